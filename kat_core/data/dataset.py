"""Dataset directories: JSONL shards + `manifest.json` (+ `rejects.jsonl` kept aside).

A record (one line of a shard):
    id          unique record id
    source_id   the task item it came from (the same item may appear once per mode)
    family      task family (arith, gsm8k, …)
    prompt      the request
    answer      the gold answer
    difficulty  1..5
    mode        "on" | "off"   — the regime this completion is written in
    regime      "tagged" (the item's own regime) | "mirror" (also rendered in the other regime)
    complexity  the tagger's score in [0, 1]
    completion  the response in the grammar (kat_core.format)
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from kat_core.errors import KatError

SHARD_GLOB = "train-*.jsonl"
REJECTS = "rejects.jsonl"
POOL = "pool.jsonl"  # held-out prompts (task items, never in the shards) for the cold start and RL
POOL_USES = ("coldstart", "rl")
RECORD_FIELDS = {
    "id": str, "source_id": str, "family": str, "prompt": str, "answer": str, "difficulty": int,
    "mode": str, "regime": str, "complexity": float, "completion": str,
}


def iter_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    """Records of a JSONL file; a malformed line raises a KatError naming file and line."""
    path = Path(path)
    try:
        f = open(path, "rb")  # bytes: a line that is not UTF-8 is named by its line, not a UnicodeDecodeError
    except OSError as e:  # a directory where the file should be, a file we may not read
        raise KatError(f"cannot read {path}: {e.strerror or e}") from None
    with f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as e:
                raise KatError(f"{path}:{lineno}: not UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})"
                               ) from None
            except json.JSONDecodeError as e:
                raise KatError(f"{path}:{lineno}: malformed JSON ({e.msg})") from None
            if not isinstance(record, dict):
                raise KatError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
            yield record


def shard_paths(dataset_dir: Path) -> list[Path]:
    dataset_dir = Path(dataset_dir)
    if not dataset_dir.is_dir():
        raise KatError(f"dataset directory not found: {dataset_dir}")
    shards = sorted(dataset_dir.glob(SHARD_GLOB))
    if not shards:
        raise KatError(f"{dataset_dir}: no {SHARD_GLOB} shards (is this a dataset made by `kat data synth`?)")
    odd = next((s for s in shards if not s.is_file()), None)  # a directory or a FIFO: open() fails or blocks
    if odd is not None:
        raise KatError(f"{odd}: a shard must be a regular file")
    return shards


def read_records(dataset_dir: Path) -> list[dict[str, Any]]:
    return [r for shard in shard_paths(dataset_dir) for r in iter_jsonl(shard)]


def read_pool(dataset_dir: Path, use: str, benchmarks_dir: str | None = None) -> list[tuple[Any, Any]]:
    """The dataset's held-out prompts for `use` ("coldstart" or "rl") as (task, item) pairs, with verifiers."""
    from kat_core.tasks.base import Item, get_task

    path = Path(dataset_dir) / POOL
    if not path.is_file():
        raise KatError(f"dataset {dataset_dir} has no {POOL} (held-out prompts for the cold start and RL); "
                       "synthesize it again with this version")
    tasks: dict[str, Any] = {}
    pairs = []
    for record in iter_jsonl(path):
        if record.get("use") != use:
            continue
        record = {k: v for k, v in record.items() if k != "use"}
        family = record["family"]
        if family not in tasks:
            tasks[family] = get_task(family, benchmarks_dir=benchmarks_dir)
        pairs.append((tasks[family], Item(**record)))
    if not pairs:
        raise KatError(f"{path} holds no prompts for {use} (synth.pool = 0?)")
    return pairs


def stratified(pairs: list[tuple[Any, Any]], n: int, seed: int) -> list[tuple[Any, Any]]:
    """n items taken round-robin over difficulty levels (seeded), so rare easy levels are labelled too."""
    import random
    from collections import defaultdict

    by_level: dict[int, list[tuple[Any, Any]]] = defaultdict(list)
    for pair in pairs:
        by_level[pair[1].difficulty].append(pair)
    rng = random.Random(seed)
    for group in by_level.values():
        rng.shuffle(group)
    out: list[tuple[Any, Any]] = []
    while len(out) < n and any(by_level.values()):
        for level in sorted(by_level):
            if by_level[level] and len(out) < n:
                out.append(by_level[level].pop())
    return out


