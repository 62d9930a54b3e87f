"""A TRL script with one line changed (the import): conversational data (prompts are lists of messages,
rendered with the chat template), TRL-style rewards that read completion[0]["content"], one of them
`async def`, combined with reward_weights.

    python examples/conversational_data.py [OUTPUT_DIR]
"""
import asyncio
import re
import sys

from datasets import Dataset

from grpo_scale import GRPOConfig, GRPOTrainer  # was: from trl import GRPOConfig, GRPOTrainer

output_dir = sys.argv[1] if len(sys.argv) > 1 else "outputs/examples/conversational_data"

SYSTEM = ("Reason about the problem inside <think>...</think>, then write only the final result inside "
          "<answer>...</answer>.")
dataset = Dataset.from_list([
    {"prompt": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": f"Solve {a}+{b}"}],
     "solution": str(a + b)}
    for a in range(10, 30) for b in range(10, 15)
])


def format_reward(completions, **kwargs):
    pattern = r"^<think>.*?</think>\s*<answer>.*?</answer>$"
    return [1.0 if re.match(pattern, c[0]["content"], re.DOTALL) else 0.0 for c in completions]


async def accuracy_reward(completions, solution, **kwargs):
    """An async reward, as for a remote judge: awaited by the trainer."""
    await asyncio.sleep(0)
    answers = [re.search(r"<answer>(.*?)</answer>", c[0]["content"]) for c in completions]
    return [1.0 if a and a.group(1).strip() == s else 0.0 for a, s in zip(answers, solution)]


training_args = GRPOConfig(
    output_dir=output_dir, max_steps=2, per_device_train_batch_size=8, num_generations=4,
    max_completion_length=32, learning_rate=1e-4, logging_steps=1, report_to="none", use_cpu=True,
    gradient_checkpointing=False, reward_weights=[0.2, 1.0], log_completions=True, num_completions_to_print=2,
)
trainer = GRPOTrainer(
    model="grpo_scale/assets/tiny-math",
    reward_funcs=[format_reward, accuracy_reward],
    args=training_args,
    train_dataset=dataset,
)
trainer.train()
trainer.save_model(output_dir)
