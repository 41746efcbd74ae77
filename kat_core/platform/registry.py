"""The model registry (MLflow) with aliases `candidate` and `champion`, a promotion gate, rollback and history.

    register_model(ckpt, report, parent_run_id)  -> version; logged as a pyfunc over the checkpoint directory,
                                                    tagged with its lineage, alias `candidate`
    gate(candidate, champion, margins)           -> (passed, reason)   (kat_core.platform.gate)
    promote_if_better(name, version)             -> (promoted, reason): the gate against the current champion
    promote(name, version, reason) / rollback(name, reason) / history(name)

Why a pyfunc and not the transformers flavour: in MLflow 3.17 `mlflow.transformers.log_model` rejects a
local checkpoint path (it only takes a pipeline or a dict of objects), and with objects it pins torchvision
and looks for a model card on the hub; it would also drop the MTP heads and our manifest. The pyfunc keeps
the checkpoint directory verbatim as an artifact, verifies its digests on load, and needs no network.

Alias history: each move is one registered-model tag `kat.alias_event.<time_ns>-<rand>` holding a JSON event
(alias, version, previous, action, reason, who, at). It lives in the registry itself, so it travels with a
remote tracking server, shows in the MLflow UI, and needs no second store; one tag per event keeps every
write small and append-only (a single JSON log tag would be rewritten on every move and grow without end).

Concurrency: alias moves take an exclusive lock on `$KAT_HOME/locks/registry-<name>.lock` (flock), read the
current alias, move it and append the event inside the lock, so two promotions serialise and each event's
`previous` is the version the other one set. The lock covers processes sharing KAT_HOME (one machine or a
shared volume); MLflow has no compare-and-set on aliases to do better across machines.
"""

from __future__ import annotations

import getpass
import json
import os
import socket
import time
import uuid
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from kat_core.errors import Conflict, GateRefused, Invalid, KatError
from kat_core.manifest import dir_digest, read_manifest, verify_manifest
from kat_core.platform import file_lock
from kat_core.platform.gate import (  # noqa: F401  (gate and items_digest: re-exported)
    EvalSummary,
    Margins,
    gate,
    items_digest,
    summary_from_report,
)
from kat_core.platform.tracking import (
    TAG_KFP_RUN,
    TAG_KIND,
    TAG_STAGE,
    experiment_id,
    get_client,
    mlflow_errors,
    pipeline_lineage,
    resolve_tracking_uri,
)

NAME = "kat"
CANDIDATE, CHAMPION = "candidate", "champion"
EVENT_PREFIX = "kat.alias_event."
TAG_SUMMARY = "kat.eval.summary"
TAG_GATE_ACC = "kat.gate.acc_margin"  # the margins of the config that registered the version
TAG_GATE_TOK = "kat.gate.tok_margin"
TAG_GATE_MIN_ACC = "kat.gate.min_accuracy"
TAG_GATE_MIN_WF = "kat.gate.min_well_formed"
PYFUNC_CODE = Path(__file__).with_name("pyfunc_model.py")
DEFAULT_MAX_NEW_TOKENS = 128  # the pyfunc's default too


# ---- registration ---------------------------------------------------------------------------------------


