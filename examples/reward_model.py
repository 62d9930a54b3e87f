"""A TRL script with one line changed (the import): a reward model (a sequence classifier with one
label) as a reward function, given as a folder; it scores prompt + completion with its own tokenizer.

    python examples/reward_model.py [OUTPUT_DIR]

The reward model here is a small randomly initialised classifier written next to the outputs, so that
the script runs anywhere; use your trained reward model's folder or Hub name instead.
"""
import sys
from pathlib import Path

import torch
from datasets import Dataset
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

from grpo_scale import GRPOConfig, GRPOTrainer  # was: from trl import GRPOConfig, GRPOTrainer

output_dir = sys.argv[1] if len(sys.argv) > 1 else "outputs/examples/reward_model"
policy = "grpo_scale/assets/tiny-math"

reward_dir = Path(output_dir) / "reward-model"
config = AutoConfig.from_pretrained(policy, num_labels=1)
config.pad_token_id = 0
torch.manual_seed(0)
AutoModelForSequenceClassification.from_config(config).save_pretrained(reward_dir)
AutoTokenizer.from_pretrained(policy).save_pretrained(reward_dir)

dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": f"Solve {a}-{b}"}]}
                             for a in range(20, 40) for b in range(1, 6)])
training_args = GRPOConfig(
    output_dir=output_dir, max_steps=2, per_device_train_batch_size=8, num_generations=4,
    max_completion_length=16, learning_rate=1e-4, logging_steps=1, report_to="none", use_cpu=True,
    gradient_checkpointing=False,
)
trainer = GRPOTrainer(model=policy, reward_funcs=str(reward_dir), args=training_args, train_dataset=dataset)
trainer.train()
trainer.save_model(output_dir)
print("reward per step:", [round(h["reward/mean"], 4) for h in trainer.history])
