"""The content-addressed artifact store: datasets and checkpoints stored once under their digest, a dataset
found again by its recipe (no second synthesis), on a real S3 server on loopback and on the local disk."""

import pytest

from kat_core.config import load_config
from kat_core.manifest import dir_digest, write_manifest
from kat_core.platform import artifacts
from kat_core.platform.artifacts import ArtifactStore, artifact_root, recipe_key
from kat_core.platform.storage import ObjectStore
from tests.helpers import moto_server

TINY = ["synth.families={arith: 40}"]


@pytest.fixture(scope="module")
def s3():
    server = moto_server()
    host, port = server.get_host_and_port()
    yield {"endpoint": f"http://{host}:{port}", "access_key": "kat-test", "secret_key": "kat-test-secret"}
    server.stop()


@pytest.fixture
def s3_env(s3, monkeypatch, tmp_path):
    monkeypatch.setenv("KAT_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("KAT_S3_ENDPOINT", s3["endpoint"])
    monkeypatch.setenv("KAT_S3_BUCKET", "kat-artifacts")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3["access_key"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3["secret_key"])
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.delenv("KAT_ARTIFACTS", raising=False)
    return s3


def keys(s3, prefix=""):
    store = ObjectStore(s3["endpoint"], s3["access_key"], s3["secret_key"], region="us-east-1")
    return {o.object_name for o in store._client().list_objects("kat-artifacts", prefix=prefix, recursive=True)}


def test_root_is_the_bucket_when_an_endpoint_is_configured_else_the_local_disk(s3_env, monkeypatch, tmp_path):
    assert artifact_root() == "s3://kat-artifacts/artifacts"
    monkeypatch.delenv("KAT_S3_ENDPOINT")
    for var in ("MLFLOW_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(var, raising=False)
    assert artifact_root() == str((tmp_path / "home").resolve() / "artifacts")
    monkeypatch.setenv("KAT_ARTIFACTS", "s3://other/prefix/")
    assert artifact_root() == "s3://other/prefix"


def test_dataset_is_stored_in_the_bucket_and_found_again_without_synthesis(s3_env, tmp_path, monkeypatch):
    config = load_config("smoke", TINY)
    manifest, fetched = artifacts.dataset(config, tmp_path / "first")
    assert not fetched and manifest["records"] > 0
    digest = dir_digest(tmp_path / "first")
    stored = keys(s3_env, f"artifacts/datasets/{digest}/")
    assert f"artifacts/datasets/{digest}/manifest.json" in stored
    assert f"artifacts/datasets/recipes/{recipe_key(config)}/recipe.json" in keys(s3_env, "artifacts/datasets/recipes/")

    # a second run with the same recipe: fetched (digest-checked), never synthesized
    def no_synthesis(*_a, **_k):
        raise AssertionError("synthesized again although the dataset is stored")

    monkeypatch.setattr(artifacts, "synthesize", no_synthesis)
    assert ArtifactStore.from_env().dataset_digest(config) == digest  # "did the data change?" is a lookup
    manifest2, fetched = artifacts.dataset(config, tmp_path / "second")
    assert fetched and manifest2 == manifest and dir_digest(tmp_path / "second") == digest
    assert sorted(p.name for p in (tmp_path / "second").iterdir() if p.name != ".kat-index.json") == \
        sorted(p.name for p in (tmp_path / "first").iterdir())

    # another recipe (a different seed) is another dataset: not found, so it would be synthesized
    assert ArtifactStore.from_env().dataset_digest(load_config("smoke", [*TINY, "seed=7"])) is None


def test_checkpoints_are_content_addressed(s3_env, tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "model.safetensors").write_bytes(b"\0weights" * 100)
    write_manifest(ckpt, stage="srpo")
    store = ArtifactStore.from_env()
    uri = store.put("models", ckpt)
    assert uri == f"s3://kat-artifacts/artifacts/models/{dir_digest(ckpt)}"
    assert store.put("models", ckpt) == uri  # the same content: stored once
    back = store.get("models", dir_digest(ckpt), tmp_path / "back")
    assert (back / "model.safetensors").read_bytes() == (ckpt / "model.safetensors").read_bytes()


def test_local_disk_behind_the_same_interface(tmp_path):
    store = ArtifactStore(tmp_path / "artifacts")
    config = load_config("smoke", TINY)
    _, fetched = artifacts.dataset(config, tmp_path / "a", store=store)
    assert not fetched
    _, fetched = artifacts.dataset(config, tmp_path / "b", store=store)
    assert fetched and dir_digest(tmp_path / "b") == dir_digest(tmp_path / "a")
    assert (tmp_path / "artifacts" / "datasets" / dir_digest(tmp_path / "a") / "manifest.json").is_file()
