"""Math benchmarks: GSM8K, MATH-500 and AIME 2024, read from the public benchmark files, with one
math-verify based verifier for all three.

Items
  gsm8k   id `gsm8k-<line index>`; answer: the number after `####`, commas removed; steps: the solution
          lines with the `<<48/2=24>>` calculator annotations removed. difficulty: the number of
          solution lines (the dataset's reasoning steps: 2..11, most 2..5) minus one, clamped to 1..5.
  math500 id: the dataset's unique_id (`test/algebra/1234.json`); answer: its `answer` field (LaTeX);
          difficulty: the MATH level 1..5; steps: the solution's paragraphs; meta: subject, solution.
  aime24  id `aime24-<id>`; answer: the `\\boxed{}` of the solution; difficulty 5; no steps.

Verification parses the gold (wrapped in `$…$`, so bare LaTeX such as `\\frac43` parses), picks exactly
**one** final answer out of the answer text (`final_answer`), parses it as one LaTeX expression and
compares with `math_verify.verify` (numbers, fractions, radicals, sets, intervals, matrices, equations
`x = 5` against `5`). One answer, never "any of the numbers in the text": otherwise a hedge ("70 or 71",
"not 70, it is 71") would earn the reward whichever number is right, and RL would learn to hedge.

Which answer a text states, and why those rules: kat_core.tasks.answers (`final_answer`).
Math-verify then reads the chosen answer with its LaTeX and expression extraction (`LatexExtractionConfig`,
`ExprExtractionConfig`) in `first_match` mode with no string fallback: one reading of one answer.
Empty or unparsable answers are wrong, never an error.

Time limits: math-verify's own limits use signal.alarm, which raises in any thread but the main one and
cancels any timer the caller had set (pytest-timeout's, for one). They are off here. In the main thread
`verify` sets its own deadline (VERIFY_TIMEOUT_S) and afterwards re-arms the caller's timer; other
threads cannot be interrupted, so there an answer is only protected by `_too_costly`, which rejects the
inputs known to make sympy run for minutes: power towers, huge powers, factorials, binomials, sums and
products of a huge n, over-long text. It cannot know every such input; an evaluation of untrusted
answers at scale is safest calling `verify` from the main thread of its worker processes.
"""

from __future__ import annotations

import logging
import math
import random
import re
import signal
import threading
import time
from abc import abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any

from kat_core.data.dataset import iter_jsonl
from kat_core.errors import KatError
from kat_core.tasks.answers import final_answer
from kat_core.tasks.base import Item, Task, register
from kat_core.tasks.paths import benchmark_file

VERIFY_TIMEOUT_S = 5.0  # per verify() call, main thread only (see the module docstring)
MAX_ANSWER_CHARS = 1000  # an <answer> is a final answer, not a derivation; longer ones are not parsed
MAX_POWER_DIGITS = 10_000  # a literal power with more digits than this is refused (10^10000 takes 0.3 s)
MAX_ITERATED_DIGITS = 5  # n!, binomials, sums and products are refused for n > 10^5 (\prod to 10^5: 0.8 s)

# math-verify warns once that its timeouts are off; we set our own deadline, so the warning misleads
for _name in ("math_verify.parser", "math_verify.grader"):
    logging.getLogger(_name).addFilter(lambda record: "Timeout is disabled" not in record.getMessage())


# --- verification ------------------------------------------------------------------------------------

# integers joined by power operators, through braces, parentheses and \right: 9^9^9, 10^{10^{10}},
# 2**2**5, (9^{9})^{9^9}; a sign on an exponent counts too (10^{-100000000} is as costly)
_POWER_CHAIN = re.compile(r"\d+(?:(?:\s|\\right|[})])*(?:\^|\*\*)(?:\s|\\left|[{(])*[-+]?\s*\d+)+")
_ITERATED = re.compile(r"!|\\d?binom|\\choose|\\prod|\\sum|\b(?:factorial|binomial|Product|Sum)\b")


class _DeadlineExceeded(BaseException):
    # a BaseException, so that math-verify's and sympy's `except Exception` do not swallow it
    pass


@lru_cache(maxsize=1)
def _math_verify() -> Any:
    """The math_verify module, imported on first use: it pulls in sympy and the LaTeX parser (about 0.3 s),
    and every process that loads a config registers this family without verifying anything (each pipeline
    stage, each `kat` command)."""
    import math_verify

    return math_verify


