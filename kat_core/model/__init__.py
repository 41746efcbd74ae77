"""Causal LMs (fresh or loaded), DeepSeek-V3-style MTP modules, and checkpoints.

Importing this package imports torch and transformers: keep it out of `kat_core/__init__.py` and the CLI's
top level."""

from kat_core.model.checkpoint import (
    check_checkpoint,
    checkpoint_meta,
    is_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from kat_core.model.lm import build_model, load_model, prepare_tokenizer
from kat_core.model.mtp import LMWithMTP, MTPHeads, MTPModule, build_mtp, mtp_forward, mtp_loss

__all__ = [
    "LMWithMTP", "MTPHeads", "MTPModule", "build_model", "build_mtp", "check_checkpoint", "checkpoint_meta",
    "is_checkpoint", "load_checkpoint", "load_model", "mtp_forward", "mtp_loss", "prepare_tokenizer",
    "save_checkpoint",
]
