"""Benchmark inputs (`Case`) and the GRPO loss implementations compared on them (`Provider`).

Two families of inputs:
- "logits": logits [B, T, V] in, loss out; the gradient is taken with respect to the logits.
- "linear": last hidden states [B, T, H] and an lm_head weight [V, H] in; the logits are an
  intermediate (never stored by the fused-linear provider); gradients of hidden and weight.

Every provider computes the same loss (the design's contract, TRL's formulas) with the same settings:
dapo normalisation, beta = 0.04 against reference log-probs, old log-probs a little off the current
policy so that some ratios clip, every token active (the worst case for kernels that skip masked rows).
"""
from __future__ import annotations

import dataclasses
import functools
import importlib.util
from typing import Callable

import torch

LOSS_KWARGS = dict(beta=0.04, epsilon_low=0.2, epsilon_high=0.2, temperature=1.0, loss_type="dapo")
# a loss type's own settings where the shared ones do not fit (cispo's epsilon_high is the cap of the ratio)
LOSS_TYPE_KWARGS = {"cispo": {"epsilon_high": 5.0}}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclasses.dataclass
class Case:
    """One benchmark point's inputs. `logits` (logits family) or `hidden` and `weight` (linear family)."""

    family: str
    B: int
    T: int
    V: int
    H: int
    dtype: torch.dtype
    device: str
    level: str  # "token" or "sequence"
    ids: torch.Tensor  # [B, T] int64
    advantages: torch.Tensor  # [B] fp32
    mask: torch.Tensor  # [B, T] bool
    old_logps: torch.Tensor  # [B, T] fp32
    ref_logps: torch.Tensor  # [B, T] fp32
    logits: torch.Tensor | None = None  # [B, T, V]
    hidden: torch.Tensor | None = None  # [B, T, H]
    weight: torch.Tensor | None = None  # [V, H]
    loss_type: str = "dapo"

    @property
    def shape(self) -> str:
        """B, T, (H,) V; and the loss type when it is not dapo (the default of every suite)."""
        h = f"-H{self.H}" if self.family == "linear" else ""
        kind = f" {self.loss_type}" if self.loss_type != "dapo" else ""
        return f"B{self.B}-T{self.T}{h}-V{self.V}{kind}"

    @property
    def unit_bytes(self) -> int:
        """U: bytes of the logits [B, T, V] in the case's dtype (materialised or not)."""
        return self.B * self.T * self.V * torch.tensor([], dtype=self.dtype).element_size()

    def loss_kwargs(self) -> dict:
        return dict(LOSS_KWARGS, importance_sampling_level=self.level, loss_type=self.loss_type,
                    **LOSS_TYPE_KWARGS.get(self.loss_type, {}))

    def head(self, rows: int) -> "Case":
        """The same case restricted to its first `rows` sequences (for the correctness check)."""
        cut = {f: getattr(self, f)[:rows] for f in ("ids", "advantages", "mask", "old_logps", "ref_logps")}
        if self.logits is not None:
            cut["logits"] = self.logits[:rows]
        if self.hidden is not None:
            cut["hidden"] = self.hidden[:rows]
        return dataclasses.replace(self, B=rows, **cut)


def _logps_rows(logits_fn, ids: torch.Tensor) -> torch.Tensor:
    """fp32 log-probs of `ids`, one sequence at a time (no [B, T, V] fp32 temporary)."""
    rows = []
    for b in range(ids.shape[0]):
        z = logits_fn(b).float()  # [T, V]
        rows.append(z.gather(-1, ids[b].unsqueeze(-1)).squeeze(-1) - torch.logsumexp(z, dim=-1))
    return torch.stack(rows)


@torch.no_grad()
def make_case(family: str, B: int, T: int, V: int, *, H: int = 0, dtype: torch.dtype = torch.float32,
              device: str = "cpu", level: str = "token", seed: int = 0, loss_type: str = "dapo") -> Case:
    """Random inputs for one point, identical for every provider (seeded)."""
    if family not in ("logits", "linear") or min(B, T, V) < 1 or (family == "linear" and H < 1):
        raise ValueError(f"bad case: family {family!r} (logits or linear), B={B} T={T} V={V} H={H} (all >= 1; "
                         "H only for linear)")
    g = torch.Generator(device=device).manual_seed(seed)  # drawn where they live: GPU sizes are GBs
    rand = functools.partial(torch.randn, generator=g, device=device)
    ids = torch.randint(0, V, (B, T), generator=g, device=device)
    adv = rand(B)
    noise_old, noise_ref = 0.1 * rand(B, T), 0.1 * rand(B, T)
    if family == "logits":
        logits = rand(B, T, V).mul_(2.0).to(dtype)
        tensors = {"logits": logits}
        logits_fn = lambda b: logits[b]  # noqa: E731
    else:
        hidden = rand(B, T, H).to(dtype)
        weight = rand(V, H).mul_(2.0 / H ** 0.5).to(dtype)
        tensors = {"hidden": hidden, "weight": weight}
        logits_fn = lambda b: hidden[b] @ weight.t()  # noqa: E731
    logp = _logps_rows(logits_fn, ids)
    return Case(family=family, B=B, T=T, V=V, H=H if family == "linear" else 0, dtype=dtype, device=device,
                level=level, ids=ids, advantages=adv, mask=torch.ones(B, T, dtype=torch.bool, device=device),
                old_logps=logp + noise_old, ref_logps=logp + noise_ref, loss_type=loss_type, **tensors)


