"""One local run in a process of its own: `python -m pipelines.worker RUN_ID` executes a run that
`LocalBackend.prepare` recorded. The dashboard's run queue (kat_app/jobs.py) starts these, so a
pipeline never runs inside the web server's process (kfp.local redirects stdout and patches the
environment for the length of a run)."""

import sys

from kat_core.errors import KatError
from pipelines.local import LocalBackend


def _progress(kind: str, stage) -> None:
    if kind == "start":
        print(f"{stage.name}: running", file=sys.stderr, flush=True)
    else:
        print(f"{stage.name}: {stage.status} in {stage.seconds}s{': ' + stage.error if stage.error else ''}",
              file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m pipelines.worker RUN_ID", file=sys.stderr)
        return 2
    from kat_core.util import short_lived_gc

    short_lived_gc()  # the process ends seconds sooner (kfp, mlflow loaded)
    try:
        info = LocalBackend(on_event=_progress).execute(args[0])
    except KatError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"run {info.run_id}: {info.status}{' (' + info.error + ')' if info.error else ''}", file=sys.stderr)
    return 0 if info.status in ("succeeded", "cancelled") else 1


if __name__ == "__main__":
    sys.exit(main())
