"""A resumable, seeded stream over user-provided rows (one shuffled pass per epoch)."""
from __future__ import annotations

import random


class RowStream:
    """Cycles over ``rows`` forever, reshuffling (seeded) at every epoch; resumable by position."""

    def __init__(self, rows: list[dict], seed: int):
        if not rows:
            raise ValueError("the training data set has no rows")
        self.rows, self.seed, self.position = rows, seed, 0
        self._order: list[int] = []

    def _epoch_order(self, epoch: int) -> list[int]:
        order = list(range(len(self.rows)))
        random.Random(f"grpo-scale-rows-{self.seed}-{epoch}").shuffle(order)
        return order

    def __next__(self) -> dict:
        epoch, i = divmod(self.position, len(self.rows))
        if i == 0 or not self._order:
            self._order = self._epoch_order(epoch)
        self.position += 1
        return self.rows[self._order[i]]

    def __iter__(self):
        return self

    def take(self, n: int) -> list[dict]:
        return [next(self) for _ in range(n)]

    def state_dict(self) -> dict:
        return {"position": self.position, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.position, self._order = int(state["position"]), []
        if self.position % len(self.rows):
            self._order = self._epoch_order(self.position // len(self.rows))
