"""DAPO's dynamic sampling: which sampled groups a step trains on.

A group whose completions all got the same reward has advantage 0 for every completion: it teaches the
policy nothing (with ``beta > 0`` only its KL term acts) while it dilutes the loss normaliser. With
``dynamic_sampling`` the trainer samples rounds of prompts, drops such groups, and stops as soon as the
kept groups fill the generation batch, or after ``max_sampling_rounds`` rounds. Kept groups beyond the
batch are discarded (DAPO's and verl's rule: they would be off-policy at the next step).

When the rounds run out first, the step trains on a short batch: the kept groups, cut down to a multiple
of ``unit`` completions so that every rank trains the same number and each rank's share still splits
into ``gradient_accumulation_steps`` equal micro-batches (``unit = lcm(G, processes x accumulation)``).
If not even one unit was kept, the step is filled up to one unit with zero-spread groups of the last
round (they have advantage 0), so that every rank still runs its micro-steps and collectives.

Nothing here knows about ranks or tensors beyond the group spreads it is given.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

ZERO_SPREAD = 1e-6  # a group whose reward std is below this has zero spread (the frac_zero_std metric too)


@dataclass
class Selection:
    """The groups a step trains on, as (round, group index within the round), in training order."""
    groups: list[tuple[int, int]] = field(default_factory=list)
    rounds: int = 0          # rounds sampled
    sampled: int = 0         # groups sampled, over all rounds
    dropped: int = 0         # groups with zero spread
    surplus: int = 0         # kept groups beyond the batch, or cut to a whole number of units
    filled: int = 0          # zero-spread groups trained on because fewer than one unit was kept
    short: bool = False      # the batch is smaller than the generation batch


def has_spread(group_std: torch.Tensor) -> torch.Tensor:
    """[groups] bool: the group's reward std (NaN: too few rewards to tell) is at least ZERO_SPREAD."""
    return torch.nan_to_num(group_std.float(), nan=0.0) >= ZERO_SPREAD


def lcm_unit(num_generations: int, num_processes: int, accumulation: int) -> int:
    """Completions a batch must be a multiple of: whole groups, and equal micro-batches on every rank."""
    return math.lcm(num_generations, num_processes * accumulation)


def select(spreads: list[torch.Tensor], need_groups: int, unit_groups: int) -> Selection:
    """Choose the groups from the per-round group spreads (reward std per group, [groups] each; NaN or a
    value below ZERO_SPREAD is zero spread). ``need_groups`` fill the batch; a short batch is a multiple
    of ``unit_groups``. The same spreads give the same choice on every rank."""
    sel = Selection(rounds=len(spreads))
    kept, zero = [], []
    for r, std in enumerate(spreads):
        ok = has_spread(std).tolist()
        sel.sampled += len(ok)
        kept += [(r, g) for g, k in enumerate(ok) if k]
        zero += [(r, g) for g, k in enumerate(ok) if not k]
    sel.dropped = len(zero)
    if len(kept) >= need_groups:
        sel.groups, sel.surplus = kept[:need_groups], len(kept) - need_groups
        return sel
    sel.short = True
    n = len(kept) // unit_groups * unit_groups
    sel.groups, sel.surplus = kept[:n], len(kept) - n
    if not n:  # fill one unit, the kept groups first, then the last round's zero-spread groups
        last = [rg for rg in zero if rg[0] == len(spreads) - 1]
        fill = sorted(kept + last[:max(0, unit_groups - len(kept))])
        zero_set = set(zero)
        sel.groups, sel.surplus = fill[:unit_groups], 0
        sel.filled = sum(rg in zero_set for rg in sel.groups)
        sel.dropped -= sel.filled
    return sel


def slots(groups: list[tuple[int, int]], num_generations: int) -> list[tuple[int, int]]:
    """The (round, global completion slot) of every completion of ``groups``, groups consecutive."""
    return [(r, g * num_generations + i) for r, g in groups for i in range(num_generations)]
