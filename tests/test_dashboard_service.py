"""The dashboard's service layer without a pipeline run: the API token and redaction, cron translation for
APScheduler, the schedule store (and its migration from schedules.json), the run queue across a restart,
and the new-run form's overrides. The live service, the pipeline and the browser: tests/test_dashboard.py."""

import json
import os
import stat
import subprocess
import sys
import threading
from datetime import datetime
from pathlib import Path

import pytest

from kat_core.errors import KatError
from tests.helpers import kat_here

ROOT = Path(__file__).resolve().parents[1]


def kat(*args, home: Path):
    """The CLI in-process (tests.helpers.kat_here) on KAT_HOME `home`."""
    return kat_here(*args, env={"KAT_HOME": str(home)})


# ---- secrets ----------------------------------------------------------------------------------------------


def test_token_is_made_once_private_and_env_wins(tmp_path, monkeypatch):
    from kat_app.security import TOKEN_FILE, load_token

    monkeypatch.delenv("KAT_API_TOKEN", raising=False)
    token, created = load_token(tmp_path)
    assert created and len(token) >= 40
    assert stat.S_IMODE((tmp_path / TOKEN_FILE).stat().st_mode) == 0o600
    assert load_token(tmp_path) == (token, False)  # the same token on the next start
    monkeypatch.setenv("KAT_API_TOKEN", "from-the-environment")
    assert load_token(tmp_path) == ("from-the-environment", False)
    monkeypatch.delenv("KAT_API_TOKEN")
    os.chmod(tmp_path / TOKEN_FILE, 0o644)  # others could read it: refused, not used
    with pytest.raises(KatError, match="readable by others"):
        load_token(tmp_path)


def test_redaction_masks_secrets_but_not_token_counts(monkeypatch):
    from kat_app.security import redact_config, redact_text, secret_name

    monkeypatch.setenv("KFP_TOKEN", "kfp-secret-value-42")
    assert not any(secret_name(k) for k in ("max_new_tokens", "mode_token_weight", "tok_margin", "tokenizer"))
    assert all(secret_name(k) for k in ("api_key", "KAT_API_TOKEN", "AWS_SECRET_ACCESS_KEY", "KFP_COOKIE",
                                        "MLFLOW_TRACKING_PASSWORD"))
    text = ("loaded kfp-secret-value-42; max_new_tokens=96 tokens_per_s: 6933 api_key=sk-abcdef1234 "
            '"password": "hunter22" Authorization: Bearer abcdefghijk12 s3://user:pw123@host/x')
    out = redact_text(text)
    for secret in ("kfp-secret-value-42", "sk-abcdef1234", "hunter22", "abcdefghijk12", "pw123"):
        assert secret not in out
    assert "max_new_tokens=96" in out and "tokens_per_s: 6933" in out
    config = {"synth": {"openai": {"api_key": "sk-1", "model": "m"}}, "evaluate": {"max_new_tokens": 96}}
    assert redact_config(config) == {"synth": {"openai": {"api_key": "***", "model": "m"}},
                                     "evaluate": {"max_new_tokens": 96}}


# ---- cron and schedules -----------------------------------------------------------------------------------


@pytest.mark.parametrize("field,names", [("1-5", "mon,tue,wed,thu,fri"), ("0", "sun"), ("7", "sun"),
                                         ("*/2", "sun,tue,thu,sat"), ("fri-sat", "fri,sat"), ("5-7", "sun,fri,sat"),
                                         ("*", "*"), ("mon,3", "mon,wed")])
def test_cron_weekdays_mean_what_cron_means(field, names):
    # APScheduler counts weekdays from Monday = 0; cron from Sunday = 0
    from kat_app.schedules import weekday_names

    assert weekday_names(field) == names


def test_next_fire_times_follow_cron_and_bad_cron_is_refused():
    from kat_app.schedules import next_fire_times

    fires = [datetime.fromisoformat(t) for t in next_fire_times("30 3 * * 1-5", 6)]
    assert all(t.hour == 3 and t.minute == 30 and t.isoweekday() <= 5 for t in fires)
    assert len({t.date() for t in fires}) == 6
    with pytest.raises(KatError, match="day of the month and the day of the week"):
        next_fire_times("0 0 1 * 1")
    with pytest.raises(KatError, match="hour field"):
        next_fire_times("0 25 * * *")


