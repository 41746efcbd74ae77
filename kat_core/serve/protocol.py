"""The OpenAI wire format as this server speaks it: request schemas, errors, thinking control, and how a
response is split into `reasoning_content` and `content`.

Requests. Unknown OpenAI fields are accepted and ignored (clients send many); fields whose meaning we cannot
honour are refused with a 400 rather than silently dropped: `stop`, `logprobs`, `echo`, `tools`.
- Thinking control: `thinking: "auto" | "on" | "off"` at the top level, or inside `chat_template_kwargs`
  (`{"thinking": "off"}`, or Qwen-style `{"enable_thinking": false}`); the top-level field wins. "on"/"off"
  pre-fill the judge and the mode token, as evaluation does; "auto" (the default) lets the model choose.
  The pre-fill is the server's words, not the model's: it belongs to the prompt (counted in `prompt_tokens`,
  not in `completion_tokens`, not shown in `reasoning_content` or the completion text), so `thinking: off`
  returns no reasoning and `max_tokens` bounds what the model generates in every mode, as evaluation's
  `max_new_tokens` does.
- Chat messages are laid out as training laid out requests (`kat_core.chat.request_text`): a model whose
  tokenizer has a chat template (a pretrained base) sees the whole conversation through it, system prompt and
  earlier turns included; a model without one (trained from scratch, on single requests) sees the content of
  the LAST user message. Text parts of a message are joined by newlines; the forced judge of "on"/"off" is
  written from the last user message.
- `max_tokens` (or `max_completion_tokens`) bounds the completion as usage counts it: the generated tokens.
- What a client sends is text. A message or prompt that spells one of the model's control tokens (the grammar's
  tags, EOS, a chat template's markers) is refused (400, code `control_token`): the tokenizer would encode it as
  that token, and a typed `</judge><think_off>` would make the model's decision for it. A request asks for at
  most one batch of completions (prompts x n <= the server's max batch rows).

Responses. Completion tokens are the generated tokens as the text shows them, without a final EOS token (it is
not in the text). `reasoning_tokens` are those of the judge and think segments the model wrote, grammar tags
included. In chat responses,
like vLLM's reasoning parsers: `reasoning_content` holds the judge and the reasoning (joined by a newline),
`content` holds the answer, and the grammar tags are dropped; `thinking_mode` on each choice says which mode
the response took. `/v1/completions` returns the raw text, tags and all.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from kat_core.format import SPECIAL_TOKENS, THINK_OPEN, forced_prefix, parse, token_segments

Thinking = Literal["auto", "on", "off"]


class APIError(Exception):
    """An error answered as OpenAI does: HTTP status and {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class _Request(BaseModel):
    model_config = ConfigDict(extra="allow")  # the many OpenAI fields we do not use are ignored

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=64)
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1)  # what torch's generator takes
    stop: str | list[str] | None = None
    thinking: Thinking | None = None
    chat_template_kwargs: dict[str, Any] | None = None

    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None


class ChatRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class CompletionRequest(_Request):
    prompt: str | list[str]


_UNSUPPORTED = ("stop", "logprobs", "top_logprobs", "echo", "tools", "functions", "response_format")


def check_supported(req: _Request) -> None:
    for name in _UNSUPPORTED:
        value = getattr(req, name, None)
        if value is None:
            value = (req.model_extra or {}).get(name)
        if value not in (None, False, [], "", {"type": "text"}):
            raise APIError(400, f"'{name}' is not supported by this server", param=name, code="unsupported_parameter")


def thinking_mode(req: _Request) -> Thinking:
    """The requested thinking control (see the module doc)."""
    if req.thinking is not None:
        return req.thinking
    kwargs = req.chat_template_kwargs or {}
    if "thinking" in kwargs:
        value = kwargs["thinking"]
        if value not in ("auto", "on", "off"):
            raise APIError(400, f"chat_template_kwargs.thinking must be 'auto', 'on' or 'off', not {value!r}",
                           param="chat_template_kwargs.thinking")
        return value
    if "enable_thinking" in kwargs:
        value = kwargs["enable_thinking"]
        if not isinstance(value, bool):
            raise APIError(400, "chat_template_kwargs.enable_thinking must be a boolean",
                           param="chat_template_kwargs.enable_thinking")
        return "on" if value else "off"
    return "auto"


def chat_messages(messages: list[ChatMessage]) -> list[dict[str, str]]:
    """The conversation as plain {"role", "content"} messages for a chat template (a developer message is a
    system one); the last user message is checked as `chat_prompt` does."""
    chat_prompt(messages)
    out = []
    for i, m in enumerate(messages):
        if m.role == "tool":
            raise APIError(400, "tool messages are not supported by this server", param=f"messages.{i}.role")
        out.append({"role": "system" if m.role == "developer" else m.role, "content": _message_text(m, i)})
    return out


