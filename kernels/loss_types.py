"""The loss types' registry and a run's loss settings (`LossSpec`), without torch: the configuration
imports this module, and `train.py` reports a bad setting before torch is loaded. The maths of each loss
type is in `losses.py` (its ``surrogate`` and ``aggregation`` name entries there)."""
from __future__ import annotations

import dataclasses
import numbers
from dataclasses import dataclass, field
from typing import Callable, Optional

IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")
IMPORTANCE_SAMPLING_MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")


@dataclass(frozen=True)
class LossType:
    """What one loss type is. ``surrogate`` and ``aggregation`` name entries of `SURROGATES` and
    `AGGREGATIONS`; ``params`` are its own settings (TRL's names and defaults); ``rules(spec)`` returns the
    problems of a spec for this loss type (messages that say what to change); ``kernel_id`` is the in-kernel
    surrogate of the one-launch Triton path (None: always the two-pass path)."""

    name: str
    surrogate: str
    aggregation: str
    summary: str
    params: dict = field(default_factory=dict)
    rules: Callable = lambda spec: []
    kernel_id: Optional[int] = None


def _clip_rules(spec) -> list[str]:
    if spec.delta is not None and spec.delta <= 1 + spec.epsilon_high:
        return [f"delta must be > 1 + epsilon_high = {1 + spec.epsilon_high}, got {spec.delta} (or set delta: null)"]
    return []


def _no_delta(name):
    def rules(spec) -> list[str]:
        if spec.delta is not None:
            return [f"delta (two-sided clipping) applies to the clipped loss types only, not {name}: set delta: null"]
        return []
    return rules


def _cispo_rules(spec) -> list[str]:
    out = _no_delta("cispo")(spec)
    if spec.epsilon_high <= 1:
        out.append(f"cispo reads epsilon_high as the cap of the ratio itself (TRL's epsilon_max, e.g. 5.0), not as "
                   f"1 + epsilon_high: epsilon_high = {spec.epsilon_high} caps every ratio below 1, so set it above 1")
    return out


def _sapo_rules(spec) -> list[str]:
    out = _no_delta("sapo")(spec)
    for name in ("sapo_temperature_pos", "sapo_temperature_neg"):
        if not spec.params_of(name) > 0:
            out.append(f"{name} must be > 0, got {spec.params_of(name)}")
    return out


def _vespo_rules(spec) -> list[str]:
    out = _no_delta("vespo")(spec)
    for name in ("vespo_k_pos", "vespo_k_neg"):
        if not spec.params_of(name) >= 0:
            out.append(f"{name} must be >= 0, got {spec.params_of(name)}")
    for name in ("vespo_lambda_pos", "vespo_lambda_neg"):
        if not spec.params_of(name) > 0:
            out.append(f"{name} must be > 0, got {spec.params_of(name)}")
    if spec.importance_sampling_mode in ("sequence_truncate", "sequence_mask"):
        out.append(f"vespo folds the importance-sampling weight into its sequence weight token by token: set "
                   f"importance_sampling_mode to token_truncate or token_mask, got {spec.importance_sampling_mode}")
    return out


SAPO_PARAMS = {"sapo_temperature_pos": 1.0, "sapo_temperature_neg": 1.05}
VESPO_PARAMS = {"vespo_k_pos": 2.0, "vespo_lambda_pos": 3.0, "vespo_k_neg": 3.0, "vespo_lambda_neg": 2.0}

