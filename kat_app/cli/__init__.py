"""The `kat` command. Heavy libraries are imported inside the commands, so `kat --help` is instant."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from kat_core.errors import KatError, ValidationFailed

app = typer.Typer(
    help="KAT platform: train AutoThink models (think only when it helps) as tracked, promotable pipelines.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
data_app = typer.Typer(help="Synthesize, validate and inspect dual-regime datasets.", no_args_is_help=True)
tasks_app = typer.Typer(help="Task families: synthetic arithmetic, math and code benchmarks.", no_args_is_help=True)
train_app = typer.Typer(
    help="Training stages: pretrain (MTP + distillation), cold start, Step-SRPO, teacher caches.", no_args_is_help=True
)
app.add_typer(data_app, name="data")
app.add_typer(tasks_app, name="tasks")
app.add_typer(train_app, name="train")

ProfileOpt = Annotated[str, typer.Option("--profile", "-p", help="smoke | demo | cluster, or a YAML file")]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="override a config key, e.g. --set synth.mirror_share=0.3 (repeatable)"),
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


@app.command()
def version() -> None:
    """Print the platform version and code revision."""
    from kat_core.manifest import code_version

    typer.echo(code_version())


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
    info = service.run_here(profile, overrides or [], out=out, on_event=_stage_progress)
    run_id = info.run_id
    _say(_run_summary(info))
    _say(f"outputs linked under {out}/ (run.json, one link per stage); log {info.log}")
    if info.status == "succeeded":
        _say(_model_summary({s.name: s.outputs for s in info.stages}))
    if info.status != "succeeded":
        raise KatError(f"run {run_id} failed at {info.error}; log: {info.log}")
    typer.echo(json.dumps({"run_id": run_id, "status": info.status, "out": str(out),
                           "outputs": {s.name: s.outputs for s in info.stages}}))


def _model_summary(outputs: dict[str, dict[str, str]]) -> str:
    """The evaluation (auto vs forced think-on/off) and the registry outcome of a finished run."""
    lines = []
    report_dir = outputs.get("evaluate", {}).get("report")
    if report_dir and (Path(report_dir) / "report.json").is_file():
        overall = json.loads((Path(report_dir) / "report.json").read_text()).get("overall", {})
        lines.append(f"evaluation ({report_dir}/report.md):")
        lines.append(f"  {'mode':5s} {'accuracy':>9s} {'tokens':>7s} {'think-on':>9s}")
        nan = float("nan")
        for mode, block in overall.items():
            acc = (block.get("accuracy") or {}).get("greedy")
            tokens = (block.get("mean_tokens") or {}).get("total")
            think_on = block.get("think_on_rate")
            lines.append(f"  {mode:5s} {nan if acc is None else acc:9.3f} {nan if tokens is None else tokens:7.1f} "
                         f"{nan if think_on is None else think_on:9.3f}")
    registered = outputs.get("register", {}).get("registered")
    if registered and Path(registered).is_file():
        r = json.loads(Path(registered).read_text())
        alias = "champion" if r.get("champion") else "candidate"
        lines.append(f"registered model {r['name']} version {r['version']} as {alias} ({r['gate']})")
    from kat_core.platform.tracking import resolve_tracking_uri

    lines.append(f"MLflow: {resolve_tracking_uri()}  (mlflow ui --backend-store-uri {resolve_tracking_uri()})")
    return "\n".join(lines)


@data_app.command("synth")
def data_synth(
    out: Annotated[Path, typer.Option("--out", "-o", help="dataset directory to write")],
    profile: ProfileOpt = "smoke",
    overrides: SetOpt = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress bar")] = False,
) -> None:
    """Synthesize a dual-regime dataset (think-off via tagging, think-on via solver/thinker/critic)."""
    from kat_core.config import load_config
    from kat_core.data.synth import synthesize

    config = load_config(profile, overrides)
    m = synthesize(config, out, progress=not quiet)
    critic = m["critic"]
    _say(
        f"wrote {m['records']} records ({m['counts']['mode']}) from {m['items']} items to {out} "
        f"in {m['seconds']:.2f}s ({m['items_per_s']} items/s); rejects {m['rejects'] or 0}, "
        f"critic catch rate {critic['catch_rate']}"
    )


@data_app.command("validate")
def data_validate(
    dataset: Annotated[Path, typer.Argument(help="dataset directory (from `kat data synth`)")],
    report: Annotated[Path | None, typer.Option(help="report directory (default: DATASET.validation)")] = None,
    profile: ProfileOpt = "smoke",
    overrides: SetOpt = None,
) -> None:
    """Validate a dataset with Great Expectations; exit 1 naming the failed expectations."""
    from kat_core.config import load_config
    from kat_core.data.validate import validate_dataset

    config = load_config(profile, overrides)
    summary = validate_dataset(dataset, report, config.validate_, config.tasks)
    _say(
        f"validation passed: {summary['passed']}/{summary['total']} expectations; "
        f"report {summary['report_json']}, data docs {summary.get('data_docs')}"
    )


@data_app.command("stats")
def data_stats(dataset: Annotated[Path, typer.Argument(help="dataset directory")]) -> None:
    """Counts per level and mode, regimes, rejects and lengths of a dataset."""
    from kat_core.data.stats import dataset_stats, render_stats

    render_stats(dataset_stats(dataset))


@train_app.command("pretrain")
def train_pretrain(
    data: Annotated[Path, typer.Option("--data", "-d", help="validated dataset directory")],
    out: Annotated[Path, typer.Option("--out", "-o", help="checkpoint directory to write")],
    teacher: Annotated[Path | None, typer.Option(help="teacher checkpoint or teacher top-k cache")] = None,
    profile: ProfileOpt = "smoke",
    overrides: SetOpt = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress bar")] = False,
) -> None:
    """Pretrain a causal LM with MTP modules (and distil from --teacher) into an HF checkpoint.

    Started again with the same arguments after a crash, it resumes from its last checkpoint."""
    from kat_core.config import load_config
    from kat_core.train.pretrain import pretrain

    _setup_logging()
    config = load_config(profile, overrides)
    metrics = pretrain(config, data, out, teacher, progress=not quiet)
    parts = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k in ("loss", "ce", "kd", "mtp"))
    _say(f"pretrained to step {metrics.get('step')} ({parts}); checkpoint {out}")


@train_app.command("coldstart")
def train_coldstart(
    model: Annotated[Path, typer.Option("--model", "-m", help="pretrained checkpoint")],
    data: Annotated[Path, typer.Option("--data", "-d", help="dataset directory (its pool.jsonl holds the prompts)")],
    out: Annotated[Path, typer.Option("--out", "-o", help="checkpoint directory to write")],
    profile: ProfileOpt = "smoke",
    overrides: SetOpt = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress bar")] = False,
) -> None:
    """Cold start: label each held-out prompt's mode from the model's own forced answers (the `autothink`
    decision criterion, per feature cell), then SFT.

    Writes the checkpoint with labels.jsonl (accuracy and tokens per mode, cell, label, reason) and
    coldstart.json."""
    from kat_core.config import load_config
    from kat_core.train.coldstart import coldstart

    _setup_logging()
    config = load_config(profile, overrides)
    result = coldstart(config, model, out, data_dir=data, progress=not quiet)
    levels = ", ".join(f"L{lvl} off {v['label_off']}/on {v['label_on']}" for lvl, v in result["per_level"].items())
    _say(f"cold start labelled {result['prompts']} prompts ({levels}); {result['in_sft']} in SFT; checkpoint {out}")


@train_app.command("srpo")
def train_srpo(
    model: Annotated[Path, typer.Option("--model", "-m", help="cold-start checkpoint (its labels.jsonl is the prior)")],
    data: Annotated[Path, typer.Option("--data", "-d", help="dataset directory whose prompts are used")],
    out: Annotated[Path, typer.Option("--out", "-o", help="checkpoint directory to write")],
    algo: Annotated[str | None, typer.Option(help="step_srpo | grpo | decoupled | adaptthink (default: srpo.algo)")
                    ] = None,
    profile: ProfileOpt = "smoke",
    overrides: SetOpt = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress bar")] = False,
) -> None:
    """Reinforcement learning after the cold start: paired-mode Step-SRPO, or the grpo, decoupled and
    adaptthink baselines. Settings under `srpo.` (samples per mode, clip, KL, srpo.train.steps/lr) and the
    decision criterion under `autothink.`; per-step rewards, the greedy decision and its regret per level on
    a probe set, clip fraction and KL go to metrics.jsonl in the checkpoint. Started again after a crash, it
    resumes."""
    from kat_core.config import load_config
    from kat_core.train.srpo import srpo

    _setup_logging()
    config = load_config(profile, overrides)
    summary = srpo(config, model, data, out, algo=algo, progress=not quiet)
    moved = ", ".join(f"{k} {v['first']:.3f} -> {v['last']:.3f}" for k, v in summary["curve"].items())
    _say(f"{summary['algo']}: {summary['steps']} steps ({moved}); checkpoint {out}")


@train_app.command("cache-teacher")
def train_cache_teacher(
    teacher: Annotated[Path, typer.Option(help="teacher checkpoint directory")],
    data: Annotated[Path, typer.Option("--data", "-d", help="the dataset the student will train on")],
    out: Annotated[Path, typer.Option("--out", "-o", help="cache directory to write")],
    profile: ProfileOpt = "smoke",
    overrides: SetOpt = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress bar")] = False,
) -> None:
    """Cache the teacher's top-k logits over the student's packed rows (use it as --teacher)."""
    from kat_core.config import load_config
    from kat_core.train.pretrain import cache_teacher

    _setup_logging()
    config = load_config(profile, overrides)
    path = cache_teacher(config, teacher, data, out, progress=not quiet)
    _say(f"teacher top-{config.pretrain.teacher_top_k} cache written to {path}")


@tasks_app.command("list")
def tasks_list() -> None:
    """The task families and their splits."""
    from kat_core.tasks import get_task, known_tasks

    for name in known_tasks():
        typer.echo(f"{name:10s} splits: {', '.join(get_task(name).splits)}")


@tasks_app.command("show")
def tasks_show(
    name: str,
    split: str = "test",
    n: Annotated[int, typer.Option("-n", help="how many items")] = 3,
    seed: int = 0,
) -> None:
    """Print a few items of a task family as JSON lines."""
    from kat_core.tasks import get_task

    for item in get_task(name).examples(split, n=n, seed=seed):
        typer.echo(json.dumps(item.to_dict(), ensure_ascii=False))


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


def _stage_progress(kind: str, stage) -> None:
    if kind == "start":
        _say(f"  {stage.name:<18} running ...")
    elif stage.status == "failed":
        _say(f"  {stage.name:<18} FAILED after {stage.seconds:.1f}s: {stage.error}")
    else:
        where = ", ".join(stage.outputs.values())
        _say(f"  {stage.name:<18} {stage.status} in {stage.seconds:.1f}s -> {where}")


def _run_summary(info) -> str:
    lines = [f"run {info.run_id} ({info.backend}, profile {info.profile}"
             f"{', ' + ' '.join(info.overrides) if info.overrides else ''}): {info.status}",
             f"  started {info.created_at}, finished {info.finished_at or '-'}"]
    if info.error:
        lines.append(f"  error: {info.error}")
    for s in info.stages:
        seconds = f"{s.seconds:.1f}s" if s.seconds is not None else "-"
        outputs = ", ".join(f"{k}={v}" for k, v in s.outputs.items())
        lines.append(f"  {s.name:<18} {s.status:<10} {seconds:>8}  {outputs}")
    if info.stages:
        lines.append(f"  {'total':<18} {'':<10} {sum(s.seconds or 0 for s in info.stages):>7.1f}s")
    if info.log:
        lines.append(f"  log {info.log}")
    return "\n".join(lines)


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


@runs_app.command("list")
def runs_list(
    backend: BackendOpt = "local",
    host: HostOpt = None,
    limit: Annotated[int, typer.Option("--limit", "-n", help="how many, newest first")] = 20,
) -> None:
    """The newest pipeline runs: id, status (queued: waiting for the dashboard's run worker), profile, start
    time and stages."""
    runs = _service(backend, host).list_runs(backend, limit)["runs"]
    if not runs:
        _say(f"no runs on the {backend} back end")
    for r in runs:
        stages = " ".join(f"{s['name']}:{s['status']}" for s in r["stages"])
        status = "queued" if r["queued"] else r["status"]
        typer.echo(f"{r['run_id']}  {status:<10} {r['profile'] or '-':<8} {r['created_at'] or '-'}  {stages}")


@runs_app.command("show")
def runs_show(
    run_id: Annotated[str, typer.Argument(help="a run id from `kat runs list`")],
    backend: BackendOpt = "local",
    host: HostOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="the run record as JSON")] = False,
) -> None:
    """One run: its status, stages (time, outputs) and error."""
    run = _service(backend, host).get_run(run_id, backend)
    typer.echo(json.dumps(run, indent=2) if as_json else _run_summary(_as_info(run)))


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
        extra = " ".join(s["overrides"])
        typer.echo(f"{s['schedule_id']}  {s['cron']:<15} {s['profile'] or '-':<8} "
                   f"{'paused' if s['paused'] else 'enabled'}  {s.get('next_fire') or '-'}  {s['name'] or ''} "
                   f"{extra}".rstrip())


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
    typer.echo(f"{'name':20s} {'versions':>8s} {'latest':>6s}  aliases")
    for m in models:
        aliases = ", ".join(f"{a}=v{v}" for a, v in m["aliases"].items()) or "-"
        typer.echo(f"{m['name']:20s} {m['versions']:>8d} {'v' + str(m['latest']):>6s}  {aliases}")


@models_app.command("show")
def models_show(
    name: Annotated[str, typer.Argument(help="registered model name, e.g. kat")],
    version: Annotated[str, typer.Argument(help="version number, or an alias (champion, candidate)")],
    as_json: Annotated[bool, typer.Option("--json", help="print the whole record as JSON")] = False,
    tracking_uri: TrackingUriOpt = None,
) -> None:
    """A version's lineage: data digests, config hash, code version, pipeline run, evaluation."""
    info = _service(tracking_uri=tracking_uri).version(name, version)
    if as_json:
        typer.echo(json.dumps(info, indent=2))
        return
    ev = info["evaluation"] or {}
    lines = [
        f"{info['name']} v{info['version']}  aliases: {', '.join(info['aliases']) or '-'}  created {info['created']}",
        f"  pipeline run (MLflow): {info['pipeline_run_id'] or '-'}",
        f"  KFP run:               {info['kfp_run_id'] or '-'}",
        f"  profile:               {info['profile'] or '-'}",
        f"  config hash:           {info['config_hash'] or '-'}",
        f"  code version:          {info['code_version'] or '-'}",
        f"  checkpoint digest:     {info['checkpoint_digest'] or '-'}",
        f"  model source:          {info['source']}",
    ]
    if ev:
        lines.append(f"  evaluation ({ev.get('mode')}): accuracy {ev.get('accuracy'):.4f}, "
                     f"mean tokens {ev.get('mean_tokens'):.1f}, n {ev.get('n')}, items {ev.get('items_digest')}")
    for title, digests in (("data", info["data"]), ("inputs", info["inputs"])):
        for key, digest in digests.items():
            lines.append(f"  {title} {key}: {digest}")
    typer.echo("\n".join(lines))


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
        before = f"v{e.previous}" if e.previous is not None else "-"
        typer.echo(f"{e.at}  {e.alias:9s} {before:>4s} -> v{e.version:<4d} {e.action:8s} {e.who}: {e.reason}")


# ---- kat eval / serve-model / generate: evaluation reports and the inference server ------------------------
# Kept as one block (kat_core/eval, kat_core/serve). `kat eval MODEL ...` is short for `kat eval run MODEL ...`.


class _EvalGroup(typer.core.TyperGroup):
    """Routes `kat eval MODEL ...` to `kat eval run MODEL ...`; subcommands (compare) and options pass through."""

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and not args[0].startswith("-"):
            args = ["run", *args]
        return super().parse_args(ctx, args)


eval_app = typer.Typer(
    cls=_EvalGroup, no_args_is_help=True,
    help="Evaluate a model (accuracy, tokens, think-on rate; auto vs forced modes): `kat eval MODEL`; "
         "compare two: `kat eval compare A B`.",
)
app.add_typer(eval_app, name="eval")

SuitesOpt = Annotated[str, typer.Option(
    "--suites", help="comma-separated: arith, gsm8k, math500, aime24, humaneval, mbpp")]
ModesOpt = Annotated[str, typer.Option("--modes", help="comma-separated evaluation modes: auto, on, off")]
LimitOpt = Annotated[int | None, typer.Option("--limit", "-n", help="items per suite (seeded sample); default all")]
SamplesOpt = Annotated[int, typer.Option("--samples", help="sampled responses per item and mode for pass@1 (0: none)")]
TemperatureOpt = Annotated[float, typer.Option(help="sampling temperature of the pass@1 samples")]
MaxNewOpt = Annotated[int, typer.Option("--max-new-tokens", help="token budget per response")]
ThreadsOpt = Annotated[int, typer.Option(
    "--threads", help="torch CPU threads (small models decode fastest on one; 0 keeps torch's default)")]
DeviceOpt = Annotated[str | None, typer.Option("--device", help="torch device (default: cuda when present, else cpu)")]


def _torch_threads(threads: int) -> None:
    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the weight-loading bar is noise for a command line
    if threads > 0:
        torch.set_num_threads(threads)


def _csv(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _eval_kwargs(limit, samples, temperature, max_new_tokens, seed, oracle_delta, token_cost, benchmarks_dir,
                 device) -> dict:
    from kat_core.config import AutoThinkConfig

    criterion = AutoThinkConfig(delta=oracle_delta, token_cost=token_cost, token_budget=max_new_tokens)
    return {"limit": limit, "n_samples": samples, "temperature": temperature, "max_new_tokens": max_new_tokens,
            "seed": seed, "criterion": criterion, "benchmarks_dir": benchmarks_dir, "device": device}


OracleDeltaOpt = Annotated[float, typer.Option(
    help="the decision criterion's delta: think-off is right when V_off >= V_on - delta")]
TokenCostOpt = Annotated[float, typer.Option(
    help="the decision criterion's token cost: V = accuracy - token_cost * tokens / max_new_tokens")]


@eval_app.command("run")
def eval_run(
    model: Annotated[Path, typer.Argument(help="checkpoint (or any HF causal LM) directory")],
    out: Annotated[Path | None, typer.Option("--out", "-o", help="report dir (default .kat/eval/<model name>)")] = None,
    suites: SuitesOpt = "arith",
    modes: ModesOpt = "auto,on,off",
    limit: LimitOpt = None,
    samples: SamplesOpt = 4,
    temperature: TemperatureOpt = 0.7,
    max_new_tokens: MaxNewOpt = 160,
    seed: int = 0,
    oracle_delta: OracleDeltaOpt = 0.02,
    token_cost: TokenCostOpt = 0.2,
    benchmarks_dir: Annotated[str | None, typer.Option(help="folder of the public benchmark files")] = None,
    threads: ThreadsOpt = 1,
    device: DeviceOpt = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress bars")] = False,
) -> None:
    """Evaluate MODEL on suites in auto and forced modes: writes report.json, report.md and PNG plots."""
    from kat_core.eval.evaluate import evaluate

    _setup_logging()
    _torch_threads(threads)
    out = out or Path(".kat/eval") / model.resolve().name
    report = evaluate(model, _csv(suites), _csv(modes), out_dir=out, progress=not quiet,
                      **_eval_kwargs(limit, samples, temperature, max_new_tokens, seed, oracle_delta, token_cost,
                                    benchmarks_dir, device))
    typer.echo(f"{'mode':6s} {'n':>5s} {'accuracy':>8s} {'pass@1':>7s} {'tokens':>7s} {'think-on':>8s}")
    for mode, b in report["overall"].items():
        p1 = b["accuracy"]["pass@1"]
        typer.echo(f"{mode:6s} {b['n']:>5d} {b['accuracy']['greedy'] or 0:>8.3f} "
                   f"{'-' if p1 is None else format(p1, '.3f'):>7s} {b['mean_tokens']['total'] or 0:>7.1f} "
                   f"{b['think_on_rate'] or 0:>8.3f}")
    sel = report["mode_selection"]
    if sel:
        cell = sel["feature_cell"]
        typer.echo(f"mode selection: feature-cell oracle {cell['oracle']['accuracy']:.3f} at "
                   f"{cell['oracle']['mean_tokens']:.1f} tokens, auto's regret {cell['regret']['accuracy']:+.3f} "
                   f"accuracy, {cell['regret']['tokens']:+.1f} tokens; hindsight oracle "
                   f"{sel['oracle']['accuracy']:.3f} at {sel['oracle']['mean_tokens']:.1f} tokens")
    skipped = {s: v["skipped_too_long"] for s, v in report["suites"].items() if v["skipped_too_long"]}
    if skipped:
        _say(f"skipped (do not fit the model's context): {skipped}")
    _say(f"report {out}/report.json, {out}/report.md, plots {out}/frontier.png, {out}/think_on_by_level.png")


@eval_app.command("compare")
def eval_compare(
    a: Annotated[Path, typer.Argument(help="A, the baseline: an evaluation dir, a report.json, or a model dir")],
    b: Annotated[Path, typer.Argument(help="B, the challenger: the same kinds")],
    out: Annotated[Path, typer.Option("--out", "-o", help="where compare.md/.json/.png (and new evaluations) go")
                   ] = Path(".kat/eval/compare"),
    suites: SuitesOpt = "arith",
    modes: ModesOpt = "auto,on,off",
    limit: LimitOpt = None,
    samples: SamplesOpt = 4,
    temperature: TemperatureOpt = 0.7,
    max_new_tokens: MaxNewOpt = 160,
    seed: int = 0,
    oracle_delta: OracleDeltaOpt = 0.02,
    token_cost: TokenCostOpt = 0.2,
    benchmarks_dir: Annotated[str | None, typer.Option(help="folder of the public benchmark files")] = None,
    threads: ThreadsOpt = 1,
    device: DeviceOpt = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress bars")] = False,
) -> None:
    """Put A and B side by side on the same items (model dirs are evaluated first, with the options given)."""
    from kat_core.eval.evaluate import compare
    from kat_core.eval.report import render_comparison

    _setup_logging()
    _torch_threads(threads)
    result = compare(a, b, out_dir=out, suites=_csv(suites), modes=_csv(modes), progress=not quiet,
                     **_eval_kwargs(limit, samples, temperature, max_new_tokens, seed, oracle_delta, token_cost,
                                    benchmarks_dir, device))
    typer.echo(render_comparison(result).split("\n![")[0].rstrip())
    _say(f"comparison {out}/compare.md, {out}/compare.json, plot {out}/compare.png")


@app.command("serve-model")
def serve_model(
    model: Annotated[Path, typer.Argument(help="checkpoint (or any HF causal LM) directory")],
    port: Annotated[int, typer.Option("--port", "-P", help="TCP port")] = 8000,
    host: Annotated[str, typer.Option(help="interface to listen on (0.0.0.0 for all)")] = "127.0.0.1",
    name: Annotated[str | None, typer.Option(help="model id clients ask for (default: the dir name)")] = None,
    max_batch: Annotated[int, typer.Option(help="most rows (requests x n) one batch runs")] = 64,
    max_wait_ms: Annotated[float, typer.Option(help="idle gap that closes a batch once it is as big as the last")
                           ] = 2.0,
    max_delay_ms: Annotated[float, typer.Option(help="longest a request waits for its batch to fill")] = 200.0,
    max_tokens: Annotated[int, typer.Option(help="completion budget when a request sets none")] = 256,
    threads: ThreadsOpt = 1,
    device: DeviceOpt = None,
    seed: int = 0,
) -> None:
    """Serve MODEL with an OpenAI-compatible API (/v1/chat/completions, /v1/completions, /v1/models), thinking
    control per request (`thinking: auto|on|off`) and dynamic batching."""
    from kat_core.serve import serve

    _setup_logging()
    _torch_threads(threads)
    serve(model, host=host, port=port, name=name or model.resolve().name, max_rows=max_batch, max_wait_ms=max_wait_ms,
          max_delay_ms=max_delay_ms, default_max_tokens=max_tokens, seed=seed, device=device)


@app.command("generate")
def generate_cmd(
    model: Annotated[Path, typer.Argument(help="checkpoint (or any HF causal LM) directory")],
    prompt: Annotated[str, typer.Argument(help='the request, e.g. "Compute 47*6+38."')],
    mode: Annotated[str, typer.Option("--mode", "-m", help="auto (the model chooses) | on | off (forced)")] = "auto",
    max_new_tokens: MaxNewOpt = 256,
    temperature: Annotated[float, typer.Option(help="0 is greedy")] = 0.0,
    top_p: Annotated[float, typer.Option(help="nucleus sampling mass")] = 1.0,
    seed: int = 0,
    threads: ThreadsOpt = 1,
    device: DeviceOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the parsed response as JSON")] = False,
) -> None:
    """Answer one request and print its parsed judge, mode, reasoning and answer."""
    from kat_core.format import parse
    from kat_core.rollout import generate
    from kat_core.serve import load_for_serving
    from kat_core.serve.protocol import forced_for_request

    if mode not in ("auto", "on", "off"):
        raise KatError(f"--mode must be auto, on or off, not {mode!r}")
    _setup_logging()
    _torch_threads(threads)
    lm, tokenizer = load_for_serving(model, device)
    forced = forced_for_request(prompt, mode)
    (sample,) = generate(lm, tokenizer, [prompt], forced=[forced], max_new_tokens=max_new_tokens,
                         temperature=temperature, top_p=top_p, seed=seed)
    parsed = parse(sample.text)
    counts = sample.segment_counts
    record = {"judge": parsed.judge, "mode": parsed.mode, "forced": mode != "auto", "reasoning": parsed.think,
              "answer": parsed.answer, "well_formed": parsed.well_formed, "error": parsed.error,
              "finish_reason": sample.finish_reason, "tokens": counts, "text": sample.text}
    if as_json:
        typer.echo(json.dumps(record, ensure_ascii=False))
        return
    indent = "\n" + " " * 11
    lines = [
        f"judge:     {parsed.judge if parsed.judge is not None else '-'}",
        f"mode:      {parsed.mode or '-'} ({'forced' if mode != 'auto' else 'chosen by the model'})",
        f"reasoning: {indent.join((parsed.think or '-').splitlines()) or '-'}",
        f"answer:    {parsed.answer if parsed.answer is not None else '-'}",
        f"tokens:    {counts.get('total', 0)} (judge {counts.get('judge', 0)}, think {counts.get('think', 0)}, "
        f"answer {counts.get('answer', 0)}); finish: {sample.finish_reason}",
    ]
    if not parsed.well_formed:
        lines += [f"malformed: {parsed.error}", f"raw:       {sample.text!r}"]
    typer.echo("\n".join(lines))


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
