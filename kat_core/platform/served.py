"""From the registry to a checkpoint on this machine: what `kat serve-model NAME@ALIAS` (or `NAME/VERSION`)
serves, under which model id, and where a version's files lie.

`parse_model_ref("kat@champion") -> ("kat", "champion")`, `parse_model_ref("kat/3") -> ("kat", "3")`;
`resolve(name, ref)` -> a `Served` (the version, its checkpoint dir, the model id clients ask for:
`kat@champion` for an alias, so it stays the same when the alias moves, `kat-v3` for a version).
A version whose artifacts are on the local disk (MLflow on SQLite under KAT_HOME) is used in place; one on a
remote store is downloaded once to `$KAT_HOME/models/<name>-v<version>` and checked against its manifest."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

from kat_core.errors import KatError, NotFound
from kat_core.platform.tracking import get_client, mlflow_errors, resolve_tracking_uri

_REF = re.compile(r"^(?P<name>[A-Za-z0-9][\w.-]*)(?:@(?P<alias>[A-Za-z][\w-]*)|/(?P<version>\d+))$")


@dataclass(frozen=True)
class Served:
    name: str
    ref: str  # the alias or the version number asked for
    version: int
    path: Path  # the checkpoint directory
    model_id: str  # what clients put in "model"

    @property
    def label(self) -> str:
        return f"{self.name} v{self.version}"


def parse_model_ref(text: str) -> tuple[str, str] | None:
    """(name, alias or version) for `NAME@ALIAS` / `NAME/VERSION`; None for anything else."""
    m = _REF.match(text.strip())
    if not m:
        return None
    return m["name"], m["alias"] or m["version"]


def version_of(name: str, ref: str | int, *, tracking_uri: str | None = None) -> int:
    """The version number `ref` (an alias or a number) names; NotFound when there is none."""
    uri = resolve_tracking_uri(tracking_uri)
    with mlflow_errors(uri):
        from mlflow.exceptions import MlflowException

        client = get_client(uri)
        try:
            if str(ref).isdigit():
                return int(client.get_model_version(name, str(ref)).version)
            return int(client.get_model_version_by_alias(name, str(ref)).version)
        except MlflowException as e:
            raise NotFound(f"no registered model {name}{'/' if str(ref).isdigit() else '@'}{ref} in the registry "
                           f"at {uri} ({str(e).splitlines()[0]})") from None


def local_checkpoint(name: str, version: int, *, tracking_uri: str | None = None) -> Path | None:
    """The checkpoint dir of `name` v`version` when its artifacts are on this machine's disk, else None."""
    from mlflow.models import Model

    uri = resolve_tracking_uri(tracking_uri)
    with mlflow_errors(uri):
        location = get_client(uri).get_model_version_download_uri(name, str(version))
    parsed = urlparse(location)
    if parsed.scheme not in ("", "file"):
        return None
    root = Path(unquote(parsed.path))
    if not (root / "MLmodel").is_file():
        return None
    artifacts = Model.load(str(root / "MLmodel")).flavors["python_function"]["artifacts"]
    path = root / artifacts["checkpoint"]["path"]
    return path if path.is_dir() else None


def checkpoint_of(name: str, version: int, cache: Path, *, tracking_uri: str | None = None) -> Path:
    """`name` v`version`'s checkpoint dir on this machine: in place when local, else downloaded into
    `cache/<name>-v<version>` (once; a copy that no longer is the registered one is fetched again). Either way
    checked against the version's manifest and registered digest (`registry.check_registered`): a KatError
    for a registry copy changed after registration."""
    from kat_core.platform.registry import check_registered, download_checkpoint

    uri = resolve_tracking_uri(tracking_uri)
    with mlflow_errors(uri):
        mv = get_client(uri).get_model_version(name, str(version))
    here = local_checkpoint(name, version, tracking_uri=tracking_uri)
    if here is not None:
        check_registered(mv, here)  # loaded in place: without this, edited weights would be served as registered
        return here
    dst = cache / f"{name}-v{version}"
    found = [p for p in dst.glob("artifacts/*") if p.is_dir()] if dst.is_dir() else []
    if len(found) == 1:
        try:
            check_registered(mv, found[0])
            return found[0]
        except KatError:
            pass  # a stale or changed copy: fetch it again
    dst.mkdir(parents=True, exist_ok=True)
    return download_checkpoint(name, version, dst, tracking_uri=tracking_uri)


def resolve(name: str, ref: str, cache: Path, *, tracking_uri: str | None = None) -> Served:
    """What `NAME@ALIAS` / `NAME/VERSION` serves now."""
    version = version_of(name, ref, tracking_uri=tracking_uri)
    path = checkpoint_of(name, version, cache, tracking_uri=tracking_uri)
    model_id = f"{name}-v{version}" if str(ref).isdigit() else f"{name}@{ref}"
    return Served(name, str(ref), version, path, model_id)


def follower(served: Served, cache: Path, *, tracking_uri: str | None = None):
    """For `serve(follow=...)`: a function that returns (checkpoint dir, label) when the alias `served` was
    resolved from points at another version now, else None."""
    current = {"version": served.version}

    def follow() -> tuple[Path, str] | None:
        version = version_of(served.name, served.ref, tracking_uri=tracking_uri)
        if version == current["version"]:
            return None
        path = checkpoint_of(served.name, version, cache, tracking_uri=tracking_uri)
        current["version"] = version
        return path, f"{served.name} v{version}"

    return follow


def model_path(text: str, cache: Path, *, tracking_uri: str | None = None) -> tuple[Path, Served | None]:
    """A model argument as a checkpoint dir: an existing directory as it is, else `NAME@ALIAS` /
    `NAME/VERSION` through the registry; one readable error for anything else."""
    path = Path(text).expanduser()
    if path.is_dir():
        return path, None
    ref = parse_model_ref(text)
    if ref is None:
        raise KatError(f"model not found: {text!r} is neither a directory nor a registered model "
                       "(NAME@ALIAS, e.g. kat@champion, or NAME/VERSION, e.g. kat/3)")
    served = resolve(*ref, cache, tracking_uri=tracking_uri)
    return served.path, served
