"""Attention that knows the structure of a GRPO batch, as a transformers attention implementation.

A GRPO batch is groups of completions of one prompt. Two places compute attention over it with work
that the structure makes unnecessary:

- **Decoding over a shared prompt.** Each group's prompt is prefilled once, but a plain KV cache then
  holds a copy of the prompt's keys and values for every completion, and every decoding step reads all
  of the copies (on the embedded model, 8 completions per prompt: 8x the reads, and most of a step's
  time). ``PrefixKV`` keeps the prompt's keys and values once per group; each step scores a group's
  queries against them together (one matrix product per group) and each row's own completion keys
  apart, with one softmax over both.

- **Packed rows** (``packing``: a micro-batch's prompts and completions in rows without padding). A
  dense mask over a packed row scores every query against every key of the row, though a completion
  sees only its prompt and itself: attention grows with the row's length squared, so rows were kept
  short and padded. ``Segments`` runs each sequence's attention on its own keys: each prompt causally
  over itself, each completion over its prompt and causally over itself (completions of similar length
  batched together), so that the whole micro-batch can be one row with no padding at all.

Calls with neither structure are transformers' ``sdpa`` unchanged. The implementation is registered with
transformers under ``NAME`` (``register``); ``enable`` switches a model to it, only for architectures
whose every layer is plain full attention (no sliding window, no soft-capping, no attention sinks, no
linear-attention layers), and the structured forms are asked for by keyword arguments of the model's
forward, which transformers passes down to the attention function.

Results equal the unstructured computation's up to rounding (``tests/test_attention.py``).
"""
from __future__ import annotations

from typing import Optional

import torch

NAME = "grpo_sdpa"
# a keyword argument of the forward for the last layer alone (``last_layer.keys_values``): the attention
# calls of the other layers receive it too, and drop it
KEYS_VALUES_ONLY = "last_layer_keys_values_only"


def stand_in_mask(rows: int, queries: int, keys: int, device, dtype=torch.float32) -> torch.Tensor:
    """A 4D attention mask [rows, 1, queries, keys] of zeros held in one element (an expanded view), for
    the forwards whose attention is structured: transformers passes a 4D mask to the attention function
    as given (no mask is built), and the structured forms read none."""
    return torch.zeros(1, 1, 1, 1, dtype=dtype, device=device).expand(rows, 1, queries, keys)


def _repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """[B, Hkv, L, D] -> [B, Hkv * n_rep, L, D], each key/value head repeated for its query heads."""
    if n_rep == 1:
        return x
    B, H, L, D = x.shape
    return x[:, :, None].expand(B, H, n_rep, L, D).reshape(B, H * n_rep, L, D)


