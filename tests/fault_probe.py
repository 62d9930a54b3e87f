"""Launched by tests/test_errors.py under `accelerate launch`: train.py's main with numerical faults
injected into the loss on one rank at chosen steps, recording per rank and step a parameter checksum.

    fault_probe.py OUT_DIR NAN_AT INF_GRAD_AT [train.py arguments]

NAN_AT / INF_GRAD_AT: comma-separated "step:rank" pairs. NAN_AT makes that rank's loss NaN at that step
(first micro-batch); INF_GRAD_AT keeps the loss finite but makes its gradient infinite.
"""
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # train.py

import train  # noqa: E402
from reliability_helpers import InfGrad  # noqa: E402
from grpo_scale.trainer import GRPOTrainer  # noqa: E402


def _pairs(text: str) -> set[tuple[int, int]]:
    return {tuple(int(v) for v in p.split(":")) for p in text.split(",") if p}


def main():
    out, nan_at, inf_at = Path(sys.argv[1]), _pairs(sys.argv[2]), _pairs(sys.argv[3])
    rank = int(os.environ.get("RANK", "0"))
    records = []
    micro_loss, grpo_step = GRPOTrainer._micro_loss, GRPOTrainer.grpo_step

    def faulty_micro_loss(self, rb, batch, idx):
        result = micro_loss(self, rb, batch, idx)
        key, first = (self.step + 1, rank), idx.start == 0
        if key in nan_at and first:
            return result._replace(loss=result.loss * float("nan"))
        if key in inf_at and first:
            return result._replace(loss=InfGrad.apply(result.loss))
        return result

    def checksum(self) -> float:
        with self.unwrapped_for_generation() as model:
            return float(sum(p.detach().double().sum() for p in model.parameters()))

    def recorded_grpo_step(self, batch):
        before = checksum(self)
        metrics = grpo_step(self, batch)
        records.append({"step": self.step, "before": before, "after": checksum(self),
                        "skipped": metrics["skipped_step"], "bad_in_a_row": self.bad_in_a_row})
        return metrics

    GRPOTrainer._micro_loss = faulty_micro_loss
    GRPOTrainer.grpo_step = recorded_grpo_step
    code = train.main(sys.argv[4:])
    (out / f"rank{rank}.json").write_text(json.dumps({"exit": code, "records": records}))
    sys.exit(code)


if __name__ == "__main__":
    main()
