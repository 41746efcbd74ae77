"""MLflow tracking and lineage on a local SQLite store: a parent run per pipeline run, a child run per stage
with params, step metrics, the manifest artifact and dataset inputs whose digests link the stages."""

import json

import pytest

from kat_core.errors import KatError
from kat_core.manifest import dir_digest, write_manifest


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """One KAT_HOME and SQLite database for the module: creating MLflow's schema costs seconds."""
    home = tmp_path_factory.mktemp("kat_home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KAT_HOME", str(home))
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{home / 'mlflow.db'}")
        yield home


@pytest.fixture(scope="module")
def client(home):
    from kat_core.platform.tracking import get_client

    return get_client()


def make_stage_dirs(root):
    """A dataset (synthesize output) and a training output that read it, as the stages leave them."""
    data = root / "data"
    data.mkdir(parents=True)
    (data / "train-00000.jsonl").write_text('{"prompt": "1+1", "response": "2"}\n')
    write_manifest(data, stage="synthesize", config={"seed": 0})
    train = root / "pretrain"
    train.mkdir()
    rows = [{"step": s, "loss": 3.0 - s * 0.5, "lr": 1e-3, "tokens_per_s": 100.0 + s} for s in (1, 2, 3)]
    (train / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 4, "lo')  # cut
    write_manifest(train, stage="pretrain", config={"lr": 1e-3}, inputs={"dataset": data})
    return data, train


def test_parent_and_child_runs_with_lineage(home, client, tmp_path):
    from kat_core.platform import tracking

    data, train = make_stage_dirs(tmp_path)
    config = {"profile": "smoke", "seed": 0, "train": {"lr": 0.001, "steps": 3}, "synth": {"families": {"arith": 8}}}
    parent = tracking.start_pipeline_run("autothink-smoke", params=config, kfp_run_id="kfp-run-1",
                                         profile="smoke", config_hash="cfg123", code_version="abc123def456")
    synth_run = tracking.log_stage(parent, "synthesize", data, params={"records": 1})
    train_run = tracking.log_stage(parent, "pretrain", train, params={"steps": 3},
                                   metrics={"final_loss": 1.5, "pass@1": 0.25, "note": "not a number"},
                                   inputs={"dataset": data})
    tracking.end_pipeline_run(parent, "succeeded")

    p = client.get_run(parent)
    assert p.info.status == "FINISHED"
    assert p.data.tags["kat.kfp_run_id"] == "kfp-run-1" and p.data.tags["kat.profile"] == "smoke"
    assert p.data.tags["kat.config_hash"] == "cfg123" and p.data.tags["kat.code_version"] == "abc123def456"
    assert p.data.params["train.lr"] == "0.001" and p.data.params["synth.families.arith"] == "8"
    assert "config.json" in {a.path for a in client.list_artifacts(parent)}

    for run_id, stage in ((synth_run, "synthesize"), (train_run, "pretrain")):
        r = client.get_run(run_id)
        assert r.data.tags["mlflow.parentRunId"] == parent and r.data.tags["kat.stage"] == stage
        assert r.data.tags["kat.kfp_run_id"] == "kfp-run-1" and r.info.status == "FINISHED"
        assert "manifest.json" in {a.path for a in client.list_artifacts(run_id)}

    # metrics.jsonl: one step per line; the line cut by a crash is skipped
    history = client.get_metric_history(train_run, "loss")
    assert [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)] == [(1, 2.5), (2, 2.0), (3, 1.5)]
    final = client.get_run(train_run).data.metrics
    assert final["final_loss"] == 1.5 and final["pass_1"] == 0.25 and "note" not in final
    assert "step" not in client.get_run(train_run).data.metrics

    # the dataset carries the same digest where it was written and where it was read
    digest = dir_digest(data)
    out_ds = client.get_run(synth_run).inputs.dataset_inputs
    in_ds = client.get_run(train_run).inputs.dataset_inputs
    assert [(d.dataset.name, d.dataset.digest) for d in out_ds] == [("synthesize", digest[:32])]
    assert [(d.dataset.name, d.dataset.digest) for d in in_ds] == [("dataset", digest[:32])]
    tags = {t.key: t.value for t in in_ds[0].tags}
    assert tags["kat.digest"] == digest and tags["mlflow.data.context"] == "input"
    assert str(data.resolve()) in in_ds[0].dataset.source  # `inputs=` gives the location

    lineage = tracking.pipeline_lineage(parent)
    assert lineage["kfp_run_id"] == "kfp-run-1" and lineage["config_hash"] == "cfg123"
    assert lineage["data"] == {"synthesize": digest, "dataset": digest}
    assert [s["stage"] for s in lineage["stages"]] == ["synthesize", "pretrain"]

    # a later stage whose input of the same name is other data keeps both digests
    sft = tmp_path / "sft"
    sft.mkdir()
    (sft / "train-00000.jsonl").write_text('{"prompt": "2+2"}\n')
    tracking.log_stage(parent, "coldstart", tmp_path, inputs={"dataset": sft})
    assert tracking.pipeline_lineage(parent)["data"] == {"synthesize": digest, "dataset": digest,
                                                         "coldstart.dataset": dir_digest(sft)}


