"""Tracking and lineage with MLflow: one parent run per pipeline run, one child run per stage.

    start_pipeline_run(name, params, tags)       -> parent run id (tags: KFP run id, profile, config hash, code)
    log_stage(parent, stage, out_dir, params)    -> child run: params, metrics.jsonl as step metrics, the
                                                    stage's manifest as an artifact, its datasets as inputs
    end_pipeline_run(parent, status)
    pipeline_lineage(parent)                     -> what a registered model version is tagged with

Every function takes run ids, not an active run, because each KFP component is a separate process. The
tracking URI is the argument, else `MLFLOW_TRACKING_URI`, else `sqlite:///$KAT_HOME/mlflow.db`.

Datasets: each digest in a stage's manifest `inputs` (dir_digest of the input directory) is logged with
`mlflow.log_input` as a metadata-only dataset whose name is the input's name; a data stage (synthesize, or
any stage called with data_stage=True) also logs its own output directory. The same directory therefore
carries the same digest in the stage that wrote it and in every stage that read it, which links them.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

from kat_core.errors import KatError, NotFound
from kat_core.manifest import MANIFEST, dir_digest, read_manifest
from kat_core.platform import file_lock, kat_home

log = logging.getLogger(__name__)

EXPERIMENT = "kat-autothink"
DATA_STAGES = ("synthesize",)  # stages whose output directory is a dataset (validate reads one)
METRICS_FILE = "metrics.jsonl"
# tags on the parent run (and copied onto registered versions); `kat.` keeps them apart from mlflow.*
TAG_KIND = "kat.kind"  # "pipeline" or "stage"
TAG_KFP_RUN = "kat.kfp_run_id"
TAG_PROFILE = "kat.profile"
TAG_CONFIG_HASH = "kat.config_hash"
TAG_CODE_VERSION = "kat.code_version"
TAG_STAGE = "kat.stage"
TAG_DIGEST = "kat.digest"  # full sha256 on a dataset input (MLflow's own digest column holds 36 chars)
_STATUSES = {"finished": "FINISHED", "succeeded": "FINISHED", "success": "FINISHED", "failed": "FAILED",
             "error": "FAILED", "killed": "KILLED", "cancelled": "KILLED", "canceled": "KILLED"}


def resolve_tracking_uri(uri: str | None = None) -> str:
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{kat_home() / 'mlflow.db'}"


@contextmanager
def mlflow_errors(uri: str) -> Iterator[None]:
    """MLflow failures a user can cause (server down, bad URI, unknown run) as one KatError line."""
    from mlflow.exceptions import MlflowException

    try:
        yield
    except MlflowException as e:
        text = str(e.message)
        if "API request to" in text and "failed with exception" in text:  # requests' retry essay
            reason = next((m for m in ("Connection refused", "Name or service not known", "timed out",
                                       "Connection reset") if m in text), "no answer")
            raise KatError(f"cannot reach the MLflow tracking server at {uri} ({reason})") from None
        if e.error_code == "RESOURCE_DOES_NOT_EXIST":
            raise NotFound(f"MLflow at {uri}: {_first_line(text)}") from None
        raise KatError(f"MLflow at {uri}: {_first_line(text)}") from None


def get_client(uri: str | None = None):
    """An MlflowClient for `uri`; also points MLflow's fluent API there, which model logging needs."""
    import mlflow

    uri = resolve_tracking_uri(uri)
    seed_sqlite_schema(uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)


