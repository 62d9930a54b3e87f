"""Rollout: prompts -> sampled completions, masks, and group-relative advantages.

Nothing here knows about Accelerate or DeepSpeed: the trainer hands in a plain ``nn.Module`` (with its
weights gathered under ZeRO-3) and a ``gather`` function for cross-rank statistics.
"""
from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass
from typing import Optional

import torch

from grpo_scale import attention, decoding, last_layer

logger = logging.getLogger(__name__)


@dataclass
class Rollout:
    """One process's share of a generation batch. N completions, prompt length P, completion length T."""
    prompt_ids: torch.Tensor        # [N, P] left-padded
    prompt_mask: torch.Tensor       # [N, P] 1 = real token
    completion_ids: torch.Tensor    # [N, T] right-padded with pad_token_id after the first EOS
    completion_mask: torch.Tensor   # [N, T] loss mask: 1 up to and including the first EOS (0 for masked-out rows)
    attention_mask: torch.Tensor    # [N, T] 1 up to and including the first EOS, whatever the loss mask says
    is_truncated: torch.Tensor      # [N] bool: no EOS within max_completion_length
    prompts: list[str]
    completions: list[str]          # decoded without special tokens
    # [N, T] fp32: the sampler's log-prob of each sampled token, under the distribution it drew from
    # (temperature, top-k, top-p applied); 0 after the first EOS. None when not recorded.
    sampling_logps: Optional[torch.Tensor] = None

    def __len__(self) -> int:
        return self.completion_ids.shape[0]

    def select(self, idx: slice) -> "Rollout":
        lp = self.sampling_logps
        return Rollout(self.prompt_ids[idx], self.prompt_mask[idx], self.completion_ids[idx],
                       self.completion_mask[idx], self.attention_mask[idx], self.is_truncated[idx],
                       self.prompts[idx], self.completions[idx], None if lp is None else lp[idx])

    def rows(self, index: list[int]) -> "Rollout":
        """The rows at ``index``, in that order."""
        at = torch.tensor(index, dtype=torch.long, device=self.completion_ids.device)
        lp = self.sampling_logps
        return Rollout(self.prompt_ids[at], self.prompt_mask[at], self.completion_ids[at], self.completion_mask[at],
                       self.attention_mask[at], self.is_truncated[at], [self.prompts[i] for i in index],
                       [self.completions[i] for i in index], None if lp is None else lp[at])

    def trimmed(self) -> "Rollout":
        """The same rows without the columns that are padding in every row (prompts are left-padded,
        completions right-padded); at least one column of each."""
        p = max(1, int(self.prompt_mask.sum(1).max())) if len(self) else 1
        t = max(1, int(self.attention_mask.sum(1).max())) if len(self) else 1
        lp = self.sampling_logps
        return Rollout(self.prompt_ids[:, -p:], self.prompt_mask[:, -p:], self.completion_ids[:, :t],
                       self.completion_mask[:, :t], self.attention_mask[:, :t], self.is_truncated, self.prompts,
                       self.completions, None if lp is None else lp[:, :t])

    @staticmethod
    def cat(parts: list["Rollout"], pad_token_id: int) -> "Rollout":
        """Rollouts stacked row-wise: prompts left-padded and completions right-padded to the widest, with
        the pad token and masks of 0, as one generate call pads them. Sampler log-probs are kept only when
        every part has them."""
        lps = [p.sampling_logps for p in parts]
        return Rollout(pad_cat([p.prompt_ids for p in parts], pad_token_id, left=True),
                       pad_cat([p.prompt_mask for p in parts], 0, left=True),
                       pad_cat([p.completion_ids for p in parts], pad_token_id, left=False),
                       pad_cat([p.completion_mask for p in parts], 0, left=False),
                       pad_cat([p.attention_mask for p in parts], 0, left=False),
                       torch.cat([p.is_truncated for p in parts]),
                       [x for p in parts for x in p.prompts], [x for p in parts for x in p.completions],
                       None if any(lp is None for lp in lps) else pad_cat(lps, 0.0, left=False))

    def prompt_runs(self) -> torch.Tensor:
        """Lengths [R] of the runs of consecutive rows with the same prompt (ids and mask); sum N."""
        same = ((self.prompt_ids[1:] == self.prompt_ids[:-1]) & (self.prompt_mask[1:] == self.prompt_mask[:-1])).all(1)
        return run_lengths(~same)


def run_lengths(new_run: torch.Tensor) -> torch.Tensor:
    """Run lengths from the [N-1] flags 'row i+1 starts a new run' (row 0 always does)."""
    starts = torch.cat([new_run.new_ones(1), new_run]).nonzero().squeeze(1)
    ends = torch.cat([starts[1:], starts.new_tensor([new_run.numel() + 1])])
    return ends - starts


