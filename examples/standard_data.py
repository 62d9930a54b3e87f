"""A TRL script with one line changed (the import): standard-format data (prompts are strings, used as they
are) from a datasets.Dataset, and a reward that reads an extra column.

    python examples/standard_data.py [OUTPUT_DIR]
"""
import sys

from datasets import Dataset

from grpo_scale import GRPOConfig, GRPOTrainer  # was: from trl import GRPOConfig, GRPOTrainer

output_dir = sys.argv[1] if len(sys.argv) > 1 else "outputs/examples/standard_data"

# Standard format: the prompt string is tokenised as it is (no chat template). The embedded demo model
# was trained on its chat format, so the prompt spells it out.
dataset = Dataset.from_list([
    {"prompt": f"<|im_start|>user\nSolve {a}+{b}<|im_end|>\n<|im_start|>assistant\n", "target": str(a + b)}
    for a in range(10, 30) for b in range(10, 15)
])


def reward_target(completions, target, **kwargs):
    """1.0 when the completion contains the expected number (a column of the data set)."""
    return [1.0 if t in completion else 0.0 for completion, t in zip(completions, target)]


training_args = GRPOConfig(
    output_dir=output_dir, max_steps=2, per_device_train_batch_size=8, num_generations=4,
    max_completion_length=24, learning_rate=1e-4, logging_steps=1, report_to="none", use_cpu=True,
    gradient_checkpointing=False, temperature=1.5, seed=0,
)
trainer = GRPOTrainer(
    model="grpo_scale/assets/tiny-math",  # a Hub name works the same on a machine with the Hub
    reward_funcs=reward_target,
    args=training_args,
    train_dataset=dataset,
)
trainer.train()
trainer.save_model(output_dir)
