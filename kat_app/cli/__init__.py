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


def main(argv: list[str] | None = None) -> None:
    """Console entry point: user errors become one line on stderr and exit code 1. `argv` (default: the
    process's arguments) lets a test run the command in-process."""
    try:
        app(args=argv, prog_name="kat")
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

