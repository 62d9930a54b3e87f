"""Turning a question into the prompt text a model sees."""
from __future__ import annotations

DEFAULT_SYSTEM_PROMPT = (
    "Reason about the problem inside <think>...</think>, then write only the final result inside "
    "<answer>...</answer>."
)


def render_prompt(tokenizer, question: str, system_prompt: str | None = DEFAULT_SYSTEM_PROMPT) -> str:
    """The prompt string for one question, ending where the assistant's reply begins (see
    ``render_messages``)."""
    return render_messages(tokenizer, [{"role": "user", "content": question}], system_prompt)


def is_conversational(prompt) -> bool:
    """TRL's conversational format: a list of ``{"role", "content"}`` messages (else a standard string)."""
    return isinstance(prompt, (list, tuple)) and all(isinstance(m, dict) and "role" in m for m in prompt)


def render_messages(tokenizer, messages: list[dict], system_prompt: str | None = None) -> str:
    """The prompt string of a conversation, ending where the assistant's reply begins.

    ``system_prompt`` goes first unless the conversation has its own system message. Uses the tokenizer's
    chat template; a tokenizer without one (a base model) gets a plain fallback: the system prompt, a
    blank line, then ``User: ...`` / ``Assistant: ...`` lines and a final ``Assistant:``.
    """
    messages = list(messages)
    if system_prompt and not any(m.get("role") == "system" for m in messages):
        messages.insert(0, {"role": "system", "content": system_prompt})
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    head = "".join(f"{m['content']}\n\n" for m in messages if m["role"] == "system")
    turns = "".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in messages if m["role"] != "system")
    return f"{head}{turns}Assistant:"