# ------------------------------------------------------------------------------------------------
# Providers.
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Provider:
    """A GRPO loss implementation as the benchmark drives it.

    leaves(case) -> dict of fresh leaf tensors (requires_grad) for one run;
    loss(leaves, case) -> the 0-d loss (forward, with autograd on);
    grads(leaves) -> the gradients by name ("logits", or "hidden" and "weight"), after backward.
    """

    name: str
    family: str
    loss: Callable
    leaves: Callable = None
    grads: Callable = None
    triton: bool = False  # runs Triton kernels (under the interpreter without a GPU)
    big_args: tuple = ()  # Triton arguments holding B*T*V elements (for the traffic count)
    note: str = ""

    def __post_init__(self):
        if self.leaves is None:
            self.leaves = _default_leaves(self.family)
        if self.grads is None:
            self.grads = _default_grads(self.family)


def _default_leaves(family):
    names = ("logits",) if family == "logits" else ("hidden", "weight")
    return lambda case: {n: getattr(case, n).detach().clone().requires_grad_() for n in names}


def _default_grads(family):
    names = ("logits",) if family == "logits" else ("hidden", "weight")
    return lambda leaves: {n: leaves[n].grad for n in names}


def _args(case: Case) -> tuple:
    return case.ids, case.advantages, case.mask, case.old_logps, case.ref_logps


def eager_loss(leaves: dict, case: Case) -> torch.Tensor:
    """The eager reference (logits family), or lm_head matmul + reference (linear family)."""
    from grpo_scale.kernels.reference import grpo_loss_reference

    logits = leaves["logits"] if "logits" in leaves else leaves["hidden"] @ leaves["weight"].t()
    return grpo_loss_reference(logits, *_args(case), **case.loss_kwargs()).loss


def _compiled(fn):
    """torch.compile of `fn`, built on first use (so merely listing the provider compiles nothing)."""
    holder = {}

    def run(leaves, case):
        if "fn" not in holder:
            holder["fn"] = torch.compile(fn, dynamic=False)  # one graph per shape, as timed
        return holder["fn"](leaves, case)
    return run


def _triton_loss(inplace: bool):
    def loss(leaves, case):
        from grpo_scale.kernels.grpo_loss import grpo_loss

        logits = leaves["logits"] if "logits" in leaves else leaves["hidden"] @ leaves["weight"].t()
        return grpo_loss(logits, *_args(case), inplace=inplace, **case.loss_kwargs()).loss
    return loss


def fused_linear_loss(leaves: dict, case: Case) -> torch.Tensor:
    from grpo_scale.kernels.fused_linear import fused_linear_grpo_loss

    return fused_linear_grpo_loss(leaves["hidden"], leaves["weight"], *_args(case), **case.loss_kwargs()).loss


def _liger_leaves(case: Case) -> dict:
    # Liger takes the logits of every position plus one, [B, T + 1, V], and ignores the last row.
    pad = torch.zeros(case.B, 1, case.V, dtype=case.dtype, device=case.device)
    return {"padded": torch.cat([case.logits, pad], dim=1).requires_grad_()}


def liger_loss(leaves: dict, case: Case) -> torch.Tensor:
    from liger_kernel.transformers.grpo_loss import triton_grpo_loss

    kw = case.loss_kwargs()
    loss, _ = triton_grpo_loss(
        leaves["padded"], case.old_logps, case.ref_logps, case.ids, case.advantages, case.mask.int(),
        temperature=kw["temperature"], beta=kw["beta"], eps_low=kw["epsilon_low"], eps_high=kw["epsilon_high"],
        inplace=False, loss_type=kw["loss_type"], importance_sampling_level=kw["importance_sampling_level"],
        reduce=True)
    return loss


def liger_available() -> bool:
    return importlib.util.find_spec("liger_kernel") is not None


def default_providers(family: str) -> list[Provider]:
    """The providers of a family, in the order they are reported. Liger only when installed."""
    ours = ("logits_ptr", "grad_ptr")
    if family == "logits":
        providers = [
            Provider("eager", "logits", eager_loss),
            Provider("compile", "logits", _compiled(eager_loss), note="torch.compile(reference)"),
            Provider("triton", "logits", _triton_loss(False), triton=True, big_args=ours),
            Provider("triton_inplace", "logits", _triton_loss(True), triton=True, big_args=ours,
                     note="gradient written into the logits buffer"),
        ]
        if liger_available():
            providers.append(Provider(
                "liger", "logits", liger_loss, leaves=_liger_leaves,
                grads=lambda lv: {"logits": lv["padded"].grad[:, :-1]}, triton=True,
                big_args=("LOGITS", "DLOGITS"), note="liger_kernel triton_grpo_loss, inplace=False"))
        return providers
    if family == "linear":
        return [
            Provider("eager", "linear", eager_loss, note="matmul + reference"),
            Provider("compile", "linear", _compiled(eager_loss), note="torch.compile(matmul + reference)"),
            Provider("triton", "linear", _triton_loss(True), triton=True, big_args=ours,
                     note="matmul + grpo_loss(inplace=True); matmul traffic not counted"),
            Provider("fused_linear", "linear", fused_linear_loss, triton=True, big_args=ours,
                     note="chunked matmul + kernel, logits never stored; matmul traffic not counted"),
        ]
    raise ValueError(f"family must be logits or linear, got {family!r}")
