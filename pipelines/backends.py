"""Run back ends behind one interface (`pipelines.interface.RunBackend`): `local` (kfp.local in this
process, `pipelines.local`) and `kubeflow` (kfp.Client, `pipelines.kubeflow`).

    backend = get_backend("local")            # or get_backend("kubeflow", host=..., token=...)
    run_id = backend.submit("smoke", ["train.steps=10"])
    backend.status(run_id).stages             # per-stage status, seconds and outputs
"""

from typing import Any

from kat_core.errors import Invalid
from pipelines.interface import RunBackend
from pipelines.kubeflow import KubeflowBackend
from pipelines.local import LocalBackend

BACKENDS = ("local", "kubeflow")

__all__ = ["BACKENDS", "KubeflowBackend", "LocalBackend", "RunBackend", "get_backend"]


def get_backend(name: str, **kwargs: Any) -> RunBackend:
    if name == "local":
        return LocalBackend(**kwargs)
    if name == "kubeflow":
        return KubeflowBackend(**kwargs)
    raise Invalid(f"unknown back end {name!r}; known: {', '.join(BACKENDS)}")