@lru_cache(maxsize=4096)
def _parse_gold(gold: str) -> tuple[Any, ...]:
    # golds are LaTeX without delimiters (`\frac43`, `\text{(C)}`, `10,\!080`); `$…$` makes math-verify
    # read the whole gold as one expression
    return tuple(_math_verify().parse(f"${gold}$", parsing_timeout=None))


def _power_digits(numbers: list[int]) -> float:
    """About how many digits numbers[0] ** numbers[1] ** … has (right-associative, like ^); inf past
    MAX_POWER_DIGITS."""
    value = abs(numbers[-1])
    digits = math.log10(value) if value else 0.0
    for base in reversed(numbers[:-1]):
        if base < 2:  # 0 and 1 stay small whatever the exponent
            value, digits = base, 0.0
            continue
        if value.bit_length() > 64:  # an exponent this large makes any base >= 2 explode
            return math.inf
        digits = value * math.log10(base)
        if digits > MAX_POWER_DIGITS:
            return math.inf
        value = base**value
    return digits


def _too_costly(text: str) -> bool:
    """Whether an answer would make sympy compute for minutes (the known ways, not every way)."""
    if len(text) > MAX_ANSWER_CHARS:
        return True
    sizes = []
    for chain in _POWER_CHAIN.finditer(text):
        numbers = [int(n) for n in re.findall(r"\d+", chain.group())]
        # every tail too: in `\prod_{k=1}^{10^{6}}` the chain starts at the 1, and 10^6 is the size
        sizes += [_power_digits(numbers[i:]) for i in range(len(numbers) - 1)]
    sizes += [math.log10(int(n)) for n in re.findall(r"\d+", text) if int(n)]
    largest = max(sizes, default=0.0)
    if largest > MAX_POWER_DIGITS:
        return True
    # n!, binomials, sums and products of a big n: 123456789! and \binom{10^9}{10^5} never finish
    return largest > MAX_ITERATED_DIGITS and _ITERATED.search(text) is not None


@lru_cache(maxsize=1)
def _answer_extraction() -> tuple[Any, ...]:
    # one reading of one answer: math-verify's LaTeX reading first, its plain-expression reading (`2**10`,
    # `1/2`) if that fails, and no raw-string fallback
    mv = _math_verify()
    return mv.LatexExtractionConfig(boxed_match_priority=0), mv.ExprExtractionConfig()


def _parse_answer(answer: str) -> list[Any]:
    return _math_verify().parse(f"${answer}$", extraction_config=_answer_extraction(),
                                fallback_mode="no_fallback", extraction_mode="first_match", parsing_timeout=None)