def position_ids(mask: torch.Tensor) -> torch.Tensor:
    """Position ids of a left-padded batch: 0 at each row's first real token (pads get 0)."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


# ---------------------------------------------------------------------- shared prompts
# GRPO samples num_generations completions of each prompt. Causal attention makes a prompt's keys and
# values independent of what follows, so a group's prompt is run once and its KV cache copied to the
# group's rows: once in generation (prefill), once in every log-prob forward (policy, old, reference),
# where the gradient of the copies sums back into the one prompt pass. Values are those of the full
# forward up to rounding; the prompt's share of the compute falls by the group size.

def _accepts(model, name: str) -> bool:
    """Whether the forward of ``model`` (or of the module a DeepSpeed engine or DDP wraps) takes ``name``."""
    return name in inspect.signature(getattr(model, "module", model).forward).parameters


def cache_argument(model) -> str:
    """The keyword a transformers model takes its KV cache under: ``cache`` (recent transformers) or
    ``past_key_values`` (older); outputs return it under the same name."""
    return "cache" if _accepts(model, "cache") else "past_key_values"


class CacheNotRepeatable(RuntimeError):
    """The model's KV cache cannot be repeated or selected by row (see ``repeatable_cache``)."""

    def __init__(self, cache):
        self.kinds = ", ".join(sorted({type(layer).__name__ for layer in getattr(cache, "layers", [])})
                               or [type(cache).__name__])
        super().__init__(f"share_prompt: the KV cache of this model ({self.kinds}) cannot be repeated for each "
                         "completion of a group; set share_prompt: false")


def repeatable_cache(cache) -> bool:
    """Whether every layer of ``cache`` holds only keys and values (transformers' DynamicLayer family, which
    repeats and selects rows, indexer keys included). Linear-attention and hybrid layers (conv and
    recurrent states), SSM caches, quantized layers and legacy tuples do not qualify."""
    from transformers import cache_utils
    layers = getattr(cache, "layers", None)
    if not layers or not hasattr(cache_utils, "DynamicLayer"):
        return False
    excluded = tuple(getattr(cache_utils, name) for name in ("LinearAttentionCacheLayerMixin", "BaseQuantizedLayer")
                     if hasattr(cache_utils, name))
    return all(isinstance(layer, cache_utils.DynamicLayer) and not isinstance(layer, excluded) for layer in layers)


def prefill(model, ids: torch.Tensor, mask: torch.Tensor, counts: Optional[torch.Tensor], cache_kw: str,
            keys_values_only: bool = False):
    """Runs the prompts ``ids``/``mask`` [R, P'] once (``model`` a causal LM or its decoder) and returns
    their KV cache with row r repeated counts[r] times (not repeated: None), or None when the model returns no cache
    (gradient checkpointing in training mode, where transformers turns it off). Raises
    ``CacheNotRepeatable`` for a cache whose rows cannot be repeated. ``keys_values_only``: the last layer
    computes its keys and values alone (``last_layer.keys_values``; a model ``last_layer.enabled``)."""
    extra = {"logits_to_keep": 1} if _accepts(model, "logits_to_keep") else {}
    if keys_values_only:
        extra[last_layer.KEYS_VALUES_ONLY] = True
    out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask), use_cache=True, **extra)
    cache = getattr(out, cache_kw, None)
    if cache is None:
        return None
    if not repeatable_cache(cache):
        raise CacheNotRepeatable(cache)
    if counts is not None:
        cache.batch_repeat_interleave(counts)  # torch.repeat_interleave takes per-row counts
    return cache


def _prompt(rb: Rollout) -> tuple[torch.Tensor, torch.Tensor]:
    """rb's prompt ids and mask without the left-padding columns common to all its rows (a micro-batch
    keeps the width of its whole generation batch)."""
    start = min(int(rb.prompt_mask.any(dim=0).int().argmax()), rb.prompt_mask.shape[1] - 1)
    return rb.prompt_ids[:, start:], rb.prompt_mask[:, start:]


def full_inputs(rb: Rollout) -> dict:
    """Prompt + completion ids [N, P+T], attention mask and the position ids generation used; outputs at
    the last T+1 positions but one predict the T completion tokens."""
    ids, mask = _prompt(rb)
    attn = torch.cat([mask, rb.attention_mask], dim=1)
    return {"input_ids": torch.cat([ids, rb.completion_ids], dim=1), "attention_mask": attn,
            "position_ids": position_ids(attn)}


def can_share_prompt(rb: Rollout) -> bool:
    """Whether ``shared_prompt_inputs`` has a prompt to share in ``rb``: some prompt is repeated and the
    prompts (without their common left padding) are longer than one token."""
    return len(rb.prompt_runs()) < len(rb) and _prompt(rb)[0].shape[1] >= 2


