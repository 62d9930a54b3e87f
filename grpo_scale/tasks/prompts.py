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


def open_reply(prompt, prefix: str | None):
    """The prompt with the assistant's reply opened by ``prefix`` (``assistant_prefix``, such as
    ``<think>``): a conversation gets a final assistant message, which the template continues (TRL's rule
    for a conversation that ends with the assistant); a string prompt gets the text appended (the trainer
    refuses that combination, since rewards could not see the prefix). A conversation that already ends
    with the assistant, or an empty prefix, leaves the prompt as it is."""
    if not prefix:
        return prompt
    if is_conversational(prompt):
        if prompt and prompt[-1].get("role") == "assistant":
            return prompt
        return [*prompt, {"role": "assistant", "content": prefix}]
    return prompt + prefix if isinstance(prompt, str) else prompt


def user_question(prompt) -> str:
    """The user's last message of a conversation (a string prompt as it is), for logs and reports."""
    if is_conversational(prompt):
        users = [m.get("content", "") for m in prompt if m.get("role") == "user"]
        return users[-1] if users else ""
    return prompt


def render_messages(tokenizer, messages: list[dict], system_prompt: str | None = None) -> str:
    """The prompt string of a conversation, ending where the assistant's reply begins, or, when the last
    message is the assistant's, inside that message (its text continued, as TRL does).

    ``system_prompt`` goes first unless the conversation has its own system message. Uses the tokenizer's
    chat template; a tokenizer without one (a base model) gets a plain fallback: the system prompt, a
    blank line, then ``User: ...`` / ``Assistant: ...`` lines and a final ``Assistant:`` (followed by the
    opened reply, if any).
    """
    messages = list(messages)
    if system_prompt and not any(m.get("role") == "system" for m in messages):
        messages.insert(0, {"role": "system", "content": system_prompt})
    opened = messages[-1]["content"] if messages and messages[-1].get("role") == "assistant" else None
    if getattr(tokenizer, "chat_template", None):
        if opened is not None:
            return tokenizer.apply_chat_template(messages, tokenize=False, continue_final_message=True)
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if opened is not None:
        messages = messages[:-1]
    head = "".join(f"{m['content']}\n\n" for m in messages if m["role"] == "system")
    turns = "".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in messages if m["role"] != "system")
    return f"{head}{turns}Assistant:" + (f" {opened}" if opened else "")