LOSS_REGISTRY: dict[str, LossType] = {t.name: t for t in (
    LossType("grpo", "clip", "sequence_mean", "mean over sequences of each sequence's token mean",
             rules=_clip_rules, kernel_id=0),
    LossType("bnpo", "clip", "token_mean", "mean over the active tokens of the micro-batch",
             rules=_clip_rules, kernel_id=0),
    LossType("dr_grpo", "clip", "fixed", "sum / (B x max_completion_length) (Dr. GRPO)",
             rules=_clip_rules, kernel_id=0),
    LossType("dapo", "clip", "items", "sum / active tokens of the whole generation batch (DAPO)",
             rules=_clip_rules, kernel_id=0),
    LossType("luspo", "clip", "sequence_sum", "mean over sequences of each sequence's token sum (LUSPO; "
             "meant for importance_sampling_level: sequence)", rules=_clip_rules, kernel_id=0),
    LossType("cispo", "cispo", "items", "clipped, detached importance weight times A logp (CISPO, MiniMax-M1); "
             "epsilon_high is the cap", rules=_cispo_rules, kernel_id=1),
    LossType("sapo", "sapo", "sequence_mean", "soft sigmoid gate instead of the hard clip (SAPO)",
             params=SAPO_PARAMS, rules=_sapo_rules, kernel_id=2),
    LossType("vespo", "vespo", "items", "detached gamma weight of the sequence ratio times A logp (VESPO)",
             params=VESPO_PARAMS, rules=_vespo_rules),
)}
LOSS_TYPES = tuple(LOSS_REGISTRY)
ALL_PARAMS = {**SAPO_PARAMS, **VESPO_PARAMS}


