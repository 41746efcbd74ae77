"""HumanEval and MBPP: loaders, the verifier, and every reference solution passing in the sandbox."""

import os
import random
from concurrent.futures import ThreadPoolExecutor

import pytest

from kat_core.errors import KatError
from kat_core.tasks.base import Item
from kat_core.tasks.code import MBPP, HumanEval, difficulty_of, extract_code
from kat_core.tasks.sandbox import SandboxResult

WORKERS = min(8, (os.cpu_count() or 2) + 1)  # the children do the work; one spare thread hides our latency

# Reference solutions known not to pass, with the reason. Empty: all 164 + 427 pass (the slowest, MBPP 123,
# needs about 5 CPU seconds of the 10 allowed).
KNOWN_REFERENCE_FAILURES: dict[str, str] = {}


@pytest.fixture(scope="module")
def humaneval() -> HumanEval:
    return HumanEval()


@pytest.fixture(scope="module")
def mbpp() -> MBPP:
    return MBPP()


def run_all(task, answers: list[tuple[Item, str]]) -> dict[str, SandboxResult]:
    with ThreadPoolExecutor(WORKERS) as pool:
        results = pool.map(lambda pair: task.run(*pair), answers)
        return {item.id: result for (item, _), result in zip(answers, results, strict=True)}


@pytest.mark.slow  # ~1 minute on two cores; benchmarks/bench_verifier.py --full runs the same sweep
@pytest.mark.parametrize("family, count", [("humaneval", 164), ("mbpp", 427)])
def test_every_reference_solution_passes(family, count, request):
    task = request.getfixturevalue(family)
    items = task.examples()
    assert len(items) == count and len({i.id for i in items}) == count
    results = run_all(task, [(item, item.answer) for item in items])
    failed = {i: r.summary() for i, r in results.items() if not r.passed}
    assert set(failed) == set(KNOWN_REFERENCE_FAILURES) & set(results), failed
    assert len(results) - len(failed) == count - len(set(KNOWN_REFERENCE_FAILURES) & set(results))


@pytest.mark.parametrize("family", ["humaneval", "mbpp"])
def test_a_sample_of_reference_solutions_passes(family, request):
    # the fast stand-in for the full sweep above: includes the items whose tests need more than the stub
    # (HumanEval prompt helpers, MBPP's `sys`, Counter and re.Match results)
    task = request.getfixturevalue(family)
    items = task.examples()
    must = {"HumanEval/32", "HumanEval/38", "HumanEval/50", "mbpp/596", "mbpp/88", "mbpp/737", "mbpp/590"}
    sample = [i for i in items if i.id in must] + random.Random(3).sample(items, 12)
    results = run_all(task, [(item, item.answer) for item in sample])
    assert all(r.passed for r in results.values()), {i: r.summary() for i, r in results.items() if not r.passed}


@pytest.mark.parametrize("family", ["humaneval", "mbpp"])
def test_perturbed_solutions_fail(family, request):
    task = request.getfixturevalue(family)
    items = task.examples()
    sample = random.Random(7).sample(range(len(items)), 25)
    answers = []
    for k in sample:
        item = items[k]
        answers.append((item, f"def {item.meta['entry_point']}(*args, **kwargs):\n    return None\n"))
        answers.append((item, items[(k + 1) % len(items)].answer))  # another problem's reference
    with ThreadPoolExecutor(WORKERS) as pool:
        verdicts = list(pool.map(lambda pair: task.verify(*pair), answers))
    assert len(verdicts) == 50
    assert not any(verdicts), [item.id for (item, _), ok in zip(answers, verdicts, strict=True) if ok]


def test_humaneval_items(humaneval):
    item = humaneval.examples()[0]
    assert item.id == "HumanEval/0" and item.family == "humaneval"
    assert item.meta["entry_point"] == "has_close_elements"
    assert item.meta["code_prompt"] in item.prompt and "def check(candidate)" in item.meta["tests"]
    assert item.answer.startswith(item.meta["code_prompt"])
    assert 1 <= item.difficulty <= 5
    assert humaneval.intent_features(item) == {
        "family": "humaneval", "difficulty": item.difficulty, "lines": item.meta["reference_lines"],
    }


def test_humaneval_answers_in_every_usual_shape(humaneval):
    item = humaneval.examples()[0]
    body = "    return any(abs(a - b) < threshold for i, a in enumerate(numbers) for b in numbers[i + 1:])\n"
    whole = f"def has_close_elements(numbers: List[float], threshold: float) -> bool:\n{body}"
    # completion style: just the body (the prompt goes first)
    assert humaneval.verify(item, body)
    # the whole function, without the prompt's `from typing import List`, in a fence with chatter
    assert humaneval.verify(item, f"Here you go:\n```python\n{whole}```\nIt compares every pair.")
    # fences: the block that defines the entry point wins over an example block before it
    assert humaneval.verify(item, f"```python\nprint(1)\n```\n\n```python\n{whole}```")
    assert not humaneval.verify(item, "```python\ndef has_close_elements(numbers, threshold):\n    return True\n```")


def test_mbpp_items(mbpp):
    item = mbpp.examples()[0]
    assert item.id == "mbpp/2" and item.meta["entry_point"] == "similar_elements"
    assert item.prompt.startswith("Write a function to find the shared elements")
    assert item.meta["tests"][0] in item.prompt
    assert mbpp.verify(item, f"```python\n{item.answer}\n```")
    assert not mbpp.verify(item, "def similar_elements(a, b):\n    return ()")


def test_mbpp_test_imports_are_run(mbpp):
    with_imports = [i for i in mbpp.examples() if i.meta["test_imports"]]
    assert with_imports
    item = with_imports[0]
    assert all(line in mbpp.test_code(item) for line in item.meta["test_imports"])


def test_examples_sample_deterministically(mbpp):
    a = [i.id for i in mbpp.examples("test", n=10, seed=3)]
    assert a == [i.id for i in mbpp.examples("test", n=10, seed=3)]
    assert a != [i.id for i in mbpp.examples("test", n=10, seed=4)]
    assert len(set(a)) == 10
    assert len(mbpp.examples("test", n=10_000)) == 427


def test_only_the_test_split(humaneval):
    with pytest.raises(KatError, match="no split 'train'"):
        humaneval.examples("train")


def test_a_missing_benchmarks_dir_is_a_readable_error(tmp_path):
    with pytest.raises(KatError, match="sanitized-mbpp.json not found"):
        MBPP(benchmarks_dir=str(tmp_path)).examples()


def test_difficulty_spans_all_levels(humaneval, mbpp):
    for task in (humaneval, mbpp):
        assert {i.difficulty for i in task.examples()} == {1, 2, 3, 4, 5}
    assert difficulty_of("def f(x):\n    return x\n") == 1
    assert difficulty_of("def f(x):\n" + "    x += 1\n" * 11 + "    return x\n") == 5


def test_extract_code():
    assert extract_code("x = 1") == "x = 1"
    assert extract_code("    return 1\n") == "    return 1"  # indentation is kept
    assert extract_code("Sure.\n```python\nx = 1\n```\nDone.") == "x = 1"
    assert extract_code("```\ny = 2\n```") == "y = 2"
    assert extract_code("```python\nx = 1\n") == "x = 1"  # an unclosed fence at the end of the text
    assert extract_code("```text\nout\n```\n```py\nz = 3\n```") == "z = 3"
    assert extract_code("```python\nf(1)\n```\n```python\ndef f(a):\n    pass\n```", "f").startswith("def f")
