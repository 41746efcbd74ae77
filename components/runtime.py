"""What every component does around its stage call: the base image, config loading, readable errors and
resumable outputs.

The component functions are shipped to the runner as source, so they import these helpers inside their
bodies; this module is part of the platform image (and of the local environment), like kat_core.
"""

import hashlib
import json
import logging
import os
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

# The image every component runs in on a cluster: it holds kat_core, components/ and kfp. No
# packages_to_install, so the same component runs unchanged under kfp.local's SubprocessRunner.
DEFAULT_IMAGE = "ghcr.io/kat-platform/kat:latest"
BASE_IMAGE = os.environ.get("KAT_BASE_IMAGE", DEFAULT_IMAGE)

PROJECT_ROOT = Path(__file__).resolve().parents[1]  # holds components/ and kat_core/ (source tree or site-packages)

# Where training stages keep their resumable work, keyed by what determines the result. KFP gives every
# run fresh output paths, so a killed stage's checkpoints would otherwise be lost with its run.
CHECKPOINT_DIR_ENV = "KAT_CHECKPOINT_DIR"


def _module_files(name: str) -> list[Path]:
    """The files importing kat_core module `name` executes: the module's and its packages' __init__."""
    parts = name.split(".")
    files = [PROJECT_ROOT.joinpath(*parts[:i], "__init__.py") for i in range(1, len(parts))]
    files += [PROJECT_ROOT.joinpath(*parts).with_suffix(".py"), PROJECT_ROOT.joinpath(*parts, "__init__.py")]
    return [f for f in files if f.is_file()]


def code_digest() -> str:
    """A digest of the code the pipeline's tasks run: components/ and the kat_core modules they import,
    transitively (read from the import statements, nothing is imported), and the shipped profiles.

    It keys what must change when that code changes, and only then (not on a commit that touches other
    code, as a git revision would): the local runner's cache (kfp.local keys a task by its command and
    inputs, which stay the same when kat_core changes) and the resumable work of training stages."""
    import ast

    todo = sorted((PROJECT_ROOT / "components").glob("*.py"))
    seen: set[Path] = set()
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]  # `from pkg import mod`
            else:
                continue
            todo += [f for n in names if n.split(".")[0] == "kat_core" for f in _module_files(n)]
    h = hashlib.sha256()
    for path in sorted(seen | set((PROJECT_ROOT / "kat_core" / "profiles").glob("*.yaml"))):
        h.update(str(path.relative_to(PROJECT_ROOT)).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def stage_config(profile: str, overrides: list[str]) -> Any:
    """The run's KatConfig; also sends kat_core's INFO lines (where outputs went, resumes) to the task log."""
    from kat_core.config import load_config

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stdout)
    logging.getLogger("kat_core").setLevel(logging.INFO)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from kat_core.util import cpu_threads, short_lived_gc

    cpu_threads()  # every stage under the one CPU thread policy
    short_lived_gc()  # a stage's process starts and ends seconds sooner
    return load_config(profile, list(overrides))


@contextmanager
def user_errors() -> Iterator[None]:
    """A KatError (bad config, data that failed validation) ends the task with one `error:` line instead
    of a traceback: that line is what the run back ends and the KFP UI show as the reason."""
    from kat_core.errors import KatError

    try:
        yield
    except KatError as e:
        print(f"error: {e}", flush=True)
        raise SystemExit(1) from None


@contextmanager
def resumable(out: str, stage: str, config: Any, inputs: dict[str, str]) -> Iterator[Path]:
    """Yield the directory a training stage should write to, then put the result at `out`.

    With KAT_CHECKPOINT_DIR set (the local back end sets it under KAT_HOME; on a cluster it is the
    checkpoints PVC), the stage works in a directory named by its config, code and input digests, so a
    run killed mid-way resumes from its last checkpoint when the same stage runs again. A directory whose
    key no run will reproduce (the code or config changed) stays behind; delete it when nothing runs."""
    from kat_core.manifest import config_hash, dir_digest

    root = os.environ.get(CHECKPOINT_DIR_ENV)
    if not root:
        yield Path(out)
        return
    key = {"stage": stage, "config": config_hash(config), "code": code_digest(),
           "inputs": {name: dir_digest(Path(path)) for name, path in sorted(inputs.items())}}
    work = Path(root) / f"{stage}-{hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]}"
    yield work / "output"
    if Path(out).exists():  # a half-written output of an earlier attempt of this task
        shutil.rmtree(out)
    shutil.move(str(work / "output"), out)  # a rename on one filesystem, a copy from a PVC
    shutil.rmtree(work, ignore_errors=True)


def open_pipeline_run(config: Any) -> str:
    """The MLflow parent run of this pipeline run (found or made from KAT_RUN_ID), logged with `config`: the
    DAG's head opens it with the whole config; a stage that asks later gets the same run."""
    from kat_core.manifest import config_hash
    from kat_core.platform.tracking import start_pipeline_run

    return start_pipeline_run(f"autothink-{config.profile}", config.model_dump(mode="json"),
                              kfp_run_id=os.environ.get("KAT_RUN_ID"), profile=config.profile,
                              config_hash=config_hash(config))


def track(stage: str, config: Any, out_dir: str, inputs: dict[str, str] | None = None,
          params: dict[str, Any] | None = None) -> None:
    """Record the finished stage in MLflow: a child run (params, its metrics.jsonl, manifest, input datasets)
    of the pipeline's parent run."""
    from kat_core.platform.tracking import log_stage

    log_stage(open_pipeline_run(config), stage, out_dir, {"profile": config.profile, "seed": config.seed,
                                                          **(params or {})}, inputs=inputs)
