"""The `kat` command. Heavy libraries are imported inside the commands, so `kat --help` is instant.

One module per group of commands (`stages`: data, train, tasks; `runs`: run, pipeline, runs, schedule, serve,
scheduler; `models`; `evaluation`: eval, serve-model, generate), `tables` for what they print, `base` for
what they share. Importing them registers their commands on `app`, in this order (the order `--help` lists)."""

from __future__ import annotations

import importlib
import sys

from kat_app.cli.base import _say, app
from kat_core.errors import KatError, ValidationFailed

__all__ = ["app", "main"]

for _group in ("stages", "runs", "models", "evaluation"):  # registers their commands, in --help's order
    importlib.import_module(f"kat_app.cli.{_group}")


def _plain_metavars(command) -> None:
    """Help that names what an option takes (TEXT, INTEGER, NUMBER, PATH; nothing after a flag) rather than
    the Python type typer 0.29 shows (`<bool>` on every flag, `--help` included, `<list[str]>`)."""
    from typer._click import Context

    help_option = command.get_help_option(Context(command, help_option_names=["-h", "--help"]))
    for param in [*command.params, *([help_option] if help_option else [])]:
        if param.param_type_name != "option" or param.metavar is not None:
            continue
        desc = param.type_descriptor
        if param.is_flag:
            param.metavar = ""
        elif not desc.is_choice:
            ann = desc.annotation
            param.metavar = ("PATH" if desc.is_path else "INTEGER" if ann is int else "NUMBER" if ann is float
                             else "TEXT")
    for sub in getattr(command, "commands", {}).values():
        _plain_metavars(sub)


def main(argv: list[str] | None = None) -> None:
    """Console entry point: user errors become one line on stderr and exit code 1. `argv` (default: the
    process's arguments) lets a test run the command in-process."""
    import typer

    from kat_core.util import short_lived_gc

    short_lived_gc()  # `kat run` and the like import mlflow, kfp, torch: their process starts and ends sooner
    command = typer.main.get_command(app)
    _plain_metavars(command)
    try:
        command.main(args=argv, prog_name="kat")
    except ValidationFailed as e:
        _say(f"error: {e}")
        sys.exit(1)
    except KatError as e:
        _say(f"error: {e}")
        sys.exit(1)
    except KeyboardInterrupt:
        _say("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()

