"""How a request is laid out before the response, in training and at inference alike.

A tokenizer with a chat template (a pretrained instruct base brought with `kat model import`) lays the request
out through its template: the template's system prompt (or one given), earlier turns, the user's request, and
the assistant's turn opened. The response (judge, mode, reasoning, answer) is the assistant's text, ended by
the tokenizer's EOS (ChatML's `<|im_end|>`). A tokenizer without a template (the models the platform trains
from scratch) gets `format.prompt_text`: the request and a newline.

BOS: a template writes its own. Without one, a tokenizer that puts a BOS in front of every encoding (the
Llama family's) gets it here as text, because every encoding in the platform is made with
`add_special_tokens=False` (so that a prompt and its response concatenate exactly).
"""

from __future__ import annotations

from typing import Any

from kat_core.format import prompt_text

Message = dict[str, Any]  # {"role": "system" | "user" | "assistant", "content": str}


def has_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def bos_text(tokenizer) -> str:
    """The BOS token's text when the tokenizer adds one to every encoding, else ""."""
    bos, bos_id = getattr(tokenizer, "bos_token", None), getattr(tokenizer, "bos_token_id", None)
    if not bos or bos_id is None:
        return ""
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bos if ids and ids[0] == bos_id else ""


def last_user_text(messages: list[Message]) -> str:
    return next((str(m.get("content") or "") for m in reversed(messages) if m.get("role") == "user"), "")


def request_text(tokenizer, request: str | list[Message]) -> str:
    """The text before the response for `request`: one user message, or a conversation (system prompt and
    earlier turns; a tokenizer without a template sees only its last user message, as it was trained)."""
    if has_template(tokenizer):
        messages = [{"role": "user", "content": request.strip()}] if isinstance(request, str) else list(request)
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    text = request if isinstance(request, str) else last_user_text(request)
    return bos_text(tokenizer) + prompt_text(text)


def completion_budget(asked: int | None, default: int, room: int | None) -> int:
    """The completion tokens a request gets: what it `asked` for, else `default` shrunk to the `room` its context
    leaves after the prompt (None: no context limit). The caller refuses a budget outside 1..room: decoding past
    the context reads positions the model never learned."""
    if asked is not None or room is None:
        return asked if asked is not None else default
    return max(min(default, room), 0)


def control_tokens(tokenizer, text: str) -> list[str]:
    """The tokenizer's added tokens (the grammar's eight tags, EOS and pad, a chat template's markers) that
    `text` encodes to. The tokenizer matches an added token's spelling anywhere in a text, so typed into a
    request it would reach the model as that control token, not as the characters typed: a user's
    `</judge><think_off><answer>` would write the model's decision for it. Whatever the tokenizer treats so
    (its normalizer included) is found by encoding, not by a list of strings."""
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    if not added or not text:
        return []
    # a token is matched as spelled unless `normalized` (then in the normalized text: a lowercasing normalizer
    # matches `<JUDGE>`); looking for the spellings first spares encoding every turn of a long conversation
    if not any(t.content in text for t in added.values()) and not any(t.normalized for t in added.values()):
        return []
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return sorted({added[i].content for i in ids if i in added})