def write_jsonl(path: Path, records: Iterable[dict[str, Any]]) -> int:
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
            n += 1
    return n


def write_shards(directory: Path, records: list[dict[str, Any]], shard_size: int) -> list[str]:
    names = []
    for i in range(0, max(len(records), 1), shard_size):
        name = f"train-{i // shard_size:05d}.jsonl"
        write_jsonl(Path(directory) / name, records[i : i + shard_size])
        names.append(name)
    return names


# what marks a directory as one this platform wrote: a stage's manifest, or the object store's index
# (kat_core.platform.storage.INDEX; not imported: platform imports this module)
_OWN_MARKERS = ("manifest.json", ".kat-index.json")


def _cannot_write(out: Path, e: OSError) -> KatError:
    where = f" ({e.filename})" if e.filename and str(e.filename) != str(out) else ""  # a parent that is a file
    return KatError(f"cannot write {out}: {e.strerror or e}{where}")


def check_apart(out: str | Path, inputs: Iterable[str | Path | None]) -> None:
    """A KatError when output path `out` is one of `inputs`, holds one or lies inside one (None: no input)."""
    out = Path(os.path.abspath(out))
    real_out = Path(os.path.realpath(out.parent)) / out.name  # its folder's links followed, not its own
    for given in inputs:
        if given is None:
            continue
        real_in = Path(os.path.realpath(given))
        if real_out == real_in or real_out in real_in.parents or real_in in real_out.parents:
            raise KatError(f"output path {out} is, holds or lies inside the input {given}; refusing to write "
                           "there (choose another path)")


def check_replaceable(out: str | Path, inputs: Iterable[str | Path | None] = ()) -> Path:
    """`out` as an absolute path (so "." and "" name a directory that can be moved), once it is clear that
    writing there replaces nothing but an earlier output: `out` is absent, an empty directory, or a directory
    with a manifest (or the store's index). Replacing deletes what was there, so a mistyped --out (".", a home
    folder, a file, /dev/null) is refused with a KatError instead of costing the user their files.

    `inputs` are what the command reads: an `out` that is one of them, holds one or lies inside one is refused
    too. An input is a stage's output, so it has a manifest and would pass the check above: `kat train pretrain
    --data d --out d` replaced the dataset with the checkpoint, and an output inside a checkpoint adds files
    its manifest does not list."""
    out = Path(os.path.abspath(out))  # abspath, not resolve: a symlink is replaced, never its target
    check_apart(out, inputs)
    if not (out.is_symlink() or out.exists()):
        return out
    if not out.is_dir():
        raise KatError(f"output path {out} exists and is not a directory; refusing to replace it "
                       "(remove it or choose another path)")
    try:
        foreign = any(out.iterdir()) and not any((out / m).is_file() for m in _OWN_MARKERS)
    except OSError as e:
        raise _cannot_write(out, e) from None
    if foreign:
        raise KatError(f"output path {out} is a non-empty directory that no KAT stage wrote (no manifest.json); "
                       "refusing to replace it (remove it or choose another path)")
    return out


@contextmanager
def atomic_output_dir(out: Path) -> Iterator[Path]:
    """Yield a temp directory beside `out`; on success it replaces `out`, on failure it is removed,
    so a reader never sees a half-written output. `out` must be replaceable (`check_replaceable`), which is
    checked before the work starts, not after it."""
    out = check_replaceable(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    except OSError as e:
        raise _cannot_write(out, e) from None
    try:
        yield tmp
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; outputs are meant to be shared
        swap_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def swap_into_place(tmp: Path, out: Path) -> None:
    """Put a finished temp dir at `out`. os.replace cannot replace a non-empty dir, so the old one moves
    aside first and is dropped after: `out` is never missing and never half-written. Only an earlier output
    is replaced (`check_replaceable`); the caller removes `tmp` if this raises."""
    out = check_replaceable(out)
    old = None
    try:
        if out.is_symlink() or out.exists():
            old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(out, old)
        os.replace(tmp, out)
    except OSError as e:
        if old is not None and not out.exists():  # put the earlier output back
            os.replace(old, out)
        raise _cannot_write(out, e) from None
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink()
