"""The shape-free part of a checkpoint: CHECKPOINT/portable/.

Accelerate's and DeepSpeed's files in a checkpoint are laid out per process (ZeRO shards, one optimiser
partition per rank), so they load only into a run with the same number of processes and ZeRO stage. Beside
them every checkpoint holds, per trainable parameter and under the model's own parameter names:

- ``weights.safetensors``: the full fp32 weights (DeepSpeed's fp32 master copy where it keeps one);
- ``exp_avg.safetensors``, ``exp_avg_sq.safetensors``: AdamW's moments, whole;
- ``portable.json``: AdamW's step count, the learning-rate scheduler's state, the names and what wrote them.

They are gathered with DeepSpeed's own accessors for ZeRO fragments (``safe_get_full_fp32_param``,
``safe_get_full_optimizer_state``), one parameter at a time, and written by the local main process of every
node (so a node that does not share the output file system has its own copy). Loading sets the fp32
master copy, the moments and the step through the matching setters, and the module's own weights (the
low-precision copy DeepSpeed computes with, partitioned under ZeRO-3) from the same values. With LoRA the
trainable parameters are the adapter's; the frozen base comes from the model the run names.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional

import torch

logger = logging.getLogger(__name__)

DIR = "portable"
META = "portable.json"
WEIGHTS, MOMENTS = "weights", ("exp_avg", "exp_avg_sq")
VERSION = 1


def trainable(model) -> list[tuple[str, torch.nn.Parameter]]:
    """(name, parameter) of the trainable parameters of the plain module, in module order."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def _wrappers(optimizer) -> list:
    """The optimizer and everything it wraps: Accelerate's wrapper, DeepSpeed's ZeRO optimizer, torch's."""
    chain = [optimizer]
    while hasattr(chain[-1], "optimizer"):
        chain.append(chain[-1].optimizer)
    return chain


def inner_optimizer(optimizer):
    """The torch optimizer under Accelerate's and DeepSpeed's wrappers (it holds the state dicts)."""
    return _wrappers(optimizer)[-1]


def _ensure_adam_state(optimizer) -> None:
    """AdamW's state for every parameter it steps (torch creates it lazily at the first step, and
    DeepSpeed's ZeRO-1/2 links its fragments to it only then): zero moments, so that they can be set."""
    chain = _wrappers(optimizer)
    inner = chain[-1]
    # ZeRO steps its flat fp32 partitions (stage 3 puts them into param_groups only while it steps)
    stepped = [p for w in chain for attr in ("fp32_partitioned_groups_flat", "single_partition_of_fp32_groups")
               for p in getattr(w, attr, [])]
    for p in stepped or [p for group in inner.param_groups for p in group["params"]]:
        state = inner.state[p]
        if "exp_avg" not in state:
            state["step"] = torch.tensor(0.0)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    for wrapper in chain:
        if hasattr(wrapper, "_lazy_init_hp_params_optimizer_state"):
            wrapper._lazy_init_hp_params_optimizer_state()


def adam_step(optimizer) -> int:
    """The optimiser's step count (AdamW keeps one per parameter, or per ZeRO partition; all equal)."""
    steps = [int(s["step"]) for s in inner_optimizer(optimizer).state.values() if "step" in s]
    return max(steps, default=0)


def _ds(param) -> bool:
    """Whether DeepSpeed holds this parameter's fp32 copy and moments in ZeRO fragments."""
    return hasattr(param, "ds_id") or hasattr(param, "_hp_mapping")


def gather(model, optimizer) -> tuple[dict, dict, int]:
    """({"weights"|"exp_avg"|"exp_avg_sq": {name: full fp32 tensor on CPU}}, {name: shape}, step).

    Collective under DeepSpeed (every rank calls it, in the same order); every rank gets the whole state.
    Moments are empty before the first optimiser step (AdamW creates them lazily).
    """
    opt = inner_optimizer(optimizer)
    step = adam_step(optimizer)
    out = {WEIGHTS: {}, **{k: {} for k in MOMENTS}}
    shapes = {}
    for name, p in trainable(model):
        shapes[name] = list(getattr(p, "ds_shape", p.shape))
        if _ds(p):
            from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state
            out[WEIGHTS][name] = safe_get_full_fp32_param(p).detach().float().cpu()
            for k in MOMENTS:
                if step:
                    out[k][name] = safe_get_full_optimizer_state(p, k).detach().float().cpu()
        else:
            out[WEIGHTS][name] = p.detach().float().cpu().clone()
            state = opt.state.get(p, {})
            for k in MOMENTS:
                if k in state:
                    out[k][name] = state[k].detach().float().cpu().clone()
        for k in (WEIGHTS, *MOMENTS):
            if name in out[k]:
                out[k][name] = out[k][name].reshape(shapes[name]).contiguous()
    return out, shapes, step