def real_problem(name, value, low=None, high=None, low_open=False) -> Optional[str]:
    """What is wrong with a real-valued setting (not a real number, NaN, or outside its range), or None."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return f"{name} must be a real number, got {value!r}"
    value = float(value)
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and value > high
    if value != value or too_low or too_high:
        bracket = "(" if low_open else "["
        return (f"{name} must lie in {bracket}{'-inf' if low is None else low}, "
                f"{'inf' if high is None else high}], got {value}")
    return None


def _real(name, value, problems, low=None, high=None, low_open=False, allow_none=False):
    if value is None and allow_none:
        return None
    problem = real_problem(name, value, low, high, low_open)
    if problem:
        problems.append(problem)
    return float(value) if not problem else value


class LossSpecError(ValueError):
    """Bad loss settings; ``problems`` lists each one (a message that says what to change)."""

    def __init__(self, problems: list[str]):
        super().__init__("; ".join(problems))
        self.problems = list(problems)


@dataclass(frozen=True)
class LossSpec:
    """A run's loss settings, validated once (construction raises ValueError naming every problem).

    Field names are TRL 1.16's where TRL has them; the importance-sampling fields drop TRL's ``vllm_``
    prefix because here the sampler may be this project's own decoding loop.
    """

    loss_type: str = "grpo"
    beta: float = 0.0
    epsilon_low: float = 0.2
    epsilon_high: float = 0.2
    delta: Optional[float] = None
    temperature: float = 1.0
    importance_sampling_level: str = "token"
    max_completion_length: Optional[int] = None
    use_bias_correction_kl: bool = False
    importance_sampling_mode: Optional[str] = None  # None: no correction
    importance_sampling_clip_min: Optional[float] = None
    importance_sampling_clip_max: Optional[float] = 3.0
    off_policy_mask_threshold: Optional[float] = None
    top_entropy_quantile: float = 1.0
    entropy_coef: float = 0.0
    params: tuple = ()  # ((name, value), ...) of the loss type's own parameters; missing ones take defaults

    def __post_init__(self):
        problems = []
        if self.loss_type not in LOSS_REGISTRY:
            raise LossSpecError([f"loss_type must be one of {LOSS_TYPES}, got {self.loss_type!r}"])
        if self.importance_sampling_level not in IMPORTANCE_SAMPLING_LEVELS:
            raise LossSpecError([f"importance_sampling_level must be one of {IMPORTANCE_SAMPLING_LEVELS}, "
                                 f"got {self.importance_sampling_level!r}"])
        _real("beta", self.beta, problems, low=0.0)
        _real("epsilon_low", self.epsilon_low, problems, low=0.0, high=1.0)
        _real("epsilon_high", self.epsilon_high, problems, low=0.0)
        _real("delta", self.delta, problems, low=0.0, low_open=True, allow_none=True)
        _real("temperature", self.temperature, problems, low=0.0, low_open=True)
        m = self.max_completion_length
        if m is not None and (isinstance(m, bool) or not isinstance(m, numbers.Integral) or m <= 0):
            problems.append(f"max_completion_length must be a positive int, got {m!r}")
        if not isinstance(self.use_bias_correction_kl, bool):
            problems.append(f"use_bias_correction_kl must be true or false, got {self.use_bias_correction_kl!r}")
        mode = self.importance_sampling_mode
        if mode is not None and mode not in IMPORTANCE_SAMPLING_MODES:
            problems.append(f"importance_sampling_mode must be one of {IMPORTANCE_SAMPLING_MODES} (or null: no "
                            f"correction), got {self.importance_sampling_mode!r}")
        lo = _real("importance_sampling_clip_min", self.importance_sampling_clip_min, problems, low=0.0,
                   allow_none=True)
        hi = _real("importance_sampling_clip_max", self.importance_sampling_clip_max, problems, low=0.0,
                   allow_none=True)
        if isinstance(lo, float) and isinstance(hi, float) and lo > hi:
            problems.append(f"importance_sampling_clip_min ({lo}) is above importance_sampling_clip_max ({hi})")
        _real("off_policy_mask_threshold", self.off_policy_mask_threshold, problems, low=0.0, allow_none=True)
        _real("top_entropy_quantile", self.top_entropy_quantile, problems, low=0.0, high=1.0)
        _real("entropy_coef", self.entropy_coef, problems)
        kind = LOSS_REGISTRY[self.loss_type]
        for name, value in self.params:
            if name not in ALL_PARAMS:
                problems.append(f"{name} is not a loss parameter (known: {sorted(ALL_PARAMS)})")
            else:
                _real(name, value, problems)
        if not problems:
            problems += kind.rules(self)
        if problems:
            raise LossSpecError(problems)

    @classmethod
    def from_kwargs(cls, **kwargs) -> "LossSpec":
        """A spec from keyword arguments, the loss types' parameters (TRL's names) among them."""
        own = {f.name for f in dataclasses.fields(cls)} - {"params"}
        unknown = [k for k in kwargs if k not in own and k not in ALL_PARAMS]
        if unknown:
            raise LossSpecError([f"unknown loss setting(s) {unknown}; known: {sorted(own | set(ALL_PARAMS))}"])
        params = tuple(sorted((k, v) for k, v in kwargs.items() if k in ALL_PARAMS))
        return cls(params=params, **{k: v for k, v in kwargs.items() if k in own})

    def warnings(self) -> list[str]:
        """Settings that are valid but probably not what was meant (TRL warns about the same)."""
        out, level = [], self.importance_sampling_level
        if self.loss_type == "luspo" and level != "sequence":
            out.append("luspo is meant for importance_sampling_level: sequence (the paper's setup); it runs at "
                       "token level")
        if self.loss_type == "vespo" and level != "token":
            out.append("vespo computes its own sequence-level weight: importance_sampling_level: token is meant")
        if level == "sequence" and self.kind.aggregation in ("token_mean", "fixed", "items"):
            out.append(f"{self.loss_type} sums per-token terms, so at importance_sampling_level: sequence each "
                       "sequence weighs by its length; GSPO's setup is loss_type: grpo")
        return out

    def params_of(self, name: str) -> float:
        return float(dict(self.params).get(name, ALL_PARAMS[name]))

    def replace(self, **changes) -> "LossSpec":
        return dataclasses.replace(self, **changes)

    @property
    def kind(self) -> LossType:
        return LOSS_REGISTRY[self.loss_type]

    def one_pass(self, has_old: bool, has_sampling: bool) -> bool:
        """Whether every token's gradient weight is known after one pass over its own row (the one-launch,
        2U Triton path); else log-probs first, the objective on [B, T], then the gradient pass (3U).

        Token-level ratios, KL and token-mode importance weights need only the token's own old, reference and
        sampler values. A sequence ratio (GSPO), VESPO's summed ratio, sequence-mode importance weights, the
        off-policy mask (a mean over the sequence, unless nothing is off-policy: no old and no sampler
        log-probs, where it keeps every token) and the entropy quantile (over the batch) need a pass between.
        """
        if (self.kind.kernel_id is None or self.importance_sampling_level != "token"
                or self.top_entropy_quantile < 1.0):
            return False
        if self.off_policy_mask_threshold is not None and (has_old or has_sampling):
            return False
        mode = self.importance_sampling_mode
        return not (has_sampling and mode is not None and mode.startswith("sequence"))
