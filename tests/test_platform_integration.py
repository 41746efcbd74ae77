"""The platform pieces together, over the network, on loopback: moto's S3 server as the object store and
`mlflow server` (SQLite backend, artifacts proxied to S3 through MLFLOW_S3_ENDPOINT_URL) as the tracking
server. A pipeline run is tracked, a model is registered through the server, its files land in the bucket,
and `models:/kat@champion` loads back from there."""

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from kat_core.manifest import dir_digest
from tests.helpers import FAST, free_port

BUCKET = "kat-int"


def keys_of(store, prefix: str) -> set[str]:
    return {o.object_name for o in store._client().list_objects(BUCKET, prefix=prefix, recursive=True)}


@pytest.fixture(scope="module")
def s3():
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield {"endpoint": f"http://{host}:{port}", "access_key": "kat-test", "secret_key": "kat-test-secret"}
    server.stop()


@pytest.fixture(scope="module")
def mlflow_server(s3, tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow_server")
    port = free_port()
    env = {**os.environ, "MLFLOW_S3_ENDPOINT_URL": s3["endpoint"], "AWS_ACCESS_KEY_ID": s3["access_key"],
           "AWS_SECRET_ACCESS_KEY": s3["secret_key"], "AWS_DEFAULT_REGION": "us-east-1",
           # MLflow 3's server also starts 8 job-queue processes (GenAI evaluation jobs, trace roll-ups) that KAT
           # never submits to: off, the server answers in ~10 s instead of 15-20 s and uses a third of the CPU
           "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    env.pop("MLFLOW_TRACKING_URI", None)
    log = open(root / "server.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
         "--artifacts-destination", f"s3://{BUCKET}/mlartifacts"],
        env=env, stdout=log, stderr=subprocess.STDOUT, cwd=root, start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"mlflow server did not start:\n{(root / 'server.log').read_text()[-3000:]}")
        time.sleep(0.5)
    try:
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # its own process group: the server and its workers
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:  # a graceful shutdown waits for idle keep-alive clients
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        log.close()


@pytest.mark.slow
def test_pipeline_through_mlflow_server_and_s3(s3, mlflow_server, tiny_tokenizer, tmp_path, monkeypatch):
    import mlflow

    from kat_core.config import ModelConfig
    from kat_core.manifest import write_manifest
    from kat_core.model.checkpoint import save_checkpoint
    from kat_core.model.lm import build_model
    from kat_core.platform import registry, tracking
    from kat_core.platform.storage import ObjectStore

    monkeypatch.setenv("KAT_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    # this process only talks to the tracking server: artifacts go through its proxy, so no S3 settings here
    for var in ("MLFLOW_S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(var, raising=False)

    # the data and the checkpoint, stored in S3 as the pipeline's stages would leave them
    data = tmp_path / "data"
    data.mkdir()
    (data / "train-00000.jsonl").write_text('{"prompt": "2+2", "response": "4"}\n')
    write_manifest(data, stage="synthesize")
    model = build_model(ModelConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64,
                                    max_seq_len=96), tiny_tokenizer, seed=0)
    ckpt = save_checkpoint(tmp_path / "ckpt", model, tiny_tokenizer,
                           manifest={"stage": "srpo", "inputs": {"dataset": data}})
    store = ObjectStore(s3["endpoint"], s3["access_key"], s3["secret_key"], region="us-east-1")
    store.upload_dir(data, f"s3://{BUCKET}/runs/kfp-int/data")
    store.upload_dir(ckpt, f"s3://{BUCKET}/runs/kfp-int/ckpt")
    ckpt_back = store.download_dir(f"s3://{BUCKET}/runs/kfp-int/ckpt", tmp_path / "ckpt-from-s3")

    parent = tracking.start_pipeline_run("autothink", params={"profile": "smoke"}, kfp_run_id="kfp-int",
                                         profile="smoke", config_hash="cfg-int")
    tracking.log_stage(parent, "synthesize", data)
    version = registry.register_model(ckpt_back, {"accuracy": 0.5, "mean_tokens": 20, "items": ["a"]}, parent)
    assert registry.promote_if_better("kat", version)[0]
    tracking.end_pipeline_run(parent, "succeeded")

    # the model's files went through the server into the bucket
    keys = {o.object_name for o in store._client().list_objects(BUCKET, prefix="mlartifacts/", recursive=True)}
    assert any(k.endswith("/MLmodel") for k in keys) and any(k.endswith("/model.safetensors") for k in keys)
    assert any(k.endswith("/manifest.json") for k in keys)  # the synthesize stage's manifest artifact

    info = registry.show_version("kat", "champion")
    assert info["version"] == version and info["kfp_run_id"] == "kfp-int" and info["config_hash"] == "cfg-int"
    assert info["data"] == {"synthesize": dir_digest(data)}

    loaded = mlflow.pyfunc.load_model("models:/kat@champion")
    assert isinstance(loaded.predict(["2+2=?"], params={"max_new_tokens": 4})[0], str)
    assert dir_digest(registry.download_checkpoint("kat", "champion", tmp_path / "dl")) == dir_digest(ckpt)


@pytest.mark.slow
def test_smoke_pipeline_runs_against_the_tracking_server_and_s3(s3, mlflow_server, tmp_path):
    """The whole smoke pipeline (`kat run`, kfp.local) tracked on the server: a parent run with one child per
    stage, the model registered, its files in the bucket, and `models:/kat-smoke@champion` loading back."""
    import json

    import mlflow

    from kat_core.platform.registry import show_version
    from kat_core.platform.storage import ObjectStore

    env = {**os.environ, "KAT_HOME": str(tmp_path / "home"), "MLFLOW_TRACKING_URI": mlflow_server,
           "OMP_NUM_THREADS": "1"}
    for var in ("MLFLOW_S3_ENDPOINT_URL", "KAT_ARTIFACTS"):
        env.pop(var, None)  # MLflow's artifacts go through the tracking server, which writes to S3
    # the run's own datasets and checkpoints go to the bucket through the artifact store
    s3_env = {"KAT_S3_ENDPOINT": s3["endpoint"], "KAT_S3_BUCKET": BUCKET, "AWS_ACCESS_KEY_ID": s3["access_key"],
              "AWS_SECRET_ACCESS_KEY": s3["secret_key"], "AWS_DEFAULT_REGION": "us-east-1"}
    env.update(s3_env)
    # its own registered model name: the server is shared with the test above, which registers "kat"
    overrides = [*FAST, "registry.model_name=kat-smoke"]
    r = subprocess.run([sys.executable, "-m", "kat_app.cli", "run", "--profile", "smoke",
                        *(a for o in overrides for a in ("--set", o))],
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    record = json.loads(r.stdout.strip().splitlines()[-1])
    assert record["status"] == "succeeded"

    client = mlflow.MlflowClient(mlflow_server)
    (experiment,) = [e for e in client.search_experiments() if e.name == "kat-autothink"]
    runs = client.search_runs([experiment.experiment_id])
    parents = [x for x in runs if "mlflow.parentRunId" not in x.data.tags
               and x.data.tags.get("kat.kfp_run_id") == record["run_id"]]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    children = {x.info.run_name for x in runs if x.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id}
    assert {"synthesize", "validate", "pretrain", "coldstart", "srpo", "evaluate"} <= children

    info = show_version("kat-smoke", "champion", tracking_uri=mlflow_server)
    assert info["version"] == 1 and info["kfp_run_id"] == record["run_id"] and "synthesize" in info["data"]
    store = ObjectStore(s3["endpoint"], s3["access_key"], s3["secret_key"], region="us-east-1")
    keys = {o.object_name for o in store._client().list_objects(BUCKET, prefix="mlartifacts/", recursive=True)}
    assert any(k.endswith("/model.safetensors") for k in keys) and any(k.endswith("/MLmodel") for k in keys)

    mlflow.set_tracking_uri(mlflow_server)
    loaded = mlflow.pyfunc.load_model("models:/kat-smoke@champion")
    assert isinstance(loaded.predict(["What is 2+3?"], params={"max_new_tokens": 8})[0], str)

    # the run stored its dataset and its model in the bucket, content-addressed
    data_digest = info["data"]["synthesize"]
    assert f"artifacts/datasets/{data_digest}/manifest.json" in keys_of(store, "artifacts/datasets/")
    registered = json.loads(Path(record["outputs"]["register"]["registered"]).read_text())
    assert registered["checkpoint"] == f"s3://{BUCKET}/artifacts/models/{info['checkpoint_digest']}"
    model_keys = keys_of(store, f"artifacts/models/{info['checkpoint_digest']}/")
    assert any(k.endswith("/model.safetensors") for k in model_keys)
    # a second run with unchanged data finds the dataset there: "changed?" is a lookup, and the synthesize
    # stage fetches it (digest-checked) instead of synthesizing it again
    from kat_app.service import Service
    from kat_core.config import load_config
    from kat_core.platform import artifacts

    with pytest.MonkeyPatch.context() as mp:
        for key, value in {**s3_env, "MLFLOW_TRACKING_URI": mlflow_server}.items():
            mp.setenv(key, value)
        mp.setattr(artifacts, "synthesize", lambda *a, **k: pytest.fail("synthesized again"))
        changed, why = Service(tmp_path / "home").data_changed_since_champion("smoke", overrides)
        assert not changed and data_digest[:12] in why, why
        _, fetched = artifacts.dataset(load_config("smoke", overrides), tmp_path / "second-run-data")
        assert fetched and dir_digest(tmp_path / "second-run-data") == data_digest
