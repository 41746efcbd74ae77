"""`kat models`: the MLflow model registry (versions, aliases, promotion through the gate, history)."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from kat_app.cli import tables
from kat_app.cli.base import (
    _say,
    _service,
    app,
)

# ---- kat models: the MLflow model registry (kat_core/platform/registry.py) --------------------------------
# Kept as one block: the sub-app, its options and commands. The tracking URI comes from --tracking-uri,
# MLFLOW_TRACKING_URI, else sqlite:///$KAT_HOME/mlflow.db.

models_app = typer.Typer(
    help="The model registry: versions with their lineage, the candidate/champion aliases, promotion history.",
    no_args_is_help=True,
)
app.add_typer(models_app, name="models")


@models_app.callback()
def _models_setup() -> None:
    import os

    # MLflow retries an unreachable server 7 times with exponential backoff (minutes); at a prompt a
    # person wants the error now. An explicit MLFLOW_HTTP_REQUEST_MAX_RETRIES still wins.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")

TrackingUriOpt = Annotated[
    str | None,
    typer.Option("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else "
                 "sqlite:///$KAT_HOME/mlflow.db)"),
]
ReasonOpt = Annotated[str, typer.Option("--reason", "-r", help="why (recorded in the alias history)")]
WhoOpt = Annotated[str | None, typer.Option("--who", help="who decides (default: $KAT_USER, else user@host)")]


@models_app.command("list")
def models_list(tracking_uri: TrackingUriOpt = None) -> None:
    """Registered models with their version count and aliases."""
    models = _service(tracking_uri=tracking_uri).models()
    if not models:
        _say("no registered models")
        return
    typer.echo(tables.models_table(models))


@models_app.command("show")
def models_show(
    name: Annotated[str, typer.Argument(help="registered model name, e.g. kat")],
    version: Annotated[str, typer.Argument(help="version number, or an alias (champion, candidate)")],
    as_json: Annotated[bool, typer.Option("--json", help="print the whole record as JSON")] = False,
    tracking_uri: TrackingUriOpt = None,
) -> None:
    """A version's lineage (data digests, config hash, code version, pipeline run, evaluation) and where its
    checkpoint lies on this machine."""
    info = _service(tracking_uri=tracking_uri).version(name, version, local_path=True)
    if as_json:
        typer.echo(json.dumps(info, indent=2))
        return
    typer.echo(tables.version_details(info))


@models_app.command("promote")
def models_promote(
    name: Annotated[str, typer.Argument(help="registered model name")],
    version: Annotated[int, typer.Argument(help="version to make champion")],
    reason: ReasonOpt,
    force: Annotated[bool, typer.Option("--force", help="promote even when the gate says no")] = False,
    who: WhoOpt = None,
    tracking_uri: TrackingUriOpt = None,
) -> None:
    """Make VERSION the champion. The promotion gate must pass against the current champion (the margins of
    the config that registered it: its `registry` section, as the pipeline's gate used them) unless --force."""
    from kat_core.platform.registry import AliasEvent

    result = _service(tracking_uri=tracking_uri).promote(name, version, reason, who, force=force)
    event = AliasEvent(**result["event"]) if result["event"] else None
    if event is None:
        _say(f"{name} v{version} is already the champion")
    else:
        before = f"v{event.previous}" if event.previous is not None else "none"
        _say(f"{name}: champion {before} -> v{event.version} ({event.reason}; by {event.who})")


@models_app.command("rollback")
def models_rollback(
    name: Annotated[str, typer.Argument(help="registered model name")],
    reason: ReasonOpt,
    who: WhoOpt = None,
    tracking_uri: TrackingUriOpt = None,
) -> None:
    """Point champion back at the previous champion."""
    from kat_core.platform.registry import AliasEvent

    event = AliasEvent(**_service(tracking_uri=tracking_uri).rollback(name, reason, who)["event"])
    _say(f"{name}: champion v{event.previous} -> v{event.version} (rollback: {event.reason}; by {event.who})")


@models_app.command("history")
def models_history(
    name: Annotated[str, typer.Argument(help="registered model name")],
    tracking_uri: TrackingUriOpt = None,
) -> None:
    """Every alias move of NAME, oldest first: when, alias, from -> to, action, who, why."""
    from kat_core.platform.registry import AliasEvent

    events = [AliasEvent(**e) for e in _service(tracking_uri=tracking_uri).history(name)]
    if not events:
        _say(f"{name}: no alias moves recorded")
    for e in events:
        typer.echo(tables.history_row(e))