def test_schedules_move_from_schedules_json_and_are_managed_by_the_cli(tmp_path):
    legacy = [{"schedule_id": "sched-0ld0ld00", "backend": "local", "cron": "0 3 * * *", "profile": "smoke",
               "overrides": ["train.steps=5"], "name": "old nightly", "enabled": True,
               "created_at": "2026-01-01T00:00:00Z"}]
    (tmp_path / "schedules.json").write_text(json.dumps(legacy))
    r = kat("schedule", "list", home=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("sched-0ld0ld00  0 3 * * *       smoke    enabled  ")
    assert "old nightly train.steps=5" in r.stdout
    assert not (tmp_path / "schedules.json").exists() and (tmp_path / "schedules.json.migrated").is_file()

    r = kat("schedule", "create", "--cron", "15 4 * * 1-5", "--profile", "smoke", "--only-if-data-changed",
            home=tmp_path)
    assert r.returncode == 0, r.stderr
    new_id = r.stdout.strip()
    next_fire = datetime.fromisoformat(r.stderr.split("; next ")[1].strip())
    assert (next_fire.hour, next_fire.minute) == (4, 15) and next_fire.isoweekday() <= 5
    assert kat("schedule", "pause", new_id, home=tmp_path).returncode == 0
    line = next(ln for ln in kat("schedule", "list", home=tmp_path).stdout.splitlines() if ln.startswith(new_id))
    assert line.endswith(" paused  -")
    assert kat("schedule", "resume", new_id, home=tmp_path).returncode == 0
    line = next(ln for ln in kat("schedule", "list", home=tmp_path).stdout.splitlines() if ln.startswith(new_id))
    assert " enabled  20" in line
    assert kat("schedule", "delete", "sched-0ld0ld00", home=tmp_path).returncode == 0
    r = kat("schedule", "pause", "sched-nothere", home=tmp_path)
    assert r.returncode == 1 and r.stderr.strip() == "error: unknown schedule id 'sched-nothere' on the local back end"
    r = kat("schedule", "create", "--cron", "0 0 1 * mon", "--profile", "smoke", home=tmp_path)
    assert r.returncode == 1 and "restrict only one of them" in r.stderr
    assert [ln.split()[0] for ln in kat("schedule", "list", home=tmp_path).stdout.splitlines()] == [new_id]


# ---- the run queue -----------------------------------------------------------------------------------------


def test_queued_runs_survive_a_restart_and_cancel_before_starting(tmp_path):
    from kat_app.service import Conflict, Invalid, Service

    svc = Service(tmp_path)  # no worker: the runs stay queued
    first = svc.submit_run("smoke", ["train.steps=3"], name="first", who="tester")
    second = svc.submit_run("smoke", "train.steps=4\n\nevaluate.limit=2\n")
    assert first["status"] == "pending" and first["queued"] and first["queue_position"] == 1
    assert second["overrides"] == ["train.steps=4", "evaluate.limit=2"] and second["queue_position"] == 2
    with pytest.raises(Invalid, match="unknown config key 'trian'"):
        svc.submit_run("smoke", ["trian.steps=3"])
    with pytest.raises(Invalid, match="not key=value"):
        svc.submit_run("smoke", ["train.steps"])

    restarted = Service(tmp_path)  # a new service process on the same KAT_HOME
    listed = restarted.list_runs()["runs"]
    assert [(r["run_id"], r["queued"]) for r in listed] == [(second["run_id"], True), (first["run_id"], True)]
    assert listed[1]["submitted_by"] == "tester"
    cancelled = restarted.cancel_run(first["run_id"])
    assert cancelled["status"] == "cancelled" and not cancelled["queued"]
    assert json.loads((tmp_path / "runs" / first["run_id"] / "run.json").read_text())["status"] == "cancelled"
    assert restarted.get_run(second["run_id"])["queue_position"] == 1
    with pytest.raises(Conflict, match="is cancelled"):
        restarted.cancel_run(first["run_id"])
    # the worker skips nothing it should run and runs nothing cancelled: the queue hands out the live one
    assert restarted.queue.claim_next()["run_id"] == second["run_id"]
    assert restarted.queue.claim_next() is None


def test_one_claimant_per_queued_run(tmp_path):
    from kat_app.jobs import JobQueue

    queue = JobQueue(tmp_path)
    for i in range(20):
        queue.add(f"local-run-{i:02d}", "local")
    claimed: list[str] = []

    def claim():
        while (job := JobQueue(tmp_path).claim_next()) is not None:
            claimed.append(job["run_id"])

    threads = [threading.Thread(target=claim) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(claimed) == [f"local-run-{i:02d}" for i in range(20)]


# ---- the new-run form ------------------------------------------------------------------------------------


def test_form_fields_show_the_profile_and_turn_changes_into_overrides(tmp_path):
    from kat_app.service import Invalid, NotFound, Service

    svc = Service(tmp_path)
    fields = {f["key"]: f for f in svc.config_fields("smoke")}
    assert fields["train.steps"]["value"] == "30" and fields["train.steps"]["kind"] == "int"
    assert fields["synth.families"]["value"] == "{arith: 300}"
    assert fields["train.backend"]["kind"] == "choice" and fields["train.backend"]["choices"] == ["torch", "deepspeed"]
    assert fields["synth.openai.api_key"]["secret"] and fields["synth.openai.api_key"]["value"] == ""
    assert not fields["evaluate.max_new_tokens"]["secret"]
    unchanged = {k: f["value"] for k, f in fields.items()}
    assert svc.overrides_from_form("smoke", unchanged) == []
    changed = {**unchanged, "train.steps": "12", "synth.families": "{arith: 100}"}
    overrides = svc.overrides_from_form("smoke", changed, "evaluate.limit=3")
    assert overrides == ["synth.families={arith: 100}", "train.steps=12", "evaluate.limit=3"]
    assert svc.check_config("smoke", overrides)["overrides"] == overrides
    with pytest.raises(Invalid, match="train.steps"):
        svc.check_config("smoke", svc.overrides_from_form("smoke", {**unchanged, "train.steps": "many"}))
    with pytest.raises(NotFound, match="unknown profile"):
        svc.config_fields("nope")


def test_secret_overrides_are_masked_in_every_answer(tmp_path, monkeypatch):
    from kat_app import schedules
    from kat_app.service import Service

    monkeypatch.setenv("KAT_HOME", str(tmp_path))
    secret = "sk-live-0123456789abcdef"
    svc = Service(tmp_path)
    run = svc.submit_run("smoke", [f"synth.openai.api_key={secret}", "train.steps=3"])
    assert run["overrides"] == ["synth.openai.api_key=***", "train.steps=3"]
    listed = json.dumps(svc.list_runs())
    lineage = json.dumps(svc.run_lineage(run["run_id"]))
    created = svc.create_schedule("0 3 * * *", "smoke", [f"synth.openai.api_key={secret}"])
    shown = json.dumps([created, svc.list_schedules(), svc.get_schedule(created["schedule_id"])])
    for answer in (json.dumps(run), listed, lineage, shown):
        assert secret not in answer
    assert '"api_key": "***"' in lineage
    # what runs keeps the real value: the run record and the schedule's job
    record = json.loads((tmp_path / "runs" / run["run_id"] / "run.json").read_text())
    assert record["overrides"][0].endswith(secret)
    assert schedules.get(created["schedule_id"], home=tmp_path).overrides == [f"synth.openai.api_key={secret}"]


def test_kubeflow_runs_and_schedules_through_the_service(tmp_path, monkeypatch):
    from kat_app.service import Invalid, Service
    from tests.kfp_server import FakeKFP

    with FakeKFP(token="t0ken") as server:
        monkeypatch.setenv("KFP_TOKEN", "t0ken")
        svc = Service(tmp_path, kfp_host=server.url)
        assert svc.backends() == {"local": None, "kubeflow": None}
        run = svc.submit_run("smoke", ["train.steps=5"], "kubeflow", name="nightly", who="tester")
        assert run["backend"] == "kubeflow" and run["status"] == "pending" and run["submitted_by"] == "tester"
        assert server.runs[run["run_id"]]["runtime_config"]["parameters"] == {"profile": "smoke",
                                                                              "overrides": ["train.steps=5"]}
        local = svc.submit_run("smoke", [], "local")
        listed = svc.list_runs()
        assert {(r["run_id"], r["backend"]) for r in listed["runs"]} == {(run["run_id"], "kubeflow"),
                                                                        (local["run_id"], "local")}
        assert listed["warnings"] == []
        assert svc.cancel_run(run["run_id"])["backend"] == "kubeflow"
        assert server.runs[run["run_id"]]["state"] == "CANCELING"
        created = svc.create_schedule("0 3 * * *", "smoke", [], backend="kubeflow", name="kfp nightly")
        assert server.recurring[created["schedule_id"]]["trigger"]["cron_schedule"]["cron"] == "0 0 3 * * *"
        assert [s["backend"] for s in svc.list_schedules()["schedules"]] == ["kubeflow"]
        with pytest.raises(Invalid, match="Kubeflow Pipelines UI"):
            svc.pause_schedule(created["schedule_id"])
        with pytest.raises(Invalid, match="needs the local scheduler"):
            svc.create_schedule("0 3 * * *", "smoke", [], backend="kubeflow", only_if_data_changed=True)
        svc.delete_schedule(created["schedule_id"])
        assert server.recurring == {}
    # the cluster gone: the local runs still list, with a warning saying why the others do not
    listed = Service(tmp_path, kfp_host=server.url).list_runs()
    assert [r["run_id"] for r in listed["runs"]] == [local["run_id"]]
    assert listed["warnings"] and listed["warnings"][0].startswith("kubeflow: cannot reach Kubeflow Pipelines at")


def _wait(condition, timeout: float, what: str):
    import time

    deadline = time.monotonic() + timeout
    while not (result := condition()):
        assert time.monotonic() < deadline, what
        time.sleep(0.3)
    return result


def test_kat_scheduler_fires_what_the_cli_triggers(tmp_path):
    """`kat scheduler` alone: it holds the scheduler lock (a second one is refused) and fires a schedule
    that another process (the CLI) triggers, within its heartbeat; the run it submits is queued for its
    worker."""
    from kat_app import schedules
    from kat_app.service import Service

    env = {**os.environ, "KAT_HOME": str(tmp_path), "OMP_NUM_THREADS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.Popen([sys.executable, "-m", "kat_app.cli", "scheduler"], env=env, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    svc = Service(tmp_path)
    try:
        _wait(svc._scheduler_running, 60, "kat scheduler did not start")
        with pytest.raises(KatError, match=f"a scheduler already runs for {tmp_path} \\(pid {proc.pid}\\)"):
            schedules.start_live(tmp_path)
        r = kat("schedule", "create", "--cron", "0 3 * * *", "--profile", "smoke", "--set", "train.steps=2",
                home=tmp_path)
        assert r.returncode == 0, r.stderr
        sid = r.stdout.strip()
        r = kat("schedule", "trigger", sid, home=tmp_path)
        assert r.returncode == 0 and r.stderr.strip() == f"schedule {sid} triggered", r.stderr
        (event,) = _wait(lambda: svc.get_schedule(sid)["events"], 30, "the trigger did not fire")
        assert event["trigger"] == "manual" and event["outcome"] == f"submitted run {event['run_id']}"
        run = svc.get_run(event["run_id"])
        assert run["schedule_id"] == sid and run["overrides"] == ["train.steps=2"]
        assert svc.cancel_run(run["run_id"])["status"] == "cancelled"
        assert svc.get_schedule(sid)["next_fire"]  # the cron schedule itself is untouched
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=30)
    assert not svc._scheduler_running()


def test_open_reads_still_guard_changes(tmp_path):
    import socket
    import urllib.error
    import urllib.request

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "KAT_HOME": str(tmp_path)}
    for key in ("KAT_API_TOKEN", "MLFLOW_TRACKING_URI"):
        env.pop(key, None)
    proc = subprocess.Popen([sys.executable, "-m", "kat_app.cli", "serve", "--port", str(port), "--open-reads"],
                            env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"

    def up():
        try:
            with urllib.request.urlopen(f"{url}/healthz", timeout=2):
                return True
        except OSError:
            return False

    try:
        _wait(up, 60, "kat serve did not start")
        with urllib.request.urlopen(f"{url}/api/runs") as r:
            assert json.loads(r.read()) == {"runs": [], "warnings": []}
        with urllib.request.urlopen(f"{url}/runs") as r:
            assert r.url == f"{url}/runs" and b"No runs yet" in r.read()  # no detour to the sign-in page
        request = urllib.request.Request(f"{url}/api/runs", data=b'{"profile": "smoke"}', method="POST",
                                         headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(request)
        assert e.value.code == 401
    finally:
        os.killpg(proc.pid, 15)
        _, err = proc.communicate(timeout=30)
    # the token was made on this first start, printed once on the terminal, kept private
    token = (tmp_path / "api_token").read_text().strip()
    assert stat.S_IMODE((tmp_path / "api_token").stat().st_mode) == 0o600
    assert "generated an API token" in err and err.count(token) == 1


def test_a_store_whose_jobs_name_the_old_fire_function_keeps_its_schedules(tmp_path):
    """Earlier versions stored `kat_core.platform.schedules:fire` in each job; that module moved, and
    APScheduler drops a job whose function it cannot import. Opening the store repoints them."""
    import pickle
    import sqlite3

    from kat_app.schedules import FIRE, STORE_FILE, LocalSchedules

    store = LocalSchedules(tmp_path)
    schedule_id = store.create("0 3 * * *", "smoke", ["train.steps=5"], name="from an older version")
    with sqlite3.connect(tmp_path / STORE_FILE) as db:  # as that version left it
        (blob,) = db.execute("SELECT job_state FROM apscheduler_jobs WHERE id = ?", (schedule_id,)).fetchone()
        state = pickle.loads(blob)
        assert state["func"] == FIRE
        state["func"] = "kat_core.platform.schedules:fire"
        db.execute("UPDATE apscheduler_jobs SET job_state = ? WHERE id = ?", (pickle.dumps(state), schedule_id))
    db.close()

    (listed,) = LocalSchedules(tmp_path).list_all()
    assert listed.schedule_id == schedule_id and listed.name == "from an older version" and listed.enabled
    with sqlite3.connect(tmp_path / STORE_FILE) as db:
        (blob,) = db.execute("SELECT job_state FROM apscheduler_jobs WHERE id = ?", (schedule_id,)).fetchone()
    db.close()
    assert pickle.loads(blob)["func"] == FIRE


def test_a_schedule_stored_with_an_old_translation_fires_on_its_crons_days(tmp_path):
    """A stored job keeps the trigger it was made with: a version that read weekday "7-7" as every day left a
    daily trigger behind. The live scheduler rebuilds each trigger from the stored cron (a paused one stays
    paused)."""
    import pickle
    import sqlite3
    from datetime import datetime

    from apscheduler.triggers.cron import CronTrigger

    from kat_app import schedules
    from kat_app.schedules import STORE_FILE, LocalSchedules

    store = LocalSchedules(tmp_path)
    sundays = store.create("0 0 * * 7-7", "smoke", [], name="sundays")
    paused = store.create("0 0 * * 7-7", "smoke", [], name="paused")
    schedules.pause(paused, tmp_path)
    with sqlite3.connect(tmp_path / STORE_FILE) as db:  # as the older version stored them: every day
        for sid in (sundays, paused):
            (blob,) = db.execute("SELECT job_state FROM apscheduler_jobs WHERE id = ?", (sid,)).fetchone()
            state = pickle.loads(blob)
            state["trigger"] = CronTrigger(minute="0", hour="0", timezone=state["trigger"].timezone)
            db.execute("UPDATE apscheduler_jobs SET job_state = ? WHERE id = ?", (pickle.dumps(state), sid))
    db.close()
    with schedules._scheduler(tmp_path.resolve()) as editor:
        assert "day_of_week" not in str(schedules._job(editor, sundays).trigger)

    schedules.start_live(tmp_path)
    try:
        got = {s.schedule_id: s for s in schedules.list_all(tmp_path)}
        assert datetime.fromisoformat(got[sundays].next_fire).isoweekday() == 7
        assert got[paused].paused and got[paused].next_fire is None
        assert "day_of_week='sun'" in str(schedules._job(schedules._live[str(tmp_path.resolve())]["scheduler"],
                                                          paused).trigger)
    finally:
        schedules.stop_live(tmp_path)