class PrefixKV:
    """The keys and values of each group's prompt, held once per group, for decoding its completions.

    ``cache``: the prefill's transformers cache over the R distinct prompts (left-padded, without their
    last token; each layer's keys/values [R, Hkv, P, D]); ``mask`` [R, P]: 1 at the prompt's real
    positions; ``counts`` [R]: the completions of each prompt, whose rows follow one another in the
    decoding batch. ``select(live)`` keeps the rows ``live`` (in order), as the decoding loop drops
    finished rows."""

    def __init__(self, cache, mask: torch.Tensor, counts: torch.Tensor):
        layers = cache.layers
        self.keys = [layer.keys for layer in layers]
        self.values = [layer.values for layer in layers]
        dtype = self.keys[0].dtype
        self.bias = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(
            ~mask.bool(), torch.finfo(dtype).min)[:, None, None, :]             # [R, 1, 1, P]
        self.groups = mask.shape[0]
        self.group = torch.repeat_interleave(torch.arange(self.groups, device=mask.device), counts.to(mask.device))
        self._index()

    def _index(self) -> None:
        counts = torch.bincount(self.group, minlength=self.groups)
        starts = counts.cumsum(0) - counts
        self.width = max(int(counts.max()), 1) if self.group.numel() else 1
        slot = torch.arange(self.group.numel(), device=self.group.device) - starts[self.group]
        self.flat = self.group * self.width + slot     # each row's place in the [groups * width] layout
        self.full = self.group.numel() == self.groups * self.width   # every slot filled: rows are the layout

    def select(self, live: torch.Tensor) -> None:
        self.group = self.group[live]
        self._index()

    def _grouped(self, x: torch.Tensor, n_rep: int) -> torch.Tensor:
        """Rows [B, H, T, X] -> [groups, Hkv, n_rep * width * T, X] (empty slots zero)."""
        B, H, T, X = x.shape
        if self.full:
            out = x
        else:
            out = x.new_zeros(self.groups * self.width, H, T, X)
            out[self.flat] = x
        return (out.reshape(self.groups, self.width, H // n_rep, n_rep, T, X).permute(0, 2, 3, 1, 4, 5)
                .reshape(self.groups, H // n_rep, n_rep * self.width * T, X))

    def _rows(self, x: torch.Tensor, n_rep: int, T: int) -> torch.Tensor:
        """The inverse of ``_grouped``: [groups, Hkv, n_rep * width * T, X] -> rows [B, H, T, X]."""
        G, Hkv, _, X = x.shape
        x = x.view(G, Hkv, n_rep, self.width, T, X).permute(0, 3, 1, 2, 4, 5).reshape(G * self.width, Hkv * n_rep, T, X)
        return x if self.full else x[self.flat]


def prefix_attention(layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, prefix: PrefixKV,
                     scaling: float, dropout: float = 0.0) -> torch.Tensor:
    """Attention of ``query`` [B, H, T, D] over its group's prompt (``prefix``, its layer ``layer``) and its
    own keys/values [B, Hkv, S, D] (the completion so far; the last T are the queries' own, causal among
    themselves); ``dropout``: the attention dropout of a module in training mode. Returns [B, T, H, D]
    as transformers' attention functions do."""
    B, H, T, D = query.shape
    S = key.shape[2]
    kp, vp = prefix.keys[layer], prefix.values[layer]
    n_rep = H // kp.shape[1]
    P = kp.shape[2]
    # scores against the prompt: one product per group, over all of the group's queries
    sp = torch.matmul(prefix._grouped(query, n_rep), kp.transpose(-1, -2)) * scaling + prefix.bias
    sp = prefix._rows(sp, n_rep, T)                                            # [B, H, T, P]
    k, v = _repeat_kv(key, n_rep), _repeat_kv(value, n_rep)
    ss = torch.matmul(query, k.transpose(-1, -2)) * scaling                    # [B, H, T, S]
    if T > 1:  # query i sits at position S - T + i of the completion
        hidden = torch.ones(T, S, dtype=torch.bool, device=query.device).triu(S - T + 1)
        ss = ss.masked_fill(hidden, torch.finfo(ss.dtype).min)
    w = torch.cat([sp, ss], dim=-1).softmax(-1, dtype=torch.promote_types(query.dtype, torch.float32)).to(query.dtype)
    if dropout:
        w = torch.nn.functional.dropout(w, p=dropout)
    wp, ws = w.split([P, S], dim=-1)
    out = prefix._rows(torch.matmul(prefix._grouped(wp, n_rep), vp), n_rep, T) + torch.matmul(ws, v)
    return out.transpose(1, 2).contiguous()


# The packed forward's completions are batched by length: at most this many batches, so that padding a
# completion to the longest of its batch wastes little and the calls stay few.
MAX_BUCKETS = 4


class Segments:
    """Which keys each query of packed rows attends to, as index tensors built once per forward.

    ``units``: per unit, (flat position of its prompt's first token, prompt length, [(flat position of a
    completion's first token, its length), ...]), flat positions counting over the rows ([R * L]); a
    prompt token attends to its prompt's earlier tokens, a completion token to its whole prompt and its
    completion's earlier tokens. ``total``: R * L; positions in no unit (a row's padding) get output 0."""

    def __init__(self, units: list[tuple[int, int, list[tuple[int, int]]]], total: int, device):
        starts = torch.tensor([start for start, _, _ in units])
        plens = torch.tensor([plen for _, plen, _ in units])
        P = int(plens.max())
        self.prompt_valid = torch.arange(P)[None, :] < plens[:, None]                    # [U, P], left-aligned
        self.prompt_index = (starts[:, None] + torch.arange(P)[None, :]) * self.prompt_valid
        completions = sorted(((u, c, n) for u, (_, _, comps) in enumerate(units) for c, n in comps if n > 0),
                             key=lambda x: x[2])
        # one attention call for the prompts, then one per batch of completions; each call's queries and
        # keys are gathered from the flat positions by one index_select over all calls (so the backward
        # adds each gradient into one buffer), and the outputs, concatenated with their padding, are put
        # back in place by one gather (``inverse``)
        queries, keys_of = [self.prompt_index], [self.prompt_index]
        real = [self.prompt_valid]
        self.buckets = []
        for part in _buckets(completions, P):
            units_of = torch.tensor([u for u, _, _ in part])
            cstart = torch.tensor([c for _, c, _ in part])
            clen = torch.tensor([n for _, _, n in part])
            N, Pb = int(clen.max()), int(plens[units_of].max())
            valid = torch.arange(N)[None, :] < clen[:, None]                               # [C, N]
            index = (cstart[:, None] + torch.arange(N)[None, :]) * valid
            keys = torch.cat([self.prompt_index[units_of, :Pb], index], dim=1)              # [C, Pb + N]
            own = torch.ones(N, N, dtype=torch.bool).tril()
            mask = torch.cat([self.prompt_valid[units_of, :Pb][:, None, :].expand(-1, N, -1),
                              own[None] & valid[:, None, :]], dim=2)                       # [C, N, Pb + N]
            self.buckets.append((index.to(device), valid.to(device), keys.to(device), mask[:, None].to(device)))
            queries.append(index)
            keys_of.append(keys)
            real.append(valid)
        self.query_shapes = [tuple(x.shape) for x in queries]
        self.key_shapes = [tuple(x.shape) for x in keys_of]
        query_index = torch.cat([x.reshape(-1) for x in queries])
        # the positions whose outputs are used (``tail_attention``): each prompt's last token, which sees its
        # whole prompt, then the completions' tokens as the buckets hold them; ``keep``: the real ones, in
        # the order of the outputs
        tail = [(starts + plens - 1)[:, None]] + queries[1:]
        self.tail_shapes = [tuple(x.shape) for x in tail]
        tail_index = torch.cat([x.reshape(-1) for x in tail])
        tail_real = torch.cat([torch.ones(len(units), dtype=torch.bool)] + [x.reshape(-1) for x in real[1:]])
        self.tail_index, self.tail_real = tail_index.to(device), tail_real.to(device)
        self.keep = tail_index[tail_real].to(device)
        self.prompt_end_mask = self.prompt_valid[:, None, None, :].to(device)             # [U, 1, 1, P]
        # the inverse: flat position -> its row in the concatenated outputs (padding: the zero row after them)
        real = torch.cat([x.reshape(-1) for x in real])
        self.zero_row = len(real)
        inverse = torch.full((total,), self.zero_row, dtype=torch.long)
        inverse[query_index[real]] = torch.arange(len(real))[real]
        self.inverse, self.query_index = inverse.to(device), query_index.to(device)
        self.key_index = torch.cat([x.reshape(-1) for x in keys_of]).to(device)
        self.prompt_index, self.prompt_valid = self.prompt_index.to(device), self.prompt_valid.to(device)


def _buckets(completions: list[tuple[int, int, int]], prompt: int) -> list[list[tuple[int, int, int]]]:
    """Completions sorted by length, cut into at most MAX_BUCKETS runs that minimise the padded work (each
    run padded to its longest; a completion's work ~ its padded length x (prompt + padded length)): a
    dynamic programme over the cut positions, one vectorised minimum per run."""
    n = len(completions)
    if n == 0:
        return []
    longest = torch.tensor([x[2] for x in completions], dtype=torch.float64)   # sorted: run i..j-1's longest is j-1's
    i, j = torch.arange(n + 1)[:, None], torch.arange(n + 1)[None, :]
    per_row = (longest * (prompt + longest))[(j - 1).clamp(min=0)]          # [1, n + 1]: the run ending at j
    cost = torch.where(i < j, (j - i) * per_row, torch.tensor(float("inf"), dtype=torch.float64))
    best = torch.full((n + 1,), float("inf"), dtype=torch.float64)
    best[0] = 0.0
    choices, finals = [], []
    for _ in range(min(MAX_BUCKETS, n)):
        total = best[:, None] + cost                                          # [from i, to j]
        best, arg = total.min(dim=0)
        choices.append(arg)
        finals.append(float(best[n]))
    runs = min(range(len(finals)), key=lambda r: finals[r]) + 1
    cuts, end = [], n
    for r in range(runs - 1, -1, -1):
        cuts.append(end)
        end = int(choices[r][end])
    bounds = [0] + cuts[::-1]
    return [completions[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


def _segment_calls(queries: torch.Tensor, query_shapes: list, prompt_mask: Optional[torch.Tensor], k: torch.Tensor,
                   v: torch.Tensor, segments: Segments, scaling: float, dropout: float) -> torch.Tensor:
    """The attention calls of ``segments``: the prompts' (``prompt_mask``, or causal where None), then each
    bucket of completions'; ``queries`` [Q, H, D] gathered for the calls (``query_shapes``), keys and values
    [R * L, Hkv, D] at every flat position. Returns the calls' outputs [Q, H, D], concatenated."""
    H, D = queries.shape[1:]
    n_rep = H // k.shape[1]
    Q = queries.split([a * b for a, b in query_shapes])
    K = k.index_select(0, segments.key_index).split([a * b for a, b in segments.key_shapes])
    V = v.index_select(0, segments.key_index).split([a * b for a, b in segments.key_shapes])
    masks = [prompt_mask] + [mask for _, _, _, mask in segments.buckets]
    outs = []
    for Qi, Ki, Vi, qs, ks, mask in zip(Q, K, V, query_shapes, segments.key_shapes, masks):
        Qi = Qi.view(*qs, H, D).transpose(1, 2)
        Ki, Vi = (_repeat_kv(t.view(*ks, -1, D).transpose(1, 2), n_rep) for t in (Ki, Vi))
        out = torch.nn.functional.scaled_dot_product_attention(Qi, Ki, Vi, attn_mask=mask, dropout_p=dropout,
                                                               is_causal=mask is None, scale=scaling)
        outs.append(out.transpose(1, 2).reshape(-1, H, D))
    return torch.cat(outs)


def segment_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, segments: Segments,
                      scaling: float, dropout: float = 0.0) -> torch.Tensor:
    """Attention of packed rows ``query`` [R, H, L, D] over ``key``/``value`` [R, Hkv, L, D] within each
    sequence (``segments``). Returns [R, L, H, D] as transformers' attention functions do."""
    R, H, L, D = query.shape
    q = query.transpose(1, 2).reshape(R * L, H, D)
    k = key.transpose(1, 2).reshape(R * L, -1, D)
    v = value.transpose(1, 2).reshape(R * L, -1, D)
    out = _segment_calls(q.index_select(0, segments.query_index), segments.query_shapes, None, k, v, segments,
                         scaling, dropout if module.training else 0.0)
    return torch.cat([out, q.new_zeros(1, H, D)])[segments.inverse].view(R, L, H, D)


def tail_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, segments: Segments, scaling: float,
                   dropout: float = 0.0) -> torch.Tensor:
    """Attention at the used positions only (``Segments.keep``): ``query`` [Q, H, D] at ``segments.tail_index``
    (padding slots included), ``key``/``value`` [R * L, Hkv, D] at every flat position. Returns [K, H, D] in
    the order of ``keep``: a prompt's last token over its prompt, a completion's tokens as in
    ``segment_attention``."""
    out = _segment_calls(query, segments.tail_shapes, segments.prompt_end_mask, key, value, segments, scaling,
                         dropout)
    return out[segments.tail_real]


def attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: Optional[float] = None,
              prefix: Optional[PrefixKV] = None, segments: Optional[Segments] = None, **kwargs):
    """The registered implementation: a structured form when its keyword argument is given, else sdpa."""
    kwargs.pop(KEYS_VALUES_ONLY, None)
    if prefix is not None or segments is not None:
        _structured_ok(kwargs)
        scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
        if segments is not None:
            return segment_attention(module, query, key, value, segments, scaling, dropout), None
        return prefix_attention(module.layer_idx, query, key, value, prefix, scaling,
                                dropout if module.training else 0.0), None
    return _SDPA(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                 **kwargs)


def _structured_ok(kwargs: dict) -> None:
    if kwargs.get("sliding_window") is not None or kwargs.get("s_aux") is not None or kwargs.get("softcap"):
        raise ValueError("grpo_scale.attention: the structured attention does not support sliding windows, "
                         "attention sinks or soft-capping; this model should not have been switched to it")


_SDPA = None  # transformers' sdpa attention function, set by ``register``


def register() -> None:
    """Registers ``NAME`` with transformers (attention function, and sdpa's masks)."""
    global _SDPA
    if _SDPA is not None:
        return
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
    AttentionInterface.register(NAME, attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)
    _SDPA = sdpa_attention_forward


def supported(config) -> Optional[str]:
    """None when a model with this transformers config can use ``NAME``, else why not."""
    impl = getattr(config, "_attn_implementation", None)
    if impl not in ("sdpa", NAME):
        return f"its attention implementation is {impl!r} (sdpa is needed)"
    types = getattr(config, "layer_types", None)
    if types is not None and any(t != "full_attention" for t in types):
        return "it has layers other than full attention (" + ", ".join(sorted(set(types))) + ")"
    if types is None and getattr(config, "sliding_window", None) is not None and getattr(config, "use_sliding_window", True):
        return "it uses a sliding window"
    for name in ("attn_logit_softcapping", "attention_chunk_size"):
        if getattr(config, name, None):
            return f"its config sets {name}"
    if getattr(config, "is_encoder_decoder", False):
        return "it is an encoder-decoder model"
    return None


def enable(model) -> bool:
    """Switches ``model`` (a transformers model, or a peft or DeepSpeed wrapper of one) to ``NAME`` when
    ``supported``; returns whether it uses it."""
    inner = getattr(model, "module", model)
    config = getattr(inner, "config", None)
    if config is None or supported(config) is not None:
        return False
    register()
    config._attn_implementation = NAME
    return True


def disable(model) -> None:
    """Back to plain sdpa (the model behaves as before ``enable``)."""
    config = getattr(getattr(model, "module", model), "config", None)
    if config is not None and getattr(config, "_attn_implementation", None) == NAME:
        config._attn_implementation = "sdpa"


def enabled(model) -> bool:
    config = getattr(getattr(model, "module", model), "config", None)
    return getattr(config, "_attn_implementation", None) == NAME