def register_model(
    checkpoint_dir: str | Path,
    report: dict[str, Any] | EvalSummary,
    parent_run_id: str | None = None,
    name: str = NAME,
    *,
    who: str | None = None,
    tracking_uri: str | None = None,
    margins: Margins | None = None,
) -> int:
    """Log `checkpoint_dir` as a model (a child run "register" of the pipeline's parent run), register it
    under `name` with its lineage and evaluation summary as version tags, point `candidate` at it, and
    return the version number. Nothing is registered for a checkpoint that fails its manifest. `margins`,
    the gate's margins of the run's config, are recorded too: a later promotion (CLI, dashboard) of this
    version uses the same ones."""
    import mlflow

    from kat_core.model.checkpoint import check_checkpoint

    ckpt = Path(checkpoint_dir)
    check_checkpoint(ckpt)
    problems = verify_manifest(ckpt, exact=True)  # exact, as serving checks it: else registered, never servable
    if problems:
        raise KatError(f"refusing to register {ckpt}: {problems[0]}")
    summary = summary_from_report(report)
    uri = resolve_tracking_uri(tracking_uri)
    with mlflow_errors(uri):
        client = get_client(uri)
        lineage = pipeline_lineage(parent_run_id, tracking_uri=uri) if parent_run_id else {}
        manifest = read_manifest(ckpt) or {}
        tags = _version_tags(ckpt, manifest, lineage, summary)
        if margins is not None:
            tags.update({TAG_GATE_ACC: repr(margins.acc_margin), TAG_GATE_TOK: repr(margins.tok_margin),
                         TAG_GATE_MIN_ACC: repr(margins.min_accuracy), TAG_GATE_MIN_WF: repr(margins.min_well_formed)})
        if parent_run_id:
            exp = client.get_run(parent_run_id).info.experiment_id
        else:
            exp = experiment_id(client)
        with mlflow.start_run(experiment_id=exp, run_name="register", parent_run_id=parent_run_id,
                              tags={TAG_KIND: "stage", TAG_STAGE: "register",
                                    **({TAG_KFP_RUN: lineage["kfp_run_id"]} if lineage.get("kfp_run_id") else {})},
                              nested=mlflow.active_run() is not None):
            with warnings.catch_warnings():  # "no input example": on purpose, see _signature
                warnings.filterwarnings("ignore", message=".*input example was not provided")
                info = mlflow.pyfunc.log_model(
                    name="model",
                    python_model=str(PYFUNC_CODE),
                    artifacts={"checkpoint": str(ckpt)},
                    signature=_signature(),
                    # explicit, so MLflow does not load the model in a subprocess to infer them
                    pip_requirements=["kat-platform", "torch", "transformers", "safetensors", "tokenizers"],
                    metadata={"kat_checkpoint_digest": tags["kat.checkpoint_digest"]},
                )
            if isinstance(report, dict):
                mlflow.log_dict(report, "report.json")
            mlflow.log_dict(lineage, "lineage.json")
            mlflow.log_metrics({"eval.accuracy": summary.accuracy, "eval.mean_tokens": summary.mean_tokens})
        version = int(mlflow.register_model(info.model_uri, name, tags=tags).version)
        with _alias_lock(name):
            _move_alias(client, name, CANDIDATE, version, "register", "registered", who)
    return version


