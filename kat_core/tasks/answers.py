r"""Which one answer a free-text answer states: the rules a grader follows, written so that a text that
hedges or negates cannot earn a reward it would not get from a grader.

One answer, never "any of the numbers in the text": a hedge ("70 or 71", "not 70, it is 71") must not
be right whichever number is right, or RL learns to hedge. The math benchmarks (kat_core.tasks.mathbench)
parse the chosen answer with math-verify; arithmetic (kat_core.tasks.arith) reads its integer.

Which answer a text states (`final_answer`), first rule that applies:
  1. `<answer>…</answer>` in the text: the last such content (an unclosed one runs to the end); the rules
     below apply to it.
  2. `\boxed{…}` or `\fbox{…}`: the content of the last one that is not negated (see 4).
  3. Math only (no word of two or more letters outside LaTeX commands and `\text{…}`): the whole text,
     without markdown emphasis or code marks around it (`**70**`, `` `70` ``), math delimiters around it
     (`$…$`, `\(…\)`, `\[…\]`), a currency `$` before a number, and a final period.
  4. Prose. The candidates are bold/italic/code-formatted math (`**70**`, `` `70` ``), `$…$`, `\(…\)`
     and `\[…\]` segments, and plain numbers (`1,234`, `-3.5`, `2/3`, `$18`; none when the prose carries
     bare LaTeX or implicit products such as `2x`, which plain-number reading would cut apart). A
     candidate is **negated**, and never the answer, when its clause says so before it (`not`, `no`,
     `never`, `n't`, `nor`, `rather than`, `instead of`, `other than`, `except`, `wrong`, `incorrect`,
     from the clause's start: after `,` `;` `.` `:` `!` `?` `but` `it is`) or right after it (`70 is wrong`,
     `70 is not…`, `70, no…`). If the text has an answer anchor ("answer is", "answer:", "answer =",
     "result is", "solution is"), what follows the last anchor counts: the rest of its sentence if that is
     math only, else its first candidate that is not negated. Without an anchor: the last candidate
     that is not negated. A revision ("wait", "actually", "no,", "correction", "I mean", ...) followed by
     a candidate voids everything before it, anchors included ("The answer is 70. Wait, no, 71" states
     71). A prose answer with no digits and no math ("Evelyn") is read whole. The minus sign U+2212
     reads as "-".
  A text with nothing that applies, or longer than MAX_ANSWER_CHARS, states no answer (wrong). So "the
  answer is not 70, it is 71" and "It is 71, not 70" state 71; "**70**" and "`70`" state 70.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

MAX_ANSWER_CHARS = 1000  # a longer answer states none (at this length the worst case takes ~0.1 s)

# a word that is not a LaTeX command (`\frac`) and not a single variable (`x`, `i`)
_WORD = re.compile(r"(?<![\\A-Za-z])[A-Za-z]{2,}")
# LaTeX commands whose argument is text or an environment name: their words do not make an answer prose
_TEXT_COMMAND = re.compile(r"\\(?:text|textbf|textit|mathrm|mathbf|mbox|operatorname|begin|end)\s*\{[^{}]*\}")
# math that plain-number reading would cut apart: LaTeX, implicit products (`2x`, `5i`), calls (`sqrt(13)`)
_MATH_IN_PROSE = re.compile(r"[\\^_{}]|\d[A-Za-z]|[A-Za-z]\(")
_ANSWER_TAG = re.compile(r"<answer>(.*?)(?:</answer>|\Z)", re.S)
# markdown emphasis or inline code around a span: **x**, __x__, *x*, _x_, `x`
_EMPHASIS = re.compile(r"(\*\*|__|\*|_|`+)(?=\S)(.+?)(?<=\S)\1", re.S)
# math segments: $…$ (unescaped), \(…\), \[…\]
_MATH_SEGMENT = re.compile(r"(?<!\\)\$(?!\$)(.+?)(?<!\\)\$|\\\((.+?)\\\)|\\\[(.+?)\\\]", re.S)
# a plain number: optional sign or currency, thousands commas, decimals, a simple fraction; not glued to
# letters, digits, LaTeX or operators that would make it part of a bigger expression
_NUMBER = re.compile(
    r"(?<![\w.^_{}\\/])(?:\\?\$\s?)?(-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|-?\d+(?:\.\d+)?(?:\s*/\s*\d+)?)(?![\w^_{}(]|\.\d|/\d)"
)
# "answer is" but not "answer isn't"
_ANCHOR = re.compile(r"\b(?:final\s+)?(?:answer|result|solution)\s*(?:is\b|:|=|would\s+be\b|will\s+be\b)\s*", re.I)
# a revision: what the text said before it no longer counts
_REVISION = re.compile(
    r"\b(?:wait|actually|correction|sorry|oops|scratch\s+that|i\s+mean|on\s+second\s+thought)\b"
    r"|(?:^|[.,;:!?]\s*)no\b",
    re.I,
)
# negation cues: before a candidate, in its clause; or right after it
_CLAUSE_START = re.compile(r"[,;.:?]|(?<!\\)!|\bbut\b|\bit(?:'s|\s+is)\b", re.I)  # `\!` is LaTeX spacing
_NEGATION_BEFORE = re.compile(
    r"\b(?:not|no|never|nor|neither|rather\s+than|instead\s+of|other\s+than|except|wrong|incorrect)\b|n't\b", re.I
)
_NEGATION_AFTER = re.compile(
    r"^\s*(?:is\s+(?:not|wrong|incorrect|false)|isn't|was\s+(?:wrong|incorrect)|(?:is|was)n't|"
    r",?\s*no(?:\s*[,.;!]|\s*$|\s+wait)|"  # "70, no, 71" but not "70, no question"
    r"(?:would\s+be|is)\s+(?:wrong|incorrect))",
    re.I,
)


def _has_prose(text: str) -> bool:
    return _WORD.search(_TEXT_COMMAND.sub(" ", text)) is not None


def _strip_wrappers(text: str) -> str:
    """`**70**.` -> `70`: emphasis, code marks, math delimiters around the whole, a final period."""
    previous = None
    while text != previous:
        previous = text
        text = text.strip().removesuffix(".").strip()
        whole = _EMPHASIS.fullmatch(text) or _MATH_SEGMENT.fullmatch(text)
        if whole:
            text = next(g for g in whole.groups()[1 if whole.re is _EMPHASIS else 0:] if g is not None)
    if text.count("$") == 1 and re.fullmatch(r"\\?\$\s?-?[\d.,]+", text):  # currency: $18, \$18
        text = text.lstrip("\\$ ")
    return text


def _negated(text: str, start: int, end: int) -> bool:
    clause_start = max((m.end() for m in _CLAUSE_START.finditer(text, 0, start)), default=0)
    return bool(_NEGATION_BEFORE.search(text[clause_start:start]) or _NEGATION_AFTER.match(text[end:]))


def _candidates(text: str) -> list[tuple[int, int, str]]:
    """(start, end, answer) of every answer-like span in prose, in text order."""
    found: list[tuple[int, int, str]] = []
    masked = list(text)

    def take(match: re.Match, content: str) -> None:
        found.append((match.start(), match.end(), content))
        masked[match.start():match.end()] = " " * (match.end() - match.start())

    for m in _EMPHASIS.finditer(text):
        content = m.group(2)
        if not _has_prose(content) and re.search(r"\d|\\", content):
            take(m, _strip_wrappers(content))
    for m in _MATH_SEGMENT.finditer("".join(masked)):
        content = next(g for g in m.groups() if g is not None)
        if not _has_prose(content):  # `$18 and $` is two prices, not math
            take(m, content.strip())
    rest = "".join(masked)
    if not _MATH_IN_PROSE.search(rest.replace("\\$", " ")):
        for m in _NUMBER.finditer(rest):
            take(m, m.group(1).replace(",", "").replace(" ", ""))
    return sorted(found)


def final_answer(text: str) -> str | None:
    """The one answer `text` states, by the rules in the module docstring; None if it states none."""
    tags = _ANSWER_TAG.findall(text)
    if tags:
        text = tags[-1]
    text = text.replace("\u2212", "-")  # the minus sign: "−70" is not 70
    if len(text) > MAX_ANSWER_CHARS:
        return None  # a final answer, not an essay; and the rules' regexes are quadratic at worst
    boxes = [(start, end, content) for start, end, content in _boxed_spans(text) if not _negated(text, start, end)]
    if boxes:
        return boxes[-1][2] or None
    if "\\boxed" in text or "\\fbox" in text:
        return None  # only negated or unclosed boxes: no answer, not a number from around them
    text = text.strip()
    if not text:
        return None
    bare = _strip_wrappers(text)
    if not _has_prose(bare):
        return bare or None
    anchors = list(_ANCHOR.finditer(text))
    candidates = [(s, e, c) for s, e, c in _candidates(text) if not _negated(text, s, e)]
    # a revision ("The answer is 70. Wait, no, it's 71") voids what came before it, if an answer follows it
    for cut in reversed([m.end() for m in _REVISION.finditer(text)]):
        if any(start >= cut for start, _, _ in candidates):
            anchors = [a for a in anchors if a.start() >= cut]
            candidates = [c for c in candidates if c[0] >= cut]
            break
    if anchors:
        tail_start = anchors[-1].end()
        sentence = re.split(r"(?<!\d)\.(?!\d)|[;?\n]|(?<!\\)!", text[tail_start:], maxsplit=1)[0]
        tail = _strip_wrappers(sentence)
        if tail and not _has_prose(tail) and not _negated(text, tail_start, tail_start):
            return tail
        after = [c for s, _, c in candidates if s >= tail_start]
        return after[0] if after else None
    if candidates:
        return candidates[-1][2]
    if not re.search(r"\d", text) and not _MATH_IN_PROSE.search(text):
        return _strip_wrappers(text)  # a name or a letter: "Evelyn", "(C)"
    return None


def _boxed_spans(text: str) -> Iterator[tuple[int, int, str]]:
    """(start, end, content) of every complete `\\boxed{…}` and `\\fbox{…}`, in text order."""
    for match in re.finditer(r"\\(?:boxed|fbox)\s*\{", text):
        depth = 0
        for i in range(match.end() - 1, len(text)):
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            if depth == 0:
                yield match.start(), i + 1, text[match.end():i].strip()
                break