def shared_prompt_inputs(rb: Rollout, prefix_model, cache_kw: str) -> Optional[dict]:
    """Inputs [N, T] whose outputs at all T positions predict the T completion tokens: each run of rows
    with the same prompt is run once through ``prefix_model`` (all prompt tokens but the last), and the
    rows are fed the last prompt token and their completions but the last token, on the expanded cache.
    None when no prompt is shared (nothing to save), every prompt is one token long, or no cache came
    back: use ``full_inputs``. Raises ``CacheNotRepeatable`` for a model whose cache rows cannot be
    repeated."""
    if not can_share_prompt(rb):
        return None
    counts = rb.prompt_runs()
    ids, mask = _prompt(rb)
    first = counts.cumsum(0) - counts
    cache = prefill(prefix_model, ids[first, :-1], mask[first, :-1], counts, cache_kw)
    if cache is None:
        return None
    T = rb.completion_ids.shape[1]
    attn = torch.cat([mask, rb.attention_mask[:, :-1]], dim=1)
    return {"input_ids": torch.cat([ids[:, -1:], rb.completion_ids[:, :-1]], dim=1),
            "attention_mask": attn, "position_ids": position_ids(attn)[:, -T:], cache_kw: cache, "use_cache": True}


def tokenize_prompts(tokenizer, prompts: list[str], max_prompt_length: Optional[int], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded [N, P] ids and mask; prompts over max_prompt_length keep their last tokens."""
    tokenizer.padding_side = "left"
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    if max_prompt_length is not None and ids.shape[1] > max_prompt_length:
        n_long = int((mask.sum(1) > max_prompt_length).sum())
        logger.warning("%d distinct prompt(s) longer than max_prompt_length=%d tokens were left-truncated",
                       n_long, max_prompt_length)
        ids, mask = ids[:, -max_prompt_length:], mask[:, -max_prompt_length:]
    return ids.to(device), mask.to(device)


def completion_mask_from_ids(completion_ids: torch.Tensor, eos_token_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask [N, T] long: 1 up to and including the first EOS, is_truncated [N] bool: no EOS at all)."""
    is_eos = torch.isin(completion_ids, torch.tensor(eos_token_ids, device=completion_ids.device))
    T = completion_ids.shape[1]
    has_eos = is_eos.any(dim=1)
    first_eos = torch.where(has_eos, is_eos.int().argmax(dim=1), torch.full_like(has_eos, T, dtype=torch.long))
    positions = torch.arange(T, device=completion_ids.device).expand_as(completion_ids)
    return (positions <= first_eos.unsqueeze(1)).long(), ~has_eos


def eos_ids(tokenizer, model) -> list[int]:
    ids = model.generation_config.eos_token_id if model.generation_config is not None else None
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    if not ids:
        raise ValueError("the tokenizer and model define no eos token: completions could never end")
    return ids


def pad_id(tokenizer, model) -> int:
    """The id that pads prompts and completions: the tokenizer's pad token, else the first EOS id."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids(tokenizer, model)[0]


# On a CPU, x @ W^T with a few rows x (a decoding step: one row per sequence) runs slower in the BLAS
# than the same products as (W @ x^T)^T: SmolLM2-135M, 16 rows, 2 threads, its 49,152 x 576 head 61 vs
# 29 ms, its 1536 x 576 MLP projection 0.54 vs 0.41 ms. With many rows (a training forward, a prefill)
# the usual orientation is as fast or faster, and so it is for small weights whatever the rows (the
# embedded model's 512 x 128 projection at 64 rows, 1 thread: 88 us as x @ W^T, 105 us as (W @ x^T)^T;
# SmolLM2's 192 x 576 ties): only layers with at least FEW_ROWS_MIN_WEIGHT weights switch. A fixed rule
# rather than a timing at start-up, so that every process of a run (and its resumption) rounds alike.
FEW_ROWS = 64
FEW_ROWS_MIN_WEIGHT = 2 ** 17


def linear(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``F.linear(hidden, weight, bias)``, computed as (W @ x^T)^T on a CPU for at most ``FEW_ROWS`` rows."""
    rows = hidden.numel() // max(hidden.shape[-1], 1)
    if hidden.device.type != "cpu" or rows > FEW_ROWS or rows == 0:
        return torch.nn.functional.linear(hidden, weight, bias)
    out = torch.mm(weight, hidden.reshape(rows, hidden.shape[-1]).t()).t()
    out = (out + bias if bias is not None else out).contiguous()
    return out.reshape(*hidden.shape[:-1], weight.shape[0])


def _linear_forward(self, hidden):
    return linear(hidden, self.weight, self.bias)


def few_row_linears(model: torch.nn.Module, min_weight: int = FEW_ROWS_MIN_WEIGHT) -> int:
    """Every plain ``nn.Linear`` of ``model`` (not a subclass: quantized and adapter layers keep their own)
    with at least ``min_weight`` weights computes with ``linear``; a layer whose forward was already
    replaced keeps it. Returns how many. The outputs are the same products, summed in another order."""
    import types
    n = 0
    for module in model.modules():
        if type(module) is torch.nn.Linear and "forward" not in module.__dict__ and \
                module.weight.numel() >= min_weight:
            module.forward = types.MethodType(_linear_forward, module)
            n += 1
    return n


def warp_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Sampling scores [N, V] in float32: transformers' warpers in its order, temperature, then top-k (0: off),
    then top-p (nucleus; the most likely token is always kept). Removed tokens get -inf."""
    scores = logits.float()
    if temperature != 1.0:
        scores = scores / temperature
    if top_k and top_k > 0:
        kth = torch.topk(scores, min(top_k, scores.shape[-1]), dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p < 1.0:
        ascending, order = torch.sort(scores, dim=-1)
        drop = ascending.softmax(-1).cumsum(-1) <= 1 - top_p
        drop[..., -1] = False
        scores = scores.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return scores


def draw_top_k(logits: torch.Tensor, temperature: float, top_k: int, top_p: float = 1.0
               ) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """A token per row of ``logits`` [N, V] drawn from ``warp_logits``' distribution when top-k is on, and
    its log-prob under it, from the top-k scores alone: the softmax, the nucleus and the draw run over k
    entries instead of V, and the draw is one uniform number per row (inverse of the cumulative
    distribution) instead of V exponentials (``torch.multinomial``): on the embedded model, 64 rows of 263,
    about a fifth of the time. The same distribution, other random draws than ``multinomial`` for a seed.
    None (use ``warp_logits``) when top-k is off or covers the vocabulary, or when a row's k-th score ties
    the next one (``warp_logits`` keeps every tied token)."""
    V = logits.shape[-1]
    if not top_k or top_k <= 0 or top_k >= V:
        return None
    scores = logits.float()
    if temperature != 1.0:
        scores = scores / temperature
    values, index = torch.topk(scores, top_k + 1, dim=-1)              # sorted, most likely first
    if bool((values[:, top_k] == values[:, top_k - 1]).any()):
        return None
    values, index = values[:, :top_k], index[:, :top_k]
    if top_p < 1.0:  # warp_logits' nucleus: drop the least likely while their mass is <= 1 - top_p
        probs = values.softmax(-1)
        tail = probs.flip(-1).cumsum(-1).flip(-1)                         # mass of each token and all below it
        drop = tail <= 1 - top_p
        drop[:, 0] = False
        values = values.masked_fill(drop, float("-inf"))
    logp = values.log_softmax(-1)
    cdf = logp.exp().cumsum(-1)
    u = torch.rand(len(cdf), 1, device=cdf.device, dtype=cdf.dtype) * cdf[:, -1:]
    kept = torch.isfinite(values).sum(-1, keepdim=True)                  # a prefix of the sorted entries
    pick = torch.searchsorted(cdf, u, right=True).clamp(max=kept - 1)
    return index.gather(1, pick).squeeze(1), logp.gather(1, pick).squeeze(1)


def reserve(cache, room: int) -> bool:
    """Gives each layer of a transformers ``DynamicCache`` (exactly ``DynamicLayer``) buffers with room for
    ``room`` more positions, so that each decoding step writes its keys and values in place instead of
    concatenating the whole cache again (on SmolLM2-135M, 16 rows, about a fifth of a decoding step). The
    layers keep ``keys`` / ``values`` as views of the filled part, and still select rows. False (nothing
    changed) for any other cache."""
    from transformers import cache_utils
    layers = getattr(cache, "layers", None)
    if room <= 0 or not layers or not all(type(layer) is cache_utils.DynamicLayer and layer.is_initialized
                                          for layer in layers):
        return False
    cls = _reserved_layer_class(cache_utils.DynamicLayer)
    for layer in layers:
        layer.__class__ = cls
        layer.make_room(room)
    return True


_RESERVED = {}


def _reserved_layer_class(base):
    if base not in _RESERVED:
        class ReservedLayer(base):
            """A DynamicLayer that writes new positions into preallocated buffers (see ``reserve``)."""

            def make_room(self, room: int) -> None:
                B, H, L, D = self.keys.shape
                self._k = self.keys.new_empty(B, H, L + room, D)
                self._v = self.values.new_empty(B, self.values.shape[1], L + room, self.values.shape[-1])
                self._k[:, :, :L] = self.keys
                self._v[:, :, :L] = self.values
                self._filled = L
                self._views()

            def _views(self) -> None:
                self.keys, self.values = self._k[:, :, :self._filled], self._v[:, :, :self._filled]

            def update(self, key_states, value_states, *args, **kwargs):
                n = key_states.shape[-2]
                if self._filled + n > self._k.shape[-2]:  # past the room: grow as DynamicLayer does
                    self.make_room(max(n, self._k.shape[-2]))
                self._k[:, :, self._filled:self._filled + n] = key_states
                self._v[:, :, self._filled:self._filled + n] = value_states
                self._filled += n
                self._views()
                return self.keys, self.values

            def batch_select_indices(self, indices: torch.Tensor) -> None:
                self._k, self._v = self._k[indices], self._v[indices]
                self._views()

            def batch_repeat_interleave(self, repeats) -> None:
                self._k = self._k.repeat_interleave(repeats, dim=0)
                self._v = self._v.repeat_interleave(repeats, dim=0)
                self._views()

            def crop(self, tokens_to_remove: int) -> None:
                if tokens_to_remove > 0 or not tokens_to_remove:
                    return super().crop(tokens_to_remove)
                self._filled = max(self._filled - abs(tokens_to_remove), 0)
                self._views()

        _RESERVED[base] = ReservedLayer
    return _RESERVED[base]


@torch.no_grad()
def made_up_decoding(model, vocab: int, how: str) -> Optional[list[torch.Tensor]]:
    """The float64 logits of three decoding steps of ``model`` on a small made-up batch (two prompts, one
    left-padded, with 2 and 3 completions, one row of each dropped after the second step), decoded ``how``: over
    the prompt cache repeated for each row (``"repeated"``), over an ``attention.PrefixKV`` through the
    model's forward (``"prefix"``, a model switched to ``attention.NAME``), or by ``decoding.DecodeStep``
    over the same prefix (``"weights"``; prefilled as ``generate`` prefills for it, the last layer's keys
    and values alone where ``last_layer.enabled``). None when the model returns no cache. The start-up checks
    compare two of them (``prefix_decoding_problem``, ``decoding.decoding_problem``)."""
    gen = torch.Generator().manual_seed(0)
    dev = next(model.parameters()).device
    cache_kw = cache_argument(model)
    ids = torch.randint(1, vocab, (2, 6), generator=gen).to(dev)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    counts = torch.tensor([2, 3], device=dev)
    rows, row_mask = ids.repeat_interleave(counts, dim=0), mask.repeat_interleave(counts, dim=0)
    fed = torch.randint(1, vocab, (5, 2), generator=gen).to(dev)
    keep_one = {"logits_to_keep": 1} if _accepts(model, "logits_to_keep") else {}
    prefix = step = None
    cache = prefill(model, ids[:, :-1], mask[:, :-1], counts if how == "repeated" else None, cache_kw,
                    keys_values_only=how == "weights" and last_layer.enabled(model))
    if cache is None:
        return None
    if how != "repeated":
        prefix, cache = attention.PrefixKV(cache, mask[:, :-1], counts), None
        if how == "weights":
            step = decoding.DecodeStep(model, prefix, len(rows), 3)
    inp, attn, pos, nxt = rows[:, -1:], row_mask, position_ids(row_mask)[:, -1:], fed
    out = []
    for t in range(3):
        if step is not None:
            logits = step.step(inp[:, -1], pos[:, -1])
        else:
            mask_now = attention.stand_in_mask(inp.shape[0], 1, t + 1, dev) if prefix is not None else attn
            o = model(input_ids=inp, attention_mask=mask_now, position_ids=pos, use_cache=True,
                      **({cache_kw: cache} if cache is not None else {}),
                      **({"prefix": prefix} if prefix is not None else {}), **keep_one)
            cache = getattr(o, cache_kw)
            logits = o.logits[:, -1]
        out.append(logits.double())
        if t == 1:  # rows 1 and 2 finish (DecodeStep then rebuilds its layout on 2 x 2 slots)
            live = torch.tensor([0, 3, 4], device=dev)
            for holder in (cache, prefix):
                if holder is not None:
                    (holder.batch_select_indices if holder is cache else holder.select)(live)
            if step is not None:
                step.select(live)
            attn, pos, nxt = attn[live], pos[live], nxt[live]
        inp = nxt[:, t:t + 1]
        attn, pos = torch.cat([attn, attn.new_ones(attn.shape[0], 1)], dim=1), pos + 1
    return out


def logits_differ(got: list[torch.Tensor], want: list[torch.Tensor], model, what: str,
                  tol: Optional[float] = None) -> Optional[str]:
    """None when ``got`` equals ``want`` up to rounding: ``tol`` (by default 1e-4 for a model in 32 or 64
    bits, 3e-2 in 16) relative to the logits' size; else a message naming ``what`` they differ from."""
    err = max(float((a - b).abs().max()) for a, b in zip(got, want))
    scale = 1.0 + max(float(b.abs().max()) for b in want)
    if tol is None:
        tol = 1e-4 if next(model.parameters()).dtype.itemsize >= 4 else 3e-2
    return None if err <= tol * scale else f"its logits differ from {what} by {err:.3g}"


def prefix_decoding_problem(model, vocab: int) -> Optional[str]:
    """Why decoding over an ``attention.PrefixKV`` differs, for ``model`` (switched to ``attention.NAME``),
    from decoding over the prompt cache repeated for each row (``made_up_decoding``); None when the
    logits agree up to rounding, or when the model returns no cache (nothing to share)."""
    plain = made_up_decoding(model, vocab, "repeated")
    if plain is None:
        return None
    return logits_differ(made_up_decoding(model, vocab, "prefix"), plain, model, "the repeated cache's")


@torch.no_grad()
def sample(model, ids: torch.Tensor, mask: torch.Tensor, *, cache, cache_kw: str, max_new_tokens: int,
           eos: list[int], pad: int, do_sample: bool, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
           drop_finished: bool = True, stop=None, with_logps: bool = False, prefix=None):
    """Completion ids [N, T <= max_new_tokens] for the left-padded prompts ``ids``/``mask`` [N, P], padded
    with ``pad`` after each row's first EOS: the decoding loop over the model's KV cache.

    ``cache`` holds the keys and values of ``ids[:, :-1]`` (``prefill``) or is None (the whole prompt is
    run first). Each step samples from ``warp_logits`` (or takes the argmax), as transformers' generate
    does. With ``drop_finished`` a row leaves the batch (and its cache) at its EOS, so the last steps run
    on the rows still going, and with top-k on the draw is ``draw_top_k``'s; each row's tokens follow
    the same distribution either way, but the random draws differ. Without it, finished rows are fed
    padding to the end and every draw is ``torch.multinomial`` over the vocabulary, as generate does,
    which gives generate's tokens for the same seed.

    ``stop``: a callable asked before each token; when it returns True decoding ends there (the trainer's
    pre-emption flag: the cut completions are then thrown away).

    ``with_logps``: also return the log-prob [N, T] fp32 of each chosen token under the distribution it
    was drawn from (``warp_logits``: temperature, top-k, top-p), from the logits the loop has anyway; 0
    after a row's EOS. The trainer compares them with its own (importance sampling, off-policy mask).

    ``prefix``: an ``attention.PrefixKV`` holding the prompts' keys and values (all prompt tokens but the
    last) once per group, for a model switched to ``attention.NAME``; ``cache`` is then None and the
    loop's own cache holds only the completions. Where ``decoding.enabled(model)`` (the trainer checks it
    at start-up), the steps are ``decoding.DecodeStep``'s, computed from the model's weights.
    """
    N = ids.shape[0]
    out = ids.new_full((N, max_new_tokens), pad)
    out_lp = torch.zeros(N, max_new_tokens, dtype=torch.float32, device=ids.device) if with_logps else None
    rows = torch.arange(N, device=ids.device)          # the batch row -> its row in ``out``
    done = torch.zeros(N, dtype=torch.bool, device=ids.device)
    eos_t = torch.tensor(eos, device=ids.device)
    keep_one = {"logits_to_keep": 1} if _accepts(model, "logits_to_keep") else {}
    seq, attn = ids, mask
    after_prompt = cache is not None or prefix is not None
    inp, pos = (ids[:, -1:], position_ids(mask)[:, -1:]) if after_prompt else (ids, position_ids(mask))
    structured = {"prefix": prefix} if prefix is not None else {}
    # over a prefix, a model that decoding.enabled accepts runs its steps from its weights (DecodeStep)
    lean = decoding.DecodeStep(model, prefix, N, max_new_tokens) if prefix is not None and decoding.enabled(model) \
        else None
    droppable = None  # whether rows can leave this model's cache, decided at the first step
    steps = 0
    for steps in range(1, max_new_tokens + 1):
        if lean is not None:
            scores = lean.step(inp[:, -1], pos[:, -1])
            droppable = drop_finished
        else:
            step_cache = {cache_kw: cache} if cache is not None else {}
            # with a prefix the attention needs no mask (a row sees its prompt by the prefix's mask, and all
            # of its own completion): a stand-in of the shape that costs nothing, passed through by transformers
            mask_now = attn if prefix is None else attention.stand_in_mask(inp.shape[0], inp.shape[1], steps,
                                                                           inp.device)
            o = model(input_ids=inp, attention_mask=mask_now, position_ids=pos, use_cache=True, **step_cache,
                      **structured, **keep_one)
            cache = getattr(o, cache_kw, None)
            if droppable is None:
                droppable = drop_finished and (cache is None or repeatable_cache(cache))
                reserve(cache, max_new_tokens - steps)
            scores = o.logits[:, -1]
        # dropping rows already draws other tokens than generate for a seed: the top-k draw is free to
        drawn = draw_top_k(scores, temperature, top_k, top_p) if do_sample and drop_finished else None
        if drawn is not None:
            nxt, lp = drawn
        else:
            probs = warp_logits(scores, temperature, top_k, top_p).softmax(-1) if do_sample or with_logps else None
            nxt = torch.multinomial(probs, 1).squeeze(1) if do_sample else scores.argmax(-1)
            # the drawn token's probability is > 0: its log is finite (no second pass over V)
            lp = probs.gather(1, nxt.unsqueeze(1)).squeeze(1).log() if with_logps else None
        if with_logps:
            out_lp[rows, steps - 1] = lp.masked_fill(done, 0.0)
        nxt = nxt.masked_fill(done, pad)
        out[rows, steps - 1] = nxt
        done = done | torch.isin(nxt, eos_t)
        n_done = int(done.sum())  # the step's one wait for the device
        if n_done == done.numel() or (stop is not None and stop()):
            break
        if droppable and n_done:
            live = (~done).nonzero().squeeze(1)
            rows, nxt, attn, pos, done = rows[live], nxt[live], attn[live], pos[live], done[live]
            seq = seq[live]
            if cache is not None:
                cache.batch_select_indices(live)
            if lean is not None:  # (its own layout: the prefix's bookkeeping is not read)
                lean.select(live)
            elif prefix is not None:
                prefix.select(live)
        if prefix is None:  # (a prefix step needs no mask)
            attn = torch.cat([attn, attn.new_ones(attn.shape[0], 1)], dim=1)
        pos = pos[:, -1:] + 1
        if cache is None and lean is None:  # a model without a KV cache: the whole sequence again
            seq = torch.cat([seq, nxt.unsqueeze(1)], dim=1)
            inp, pos = seq, position_ids(attn)
        else:
            inp = nxt.unsqueeze(1)
    if with_logps:
        return out[:, :steps], out_lp[:, :steps]
    return out[:, :steps]


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], *, max_prompt_length: Optional[int], max_new_tokens: int,
             do_sample: bool, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
             mask_truncated: bool = False, batch_size: Optional[int] = None, share_prompt: bool = True,
             stop=None, with_logps: bool = False) -> Rollout:
    """Sample (or greedily decode) one completion per prompt string.

    With ``share_prompt``, consecutive copies of the same prompt (a GRPO group) are prefilled once, and
    their keys and values held once (``attention.PrefixKV``, for a model switched to ``attention.NAME``)
    or the cache repeated for each copy (``CacheNotRepeatable`` when the model's cache cannot be).
    Decoding is ``sample``: top-k 0 and top-p 1 are off.

    Completions stop at the first EOS; tokens after it are padding and masked out. With
    ``mask_truncated`` the whole mask of a completion that never produced EOS is zeroed. ``with_logps``:
    the rollout carries the sampler's log-probs (see ``sample``).
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    device = next(model.parameters()).device
    eos = eos_ids(tokenizer, model)
    pad = pad_id(tokenizer, model)
    was_training = model.training
    model.eval()
    batch_size = batch_size or len(prompts)
    parts = []
    cache_kw = cache_argument(model)
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        new_run = torch.tensor([a != b for a, b in zip(chunk[1:], chunk[:-1])], dtype=torch.bool)
        counts = run_lengths(new_run).to(device)
        first = (counts.cumsum(0) - counts).tolist()
        ids, mask = tokenize_prompts(tokenizer, [chunk[i] for i in first], max_prompt_length, device)
        cache = prefix = None
        if share_prompt and len(first) < len(chunk) and ids.shape[1] > 1:
            if attention.enabled(model):  # each distinct prompt once, and its keys and values held once
                # decoded by DecodeStep (checked with this prefill): the last layer's keys and values alone
                lean = decoding.enabled(model) and last_layer.enabled(model)
                held = prefill(model, ids[:, :-1], mask[:, :-1], None, cache_kw, keys_values_only=lean)
                prefix = attention.PrefixKV(held, mask[:, :-1], counts) if held is not None else None
            else:  # each distinct prompt once, its cache repeated for its completions
                cache = prefill(model, ids[:, :-1], mask[:, :-1], counts, cache_kw)
        ids, mask = ids.repeat_interleave(counts, dim=0), mask.repeat_interleave(counts, dim=0)
        completion = sample(model, ids, mask, cache=cache, cache_kw=cache_kw, max_new_tokens=max_new_tokens,
                            eos=eos, pad=pad, do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p,
                            stop=stop, with_logps=with_logps, prefix=prefix)
        completion, logps = completion if with_logps else (completion, None)
        parts.append((ids, mask, completion, logps))
    model.train(was_training)
    return assemble(tokenizer, prompts, pad_cat([p[0] for p in parts], pad, left=True),
                    pad_cat([p[1] for p in parts], 0, left=True), pad_cat([p[2] for p in parts], pad, left=False),
                    eos=eos, pad=pad, mask_truncated=mask_truncated,
                    logps=pad_cat([p[3] for p in parts], 0.0, left=False) if with_logps else None)


def assemble(tokenizer, prompts: list[str], prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
             completion_ids: torch.Tensor, *, eos: list[int], pad: int, mask_truncated: bool,
             logps: Optional[torch.Tensor] = None) -> Rollout:
    """The Rollout of sampled tokens, whichever engine sampled them: ``completion_ids`` [N, T] as sampled
    (anything after a row's first EOS is ignored), the left-padded prompts they continue. Masks stop after
    the first EOS; with ``mask_truncated`` a completion that never produced one is masked out entirely;
    ``logps`` [N, T], the sampler's log-prob of each token, is zeroed after the first EOS."""
    completion_mask, is_truncated = completion_mask_from_ids(completion_ids, eos)
    completion_ids = completion_ids.masked_fill(completion_mask == 0, pad)
    attention_mask = completion_mask.clone()
    if mask_truncated:
        completion_mask = completion_mask * (~is_truncated).unsqueeze(1).long()
    texts = tokenizer.batch_decode(completion_ids, skip_special_tokens=False)
    completions = [_strip_special(t, tokenizer) for t in texts]
    if logps is not None:
        logps = logps.float().masked_fill(attention_mask == 0, 0.0)
    return Rollout(prompt_ids, prompt_mask, completion_ids, completion_mask, attention_mask, is_truncated,
                   list(prompts), completions, logps)


def _strip_special(text: str, tokenizer) -> str:
    """Drop pad/eos/bos text but keep added tags such as <think> that tokenizers mark special."""
    for tok in {tokenizer.pad_token, tokenizer.eos_token, tokenizer.bos_token} - {None}:
        text = text.replace(tok, "")
    return text


def pad_cat(tensors: list[torch.Tensor], value: int, left: bool, width: Optional[int] = None) -> torch.Tensor:
    """[N_i, W_i] tensors stacked row-wise, each padded with ``value`` on the left or right to ``width``
    (default: the widest)."""
    width = max(t.shape[1] for t in tensors) if width is None else width
    padded = []
    for t in tensors:
        fill = t.new_full((t.shape[0], width - t.shape[1]), value)
        padded.append(torch.cat([fill, t] if left else [t, fill], dim=1))
    return torch.cat(padded, dim=0)


def group_advantages(rewards: torch.Tensor, num_generations: int, scale: str = "group",
                     eps: float = 1e-4) -> tuple[torch.Tensor, torch.Tensor]:
    """Group-relative advantages for a whole generation batch (all ranks), rows grouped consecutively.

    rewards: [N] total reward per completion, NaN where no reward function scored it.
    Returns (advantages [N], group_std [N/G]). A_i = (r_i - mean_group) / (std + eps) with the unbiased std
    (scale='group'), the batch's std ('batch'), or no scaling ('none'). Missing rewards are left out of
    their group's statistics and get advantage 0.
    """
    if rewards.numel() % num_generations:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {num_generations}")
    r = rewards.view(-1, num_generations).double()
    valid = ~torch.isnan(r)
    n = valid.sum(1, keepdim=True).clamp(min=1)
    mean = torch.where(valid, r, 0.0).sum(1, keepdim=True) / n
    dev = torch.where(valid, r - mean, 0.0)
    std = (dev.pow(2).sum(1, keepdim=True) / (n - 1).clamp(min=1)).sqrt()
    adv = dev
    if scale == "group":
        adv = adv / (std + eps)
    elif scale == "batch":
        flat = r[valid]
        batch_std = flat.std() if flat.numel() > 1 else flat.new_tensor(0.0)
        adv = adv / (batch_std + eps)
    elif scale != "none":
        raise ValueError(f"scale_rewards must be group, batch or none, got {scale!r}")
    adv = torch.where(valid, adv, 0.0)
    return adv.view(-1).float(), std.view(-1).float()