def write(folder: Path, tensors: dict, meta: dict) -> None:
    """Write the gathered state into ``folder/portable`` (the caller's process only)."""
    from safetensors.torch import save_file
    d = Path(folder) / DIR
    d.mkdir(parents=True, exist_ok=True)
    for key, values in tensors.items():
        if values:
            save_file(values, str(d / f"{key}.safetensors"))
    (d / META).write_text(json.dumps({"version": VERSION, **meta}, indent=1))


def scheduler_state(scheduler) -> dict:
    """A LambdaLR's state as JSON (the lambdas themselves are code, rebuilt from the config)."""
    state = scheduler.state_dict()
    state["lr_lambdas"] = [None] * len(state.get("lr_lambdas", []))
    return json.loads(json.dumps(state))


def has(folder: Path) -> bool:
    return (Path(folder) / DIR / META).is_file() and (Path(folder) / DIR / f"{WEIGHTS}.safetensors").is_file()


def read_meta(folder: Path) -> dict:
    return json.loads((Path(folder) / DIR / META).read_text())


def read(folder: Path, key: str) -> dict[str, torch.Tensor]:
    """One of the state files as {name: tensor}; {} when it was not written (no optimiser step yet)."""
    from safetensors.torch import load_file
    f = Path(folder) / DIR / f"{key}.safetensors"
    return load_file(str(f)) if f.is_file() else {}


def shape_differences(saved: dict, want: dict) -> Optional[str]:
    """None when ``saved`` and ``want`` ({name: shape}) hold the same names with the same shapes, else what
    differs: names missing from ``saved``, unexpected in it, or of another shape (three of each at most)."""
    missing, extra = sorted(want.keys() - saved.keys()), sorted(saved.keys() - want.keys())
    reshaped = sorted(k for k in want.keys() & saved.keys() if list(want[k]) != list(saved[k]))
    problems = [f"{what} {names[:3]}{'...' if len(names) > 3 else ''}" for what, names in
                (("missing", missing), ("unexpected", extra), ("of another shape", reshaped)) if names]
    return "; ".join(problems) or None


def check_names(folder: Path, model) -> Optional[str]:
    """None when the portable state holds exactly the trainable parameters of ``model`` with their shapes,
    else what differs (a changed model or LoRA settings)."""
    want = {n: list(getattr(p, "ds_shape", p.shape)) for n, p in trainable(model)}
    return shape_differences(read_meta(folder)["shapes"], want)


@torch.no_grad()
def load(folder: Path, model, optimizer) -> int:
    """Set the trainable weights (fp32 master copy and module weights), AdamW's moments and step from
    ``folder/portable``. Collective under ZeRO-3 (every rank, same order). Returns the step count."""
    meta = read_meta(folder)
    step = int(meta["adam_step"])
    weights = read(folder, WEIGHTS)
    moments = {k: read(folder, k) for k in MOMENTS}
    opt = inner_optimizer(optimizer)
    if step:
        _ensure_adam_state(optimizer)
    for name, p in trainable(model):
        value = weights[name]
        _set_module_weight(p, value)
        if _ds(p):
            from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state
            safe_set_full_fp32_param(p, value.to(p.device))
            if step:
                for k in MOMENTS:
                    safe_set_full_optimizer_state(p, moments[k][name].to(p.device), k)
        elif step:
            for k in MOMENTS:
                opt.state[p][k].copy_(moments[k][name].reshape(p.shape))
    for state in opt.state.values():  # DeepSpeed's partitions (and the parameters set above)
        if "step" in state:
            old = state["step"]
            state["step"] = old.new_tensor(float(step)) if torch.is_tensor(old) else step
    return step


def _set_module_weight(p, value: torch.Tensor) -> None:
    """The module's own copy of a weight: whole on every rank, or ZeRO-3's partition of it."""
    if hasattr(p, "ds_id"):
        import deepspeed
        with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
            if torch.distributed.get_rank() == 0:
                p.data.copy_(value.reshape(p.shape).to(p.dtype))
    else:
        p.data.copy_(value.reshape(p.shape).to(device=p.device, dtype=p.dtype))