def schema_cache_dir() -> Path:
    """Where the empty MLflow schema is kept between runs: `$XDG_CACHE_HOME/kat`, else `~/.cache/kat`."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "kat"


def _schema_template() -> Path | None:
    """An SQLite file holding MLflow's tables and nothing else (no experiment yet), built once per MLflow version
    in schema_cache_dir(); None where it cannot be built (MLflow moved the private function, no writable cache)."""
    import mlflow

    template = schema_cache_dir() / f"mlflow-{mlflow.__version__}-schema.db"
    if template.is_file():
        return template
    tmp = None
    try:
        import sqlalchemy
        from mlflow.store.db.utils import _initialize_tables  # what MLflow's SQLAlchemyStore runs on a new database

        template.parent.mkdir(parents=True, exist_ok=True)
        tmp = _temp_path(template)
        engine = sqlalchemy.create_engine(f"sqlite:///{tmp}")
        try:
            _initialize_tables(engine)
        finally:
            engine.dispose()
        os.replace(tmp, template)  # whole or absent; a concurrent builder writes the same schema
        return template
    except Exception:  # whatever failed here, MLflow builds the schema itself, as before
        log.debug("no MLflow schema template; MLflow builds the schema itself", exc_info=True)
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        return None


def _temp_path(beside: Path) -> Path:
    """A new empty file of its own next to `beside` (unique across processes and threads), with the mode
    (umask) a database file SQLite creates would have."""
    import secrets

    path = beside.with_name(f".{beside.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
    return path


def seed_sqlite_schema(uri: str) -> None:
    """Start a new local SQLite tracking database as a copy of an empty one with MLflow's schema.

    MLflow builds its schema by replaying every migration, some 1,700 statements each committed to disk: 3-5 s
    on a 2-core VM, paid by the first stage of every run in a new KAT_HOME (and every test with a fresh one).
    The copy is what those migrations leave; MLflow then adds its Default experiment to it as it would have.
    An existing database is never touched, a server URI is left alone, and without a template (see
    _schema_template) MLflow builds the schema as before."""
    if not uri.startswith("sqlite:///") or "?" in uri:
        return
    path = Path(uri.removeprefix("sqlite:///"))
    if path.exists() or not path.parent.is_dir():
        return
    template = _schema_template()
    if template is None:
        return
    tmp = None
    try:
        tmp = _temp_path(path)
        shutil.copyfile(template, tmp)
        os.link(tmp, path)  # never over a database another process or thread has just started
    except FileExistsError:
        pass
    except OSError:
        log.debug("could not seed %s; MLflow builds the schema itself", path, exc_info=True)
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)


def experiment_id(client, name: str = EXPERIMENT) -> str:
    """Get or create the experiment. For a local database the artifacts go under $KAT_HOME/mlartifacts
    (MLflow's own default is ./mlruns of whatever directory the process happens to run in); a tracking
    server chooses its own artifact store."""
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    uri = client.tracking_uri
    location = (kat_home() / "mlartifacts").as_uri() if uri.startswith(("sqlite:", "file:", "/")) else None
    try:
        return client.create_experiment(name, artifact_location=location)
    except MlflowException:  # another process created it in between
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def start_pipeline_run(
    name: str,
    params: dict[str, Any] | None = None,
    tags: dict[str, str] | None = None,
    *,
    kfp_run_id: str | None = None,
    profile: str | None = None,
    config_hash: str | None = None,
    code_version: str | None = None,
    tracking_uri: str | None = None,
) -> str:
    """Start the parent run of a pipeline run and return its id.

    `params` may be nested (a config's model_dump): keys are flattened with dots, and the whole dict is
    also logged as `config.json`. With a `kfp_run_id` that already has a parent run (a retried task, or
    parallel tasks that each ask), that run is returned instead of a second one."""
    from mlflow.entities import Param

    from kat_core.manifest import code_version as current_code_version

    uri = resolve_tracking_uri(tracking_uri)
    all_tags = {
        TAG_KIND: "pipeline",
        TAG_CODE_VERSION: code_version or current_code_version(),
        **({TAG_KFP_RUN: kfp_run_id} if kfp_run_id else {}),
        **({TAG_PROFILE: profile} if profile else {}),
        **({TAG_CONFIG_HASH: config_hash} if config_hash else {}),
        **(tags or {}),
    }
    # get-or-create under a lock (same KAT_HOME), so two tasks of one KFP run never make two parents
    with mlflow_errors(uri), (file_lock(f"pipeline-run-{kfp_run_id}") if kfp_run_id else nullcontext()):
        client = get_client(uri)
        exp = experiment_id(client)
        existing = find_pipeline_run(kfp_run_id, tracking_uri=uri) if kfp_run_id else None
        if existing:
            return existing
        run_id = client.create_run(exp, run_name=name, tags=all_tags).info.run_id
        client.log_batch(run_id, params=[Param(k, v) for k, v in flatten(params or {}).items()])
        if params:
            client.log_dict(run_id, params, "config.json")
    log.info("MLflow parent run %s (%s) at %s", run_id, name, uri)
    return run_id


def log_stage(
    parent_run_id: str,
    stage: str,
    out_dir: str | Path,
    params: dict[str, Any] | None = None,
    metrics_file: str | Path | None = None,
    *,
    metrics: dict[str, float] | None = None,
    inputs: dict[str, str | Path] | None = None,
    data_stage: bool | None = None,
    artifacts: list[str | Path] | None = None,
    status: str = "FINISHED",
    tracking_uri: str | None = None,
) -> str:
    """Record a finished stage as a child run of `parent_run_id`; returns the child run id.

    Logged: `params` (flattened), each line of `metrics_file` (default out_dir/metrics.jsonl when present)
    as metrics at its `step`, the final `metrics`, the manifest as an artifact and its config hash / code
    version as tags, the manifest's input digests as datasets (`inputs`, name -> path or URI, adds where
    they are, and digests of inputs the manifest does not list), and for a data stage (default: synthesize)
    `out_dir` itself as a dataset. `artifacts` are extra files or directories to upload."""
    import mlflow

    out = Path(out_dir)
    manifest = read_manifest(out) or {}
    state = _state(status)
    metrics_path = Path(metrics_file) if metrics_file else out / METRICS_FILE
    if metrics_file and not metrics_path.is_file():
        raise KatError(f"metrics file not found: {metrics_path}")
    # digests of the inputs: the manifest's, plus those of directories passed in `inputs` it does not list
    where = {name: str(path) for name, path in (inputs or {}).items()}
    digests = dict(manifest.get("inputs") or {})
    for name, path in where.items():
        if name not in digests and Path(path).is_dir():
            digests[name] = dir_digest(Path(path))
    uri = resolve_tracking_uri(tracking_uri)
    with mlflow_errors(uri):
        client = get_client(uri)
        parent = client.get_run(parent_run_id)
        tags = {TAG_KIND: "stage", TAG_STAGE: stage, "kat.out_dir": str(out)}
        for key, tag in (("config_hash", TAG_CONFIG_HASH), ("code_version", TAG_CODE_VERSION)):
            if manifest.get(key):
                tags[tag] = str(manifest[key])
        if parent.data.tags.get(TAG_KFP_RUN):
            tags[TAG_KFP_RUN] = parent.data.tags[TAG_KFP_RUN]
        # fluent API: mlflow.log_input needs an active run; the context ends it (FAILED if we raise)
        with mlflow.start_run(experiment_id=parent.info.experiment_id, run_name=stage,
                              parent_run_id=parent_run_id, tags=tags, nested=mlflow.active_run() is not None) as run:
            run_id = run.info.run_id
            if params:
                mlflow.log_params(flatten(params))
            if metrics_path.is_file():
                _log_metrics_file(client, run_id, metrics_path)
            if metrics:
                mlflow.log_metrics({metric_key(k): float(v) for k, v in metrics.items() if _is_number(v)})
            if (out / MANIFEST).is_file():
                mlflow.log_artifact(str(out / MANIFEST))
            for extra in map(Path, artifacts or []):
                if extra.is_dir():
                    mlflow.log_artifacts(str(extra), extra.name)
                else:
                    mlflow.log_artifact(str(extra))
            for name, digest in digests.items():
                _log_dataset(name, digest, source=_source(where.get(name)), context="input")
            if data_stage if data_stage is not None else stage in DATA_STAGES:
                _log_dataset(stage, dir_digest(out), source=_source(str(out)), context="output")
        if state != "FINISHED":
            client.set_terminated(run_id, state)
    log.info("MLflow stage run %s: %s (parent %s)", run_id, stage, parent_run_id)
    return run_id


def end_pipeline_run(run_id: str, status: str = "FINISHED", *, tracking_uri: str | None = None) -> None:
    """Close the parent run: FINISHED, FAILED or KILLED (KFP's succeeded/failed/cancelled are accepted)."""
    state = _state(status)
    uri = resolve_tracking_uri(tracking_uri)
    with mlflow_errors(uri):
        get_client(uri).set_terminated(run_id, state)


def find_pipeline_run(kfp_run_id: str, *, tracking_uri: str | None = None) -> str | None:
    """The parent run of a KFP run id, if one was started."""
    uri = resolve_tracking_uri(tracking_uri)
    with mlflow_errors(uri):
        client = get_client(uri)
        exp = client.get_experiment_by_name(EXPERIMENT)
        if exp is None:
            return None
        runs = client.search_runs(
            [exp.experiment_id],
            filter_string=f"tags.`{TAG_KFP_RUN}` = '{kfp_run_id}' and tags.`{TAG_KIND}` = 'pipeline'",
            max_results=1,
        )
        return runs[0].info.run_id if runs else None


def pipeline_lineage(parent_run_id: str, *, tracking_uri: str | None = None) -> dict[str, Any]:
    """What a pipeline run was made of: its tags (KFP run id, profile, config hash, code version), and every
    dataset its stages logged (name -> full digest; a name seen again with other data becomes stage.name)."""
    uri = resolve_tracking_uri(tracking_uri)
    with mlflow_errors(uri):
        client = get_client(uri)
        parent = client.get_run(parent_run_id)
        children = client.search_runs(
            [parent.info.experiment_id],
            filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}'",
            order_by=["attributes.start_time ASC"],
        )
    data: dict[str, str] = {}
    stages = []
    for child in children:
        stages.append({"stage": child.data.tags.get(TAG_STAGE, child.info.run_name), "run_id": child.info.run_id,
                       "status": child.info.status})
        stage = child.data.tags.get(TAG_STAGE, child.info.run_name)
        for ds_input in child.inputs.dataset_inputs:
            tags = {t.key: t.value for t in ds_input.tags}
            name, digest = ds_input.dataset.name, tags.get(TAG_DIGEST, ds_input.dataset.digest)
            if data.get(name, digest) != digest:  # the same input name with other data in a later stage
                name = f"{stage}.{name}"
            data.setdefault(name, digest)
    ptags = parent.data.tags
    return {
        "pipeline_run_id": parent_run_id,
        "kfp_run_id": ptags.get(TAG_KFP_RUN),
        "profile": ptags.get(TAG_PROFILE),
        "config_hash": ptags.get(TAG_CONFIG_HASH),
        "code_version": ptags.get(TAG_CODE_VERSION),
        "data": data,
        "stages": stages,
    }


def flatten(params: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """{"train": {"lr": 0.001}} -> {"train.lr": "0.001"}: MLflow params are flat strings."""
    flat: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value if isinstance(value, str) else json.dumps(value, default=str)
    return flat


def _log_metrics_file(client, run_id: str, path: Path) -> None:
    """Each JSON line of a stage's metrics file becomes one step of every numeric key in it."""
    import time

    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    batch = []
    for i, line in enumerate(path.read_text().splitlines()):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            log.warning("%s line %d is not JSON; skipped", path, i + 1)  # a line cut by a crash mid-write
            continue
        step = int(row.get("step", i))
        batch += [Metric(metric_key(k), float(v), now, step) for k, v in row.items() if k != "step" and _is_number(v)]
    for start in range(0, len(batch), 1000):  # MLflow takes at most 1000 metrics per batch
        client.log_batch(run_id, metrics=batch[start:start + 1000])


def _log_dataset(name: str, digest: str, source: str | None, context: str) -> None:
    """A metadata-only dataset: KAT datasets are sharded JSONL directories identified by their digest, so
    MLflow records the name, where it was (when known) and the digest, not a copy of the rows."""
    import mlflow
    from mlflow.data.code_dataset_source import CodeDatasetSource
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    if source:
        with warnings.catch_warnings():  # MLflow registers its local-path source twice and warns about it
            warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted")
            src = resolve_dataset_source(source)
    else:  # an input known only by the digest in a manifest has no location: MLflow's tag-only source
        src = CodeDatasetSource(tags={TAG_DIGEST: digest})
    dataset = MetaDataset(src, name=name, digest=digest[:32])
    mlflow.log_input(dataset, context=context, tags={TAG_DIGEST: digest})


def metric_key(name: str) -> str:
    """MLflow refuses metric names outside [A-Za-z0-9_./ :-]; "pass@1" becomes "pass_1" rather than failing."""
    return re.sub(r"[^\w./ :-]", "_", str(name))


def _source(where: str | None) -> str | None:
    """A dataset location MLflow can resolve: an s3:// or other URI as is, a local path made absolute."""
    if not where:
        return None
    return where if "://" in where else str(Path(where).resolve())


def _state(status: str) -> str:
    state = _STATUSES.get(status.lower(), status.upper())
    if state not in ("FINISHED", "FAILED", "KILLED"):
        raise KatError(f"unknown run status {status!r}; use FINISHED, FAILED or KILLED")
    return state


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _first_line(text: str) -> str:
    text = (text or "").strip()
    return text.splitlines()[0][:300] if text else "unknown error"
