"""What a new user meets (issue 20): where KAT_HOME is, whatever folder they run `kat` from; a run log a person
reads (the executor's JSON, colours and bar redraws only in the debug log); and the smoke profile's quick look,
run for real: labelled a plumbing check at the start and the end of `kat run` and on the run page, its log
path printed before the first stage, per-stage progress lines, and its model kept from champion by the gate."""

import json
import os
import re
import subprocess
import time
import urllib.request

import pytest

from pipelines.runlog import RunLog, clean_line
from tests.helpers import KAT, ROOT

CLEAN_ENV = {k: v for k, v in os.environ.items() if k not in ("KAT_HOME", "MLFLOW_TRACKING_URI")}


class OpenReadsServer:
    """`kat serve --open-reads` on a free port (pages readable without signing in), stopped with its group."""

    def __init__(self, home):
        from tests.helpers import free_port

        self.home, self.port = home, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**CLEAN_ENV, "KAT_HOME": str(home), "OMP_NUM_THREADS": "1", "KAT_API_TOKEN": "journey-token-123"}

    def start(self):
        self.proc = subprocess.Popen([*KAT, "serve", "--port", str(self.port), "--open-reads"], cwd=ROOT,
                                     env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True)
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{self.url}/healthz", timeout=5):
                    return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("kat serve did not start") from None
                time.sleep(0.3)

    def stop(self):
        os.killpg(self.proc.pid, 15)
        self.proc.wait(timeout=30)


