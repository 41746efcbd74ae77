"""The hardened code verifier against the previous one: seconds per verified item, and what each accepts.

The previous verifier (tests appended to the candidate's program, one process, a printed nonce as the
pass signal) is loaded at run time from git (`kat_core/tasks/sandbox.py` at PREVIOUS_COMMIT) into a
throw-away module, so it stays reachable only here. Both verify the same reference solutions, one item at
a time, interleaved (previous, hardened, previous, ...) after a warm-up; an item's figure is the median
of `--repeats` runs, and the table shows the mean over items of wall seconds and the children's CPU
seconds (user + system, both processes for the hardened one).

It also runs the hostile corpus of tests/test_hostile_code.py through both (how many hostile candidates
each one passes), and with `--full` the whole HumanEval (164) and MBPP (427) reference sweep through the
hardened verifier (the done-when check; a few minutes on two cores).

    .venv/bin/python benchmarks/bench_verifier.py [--items 30 --repeats 3 --full --workers 2]

The last line is `ratio hardened/previous s_per_item: X` (wall seconds per item).
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kat_core.tasks.code import MBPP, HumanEval  # noqa: E402

PREVIOUS_COMMIT = "846e282"  # the last commit before issue 17's hardening


def load_previous():
    """The previous sandbox module, from git, as a module of its own (its own probe and uid slots)."""
    source = subprocess.run(["git", "-C", str(ROOT), "show", f"{PREVIOUS_COMMIT}:kat_core/tasks/sandbox.py"],
                            check=True, capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp(prefix="kat-bench-verifier-")) / "previous_sandbox.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("previous_sandbox", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["previous_sandbox"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def previous_run(previous, task, item, answer):
    """What `task.run` did before: program and tests in one process."""
    return previous.run_tests(task.program(item, answer), task.test_code(item),
                              timeout_s=2 * task.timeout_s, cpu_s=math.ceil(task.timeout_s))


def timed(fn):
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    result = fn()
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return result, wall, cpu


def hostile_counts(previous, items):
    sys.path.insert(0, str(ROOT / "tests"))
    import test_hostile_code as corpus

    passed = {"previous": 0, "hardened": 0}
    total = 0
    for template in corpus.HOSTILE.values():
        for task, item in items:
            answer = corpus.source(template, item.meta["entry_point"])
            total += 1
            passed["previous"] += previous_run(previous, task, item, answer).passed
            passed["hardened"] += task.run(item, answer).passed
    return passed, total, len(corpus.HOSTILE)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, default=30, help="reference solutions measured, half from each benchmark")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--full", action="store_true", help="also sweep all 164 + 427 references (hardened)")
    # as many as there are cores: MBPP 123 needs ~7 CPU seconds, and its 20 s wall clock runs out when a
    # loaded machine shares its cores among more workers
    ap.add_argument("--workers", type=int, default=2, help="parallel verifications in the full sweep")
    args = ap.parse_args()

    previous = load_previous()
    humaneval, mbpp = HumanEval(), MBPP()
    rng = random.Random(args.seed)
    # MBPP 123 alone takes ~5 CPU seconds (its own work, the same under both): left out of the timing sample
    pool = [(humaneval, i) for i in humaneval.examples()] + [(mbpp, i) for i in mbpp.examples() if i.id != "mbpp/123"]
    half = args.items // 2
    sample = rng.sample(pool[:164], half) + rng.sample(pool[164:], args.items - half)

    for task, item in sample[:3]:  # warm-up: probes, imports, page cache
        previous_run(previous, task, item, item.answer)
        task.run(item, item.answer)

    figures = {"previous": {"wall": [], "cpu": [], "passed": 0}, "hardened": {"wall": [], "cpu": [], "passed": 0}}
    for task, item in sample:
        runs = {"previous": [], "hardened": []}
        for _ in range(args.repeats):
            runs["previous"].append(timed(lambda t=task, i=item: previous_run(previous, t, i, i.answer)))
            runs["hardened"].append(timed(lambda t=task, i=item: t.run(i, i.answer)))
        for name, measured in runs.items():
            figures[name]["wall"].append(statistics.median(w for _, w, _ in measured))
            figures[name]["cpu"].append(statistics.median(c for _, _, c in measured))
            figures[name]["passed"] += all(r.passed for r, _, _ in measured)

    by_id = {item.id: (task, item) for task, item in pool}
    hostile, hostile_total, hostile_kinds = hostile_counts(
        previous, [by_id["HumanEval/23"], by_id["HumanEval/29"], by_id["mbpp/2"]])

    print(f"\ncode verifier, {len(sample)} reference solutions ({half} HumanEval, {len(sample) - half} MBPP), "
          f"median of {args.repeats} runs each, one at a time")
    print(f"{'verifier':<10} {'s_per_item':>11} {'cpu_s_per_item':>15} {'refs_passed':>12} "
          f"{'hostile_passed':>15}")
    for name, fig in figures.items():
        print(f"{name:<10} {statistics.mean(fig['wall']):>11.4f} {statistics.mean(fig['cpu']):>15.4f} "
              f"{fig['passed']:>6}/{len(sample):<5} {hostile[name]:>8}/{hostile_total:<6}")
    print(f"(hostile corpus: {hostile_kinds} attacks x 3 items, from tests/test_hostile_code.py)")

    if args.full:
        with ThreadPoolExecutor(args.workers) as workers:
            for task in (humaneval, mbpp):
                items = task.examples()
                start = time.perf_counter()
                results = list(workers.map(lambda i, t=task: t.run(i, i.answer), items))
                failed = [i.id for i, r in zip(items, results, strict=True) if not r.passed]
                note = f"; failed: {', '.join(failed)}" if failed else ""
                print(f"full sweep {task.name}: {len(items) - len(failed)}/{len(items)} references pass "
                      f"({time.perf_counter() - start:.0f} s, {args.workers} workers){note}")

    ratio = statistics.mean(figures["hardened"]["wall"]) / statistics.mean(figures["previous"]["wall"])
    print(f"ratio hardened/previous s_per_item: {ratio:.2f}")


if __name__ == "__main__":
    main()
