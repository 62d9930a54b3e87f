"""Padding-free log-prob forwards: a micro-batch's sequences packed into rows without padding.

A micro-batch of N completions is right-padded to its longest completion, and its prompts are
left-padded to the longest prompt: on a real model about half of what a padded forward computes can be
padding (completions of 20 tokens beside one of 48). Packing runs only real tokens. Each packed row
holds one or more *units*: a prompt once, then completions of it, each completion's positions
restarting where the prompt ends. A 4D attention mask keeps attention within each sequence: a prompt
token sees the earlier tokens of its prompt; a completion token sees its prompt and the earlier tokens
of its own completion. With ``share`` a unit holds a group's prompt once and several of its completions
(the shared prompt, without a KV cache); without it, one prompt copy per completion.

The mask is dense, [rows, 1, L, L]: every query of a row is scored against all L keys of the row, so a
row's attention grows with L^2 while its linear layers grow with L. ``layout`` picks the rows with a
cost model: a unit of S tokens costs S * (1 + key_cost * S) (``key_cost``: a token's attention work per
key relative to its linear layers' work, from the model's shapes: ``key_cost``); a group may be split
into several units, each with its own copy of the prompt, and units are spread over R rows as evenly as
they go (largest first into the emptiest row), each row padded to the longest, with the R of lowest
total cost.

Outputs are those of the padded forward up to rounding: ``index`` [N, T] picks, for each completion
position t, the packed position whose output predicts completion token t (the prompt's last token for
t = 0); positions past a completion's end point at its prompt's last token and are masked by the loss.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class Packed:
    input_ids: torch.Tensor       # [R, L] long; rows right-padded with token 0
    position_ids: torch.Tensor    # [R, L] long; restart at each prompt, continue from it in each completion
    attention_mask: torch.Tensor  # [R, 1, L, L] additive: 0 where a query may attend, the dtype's minimum elsewhere
    index: torch.Tensor           # [N, T] long, into the flattened [R * L] positions
    real_tokens: int              # tokens that are not padding (prompt copies included)
    # with ``segments``: the sequences for attention.Segments (attention_mask is then a stand-in of
    # the right shape that costs no memory: transformers passes a 4D mask through untouched)
    segments: Optional[object] = None

    def inputs(self) -> dict:
        out = {"input_ids": self.input_ids, "position_ids": self.position_ids, "attention_mask": self.attention_mask}
        if self.segments is not None:
            out["segments"] = self.segments
        return out

    def gather(self, hidden: torch.Tensor) -> torch.Tensor:
        """[N, T, H] of the decoder's output [R, L, H]: the outputs that predict the completion tokens."""
        return hidden.reshape(-1, hidden.shape[-1])[self.index]


# Attention kernels on a CPU run at about half the rate of the matrix products of the linear layers
# (SmolLM2-135M, sdpa, 2 threads: 49 vs 100 GFLOP/s), so their work counts twice.
ATTENTION_PENALTY = 2.0


def key_cost(config) -> float:
    """A token's attention work per key it is scored against, relative to the work of its linear layers
    (projections and MLP), from a transformers config; 1 / (3 * hidden_size) when the shapes are not there."""
    H = getattr(config, "hidden_size", None)
    heads = getattr(config, "num_attention_heads", None)
    inter = getattr(config, "intermediate_size", None)
    if not (isinstance(H, int) and isinstance(heads, int) and isinstance(inter, int)):
        return 1.0 / (3 * H) if isinstance(H, int) and H > 0 else 1e-3
    hd = getattr(config, "head_dim", None) or H // heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    linear = 2 * (2 * H * heads * hd + 2 * H * kv * hd + 3 * H * inter)
    return ATTENTION_PENALTY * 4 * heads * hd / linear


def _cost(size: int, cost_per_key: float) -> float:
    return size * (1.0 + cost_per_key * size)


def spread(sizes: list[int], bins: int) -> list[list[int]]:
    """Item indices spread over ``bins`` bins, largest first into the emptiest (empty bins dropped)."""
    out, load = [[] for _ in range(bins)], [0] * bins
    for i in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        b = load.index(min(load))
        out[b].append(i)
        load[b] += sizes[i]
    return [b for b in out if b]


def units_of(prompt_lengths: list[int], lengths: list[int], runs: list[int], cost_per_key: float) -> list[tuple[int, list[int]]]:
    """(prompt row, completion rows) of each unit: each run of rows with the same prompt is split into the
    number of units (each with the prompt) of lowest cost. A completion brings its tokens but the last."""
    units, start = [], 0
    for count in runs:
        rows = list(range(start, start + count))
        start += count
        P = prompt_lengths[rows[0]]
        need = [max(lengths[r] - 1, 0) for r in rows]
        best = None
        for m in range(1, count + 1):
            parts = spread(need, m)
            cost = sum(_cost(P + sum(need[i] for i in part), cost_per_key) for part in parts)
            if best is None or cost < best[0] - 1e-9:
                best = (cost, parts)
        units += [(rows[0], [rows[i] for i in sorted(part)]) for part in best[1]]
    return units


