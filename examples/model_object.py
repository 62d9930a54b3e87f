"""A TRL script with one line changed (the import): a model and tokenizer loaded by the script
(processing_class), a built-in reward by name next to a function, LoRA through peft_config, and
save_model, which writes a model plain transformers loads.

    python examples/model_object.py [OUTPUT_DIR]
"""
import sys

from datasets import Dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer

from grpo_scale import GRPOConfig, GRPOTrainer  # was: from trl import GRPOConfig, GRPOTrainer

output_dir = sys.argv[1] if len(sys.argv) > 1 else "outputs/examples/model_object"
path = "grpo_scale/assets/tiny-math"
model = AutoModelForCausalLM.from_pretrained(path)
tokenizer = AutoTokenizer.from_pretrained(path)

dataset = Dataset.from_list([
    {"prompt": [{"role": "user", "content": f"Solve {a}*{b}"}], "answer": str(a * b)}
    for a in range(10, 30) for b in range(2, 7)
])


def brevity(completions, **kwargs):
    return [-len(c[0]["content"]) / 100 for c in completions]


training_args = GRPOConfig(
    output_dir=output_dir, max_steps=2, per_device_train_batch_size=8, num_generations=4,
    max_completion_length=32, learning_rate=1e-3, logging_steps=1, report_to="none", use_cpu=True,
    gradient_checkpointing=False, beta=0.04,
)
trainer = GRPOTrainer(
    model=model,
    processing_class=tokenizer,
    reward_funcs=["correctness", brevity],  # a built-in by name, and a function
    args=training_args,
    train_dataset=dataset,
    peft_config=LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM"),
)
trainer.train()
trainer.save_model(output_dir)  # the merged model in output_dir, the adapter in output_dir/adapter

reloaded = AutoModelForCausalLM.from_pretrained(output_dir)  # plain transformers
print(f"reloaded {type(reloaded).__name__} with {reloaded.num_parameters():,} parameters from {output_dir}")
