"""Ask a trained model a question, with the prompt it was trained with: plain transformers, no grpo-scale.

    python examples/inference.py outputs/smollm2-135m-math "Solve 13+29"

A run's final/ is an ordinary model folder; its summary.json holds the config, whose system_prompt and
assistant_prefix make the prompt the model saw in training (the chat template, the system message, and the
reply opened with the prefix, if any).
"""
import json
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

run = Path(sys.argv[1] if len(sys.argv) > 1 else "outputs/smollm2-135m-math")
question = sys.argv[2] if len(sys.argv) > 2 else "Solve 13+29"
config = json.loads((run / "summary.json").read_text())["config"]

tokenizer = AutoTokenizer.from_pretrained(run / "final")
model = AutoModelForCausalLM.from_pretrained(run / "final", dtype=torch.float32).eval()

messages = [{"role": "user", "content": question}]
if config["system_prompt"]:
    messages.insert(0, {"role": "system", "content": config["system_prompt"]})
prefix = config.get("assistant_prefix") or ""
if tokenizer.chat_template:
    if prefix:  # open the reply and let the model continue it
        messages.append({"role": "assistant", "content": prefix})
        text = tokenizer.apply_chat_template(messages, tokenize=False, continue_final_message=True)
    else:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
else:  # a model without a chat template (the embedded demo model): the trainer's plain layout
    system = f"{config['system_prompt']}\n\n" if config["system_prompt"] else ""
    text = f"{system}User: {question}\nAssistant:" + (f" {prefix}" if prefix else "")

inputs = tokenizer(text, return_tensors="pt", add_special_tokens=False)
with torch.no_grad():
    out = model.generate(**inputs, max_new_tokens=config["max_completion_length"], do_sample=False)
print(prefix + tokenizer.decode(out[0, inputs.input_ids.shape[1]:], skip_special_tokens=True))