def layout(sizes: list[int], cost_per_key: float) -> list[list[int]]:
    """Units (by size) spread over rows: the row count of lowest cost, each row padded to the longest."""
    best = None
    for rows in range(1, len(sizes) + 1):
        bins = spread(sizes, rows)
        L = max(sum(sizes[i] for i in b) for b in bins)
        cost = len(bins) * _cost(L, cost_per_key)
        if best is None or cost < best[0] - 1e-9:
            best = (cost, bins)
    return best[1]


def pack(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, completion_ids: torch.Tensor,
         attention_mask: torch.Tensor, runs: Optional[list[int]], cost_per_key: float,
         dtype: torch.dtype, segments: bool = False) -> Optional[Packed]:
    """The packed forward's inputs for N left-padded prompts [N, P] and right-padded completions [N, T]
    (``attention_mask``: 1 for each completion's real tokens, a prefix of its row). ``runs``: lengths of
    the runs of consecutive rows that share a prompt (one unit per run, or several when that costs less),
    or None for one prompt copy per completion. ``cost_per_key``: see ``key_cost`` (0: everything in one
    row, a group in one unit). None when some prompt is empty (nothing would predict its first token).
    ``segments``: for a model switched to ``attention.NAME``: no dense mask; attention kept within each
    sequence by ``attention.Segments`` (pass cost_per_key 0: attention no longer grows with a row's length
    squared, so one row without padding is best)."""
    N, T = completion_ids.shape
    device = completion_ids.device
    prompt_lengths = prompt_mask.sum(1).tolist()
    lengths = attention_mask.sum(1).tolist()
    if N == 0 or min(prompt_lengths) < 1:
        return None
    units = units_of(prompt_lengths, lengths, runs if runs is not None else [1] * N, cost_per_key)
    sizes = [prompt_lengths[p] + sum(max(lengths[r] - 1, 0) for r in rows) for p, rows in units]
    bins = layout(sizes, cost_per_key)
    L = max(sum(sizes[u] for u in b) for b in bins)
    R = len(bins)
    ids = torch.zeros(R, L, dtype=torch.long)
    pos = torch.zeros(R, L, dtype=torch.long)
    # Per token: which sequence it belongs to (a unit's prompt is sequence 0 of the unit, its completions
    # 1, 2, ...) as (unit id, segment id); a padding token is a unit of its own.
    unit_id = torch.arange(R * L, dtype=torch.long).view(R, L) + len(units)  # padding: unique ids
    segment = torch.zeros(R, L, dtype=torch.long)
    index = torch.zeros(N, T, dtype=torch.long)
    p_ids, c_ids = prompt_ids.cpu(), completion_ids.cpu()
    spans = []  # per unit: (flat start of its prompt, prompt length, [(flat start, length) of each completion])
    for b, members in enumerate(bins):
        at = 0
        for u in members:
            prow, rows = units[u]
            P = prompt_lengths[prow]
            ids[b, at:at + P] = p_ids[prow, p_ids.shape[1] - P:]
            pos[b, at:at + P] = torch.arange(P)
            unit_id[b, at:at + P] = u
            last_prompt = b * L + at + P - 1
            spans.append((b * L + at, P, []))
            at += P
            for k, r in enumerate(rows, start=1):
                n = max(lengths[r] - 1, 0)
                ids[b, at:at + n] = c_ids[r, :n]
                pos[b, at:at + n] = torch.arange(P, P + n)
                unit_id[b, at:at + n] = u
                segment[b, at:at + n] = k
                index[r] = last_prompt
                index[r, 1:n + 1] = torch.arange(b * L + at, b * L + at + n)
                spans[-1][2].append((b * L + at, n))
                at += n
    if segments:
        from grpo_scale.attention import Segments, stand_in_mask
        return Packed(ids.to(device), pos.to(device), stand_in_mask(R, L, L, device, dtype), index.to(device),
                      sum(sizes), Segments(spans, R * L, device))
    same_unit = unit_id.unsqueeze(2) == unit_id.unsqueeze(1)               # [R, Lq, Lk]
    k_seg, q_seg = segment.unsqueeze(1), segment.unsqueeze(2)
    visible = same_unit & ((k_seg == 0) | (k_seg == q_seg)) & torch.ones(L, L, dtype=torch.bool).tril()
    mask = torch.zeros(R, 1, L, L, dtype=dtype)
    mask.masked_fill_(~visible.unsqueeze(1), torch.finfo(dtype).min)
    return Packed(ids.to(device), pos.to(device), mask.to(device), index.to(device), sum(sizes))
