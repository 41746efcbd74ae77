"""`manifest.json`: what produced an output directory (stage, config hash, code version), the digests of
its inputs and of its own files. Lineage, caching and resume all read it."""

from __future__ import annotations

import hashlib
import json
import subprocess
import time
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
STORE_INDEX = ".kat-index.json"  # what the object store adds to a directory it stores or fetches (storage.INDEX)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def config_hash(config: Any) -> str:
    """A stable digest of a config (a pydantic model or anything JSON-serialisable)."""
    data = config.model_dump(mode="json") if hasattr(config, "model_dump") else config
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def code_version() -> str:
    """The git commit of the code (with `+dirty` when the tree has changes), else the package version."""
    from kat_core import __version__

    root = Path(__file__).resolve().parents[1]
    try:
        sha = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"],
            capture_output=True, text=True, timeout=5, check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=5,
        ).stdout.strip()
        return f"{sha}+dirty" if dirty else sha
    except (OSError, subprocess.SubprocessError):
        return __version__


def dir_digest(directory: Path) -> str:
    """One digest for a directory: its manifest's file digests if it has one, else its files hashed."""
    directory = Path(directory)
    files = (read_manifest(directory) or {}).get("files")
    if not isinstance(files, dict):  # no manifest, or a broken one (a traceback after a whole stage's work)
        files = {str(p.relative_to(directory)): sha256_file(p) for p in sorted(directory.rglob("*")) if p.is_file()}
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()


def write_manifest(
    directory: Path,
    *,
    stage: str,
    config: Any = None,
    inputs: dict[str, Path] | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write `manifest.json` for `directory`, digesting every file already in it."""
    directory = Path(directory)
    files = {
        str(p.relative_to(directory)): sha256_file(p)
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }
    manifest = {
        "stage": stage,
        "config_hash": config_hash(config) if config is not None else None,
        "code_version": code_version(),
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "inputs": {name: dir_digest(Path(p)) for name, p in (inputs or {}).items()},
        "files": files,
        **(extra or {}),
    }
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    return manifest


def read_manifest(directory: Path) -> dict[str, Any] | None:
    """The directory's manifest, or None when it has none that can be read: missing, unreadable, not UTF-8, not
    JSON, or JSON that is not an object (every reader calls .get on it; a `[1, 2]` manifest was a traceback)."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return manifest if isinstance(manifest, dict) else None


def verify_manifest(directory: Path, *, exact: bool = False) -> list[str]:
    """Problems with a directory against its manifest (missing or changed files); empty when intact. With
    `exact`, a file the manifest does not list is a problem too: for a directory that is loaded as a whole
    (a registered checkpoint), where an added file (a chat template, tokenizer extras) changes what loads."""
    manifest = read_manifest(directory)
    if manifest is None:
        return [f"{directory}: no readable {MANIFEST}"]
    problems = []
    files = manifest.get("files", {})
    if not isinstance(files, dict):
        return [f"{directory}: {MANIFEST} lists no files (its `files` is not a mapping)"]
    for name, digest in files.items():
        path = Path(directory) / name
        if not path.is_file():
            problems.append(f"missing file {name}")
        elif sha256_file(path) != digest:
            problems.append(f"digest mismatch for {name}")
    if exact:
        # a link counts as a file, to a directory too: the loader would follow it
        on_disk = (str(p.relative_to(directory)) for p in sorted(Path(directory).rglob("*"))
                   if p.is_symlink() or not p.is_dir())
        problems += [f"file {name} is not in the manifest" for name in on_disk
                     if name not in (MANIFEST, STORE_INDEX) and name not in files]
    return problems
