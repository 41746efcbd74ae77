"""The response grammar (DESIGN.md):

    <judge>…</judge><think_on><think>…</think><answer>…</answer>
    <judge>…</judge><think_off><answer>…</answer>

`parse` never raises: malformed output comes back with `well_formed=False` and a reason. A missing
closing `</answer>` at the very end of the text is tolerated (generation often stops right before it).
Spans are character offsets `[start, end)` into the parsed text.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

JUDGE_OPEN, JUDGE_CLOSE = "<judge>", "</judge>"
THINK_ON, THINK_OFF = "<think_on>", "<think_off>"
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"

# Order matters for tokenizers: every tag is one special token.
SPECIAL_TOKENS: tuple[str, ...] = (
    JUDGE_OPEN, JUDGE_CLOSE, THINK_ON, THINK_OFF, THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE,
)
MODE_TOKEN = {"on": THINK_ON, "off": THINK_OFF}

Mode = Literal["on", "off"]
_TAG_RE = re.compile("|".join(re.escape(t) for t in sorted(SPECIAL_TOKENS, key=len, reverse=True)))


@dataclass(frozen=True)
class Response:
    """A well-formed response. `think` is None exactly when mode is "off"."""

    judge: str
    mode: Mode
    answer: str
    think: str | None = None

    def __post_init__(self):
        if self.mode not in ("on", "off"):
            raise ValueError(f"mode must be 'on' or 'off', not {self.mode!r}")
        if (self.mode == "on") != (self.think is not None):
            raise ValueError("think text is required with mode 'on' and forbidden with mode 'off'")
        for name in ("judge", "think", "answer"):
            value = getattr(self, name)
            if value is not None and _TAG_RE.search(value):
                raise ValueError(f"{name} text must not contain grammar tags")


@dataclass
class Parsed:
    judge: str | None = None
    mode: Mode | None = None
    think: str | None = None
    answer: str | None = None
    well_formed: bool = False
    error: str | None = None
    # character spans of each field's content plus the two RL segments:
    # "judge_segment" = <judge>…</judge> + mode token; "response_segment" = everything after the mode token
    spans: dict[str, tuple[int, int]] = field(default_factory=dict)

    def response(self) -> Response | None:
        if not self.well_formed:
            return None
        return Response(judge=self.judge or "", mode=self.mode, think=self.think, answer=self.answer or "")


def prompt_text(prompt: str) -> str:
    """How a request is laid out before the response, in training and at inference alike."""
    return prompt.strip() + "\n"


def render(judge: str, mode: Mode, answer: str, think: str | None = None, *, close: bool = True) -> str:
    """Render a response; `close=False` leaves off the final `</answer>` (a generation prefix)."""
    Response(judge=judge, mode=mode, answer=answer, think=think)  # validates
    head = f"{JUDGE_OPEN}{judge}{JUDGE_CLOSE}{MODE_TOKEN[mode]}"
    body = f"{THINK_OPEN}{think}{THINK_CLOSE}" if mode == "on" else ""
    return f"{head}{body}{ANSWER_OPEN}{answer}{ANSWER_CLOSE if close else ''}"


def render_response(r: Response) -> str:
    return render(r.judge, r.mode, r.answer, r.think)


def forced_prefix(judge: str, mode: Mode) -> str:
    """The prefix that forces a mode at inference: `<judge>…</judge><think_on>` or `…<think_off>`."""
    return f"{JUDGE_OPEN}{judge}{JUDGE_CLOSE}{MODE_TOKEN[mode]}"


def parse(text: str) -> Parsed:
    """Parse any model output. Never raises; leading/trailing whitespace around the whole is ignored."""
    out = Parsed()
    try:
        _parse_into(text, out)
    except _Malformed as e:
        out.well_formed = False
        out.error = str(e)
    return out


class _Malformed(Exception):
    pass


def _parse_into(text: str, out: Parsed) -> None:
    tags = [(m.group(), m.start(), m.end()) for m in _TAG_RE.finditer(text)]
    pos = 0  # index into tags

    def expect(tag: str, *, at_end_ok: bool = False) -> tuple[int, int] | None:
        nonlocal pos
        if pos >= len(tags):
            if at_end_ok:
                return None
            raise _Malformed(f"missing {tag}")
        name, start, end = tags[pos]
        if name != tag:
            raise _Malformed(f"expected {tag}, found {name} at {start}")
        pos += 1
        return start, end

    def between(a_end: int, b_start: int) -> str:
        return text[a_end:b_start]

    if not text.strip():
        raise _Malformed("empty text")
    j_open = expect(JUDGE_OPEN)
    if text[: j_open[0]].strip():
        raise _Malformed("text before <judge>")
    j_close = expect(JUDGE_CLOSE)
    out.judge = between(j_open[1], j_close[0])
    out.spans["judge"] = (j_open[1], j_close[0])
    if pos >= len(tags) or tags[pos][0] not in (THINK_ON, THINK_OFF):
        raise _Malformed("missing mode token after </judge>")
    mode_tag, m_start, m_end = tags[pos]
    pos += 1
    if between(j_close[1], m_start).strip():
        raise _Malformed("text between </judge> and the mode token")
    out.mode = "on" if mode_tag == THINK_ON else "off"
    out.spans["mode"] = (m_start, m_end)
    out.spans["judge_segment"] = (j_open[0], m_end)
    after_mode = m_end
    if out.mode == "on":
        t_open = expect(THINK_OPEN)
        if between(m_end, t_open[0]).strip():
            raise _Malformed("text between <think_on> and <think>")
        t_close = expect(THINK_CLOSE)
        out.think = between(t_open[1], t_close[0])
        out.spans["think"] = (t_open[1], t_close[0])
        after_mode = t_close[1]
    a_open = expect(ANSWER_OPEN)
    if between(after_mode, a_open[0]).strip():
        raise _Malformed("text before <answer>")
    a_close = expect(ANSWER_CLOSE, at_end_ok=True)
    if a_close is None:  # tolerated: generation stopped before the closing tag
        out.answer = text[a_open[1]:].rstrip()
        end = a_open[1] + len(out.answer)
        out.spans["answer"] = (a_open[1], end)
    else:
        out.answer = between(a_open[1], a_close[0])
        out.spans["answer"] = (a_open[1], a_close[0])
        end = a_close[1]
        if pos < len(tags):
            raise _Malformed(f"unexpected {tags[pos][0]} after </answer>")
        if text[end:].strip():
            raise _Malformed("text after </answer>")
    out.spans["response_segment"] = (m_end, end)
    out.well_formed = True


# --- token accounting -------------------------------------------------------------------------------

SEGMENTS = ("judge", "think", "answer", "other")


def token_segments(ids: Sequence[int], tag_ids: dict[str, int]) -> list[str]:
    """Label each token id "judge" | "think" | "answer" | "other", following the grammar's tags.

    Tag tokens belong to the segment they open or close; the mode token belongs to the judge segment
    (that is where Step-SRPO puts the mode advantage). `tag_ids` maps each tag string to its token id.
    """
    by_id = {v: k for k, v in tag_ids.items()}
    labels, state = [], "other"
    for tok in ids:
        tag = by_id.get(tok)
        if tag == JUDGE_OPEN:
            state = "judge"
            labels.append("judge")
        elif tag in (JUDGE_CLOSE, THINK_ON, THINK_OFF):
            labels.append("judge")
            state = "other"
        elif tag == THINK_OPEN:
            state = "think"
            labels.append("think")
        elif tag == THINK_CLOSE:
            labels.append("think")
            state = "other"
        elif tag == ANSWER_OPEN:
            state = "answer"
            labels.append("answer")
        elif tag == ANSWER_CLOSE:
            labels.append("answer")
            state = "done"
        else:
            labels.append(state if state != "done" else "other")
    return labels


def count_tokens(text_or_ids: str | Sequence[int], tokenizer) -> dict[str, int]:
    """Tokens per segment (judge, think, answer, other) and total, for text or ids, given an HF tokenizer."""
    ids = (
        tokenizer(text_or_ids, add_special_tokens=False)["input_ids"]
        if isinstance(text_or_ids, str)
        else list(text_or_ids)
    )
    tag_ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    counts = dict.fromkeys(SEGMENTS, 0)
    for label in token_segments(ids, tag_ids):
        counts[label] += 1
    counts["total"] = len(ids)
    return counts