@contextmanager
def _deadline(seconds: float) -> Iterator[None]:
    """Raise _DeadlineExceeded in the block after `seconds`, in the main thread; a no-op elsewhere
    (signals are delivered to the main thread only). A timer the caller had running is re-armed after."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
        yield
        return
    outer_handler = signal.getsignal(signal.SIGALRM)
    if outer_handler is None:  # a handler installed outside Python could not be restored
        yield
        return

    def on_alarm(signum: int, frame: Any) -> None:
        raise _DeadlineExceeded

    started = time.monotonic()
    signal.signal(signal.SIGALRM, on_alarm)
    outer_left, outer_interval = signal.setitimer(signal.ITIMER_REAL, seconds)
    if 0 < outer_left < seconds:  # the caller's timer is due first: fire then, and let it run after us
        signal.setitimer(signal.ITIMER_REAL, outer_left)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, outer_handler)
        if outer_left > 0:
            left = max(outer_left - (time.monotonic() - started), 1e-3)
            signal.setitimer(signal.ITIMER_REAL, left, outer_interval)


def verify_math(gold: str, answer_text: str, timeout_s: float = VERIFY_TIMEOUT_S) -> bool:
    """Whether `answer_text` states the same mathematical answer as the gold answer `gold` (LaTeX or a
    plain number). Never raises for a bad answer: empty, unparsable, too costly or too slow is False."""
    text = (answer_text or "").strip()
    if not text or _too_costly(text):
        return False
    mv = _math_verify()  # imported before the deadline starts: a first import must not count against it
    _answer_extraction()
    try:
        with _deadline(timeout_s):
            answer = final_answer(text)
            if answer is None:
                return False
            gold_parsed = list(_parse_gold(gold))
            parsed = _parse_answer(answer)
            return bool(gold_parsed and parsed) and mv.verify(gold_parsed, parsed, timeout_seconds=None)
    except _DeadlineExceeded:
        return False
    except Exception:  # a malformed answer grades as wrong; it must not stop an evaluation
        logging.getLogger(__name__).debug("verification failed for %r", text, exc_info=True)
        return False


# --- loaders -----------------------------------------------------------------------------------------

_CALCULATOR = re.compile(r"<<[^>]*>>")


def boxed_content(text: str, command: str = "\\boxed") -> str | None:
    """The content of the last `\\boxed{…}` (or `command{…}`) in `text` (braces may nest), or None."""
    start = text.rfind(command + "{")
    if start < 0:
        return None
    depth, begin = 0, start + len(command) + 1
    for i in range(begin - 1, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[begin:i].strip()
    return None


def _field(record: dict[str, Any], key: str, path: Path, index: int) -> Any:
    if key not in record:
        raise KatError(f"{path}: record {index + 1} has no field {key!r}")
    return record[key]


class _MathBenchmark(Task):
    """A math benchmark read from one JSONL file of the benchmarks dir; only a test split."""

    filename: str = ""
    splits = ("test",)

    def __init__(self, benchmarks_dir: str | None = None) -> None:
        self.benchmarks_dir = benchmarks_dir
        self._items: list[Item] | None = None

    def examples(self, split: str = "test", n: int | None = None, seed: int = 0) -> list[Item]:
        self._check_split(split)
        if self._items is None:
            path = benchmark_file(self.filename, self.benchmarks_dir)
            self._items = [self._item(rec, path, i) for i, rec in enumerate(iter_jsonl(path))]
        if n is None or n >= len(self._items):
            return list(self._items)
        # a sample in file order: the same n and seed give the same items, listed the same way
        chosen = sorted(random.Random(f"{self.name}:{seed}").sample(range(len(self._items)), n))
        return [self._items[i] for i in chosen]

    def verify(self, item: Item, answer_text: str) -> bool:
        return verify_math(item.answer, answer_text)

    def intent_features(self, item: Item) -> dict[str, Any]:
        features = super().intent_features(item)
        if "subject" in item.meta:
            features["subject"] = item.meta["subject"]
        return features

    @abstractmethod
    def _item(self, record: dict[str, Any], path: Path, index: int) -> Item:
        """One benchmark record as an Item (KatError naming the file for a bad record)."""


@register("gsm8k")
class GSM8K(_MathBenchmark):
    name = "gsm8k"
    filename = "gsm8k_test.jsonl"

    def _item(self, record: dict[str, Any], path: Path, index: int) -> Item:
        solution, sep, final = str(_field(record, "answer", path, index)).rpartition("####")
        if not sep:
            raise KatError(f"{path}: record {index + 1}: the answer has no '#### <final answer>'")
        lines = [line.strip() for line in solution.strip().splitlines() if line.strip()]
        return Item(
            id=f"gsm8k-{index}",
            family=self.name,
            prompt=str(_field(record, "question", path, index)),
            answer=final.strip().replace(",", ""),
            difficulty=min(max(len(lines) - 1, 1), 5),
            steps=[_CALCULATOR.sub("", line) for line in lines],
            meta={"calculations": sum(len(_CALCULATOR.findall(line)) for line in lines)},
        )


@register("math500")
class MATH500(_MathBenchmark):
    name = "math500"
    filename = "math500_test.jsonl"

    def _item(self, record: dict[str, Any], path: Path, index: int) -> Item:
        solution = str(_field(record, "solution", path, index))
        level = _field(record, "level", path, index)
        if not isinstance(level, int) or not 1 <= level <= 5:
            raise KatError(f"{path}: record {index + 1}: level must be an integer 1..5, not {level!r}")
        return Item(
            id=str(_field(record, "unique_id", path, index)),
            family=self.name,
            prompt=str(_field(record, "problem", path, index)),
            answer=str(_field(record, "answer", path, index)),
            difficulty=level,
            steps=[p.strip() for p in solution.split("\n\n") if p.strip()],
            meta={"subject": _field(record, "subject", path, index), "solution": solution},
        )


@register("aime24")
class AIME24(_MathBenchmark):
    name = "aime24"
    filename = "aime24_test.jsonl"

    def _item(self, record: dict[str, Any], path: Path, index: int) -> Item:
        answer = boxed_content(str(_field(record, "solution", path, index)))
        if not answer:
            raise KatError(f"{path}: record {index + 1}: the solution has no \\boxed{{answer}}")
        return Item(
            id=f"aime24-{_field(record, 'id', path, index)}",
            family=self.name,
            prompt=str(_field(record, "problem", path, index)),
            answer=answer,
            difficulty=5,  # AIME problems are competition-hard throughout
            meta={"url": record.get("url", "")},
        )
