"""Checkpoints: a standard HF model directory (config, safetensors weights, tokenizer) that plain
`AutoModelForCausalLM.from_pretrained` loads, plus the MTP weights beside it and a manifest.

    config.json, model.safetensors, generation_config.json, tokenizer files   (HF)
    mtp.safetensors, mtp_config.json                                           (only when D > 0)
    kat_checkpoint.json                                                        (format, MTP depth, extra)
    manifest.json                                                              (file digests)

Written atomically: everything goes to a hidden sibling temp dir which is then renamed into place, so a
reader never sees a half-written checkpoint under the final name.
"""

from __future__ import annotations

import json
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kat_core.data.dataset import swap_into_place
from kat_core.errors import KatError, first_line
from kat_core.manifest import write_manifest

MTP_WEIGHTS, MTP_CONFIG, KAT_META = "mtp.safetensors", "mtp_config.json", "kat_checkpoint.json"
FORMAT = "kat-checkpoint/1"
LABELS = "labels.jsonl"  # the cold start's mode labels, which travel with the checkpoints made from it (lineage)
_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def save_checkpoint(
    out_dir: str | Path,
    model,
    tokenizer,
    mtp_heads=None,
    extra: dict[str, Any] | None = None,
    write_more: Callable[[Path], None] | None = None,
    manifest: dict[str, Any] | None = None,
) -> Path:
    """Write a checkpoint to `out_dir` atomically, replacing any previous one there.

    `extra` (JSON-serialisable) lands in kat_checkpoint.json. `write_more(tmp_dir)` is called before the
    manifest is written, so an engine's optimizer/scheduler/RNG files join the same atomic write and are
    digested too. `manifest` holds keyword arguments for `write_manifest` (default: stage "checkpoint")."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        depth = len(mtp_heads) if mtp_heads is not None else 0
        if depth:
            state = {k: v.detach().contiguous().cpu() for k, v in mtp_heads.state_dict().items()}
            save_file(state, str(tmp / MTP_WEIGHTS))
            mtp_meta = {"depth": depth, "hidden_input": "base last hidden state, after the final norm",
                        "block_config": mtp_heads.config.to_dict()}
            _write_json(tmp / MTP_CONFIG, mtp_meta)
        _write_json(tmp / KAT_META, {"format": FORMAT, "mtp_depth": depth, "extra": extra or {}})
        if write_more is not None:
            write_more(tmp)
        write_manifest(tmp, **(manifest or {"stage": "checkpoint"}))
        swap_into_place(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def load_checkpoint(ckpt_dir: str | Path, dtype=None):
    """-> (model, tokenizer, mtp_heads or None). Raises KatError for a dir that is not a checkpoint or whose
    MTP weights do not fit the model."""
    from kat_core.model.lm import load_model

    path = Path(ckpt_dir)
    check_checkpoint(path)
    model, tokenizer = load_model(path, dtype=dtype)
    return model, tokenizer, load_mtp_heads(path, model)


def load_mtp_heads(ckpt_dir: str | Path, model):
    """The MTP heads saved beside the model in `ckpt_dir`, on `model`'s device and dtype; None when the directory
    has none (a foreign HF model, or MTP depth 0). Raises KatError when they do not fit the model."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from kat_core.model.mtp import MTPHeads

    path = Path(ckpt_dir)
    if not (path / MTP_CONFIG).is_file():
        return None
    try:
        depth = int(json.loads((path / MTP_CONFIG).read_text())["depth"])
        heads = MTPHeads(model.config, depth)
        heads.load_state_dict(load_file(str(path / MTP_WEIGHTS)), strict=True)
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as e:
        raise KatError(f"bad MTP weights in checkpoint {path}: {first_line(e)}") from e
    param = next(model.parameters())
    return heads.to(device=param.device, dtype=param.dtype)


def checkpoint_meta(ckpt_dir: str | Path) -> dict[str, Any]:
    """kat_checkpoint.json (format, mtp_depth, extra); {} for a plain HF dir."""
    path = Path(ckpt_dir) / KAT_META
    return json.loads(path.read_text()) if path.is_file() else {}


def is_checkpoint(ckpt_dir: str | Path) -> bool:
    return _why_not(Path(ckpt_dir)) is None


def check_checkpoint(ckpt_dir: str | Path) -> None:
    """Raise a one-line KatError when `ckpt_dir` is not a loadable checkpoint directory."""
    reason = _why_not(Path(ckpt_dir))
    if reason:
        raise KatError(f"not a KAT checkpoint: {ckpt_dir} ({reason})")


def _why_not(path: Path) -> str | None:
    if not path.is_dir():
        return "no such directory"
    if not (path / "config.json").is_file():
        return "no config.json"
    if not any((path / name).is_file() for name in _WEIGHTS):
        return "no model weights"
    return None


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")

