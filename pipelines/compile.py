"""Compile the AutoThink pipeline to KFP IR YAML (what `kat pipeline compile` writes and Kubeflow runs)."""

import os
import tempfile
from pathlib import Path

from kat_core.errors import KatError
from pipelines.autothink import ClusterOptions, build_pipeline


def compile_pipeline(
    out: str | Path,
    profile: str = "demo",
    overrides: list[str] | None = None,
    *,
    cluster: bool | ClusterOptions = False,
    retries: int = 2,
) -> Path:
    """Write the pipeline for `profile` as KFP IR YAML to `out` (atomically); `cluster=True` adds the
    kfp-kubernetes settings of the config's `cluster` section (images, GPUs, node selector, tolerations,
    secrets, checkpoints PVC; training stages that run as a TrainJob get no GPUs themselves)."""
    from kfp import compiler

    if cluster is True:
        from kat_core.config import load_config

        options = ClusterOptions.from_config(load_config(profile, overrides))
    else:
        options = cluster or None
    pipeline = build_pipeline(profile, overrides, cluster=options, retries=retries)
    out = Path(out)
    tmp = None
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".yaml", dir=out.parent)
        os.close(fd)
        compiler.Compiler().compile(pipeline_func=pipeline, package_path=tmp)
        os.replace(tmp, out)
    except OSError as e:  # `--out` is a directory, under a file, not writable: the user's to fix, in one line
        raise KatError(f"cannot write the pipeline to {out}: {e.strerror or e}") from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)
    return out
