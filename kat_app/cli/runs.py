"""`kat version`, `kat run`, `kat pipeline`, `kat runs`, `kat schedule`, `kat serve`, `kat scheduler`: runs
of the pipeline, its schedules and the dashboard, all through the service layer."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from kat_app.cli import tables
from kat_app.cli.base import (
    ProfileOpt,
    SetOpt,
    _as_info,
    _say,
    _service,
    _setup_logging,
    _stage_progress,
    app,
)
from kat_core.errors import KatError


def _print_version() -> None:
    from kat_core.manifest import code_version
    from kat_core.platform import kat_home
    from kat_core.platform.tracking import resolve_tracking_uri

    typer.echo(f"kat {code_version()}")
    typer.echo(f"KAT_HOME {kat_home()}  (runs, pipeline outputs, queue, schedules; set KAT_HOME to move it)")
    typer.echo(f"MLflow   {resolve_tracking_uri()}")


def _version_option(value: bool) -> None:
    if value:
        _print_version()
        raise typer.Exit()


@app.callback()
def _options(version: Annotated[bool, typer.Option(
        "--version", is_eager=True, callback=_version_option, help="the version, KAT_HOME and MLflow URI, then exit"
)] = False) -> None:
    pass


@app.command()
def version() -> None:
    """Print the platform version and code revision, where KAT_HOME is and the MLflow tracking URI."""
    _print_version()


@app.command()
def run(
    profile: ProfileOpt = "demo",
    out: Annotated[Path | None, typer.Option(
        help="where links to the run's outputs and its run.json go (default: $KAT_HOME/latest)")] = None,
    overrides: SetOpt = None,
) -> None:
    """Run the AutoThink pipeline end to end on a profile, on the local back end (kfp.local).

    Progress per stage; finished stages of an identical earlier run are served from the cache; a training
    stage killed mid-way resumes from its last checkpoint. Ends with where everything went."""
    service = _service()
    out = out or service.home / "latest"
    purpose = service.check_config(profile, overrides, profile_files=True)["purpose"]
    if purpose:
        _say(f"profile {profile}: {purpose}")
    info = service.run_here(profile, overrides or [], out=out, on_event=_stage_progress,
                            on_prepared=lambda i: _say(f"run {i.run_id}: log {i.log}"))
    run_id = info.run_id
    _say(tables.run_summary(info))
    _say(f"outputs linked under {out}/ (run.json, one link per stage); log {info.log}")
    if info.status == "succeeded":
        _say(tables.model_summary({s.name: s.outputs for s in info.stages}))
    if purpose:
        _say(f"profile {profile}: {purpose}")
    if info.status != "succeeded":
        raise KatError(f"run {run_id} failed at {info.error}; log: {info.log}")
    typer.echo(json.dumps({"run_id": run_id, "status": info.status, "out": str(out),
                           "outputs": {s.name: s.outputs for s in info.stages}}))



# ---------------------------------------------------------------------------------------------------------
# Pipelines, runs and schedules (the run back ends in pipelines/, imported inside the commands)

pipeline_app = typer.Typer(help="Compile the AutoThink pipeline to KFP IR YAML, submit it.", no_args_is_help=True)
runs_app = typer.Typer(help="Pipeline runs on a back end: list, show, cancel.", no_args_is_help=True)
schedule_app = typer.Typer(help="Cron schedules for retraining: create, list, pause, resume, trigger, delete.",
                           no_args_is_help=True)
app.add_typer(pipeline_app, name="pipeline")
app.add_typer(runs_app, name="runs")
app.add_typer(schedule_app, name="schedule")

BackendOpt = Annotated[str, typer.Option(
    "--backend", "-b", envvar="KAT_BACKEND", help="local (kfp.local, state under KAT_HOME) | kubeflow (kfp.Client)")]
HostOpt = Annotated[str | None, typer.Option(
    help="Kubeflow Pipelines endpoint (default KFP_HOST); auth from KFP_TOKEN or KFP_COOKIE")]


@pipeline_app.command("compile")
def pipeline_compile(
    out: Annotated[Path, typer.Option("--out", "-o", help="the KFP IR YAML to write")] = Path("autothink.yaml"),
    profile: Annotated[str | None, typer.Option(
        "--profile", "-p", help="default profile parameter and DAG shape (default: cluster with --cluster, else demo)")
    ] = None,
    overrides: SetOpt = None,
    cluster: Annotated[bool, typer.Option(
        "--cluster", help="add GPU requests, node selector, tolerations, secrets and the checkpoints PVC")] = False,
) -> None:
    """Compile the AutoThink pipeline to KFP IR YAML (upload it to Kubeflow Pipelines, or submit it)."""
    from pipelines.compile import compile_pipeline

    profile = profile or ("cluster" if cluster else "demo")
    path = compile_pipeline(out, profile, overrides or [], cluster=cluster)
    _say(f"compiled the AutoThink pipeline (profile {profile}{', cluster settings' if cluster else ''}) to {path}")


@pipeline_app.command("submit")
def pipeline_submit(
    profile: ProfileOpt = "demo",
    overrides: SetOpt = None,
    backend: BackendOpt = "local",
    host: HostOpt = None,
    name: Annotated[str | None, typer.Option(help="run name")] = None,
    cluster: Annotated[bool | None, typer.Option(
        "--cluster/--no-cluster", help="kubeflow: kfp-kubernetes settings (default: when the profile is cluster)")
    ] = None,
) -> None:
    """Start a pipeline run; prints its run id (the local back end runs it to its end first)."""
    if backend not in ("local", "kubeflow"):
        raise KatError(f"unknown back end {backend!r}; known: local, kubeflow")
    service = _service(backend, host)
    if backend == "local":
        info = service.run_here(profile, overrides or [], name=name, on_event=_stage_progress)
        run_id, status, error = info.run_id, info.status, info.error
    else:
        run = service.submit_run(profile, overrides or [], backend, name=name, who="cli", cluster=cluster,
                                 profile_files=True)
        run_id, status, error = run["run_id"], run["status"], run["error"]
    _say(f"run {run_id} on {backend}: {status}")
    typer.echo(run_id)
    if status == "failed":
        raise KatError(f"run {run_id} failed at {error}")


@runs_app.command("list")
def runs_list(
    backend: BackendOpt = "local",
    host: HostOpt = None,
    limit: Annotated[int, typer.Option("--limit", "-n", help="how many, newest first")] = 20,
) -> None:
    """The newest pipeline runs: id, status (queued: waiting for the dashboard's run worker), profile, start
    time and stages."""
    service = _service(backend, host)
    runs = service.list_runs(backend, limit)["runs"]
    if backend == "local":
        _say(f"KAT_HOME {service.home}")
    if not runs:
        _say(f"no runs on the {backend} back end")
    for r in runs:
        typer.echo(tables.run_row(r))


@runs_app.command("show")
def runs_show(
    run_id: Annotated[str, typer.Argument(help="a run id from `kat runs list`")],
    backend: BackendOpt = "local",
    host: HostOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="the run record as JSON")] = False,
) -> None:
    """One run: its status, stages (time, outputs) and error."""
    run = _service(backend, host).get_run(run_id, backend)
    typer.echo(json.dumps(run, indent=2) if as_json else tables.run_summary(_as_info(run)))


@runs_app.command("cancel")
def runs_cancel(
    run_id: Annotated[str, typer.Argument(help="a run id from `kat runs list`")],
    backend: BackendOpt = "local",
    host: HostOpt = None,
) -> None:
    """Stop a queued or running run (kubeflow: terminate it)."""
    _service(backend, host).cancel_run(run_id, backend)
    _say(f"run {run_id} cancelled")


@schedule_app.command("create")
def schedule_create(
    cron: Annotated[str, typer.Option(help='5-field cron, e.g. "0 3 * * *" (03:00 every day)')],
    profile: ProfileOpt = "demo",
    overrides: SetOpt = None,
    backend: BackendOpt = "local",
    host: HostOpt = None,
    name: Annotated[str | None, typer.Option(help="schedule name")] = None,
    only_if_data_changed: Annotated[bool, typer.Option(
        "--only-if-data-changed", help="local: skip a firing when the training data equals the champion's")] = False,
) -> None:
    """Schedule retraining: a KFP recurring run on kubeflow; on local, a job in KAT_HOME's scheduler store
    that `kat serve` (or `kat scheduler`) fires. A scheduled run promotes its model only through the gate."""
    created = _service(backend, host).create_schedule(cron, profile, overrides or [], name=name, backend=backend,
                                                      only_if_data_changed=only_if_data_changed)
    nxt = f"; next {created['next_fire']}" if created.get("next_fire") else ""
    _say(f"schedule {created['schedule_id']} on {backend}: profile {profile} at {cron!r}{nxt}")
    typer.echo(created["schedule_id"])


@schedule_app.command("list")
def schedule_list(backend: BackendOpt = "local", host: HostOpt = None) -> None:
    """The schedules: id, cron, profile, enabled or paused, next fire time, name, overrides."""
    schedules = _service(backend, host).list_schedules(backend)["schedules"]
    if not schedules:
        _say(f"no schedules on the {backend} back end")
    for s in schedules:
        typer.echo(tables.schedule_row(s))


@schedule_app.command("delete")
def schedule_delete(
    schedule_id: Annotated[str, typer.Argument(help="a schedule id from `kat schedule list`")],
    backend: BackendOpt = "local",
    host: HostOpt = None,
) -> None:
    """Delete a schedule."""
    _service(backend, host).delete_schedule(schedule_id, backend)
    _say(f"schedule {schedule_id} deleted")


@schedule_app.command("pause")
def schedule_pause(schedule_id: Annotated[str, typer.Argument(help="a local schedule id")]) -> None:
    """Stop a local schedule from firing until it is resumed."""
    _service().pause_schedule(schedule_id)
    _say(f"schedule {schedule_id} paused")


@schedule_app.command("resume")
def schedule_resume(schedule_id: Annotated[str, typer.Argument(help="a local schedule id")]) -> None:
    """Let a paused local schedule fire again."""
    s = _service().resume_schedule(schedule_id)
    _say(f"schedule {schedule_id} resumed; next {s['next_fire']}")


@schedule_app.command("trigger")
def schedule_trigger(schedule_id: Annotated[str, typer.Argument(help="a local schedule id")]) -> None:
    """Fire a local schedule once, now (the running `kat serve` / `kat scheduler` does it)."""
    result = _service().trigger_schedule(schedule_id)
    where = "" if result["scheduler_running"] else " (no scheduler runs now: it fires when `kat serve` starts)"
    _say(f"schedule {schedule_id} triggered{where}")


@app.command("serve")
def serve_dashboard(
    port: Annotated[int, typer.Option("--port", "-P", help="TCP port")] = 8080,
    host: Annotated[str, typer.Option(help="interface to listen on (0.0.0.0 for all)")] = "127.0.0.1",
    concurrency: Annotated[int, typer.Option(help="local runs executed at the same time")] = 1,
    open_reads: Annotated[bool, typer.Option(
        "--open-reads", envvar="KAT_DASHBOARD_OPEN_READS", help="let anyone read pages and the API without the "
        "token (changes still need it)")] = False,
    secure_cookies: Annotated[bool, typer.Option(
        "--secure-cookies", help="mark the session cookie Secure (behind HTTPS)")] = False,
    access_log: Annotated[bool, typer.Option("--access-log", help="log every request")] = False,
) -> None:
    """The dashboard and REST API (runs, models, schedules, data), with the local run worker and the
    scheduler. Needs the API token (KAT_API_TOKEN, else $KAT_HOME/api_token: made and printed on first start)."""
    from kat_app.dashboard import serve

    _setup_logging()
    serve(host, port, open_reads=open_reads, concurrency=concurrency, access_log=access_log,
          secure_cookies=secure_cookies)


@app.command("scheduler")
def scheduler_cmd(
    concurrency: Annotated[int, typer.Option(help="local runs executed at the same time")] = 1,
) -> None:
    """Fire the local schedules and execute queued local runs, without the web service (Ctrl-C stops)."""
    import threading

    from kat_app import schedules
    from kat_app.jobs import RunWorker
    from kat_app.service import Service
    from kat_core.platform import kat_home

    _setup_logging()
    home = kat_home()
    schedules.start_live(home)
    service = Service(home)
    try:
        service.models()  # create or migrate the MLflow schema before any run's stage would, at the same time
    except KatError as e:
        _say(f"warning: {e}")
    worker = RunWorker(home, concurrency=concurrency)
    worker.start()
    listed = service.list_schedules("local")["schedules"]
    _say(f"scheduler for {home}: {len(listed)} schedule(s); Ctrl-C stops")
    try:
        threading.Event().wait()
    finally:
        worker.stop()
        schedules.stop_live(home)


