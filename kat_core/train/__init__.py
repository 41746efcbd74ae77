"""Training: the engine (one explicit loop over DeepSpeed or plain torch) and the recipes built on it.

Importing this package is cheap: `train`, `TrainResult`, `unwrap` and `epoch_sampler` load
`kat_core.train.engine` (and torch) on first use.
"""

from __future__ import annotations

from typing import Any

__all__ = ["train", "TrainResult", "unwrap", "epoch_sampler", "lr_factor"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from kat_core.train import engine

        return getattr(engine, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
