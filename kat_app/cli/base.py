"""What every group of the `kat` command shares: the app, the profile and override options, where
messages go, and the service layer the commands call."""

from __future__ import annotations

from typing import Annotated

import typer

from kat_app.cli import tables
from kat_core.errors import KatError

app = typer.Typer(
    help="KAT platform: train AutoThink models (think only when it helps) as tracked, promotable pipelines.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

ProfileOpt = Annotated[str, typer.Option("--profile", "-p", metavar="PROFILE",
                                         help="smoke | demo | cluster | real, or a YAML file")]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", metavar="KEY=VALUE",
                 help="override a config key, e.g. --set synth.mirror_share=0.3 (repeatable)"),
]


def _say(message: str) -> None:
    typer.echo(message, err=True)


def _setup_logging() -> None:
    """Our INFO lines (where outputs went, progress without a bar) on stderr; libraries stay at WARNING."""
    import logging
    import os

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("kat_core").setLevel(logging.INFO)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the embedded default never reaches a hub


def _stage_progress(kind: str, stage) -> None:
    _say(tables.stage_line(kind, stage))


def _service(backend: str | None = None, host: str | None = None, tracking_uri: str | None = None):
    """The service layer the dashboard uses too (kat_app/service/)."""
    from kat_app.service import Service

    if host and backend != "kubeflow":
        raise KatError("--host is for the kubeflow back end")
    return Service(kfp_host=host, tracking_uri=tracking_uri)


def _as_info(run: dict):
    """A service run (a dict) with attribute access, for _run_summary."""
    from types import SimpleNamespace

    return SimpleNamespace(**{**run, "stages": [SimpleNamespace(**s) for s in run["stages"]]})


