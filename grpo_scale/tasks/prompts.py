"""Turning a question into the prompt text a model sees."""
from __future__ import annotations

DEFAULT_SYSTEM_PROMPT = (
    "Reason about the problem inside <think>...</think>, then write only the final result inside "
    "<answer>...</answer>."
)


def render_prompt(tokenizer, question: str, system_prompt: str | None = DEFAULT_SYSTEM_PROMPT) -> str:
    """The prompt string for one question, ending where the assistant's reply begins.

    Uses the tokenizer's chat template (system message first, when given). A tokenizer without a chat
    template (a base model) gets a plain fallback: the system prompt, a blank line, ``User: ...`` and
    ``Assistant:`` on their own lines.
    """
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": question}]
        if system_prompt:
            messages.insert(0, {"role": "system", "content": system_prompt})
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    head = f"{system_prompt}\n\n" if system_prompt else ""
    return f"{head}User: {question}\nAssistant:"