def test_input_known_only_by_manifest_digest(home, client, tmp_path):
    from kat_core.platform import tracking

    data, train = make_stage_dirs(tmp_path)
    parent = tracking.start_pipeline_run("p")
    run = tracking.log_stage(parent, "pretrain", train)  # no `inputs=`: the manifest's digest still links
    (ds,) = client.get_run(run).inputs.dataset_inputs
    assert ds.dataset.name == "dataset" and ds.dataset.digest == dir_digest(data)[:32]


def test_retried_start_reuses_the_parent(home):
    from kat_core.platform import tracking

    first = tracking.start_pipeline_run("p", kfp_run_id="kfp-retry")
    assert tracking.start_pipeline_run("p", kfp_run_id="kfp-retry") == first
    assert tracking.find_pipeline_run("kfp-retry") == first
    assert tracking.find_pipeline_run("kfp-none") is None
    assert tracking.start_pipeline_run("p", kfp_run_id="kfp-other") != first


def test_failed_stage_and_pipeline(home, client, tmp_path):
    from kat_core.platform import tracking

    parent = tracking.start_pipeline_run("p")
    child = tracking.log_stage(parent, "validate", tmp_path, status="failed", data_stage=False)
    tracking.end_pipeline_run(parent, "failed")
    assert client.get_run(child).info.status == "FAILED"
    assert client.get_run(parent).info.status == "FAILED"
    with pytest.raises(KatError, match="unknown run status"):
        tracking.end_pipeline_run(parent, "exploded")


def test_artifacts_live_under_kat_home(home, client):
    from kat_core.platform import tracking

    run = client.get_run(tracking.start_pipeline_run("p", params={"a": 1}))
    assert run.info.artifact_uri.startswith((home / "mlartifacts").as_uri())


def test_user_errors_are_one_line(home, tmp_path, monkeypatch):
    from kat_core.platform import tracking

    with pytest.raises(KatError) as err:
        tracking.log_stage("0" * 32, "pretrain", tmp_path)
    assert "\n" not in str(err.value) and "MLflow at sqlite" in str(err.value)
    with pytest.raises(KatError, match="metrics file not found"):
        tracking.log_stage(tracking.start_pipeline_run("p"), "x", tmp_path, metrics_file=tmp_path / "nope.jsonl")

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    with pytest.raises(KatError) as err:
        tracking.start_pipeline_run("p", tracking_uri="http://127.0.0.1:9")
    assert str(err.value) == "cannot reach the MLflow tracking server at http://127.0.0.1:9 (Connection refused)"


def test_default_uri_is_sqlite_under_kat_home(monkeypatch, tmp_path):
    from kat_core.platform.tracking import resolve_tracking_uri

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("KAT_HOME", str(tmp_path / "h"))
    assert resolve_tracking_uri() == f"sqlite:///{tmp_path / 'h' / 'mlflow.db'}"
    assert resolve_tracking_uri("http://mlflow:5000") == "http://mlflow:5000"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://env:5000")
    assert resolve_tracking_uri() == "http://env:5000"


def test_flatten():
    from kat_core.platform.tracking import flatten

    assert flatten({"a": {"b": 1, "c": [1, 2]}, "d": "x", "e": None, "f": {}}) == {
        "a.b": "1", "a.c": "[1, 2]", "d": "x", "e": "null", "f": "{}"}


def test_platform_modules_import_nothing_heavy():
    """Components and the evaluation import these at their top; mlflow, minio and torch load on first use."""
    import subprocess
    import sys

    code = ("import sys, kat_core.platform.tracking, kat_core.platform.registry, kat_core.platform.storage; "
            "print(sorted(m for m in ('mlflow', 'minio', 'torch', 'transformers', 'pandas') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"



def sqlite_tables(path) -> dict:
    """The tables and indexes of an SQLite file (their CREATE statements) and its experiments."""
    import sqlite3

    db = sqlite3.connect(path)
    try:
        return {"objects": sorted(db.execute("SELECT type, name, sql FROM sqlite_master").fetchall()),
                "experiments": db.execute("SELECT experiment_id, name FROM experiments").fetchall()}
    finally:
        db.close()


def test_a_new_local_database_starts_from_the_cached_schema(tmp_path, monkeypatch):
    """A new SQLite tracking database is a copy of the schema MLflow's own set-up leaves (built once per MLflow
    version, cached); MLflow takes it as its own, and an existing database is never replaced."""
    import mlflow

    from kat_core.platform import tracking

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    seeded, again = tmp_path / "seeded.db", tmp_path / "again.db"
    client = tracking.get_client(f"sqlite:///{seeded}")
    (template,) = (tmp_path / "cache" / "kat").iterdir()
    assert template.name == f"mlflow-{mlflow.__version__}-schema.db"
    assert sqlite_tables(template)["experiments"] == []  # MLflow adds its Default experiment to the copy
    assert sqlite_tables(seeded) == sqlite_tables(template) | {"experiments": [(0, "Default")]}
    run_id = tracking.start_pipeline_run("p", {"a": 1}, tracking_uri=f"sqlite:///{seeded}")
    tracking.get_client(f"sqlite:///{seeded}")  # an existing database: left as it is
    assert client.get_run(run_id).data.params == {"a": "1"}
    tracking.get_client(f"sqlite:///{again}")  # from the cached template
    assert sqlite_tables(again) == sqlite_tables(template) | {"experiments": [(0, "Default")]}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again.db", "cache", "seeded.db"]  # no leftovers