def test_kat_home_does_not_depend_on_the_working_directory(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**CLEAN_ENV, "HOME": str(tmp_path / "home"), "OMP_NUM_THREADS": "1"}
    outs = []
    for cwd in (ROOT, elsewhere):
        r = subprocess.run([*KAT, "--version"], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        outs.append(r.stdout)
    assert outs[0] == outs[1]
    assert f"KAT_HOME {ROOT / '.kat'}" in outs[0] and f"sqlite:///{ROOT / '.kat' / 'mlflow.db'}" in outs[0]
    r = subprocess.run([*KAT, "runs", "list", "-n", "1"], cwd=elsewhere, env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and f"KAT_HOME {ROOT / '.kat'}" in r.stderr, r.stderr
    assert not (elsewhere / ".kat").exists()  # no stray state where the command happened to run
    # the environment still wins
    r = subprocess.run([*KAT, "--version"], cwd=elsewhere, env={**env, "KAT_HOME": str(tmp_path / "h")},
                       capture_output=True, text=True, timeout=120)
    assert f"KAT_HOME {tmp_path / 'h'}" in r.stdout


def test_help_names_what_options_take():
    from tests.helpers import kat_here

    for command in ([], ["run"], ["models", "promote"], ["serve-model"], ["schedule", "create"]):
        r = kat_here(*command, "--help")
        assert r.returncode == 0, r.stderr
        assert "<bool>" not in r.stdout and "<list[str]>" not in r.stdout and "<float>" not in r.stdout, r.stdout
    text = kat_here("run", "--help").stdout
    assert re.search(r"--set\s+-s\s+KEY=VALUE", text) and re.search(r"--out\s+PATH", text), text


# what kfp.local prints for a task (shortened): colours, the executor's input JSON, its bookkeeping, a bar
KFP_OUTPUT = """\
12:00:00.100 - INFO - Executing task \x1b[96m'pretrain'\x1b[0m
12:00:00.100 - INFO - Streamed logs:

    [KFP Executor 2026-12-03 12:00:00,200 INFO]: Looking for component `pretrain` in --component_module_path `/tmp/x.py`
    [KFP Executor 2026-12-03 12:00:00,201 INFO]: Got executor_input:
    {
        "inputs": {
            "parameterValues": {"profile": "smoke"}
        },
        "outputs": {"outputFile": "/tmp/executor_output.json"}
    }
    train (torch):  10%|#         | 1/10\rtrain (torch):  50%|#####     | 5/10\rtrain (torch): 100%|##########| 10/10
    [KFP Executor 2026-12-03 12:00:05,000 INFO]: step 5/10 loss 2.5000 lr 1.00e-03
    [KFP Executor 2026-12-03 12:00:09,000 WARNING]: step 10/10 loss 1.2500 lr 1.00e-04
    [KFP Executor 2026-12-03 12:00:09,500 INFO]: Wrote executor output file to /tmp/executor_output.json.

    Writing model shards:   0%|          | 0/1 [00:00<?, ?it/s]
    Writing model shards: 100%|##########| 1/1 [00:00<00:00, 253.51it/s]
12:00:10.000 - INFO - Task \x1b[96m'pretrain'\x1b[0m finished with status \x1b[92mSUCCESS\x1b[0m
"""


def test_the_run_log_keeps_what_a_person_reads_and_the_debug_log_keeps_everything(tmp_path):
    human, debug = (tmp_path / "pipeline.log").open("w"), (tmp_path / "pipeline.debug.log").open("w")
    steps = []
    log = RunLog(human, debug, on_step=lambda *a: steps.append(a))
    for i in range(0, len(KFP_OUTPUT), 37):  # arbitrary chunks, as a stream delivers them
        log.write(KFP_OUTPUT[i:i + 37])
    log.close_pending()
    human.close()
    debug.close()
    text = (tmp_path / "pipeline.log").read_text()
    with open(tmp_path / "pipeline.debug.log", newline="") as f:  # as written: \r kept
        assert f.read() == KFP_OUTPUT
    assert "\x1b" not in text and "parameterValues" not in text and "{" not in text and "executor" not in text
    assert "Task 'pretrain' finished with status SUCCESS" in text
    assert "    12:00:05 step 5/10 loss 2.5000" in text and "    12:00:09 WARNING step 10/10" in text
    assert [ln for ln in text.splitlines() if "train (torch)" in ln] == [
        "    train (torch): 100%|##########| 10/10"]
    assert [ln for ln in text.splitlines() if "Writing model shards" in ln] == [
        "    Writing model shards: 100%|##########| 1/1 [00:00<00:00, 253.51it/s]"]
    assert steps == [(5, 10, 2.5), (10, 10, 1.25)]
    assert clean_line("\x1b[1mbold\x1b[0m\r") == "bold"


@pytest.mark.slow
def test_smoke_quick_look_is_labelled_logged_and_kept_from_champion(smoke_run):
    # the session's smoke run (conftest): the smoke profile at its smallest, run from a folder of its own, with the
    # promotion gate's floors on, so the gate judges this model for real
    home, r = smoke_run.home, smoke_run.result
    lines = r.stderr.splitlines()
    # labelled at the start and at the end
    assert lines[0].startswith("profile smoke: a plumbing check") and "learns nothing" in lines[0], lines[:3]
    assert lines[-1] == lines[0]
    # the log's path before the first stage starts
    run_id = json.loads(r.stdout)["run_id"]
    log = home / "runs" / run_id / "pipeline.log"
    assert lines[1] == f"run {run_id}: log {log}"
    assert re.fullmatch(r"\s+configure\s+running \.\.\.", lines[2])  # the config checked, then the stages
    assert any(re.fullmatch(r"\s+synthesize\s+running \.\.\.", ln) for ln in lines[3:6]), lines[:8]
    # per-stage progress: step/total, loss, elapsed and an ETA while steps remain
    progress = [ln for ln in lines if re.match(r"\s+pretrain\s+step \d+/6 · loss [\d.e-]+ · \d+s", ln)]
    assert progress and progress[-1].split()[2] == "6/6", r.stderr
    # the gate keeps the model that learned nothing from champion, and says why
    registered = next(ln for ln in lines if ln.startswith("registered model"))
    assert " as candidate (" in registered and re.search(r"not well-formed|below the minimum", registered), registered
    # the human log: no executor JSON, no colour codes; the debug log has them
    human, debug = log.read_text(), log.with_name("pipeline.debug.log").read_text()
    assert "parameterValues" not in human and "\x1b[" not in human and "==> kat: task register" in human
    assert "parameterValues" in debug and len(human.splitlines()) < len(debug.splitlines()) / 2
    record = json.loads((home / "runs" / run_id / "run.json").read_text())
    assert next(s for s in record["stages"] if s["name"] == "pretrain")["progress"].startswith("step 6/6")

    # the run page says so too
    server = OpenReadsServer(home)
    server.start()
    try:
        with urllib.request.urlopen(f"{server.url}/runs/{run_id}", timeout=30) as answer:
            page = answer.read().decode()
        purpose = re.search(r'<p class="purpose" id="run-purpose">(.*?)</p>', page, re.S)
        assert purpose and "plumbing check" in purpose.group(1), page[:2000]
        assert re.search(r'id="progress-pretrain">step 6/6 · loss', page)
    finally:
        server.stop()


def test_the_run_page_follows_a_live_log_and_keeps_what_the_reader_opened(tmp_path):
    """A running run (its record and log written here, its pid this test's): the log panel opens at its tail and
    stays there as lines arrive, the stage's progress line shows, and the 2 s refresh keeps "Full config" open."""
    from playwright.sync_api import expect, sync_playwright

    from pipelines.local import LocalBackend
    from pipelines.records import StageInfo, now_iso
    from tests.test_dashboard import CHROMIUM, TOKEN, Server

    home = tmp_path / "home"
    backend = LocalBackend(home=home)
    run_id = backend.prepare("smoke", [])
    info = backend.status(run_id)
    info.status, info.pid, info.started_at = "running", os.getpid(), now_iso()
    info.stages = [StageInfo("pretrain", "running", progress="step 10/30 · loss 5.1 · 20s · ETA 40s")]
    backend._save(info)
    log = home / "runs" / run_id / "pipeline.log"
    log.write_text("\n==> kat: task pretrain\n" + "".join(f"    line {i}\n" for i in range(60)))

    server = Server(home)
    server.start()
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"] if os.geteuid() == 0 else [])
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.set_default_timeout(20_000)
            page.goto(f"{server.url}/runs/{run_id}")
            page.fill("input[name=token]", TOKEN)
            page.click("button[type=submit]")
            page.wait_for_url(f"**/runs/{run_id}")
            expect(page.locator("#progress-pretrain")).to_have_text("step 10/30 · loss 5.1 · 20s · ETA 40s")
            at_end = "pre => pre.scrollHeight - pre.scrollTop - pre.clientHeight < 4"
            assert page.locator("pre.log").evaluate(at_end), "the log panel did not open at its tail"
            page.locator("summary", has_text="Full config").click()
            with log.open("a") as f:
                f.write("".join(f"    later {i}\n" for i in range(20)))
            expect(page.locator("pre.log")).to_contain_text("later 19", timeout=15_000)  # a refresh came
            page.wait_for_timeout(2500)  # and another
            assert page.locator("pre.log").evaluate(at_end), "the refresh left the log panel off its tail"
            assert page.locator("details", has=page.locator("summary", has_text="Full config")).evaluate(
                "d => d.open"), "the refresh closed the section the reader opened"
            browser.close()
    finally:
        server.stop()
        server.log.close()


def test_report_md_is_a_page_and_the_raw_file_stays_one_click_away(tmp_path):
    from pipelines.local import LocalBackend
    from pipelines.records import StageInfo
    from tests.test_dashboard import api

    home = tmp_path / "home"
    backend = LocalBackend(home=home)
    run_id = backend.prepare("smoke", [])
    report = tmp_path / "report"
    report.mkdir()
    (report / "report.md").write_text("# Evaluation\n\n| mode | accuracy |\n|---|---|\n| auto | 0.880 |\n\n"
                                      "<script>alert(1)</script>\n\n![frontier](frontier.png)\n")
    info = backend.status(run_id)
    info.status = "succeeded"
    info.stages = [StageInfo("evaluate", "succeeded", outputs={"report": str(report)})]
    backend._save(info)
    server = OpenReadsServer(home)
    server.start()
    try:
        status, page = api(server, "GET", f"/runs/{run_id}/files/evaluate/report/report.md")
        page = page.decode()
        assert status == 200 and "<h1>Evaluation</h1>" in page and "<td>0.880</td>" in page, page[-2000:]
        assert "<script>alert(1)</script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
        assert '<img src="frontier.png" alt="frontier"' in page  # beside report.md, through the same route
        status, raw = api(server, "GET", f"/runs/{run_id}/files/evaluate/report/report.md?raw=1")
        assert status == 200 and raw.decode().startswith("# Evaluation")
    finally:
        server.stop()