def _signature():
    """Prompts (strings) in, completions out, `max_new_tokens` as a param (MLflow drops params a signature lacks).
    Given explicitly: an input example would make MLflow load the model and generate while logging."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec("string")]),  # unnamed: a plain list of prompts passes validation
        outputs=Schema([ColSpec("string")]),
        params=ParamSchema([ParamSpec("max_new_tokens", "long", DEFAULT_MAX_NEW_TOKENS)]),
    )


def _version_tags(ckpt: Path, manifest: dict[str, Any], lineage: dict[str, Any], summary: EvalSummary
                  ) -> dict[str, str]:
    """Lineage on the version: pipeline run, KFP run, config hash, code version, every data digest."""
    tags = {
        "kat.pipeline_run_id": lineage.get("pipeline_run_id"),
        "kat.kfp_run_id": lineage.get("kfp_run_id"),
        "kat.profile": lineage.get("profile"),
        "kat.config_hash": lineage.get("config_hash") or manifest.get("config_hash"),
        "kat.code_version": lineage.get("code_version") or manifest.get("code_version"),
        "kat.checkpoint_stage": manifest.get("stage"),
        "kat.checkpoint_digest": dir_digest(ckpt),
        TAG_SUMMARY: summary.to_json(),
        "kat.eval.accuracy": f"{summary.accuracy:.6g}",
        "kat.eval.mean_tokens": f"{summary.mean_tokens:.6g}",
    }
    for input_name, digest in (manifest.get("inputs") or {}).items():
        tags[f"kat.input.{input_name}"] = digest
    for data_name, digest in (lineage.get("data") or {}).items():
        tags[f"kat.data.{data_name}"] = digest
    return {k: str(v) for k, v in tags.items() if v is not None}


# ---- aliases: promote, rollback, history ----------------------------------------------------------------


@dataclass(frozen=True)
class AliasEvent:
    alias: str
    version: int
    previous: int | None
    action: str  # register | promote | rollback
    reason: str
    who: str
    at: str

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


def promote(name: str, version: int, reason: str, who: str | None = None, *, alias: str = CHAMPION,
            gate_margins: Margins | None = None, force: bool = False,
            tracking_uri: str | None = None) -> AliasEvent | None:
    """Point `alias` (default champion) at `version` and record who and why; None when it already points
    there. With `gate_margins` the gate must pass against the current champion first (a KatError says why
    not), unless `force`: then the move is made and the history says the gate was overridden and why it
    would have refused. Without margins, this is the unconditional move a person decides on."""
    uri = resolve_tracking_uri(tracking_uri)
    with mlflow_errors(uri), _alias_lock(name):
        client = get_client(uri)
        if gate_margins is not None and alias == CHAMPION:
            try:
                passed, why = _check_gate(client, name, int(version), gate_margins)
            except KatError as e:  # e.g. a version registered without kat's evaluation summary
                if not force:
                    raise
                passed, why = False, f"not judged ({e})"
            if not passed and not force:
                raise GateRefused(f"the promotion gate keeps {name} v{version} out: {why}")
            reason = f"{reason}; gate: {why}" if passed else f"{reason}; gate overridden (forced): {why}"
        elif force:
            reason = f"{reason}; gate overridden (forced)"
        return _move_alias(client, name, alias, int(version), "promote", reason, who)


def promote_if_better(name: str, version: int, margins: Margins | None = None, who: str | None = None,
                      *, tracking_uri: str | None = None) -> tuple[bool, str]:
    """The pipeline's step: run the gate for `version` against the current champion and promote it when it
    passes. Check and move happen under one lock, so the champion cannot change in between."""
    uri = resolve_tracking_uri(tracking_uri)
    with mlflow_errors(uri), _alias_lock(name):
        client = get_client(uri)
        if _alias_target(client, name, CHAMPION) == int(version):
            return False, f"version {version} is already the champion"
        passed, reason = _check_gate(client, name, int(version), margins or Margins())
        if passed:
            _move_alias(client, name, CHAMPION, int(version), "promote", f"gate: {reason}", who)
        return passed, reason


def _check_gate(client, name: str, version: int, margins: Margins) -> tuple[bool, str]:
    current = _alias_target(client, name, CHAMPION)
    champion = _summary_of(client, name, current) if current is not None and current != version else None
    return gate(_summary_of(client, name, version), champion, margins)


def rollback(name: str, reason: str, who: str | None = None, *, tracking_uri: str | None = None) -> AliasEvent:
    """Point champion back at the champion before the current one (repeatable: each rollback steps one
    further back through the promotions that were not themselves rolled back)."""
    uri = resolve_tracking_uri(tracking_uri)
    with mlflow_errors(uri), _alias_lock(name):
        client = get_client(uri)
        chain = champion_chain(_history(client, name))
        current = _alias_target(client, name, CHAMPION)
        if not chain or chain[-1] != current:
            raise Conflict(f"{name}: champion is v{current} but its history ends at "
                           f"v{chain[-1] if chain else None} (moved outside kat?); promote a version explicitly")
        if len(chain) < 2:
            raise Conflict(f"{name}: no previous champion to roll back to (champion v{current} was the first)")
        event = _move_alias(client, name, CHAMPION, chain[-2], "rollback", reason, who)
        if event is None:  # cannot happen with a history written by kat: neighbours in the chain differ
            raise Conflict(f"{name}: history says the previous champion is the current one (v{current})")
        return event


def history(name: str, *, tracking_uri: str | None = None) -> list[AliasEvent]:
    """Every alias move of `name`, oldest first."""
    uri = resolve_tracking_uri(tracking_uri)
    with mlflow_errors(uri):
        return _history(get_client(uri), name)


def champion_chain(events: list[AliasEvent]) -> list[int]:
    """The champions in order, with rolled-back ones removed: a promotion pushes, a rollback pops."""
    chain: list[int] = []
    for e in events:
        if e.alias != CHAMPION:
            continue
        if e.action == "rollback":
            if chain:
                chain.pop()
            if not chain or chain[-1] != e.version:  # history that does not start at the first champion
                chain.append(e.version)
        else:
            chain.append(e.version)
    return chain


def _move_alias(client, name: str, alias: str, version: int, action: str, reason: str, who: str | None
                ) -> AliasEvent | None:
    """Move `alias` and append its event; call with the alias lock held."""
    client.get_model_version(name, str(version))  # an unknown version fails here, before anything moves
    previous = _alias_target(client, name, alias)
    if previous == version:
        return None
    client.set_registered_model_alias(name, alias, str(version))
    event = AliasEvent(alias, version, previous, action, reason, who or default_who(),
                       time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    try:
        client.set_registered_model_tag(name, f"{EVENT_PREFIX}{time.time_ns():020d}-{uuid.uuid4().hex[:6]}",
                                        event.to_json())
    except BaseException:
        # a move without its event (e.g. a reason longer than the registry takes) would leave a history that
        # no longer ends at the alias, and rollback refuses that: put the alias back, then report
        if previous is None:
            client.delete_registered_model_alias(name, alias)
        else:
            client.set_registered_model_alias(name, alias, str(previous))
        raise
    return event


def _history(client, name: str) -> list[AliasEvent]:
    tags = client.get_registered_model(name).tags
    return [AliasEvent(**json.loads(tags[k])) for k in sorted(tags) if k.startswith(EVENT_PREFIX)]


def _alias_target(client, name: str, alias: str) -> int | None:
    target = client.get_registered_model(name).aliases.get(alias)
    return int(target) if target is not None else None


def _summary_of(client, name: str, version: int) -> EvalSummary:
    text = client.get_model_version(name, str(version)).tags.get(TAG_SUMMARY)
    if not text:
        raise KatError(f"{name} v{version} has no evaluation summary ({TAG_SUMMARY}); it was not registered by kat")
    try:
        return EvalSummary.from_json(text)
    except (ValueError, TypeError) as e:  # a version tag edited by hand (the MLflow UI): one line, not a traceback
        raise KatError(_unreadable_summary(name, version, e)) from None


def _unreadable_summary(name: str, version: int | str, error: Exception) -> str:
    return f"{name} v{version} has an unreadable evaluation summary (version tag {TAG_SUMMARY}: {error})"


def _alias_lock(name: str):
    """Serialises alias moves of one registered model (see the module docstring)."""
    return file_lock(f"registry-{name}")


def default_who() -> str:
    """KAT_USER, else the login name and host (containers often have no passwd entry for their uid)."""
    if os.environ.get("KAT_USER"):
        return os.environ["KAT_USER"]
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = f"uid{os.getuid()}"
    return f"{user}@{socket.gethostname()}"


# ---- reading the registry --------------------------------------------------------------------------------


def model_uri(name: str = NAME, ref: str | int = CHAMPION) -> str:
    """`models:/kat@champion` for an alias, `models:/kat/3` for a version."""
    return f"models:/{name}/{ref}" if str(ref).isdigit() else f"models:/{name}@{ref}"


def versions_filter(name: str) -> str:
    """MLflow's filter for the versions of `name`. Its filter strings have no escape character: a name is
    quoted with whichever quote it does not hold (MLflow accepts names holding either)."""
    for quote in ("'", '"'):
        if quote not in name:
            return f"name = {quote}{name}{quote}"
    raise Invalid(f"model name {name!r} holds both quote characters; a registry search cannot spell it")


def list_models(*, tracking_uri: str | None = None) -> list[dict[str, Any]]:
    uri = resolve_tracking_uri(tracking_uri)
    with mlflow_errors(uri):
        client = get_client(uri)
        # every version in one paged search, grouped here: a filter `name = '...'` cannot spell a name holding
        # both quote characters (MLflow accepts such names), and one such model would fail the whole listing
        by_name: dict[str, list[Any]] = {}
        token = None
        while True:
            page = client.search_model_versions(max_results=10000, page_token=token)
            for mv in page:
                by_name.setdefault(mv.name, []).append(mv)
            token = page.token
            if not token:
                break
        out = []
        for rm in client.search_registered_models(max_results=1000):
            versions = by_name.get(rm.name, [])
            out.append({
                "name": rm.name,
                "versions": len(versions),
                "latest": max((int(v.version) for v in versions), default=None),
                "aliases": {alias: int(v) for alias, v in sorted(rm.aliases.items())},
            })
        return sorted(out, key=lambda m: m["name"])


def show_version(name: str, version: int | str, *, tracking_uri: str | None = None) -> dict[str, Any]:
    """One version with its lineage: data digests, config hash, code version, pipeline and KFP run, the
    evaluation summary, aliases and where the model files are. `version` may be an alias name."""
    uri = resolve_tracking_uri(tracking_uri)
    with mlflow_errors(uri):
        client = get_client(uri)
        mv = (client.get_model_version(name, str(version)) if str(version).isdigit()
              else client.get_model_version_by_alias(name, str(version)))
    tags = dict(mv.tags)
    try:
        evaluation = json.loads(tags[TAG_SUMMARY]) if TAG_SUMMARY in tags else None
    except ValueError as e:  # edited by hand: one line, not a traceback
        raise KatError(_unreadable_summary(name, mv.version, e)) from None
    return {
        "name": name,
        "version": int(mv.version),
        "aliases": sorted(mv.aliases),
        "created": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(mv.creation_timestamp / 1000)),
        "source": mv.source,
        "register_run_id": mv.run_id,
        "pipeline_run_id": tags.get("kat.pipeline_run_id"),
        "kfp_run_id": tags.get("kat.kfp_run_id"),
        "profile": tags.get("kat.profile"),
        "config_hash": tags.get("kat.config_hash"),
        "code_version": tags.get("kat.code_version"),
        "checkpoint_digest": tags.get("kat.checkpoint_digest"),
        "data": {k.removeprefix("kat.data."): v for k, v in sorted(tags.items()) if k.startswith("kat.data.")},
        "inputs": {k.removeprefix("kat.input."): v for k, v in sorted(tags.items()) if k.startswith("kat.input.")},
        "evaluation": evaluation,
        "gate": {"acc_margin": float(tags[TAG_GATE_ACC]), "tok_margin": float(tags[TAG_GATE_TOK]),
                 **{key: float(tags[tag]) for key, tag in (("min_accuracy", TAG_GATE_MIN_ACC),
                                                            ("min_well_formed", TAG_GATE_MIN_WF)) if tag in tags}}
        if TAG_GATE_ACC in tags and TAG_GATE_TOK in tags else None,
    }


def download_checkpoint(name: str = NAME, ref: str | int = CHAMPION, dst: str | Path | None = None,
                        *, tracking_uri: str | None = None) -> Path:
    """The registered checkpoint directory of `name@ref` copied to `dst` (default: a new temp dir) and
    verified against its manifest, for code that wants `load_checkpoint` rather than the pyfunc."""
    import tempfile

    import mlflow
    from mlflow.models import Model

    uri = resolve_tracking_uri(tracking_uri)
    with mlflow_errors(uri):
        client = get_client(uri)
        # the version first, then its files: an alias that moves in between cannot pair one's files with
        # the other's registered digest
        mv = (client.get_model_version(name, str(ref)) if str(ref).isdigit()
              else client.get_model_version_by_alias(name, str(ref)))
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri(name, mv.version),
                                                         dst_path=str(dst or tempfile.mkdtemp(prefix="kat-model-"))))
    # pyfunc artifacts keep the source directory's own name: the MLmodel file says where it went
    artifacts = Model.load(str(local / "MLmodel")).flavors["python_function"]["artifacts"]
    path = local / artifacts["checkpoint"]["path"]
    check_registered(mv, path)
    return path


def check_registered(mv, path: str | Path) -> None:
    """Raise a KatError unless the checkpoint at `path` is the one registered as model version `mv`: its files
    match its manifest, no file was added, and the manifest is the one registered. The artifact store holds
    manifest.json beside the weights, so whoever can change one can change both; the digest of the manifest's
    file list (`kat.checkpoint_digest`, a version tag) lives in the registry. A version registered without it
    (not by kat) is checked against its manifest alone."""
    where = f"{mv.name} v{mv.version}"
    problems = verify_manifest(Path(path), exact=True)
    if problems:
        raise KatError(f"the checkpoint of {where} at {path} does not match its manifest: {problems[0]}")
    registered = (mv.tags or {}).get("kat.checkpoint_digest")
    if registered and dir_digest(Path(path)) != registered:
        raise KatError(f"the checkpoint of {where} at {path} is not the one registered: its manifest changed "
                       f"(digest {dir_digest(Path(path))[:12]}…, registered {registered[:12]}…)")

