"""Causal LMs (fresh or loaded), DeepSeek-V3-style MTP modules, and checkpoints.

The names below load their module on first use (PEP 562): `kat_core.model.lm` and `kat_core.model.mtp` import
torch and transformers (about 4 s), which a process that only checks or reads a checkpoint directory
(`kat_core.model.checkpoint`: the register stage, `kat models`) does not need. Keep this package out of
`kat_core/__init__.py` and the CLI's top level all the same."""

from typing import Any

_CHECKPOINT = ("check_checkpoint", "checkpoint_meta", "is_checkpoint", "load_checkpoint", "save_checkpoint")
_LM = ("build_model", "load_model", "prepare_tokenizer")
_MTP = ("LMWithMTP", "MTPHeads", "MTPModule", "build_mtp", "mtp_forward", "mtp_loss")

__all__ = sorted(_CHECKPOINT + _LM + _MTP)


def __getattr__(name: str) -> Any:
    # plain import statements, so components.runtime.code_digest still reads these modules as this package's
    if name in _CHECKPOINT:
        from kat_core.model import checkpoint as module
    elif name in _LM:
        from kat_core.model import lm as module
    elif name in _MTP:
        from kat_core.model import mtp as module
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(module, name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
