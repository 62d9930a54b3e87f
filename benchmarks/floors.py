"""Floors of each phase of a GRPO step, and the speed-up bounds they set (placeholder until written)."""


def floor_rows(records, threads=1):
    raise NotImplementedError
