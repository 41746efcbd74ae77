"""Datasets and model checkpoints in object storage, content-addressed: what a run makes is stored once
under its digest, and a dataset is also found by its recipe (the synthesis settings and code), so a run
whose data did not change fetches it instead of synthesizing it again, and scheduled retraining's "did
the training data change?" is a lookup.

    store = ArtifactStore.from_env()          # s3://$KAT_S3_BUCKET/artifacts when an S3 endpoint is set,
                                              # else $KAT_HOME/artifacts on the local disk (same interface)
    uri = store.put("models", ckpt_dir)       # <root>/models/<digest>/ (kept if already there)
    manifest, fetched = dataset(config, out)  # the synthesize stage: fetched from the store, or made and stored

Layout under the root (every directory written through `ObjectStore`: sha256-indexed, checked on the way
back, an unfinished upload never reads as complete):

    datasets/<digest>/           a dataset directory (JSONL shards + manifest.json)
    datasets/recipes/<key>/      recipe.json: {"digest": ..., "recipe": ...} for the synthesis recipe `key`
    models/<digest>/             a checkpoint directory (HF model + mtp.safetensors + manifest.json)
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

from kat_core.config import KatConfig
from kat_core.data.synth import synthesize
from kat_core.errors import NotFound
from kat_core.manifest import dir_digest, read_manifest
from kat_core.platform import kat_home
from kat_core.platform.storage import ObjectStore, endpoint_from_env, is_s3

log = logging.getLogger(__name__)

ROOT_ENV = "KAT_ARTIFACTS"        # an explicit root: s3://bucket/prefix or a local directory
BUCKET_ENV = "KAT_S3_BUCKET"      # the bucket when only an endpoint is configured
DEFAULT_BUCKET = "kat"
RECIPE = "recipe.json"
# the code a dataset depends on: a change here is a new recipe (and so a new synthesis)
_SYNTH_CODE = ("data", "tasks", "format.py", "config.py")


def artifact_root(home: str | Path | None = None) -> str:
    """Where artifacts live: $KAT_ARTIFACTS, else s3://$KAT_S3_BUCKET/artifacts when an S3 endpoint is
    configured (KAT_S3_ENDPOINT, MLFLOW_S3_ENDPOINT_URL or AWS_ENDPOINT_URL), else `home`/artifacts (default
    $KAT_HOME)."""
    if os.environ.get(ROOT_ENV):
        return os.environ[ROOT_ENV].rstrip("/")
    if endpoint_from_env():
        return f"s3://{os.environ.get(BUCKET_ENV) or DEFAULT_BUCKET}/artifacts"
    return str((Path(home).resolve() if home is not None else kat_home()) / "artifacts")


def _synth_code_digest() -> str:
    base = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for name in _SYNTH_CODE:
        paths = sorted((base / name).rglob("*.py")) if (base / name).is_dir() else [base / name]
        for path in paths:
            h.update(str(path.relative_to(base)).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def recipe(config: KatConfig) -> dict[str, Any]:
    """What a dataset is made from: the synthesis and task settings, the seed and the code that runs them."""
    data = config.model_dump(mode="json", by_alias=True)
    return {"synth": data["synth"], "tasks": data["tasks"], "seed": data["seed"], "code": _synth_code_digest()}


def recipe_key(config: KatConfig) -> str:
    return hashlib.sha256(json.dumps(recipe(config), sort_keys=True).encode()).hexdigest()[:32]


class ArtifactStore:
    """Content-addressed directories under one root (an s3:// URI or a local directory)."""

    def __init__(self, root: str | Path, store: ObjectStore | None = None):
        self.root = str(root).rstrip("/")
        self.store = store or ObjectStore()

    @classmethod
    def from_env(cls, home: str | Path | None = None) -> ArtifactStore:
        """The store `artifact_root` names (`home`: the KAT_HOME a local root lies in, default $KAT_HOME)."""
        return cls(artifact_root(home))

    @property
    def remote(self) -> bool:
        return is_s3(self.root)

    def uri(self, kind: str, digest: str) -> str:
        return f"{self.root}/{kind}/{digest}"

    def has(self, kind: str, digest: str) -> bool:
        return self.store.exists(self.uri(kind, digest))

    def put(self, kind: str, directory: str | Path) -> str:
        """Store `directory` under its digest (a directory already stored under it stays: same content);
        returns its URI."""
        uri = self.uri(kind, dir_digest(Path(directory)))
        if self.store.exists(uri):
            log.info("%s already stored at %s", directory, uri)
        else:
            self.store.upload_dir(directory, uri)
        return uri

    def get(self, kind: str, digest: str, local: str | Path) -> Path:
        """Fetch a stored directory into `local` (every file checked); `NotFound` when it is not stored."""
        uri = self.uri(kind, digest)
        if not self.store.exists(uri):
            raise NotFound(f"no {kind} {digest[:12]} at {self.root}")
        return self.store.download_dir(uri, local)

    # -- datasets by recipe

    def record_recipe(self, key: str, digest: str, details: dict[str, Any]) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / RECIPE).write_text(json.dumps({"digest": digest, "recipe": details}, indent=1) + "\n")
            self.store.upload_dir(tmp, self.uri("datasets/recipes", key))

    def dataset_digest(self, config: KatConfig) -> str | None:
        """The digest of the dataset `config` synthesizes, if one was stored (None: never made here)."""
        uri = self.uri("datasets/recipes", recipe_key(config))
        if not self.store.exists(uri):
            return None
        with tempfile.TemporaryDirectory() as tmp:
            self.store.download_dir(uri, Path(tmp) / "r")
            digest = json.loads((Path(tmp) / "r" / RECIPE).read_text())["digest"]
        return digest if self.has("datasets", digest) else None


def dataset(config: KatConfig, out: str | Path, *, store: ArtifactStore | None = None,
            progress: bool = False) -> tuple[dict[str, Any], bool]:
    """The synthesize stage through the artifact store: the dataset of this recipe fetched into `out` when
    it is stored (digest-checked), else synthesized, stored under its digest and its recipe recorded.
    Returns (its manifest, whether it was fetched)."""
    store = store or ArtifactStore.from_env()
    digest = store.dataset_digest(config)
    if digest is not None:
        store.get("datasets", digest, out)
        log.info("dataset %s fetched from %s (unchanged recipe)", digest[:12], store.root)
        return read_manifest(Path(out)) or {}, True
    manifest = synthesize(config, out, progress=progress)
    uri = store.put("datasets", out)
    store.record_recipe(recipe_key(config), dir_digest(Path(out)), recipe(config))
    log.info("dataset stored at %s", uri)
    return manifest, False