def _message_text(m: ChatMessage, i: int) -> str:
    if isinstance(m.content, str):
        return m.content
    if isinstance(m.content, list):
        parts = []
        for part in m.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise APIError(400, "only text content parts are supported", param=f"messages.{i}.content")
            parts.append(part["text"])
        return "\n".join(parts)
    return ""


def chat_prompt(messages: list[ChatMessage]) -> str:
    """The request text: the last user message (see the module doc)."""
    for i in range(len(messages) - 1, -1, -1):
        m = messages[i]
        if m.role != "user":
            continue
        text = _message_text(m, i)
        if not text.strip():
            raise APIError(400, "the last user message is empty", param=f"messages.{i}.content")
        return text
    raise APIError(400, "messages must contain a user message", param="messages")


# --- the judge a forced mode pre-fills -----------------------------------------------------------------------

_ARITH = re.compile(r"^\s*Compute ([\d+\-*]+)\.\s*$")


def request_features(prompt: str) -> dict[str, Any]:
    """Intent features for a free-text request. A request in a built-in task's own form (arith's
    `Compute 47*6+38.`) gets that task's features, so a forced judge reads as in training; anything else gets
    generic ones."""
    m = _ARITH.match(prompt)
    if m:
        from kat_core.tasks.arith import ArithTask, make_item

        try:
            return ArithTask().intent_features(make_item(m[1], level=0))
        except ValueError:
            pass
    return {"family": "request"}


def forced_for_request(prompt: str, mode: Thinking) -> str | None:
    if mode == "auto":
        return None
    from kat_core.data.judge import judge_text

    return forced_prefix(judge_text(request_features(prompt), mode), mode)


# --- splitting a response into reasoning and answer -------------------------------------------------------------

@dataclass
class Split:
    """A response's token ids cut into (channel, text) pieces, channel "reasoning" or "content", plus counts."""

    pieces: list[tuple[str, str]]
    completion_tokens: int
    reasoning_tokens: int
    mode: str | None  # the mode token the response carries

    def text(self, channel: str) -> str:
        return "".join(t for c, t in self.pieces if c == channel)


def split_response(ids: list[int], tokenizer, *, prefilled: int = 0) -> Split:
    """Cut a response (forced prefix + generated ids, no EOS) into reasoning and content pieces.

    The first `prefilled` ids are the forced prefix: they give the mode and the segments their context but are
    not the model's output, so they yield no piece and no count.

    Judge and think tokens are reasoning, everything else content; tag tokens are structure and produce no
    text. One piece per run of same-channel tokens, decoded as a run, so a multi-byte character split over
    tokens is never cut."""
    tag_ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    by_id = {v: k for k, v in tag_ids.items()}
    labels = token_segments(ids, tag_ids)
    pieces: list[tuple[str, str]] = []
    run: list[int] = []
    run_channel = "content"
    said_reasoning = False

    def flush() -> None:
        nonlocal run
        if run:
            text = tokenizer.decode(run, skip_special_tokens=False)
            if text:
                pieces.append((run_channel, text))
        run = []

    # the mode is the one the grammar reads (the mode token right after the judge), as evaluation's `parse` reads
    # it: a mode token elsewhere in a malformed response is not a choice of mode
    mode = parse(tokenizer.decode(ids, skip_special_tokens=False)).mode
    # whitespace outside the segments that a tag or the end follows (`</think>\n<answer>`) is layout, not
    # content: the content is the answer, as `format.parse` reads it. Whitespace that text follows is kept. The
    # rule looks at what came before and the next token only, so a response's split is the split of its prefix
    # plus what the next tokens add: what a stream sends as they come adds up to the whole response
    layout: list[int] = []
    for k, (tok, label) in enumerate(zip(ids, labels, strict=True)):
        tag = by_id.get(tok)
        if k < prefilled:
            continue
        if tag is not None:
            flush()
            layout = []
            if tag == THINK_OPEN and said_reasoning:  # the judge and the reasoning read as two paragraphs
                pieces.append(("reasoning", "\n"))
            continue
        if label == "other" and not tokenizer.decode([tok], skip_special_tokens=False).strip():
            layout.append(tok)
            continue
        channel = "reasoning" if label in ("judge", "think") else "content"
        if layout:  # text follows: the whitespace before it was content
            if run_channel != "content":
                flush()
                run_channel = "content"
            run += layout
            layout = []
        if channel != run_channel:
            flush()
            run_channel = channel
        run.append(tok)
        said_reasoning = said_reasoning or channel == "reasoning"
    flush()
    reasoning = sum(label in ("judge", "think") for label in labels[prefilled:])
    return Split(pieces, len(ids) - prefilled, reasoning, mode)
