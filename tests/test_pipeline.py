"""The AutoThink pipeline: its compiled DAG, the whole smoke pipeline on kfp.local (cache, validation gate,
resume after a kill), and the Kubeflow back end against a KFP API server on loopback."""

import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from kat_core.errors import KatError
from tests.helpers import FAST, KAT, ROOT, kat, kat_here
from tests.kfp_server import FakeKFP


def load_ir(path: Path) -> tuple[dict, dict]:
    """(pipeline spec, kubernetes platform spec or {}) from a compiled YAML."""
    docs = list(yaml.safe_load_all(path.read_text()))
    platform = docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"] if len(docs) > 1 else {}
    return docs[0], platform


# ---------------------------------------------------------------------------------------------- the DAG


def test_compiled_dag_gates_training_on_validation(tmp_path):
    r = kat_here("pipeline", "compile", "--out", tmp_path / "autothink.yaml", "--profile", "smoke")
    assert r.returncode == 0, r.stderr
    spec, platform = load_ir(tmp_path / "autothink.yaml")
    tasks = spec["root"]["dag"]["tasks"]
    # smoke trains no teacher
    assert set(tasks) == {"configure", "synthesize", "validate", "pretrain", "coldstart", "srpo", "evaluate",
                          "register"}
    assert tasks["validate"]["dependentTasks"] == ["configure", "synthesize"]
    assert tasks["coldstart"]["inputs"]["artifacts"]["pretrained"]["taskOutputArtifact"] == {
        "producerTask": "pretrain", "outputArtifactKey": "model"}
    # RL starts from the cold start, and the model evaluated and registered is the RL one
    assert tasks["srpo"]["inputs"]["artifacts"]["coldstart"]["taskOutputArtifact"] == {
        "producerTask": "coldstart", "outputArtifactKey": "model"}
    assert tasks["evaluate"]["inputs"]["artifacts"]["model"]["taskOutputArtifact"]["producerTask"] == "srpo"
    assert tasks["register"]["inputs"]["artifacts"]["model"]["taskOutputArtifact"]["producerTask"] == "srpo"
    # registration only of an evaluated model
    assert tasks["register"]["inputs"]["artifacts"]["report"]["taskOutputArtifact"] == {
        "producerTask": "evaluate", "outputArtifactKey": "report"}
    assert "validate" in tasks["pretrain"]["dependentTasks"]
    gate = tasks["pretrain"]["inputs"]["artifacts"]["validation"]["taskOutputArtifact"]
    assert gate == {"producerTask": "validate", "outputArtifactKey": "report"}
    # every stage is cached, keyed on the overrides it reads, which the never-cached configure task hands it
    assert all(bool(t["cachingOptions"].get("enableCache")) == (name != "configure") for name, t in tasks.items())
    for name in ("synthesize", "evaluate"):
        assert tasks[name]["inputs"]["parameters"]["overrides"]["taskOutputParameter"] == {
            "producerTask": "configure", "outputParameterKey": name}
    assert tasks["pretrain"]["retryPolicy"]["maxRetryCount"] == 2
    assert "retryPolicy" not in tasks["synthesize"] and "retryPolicy" not in tasks["validate"]
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert params["profile"] == {"defaultValue": "smoke", "isOptional": True, "parameterType": "STRING"}
    assert params["overrides"]["parameterType"] == "LIST"
    # every task receives the run's parameters, and nothing on the component side installs packages
    for task in tasks.values():
        assert task["inputs"]["parameters"]["profile"] == {"componentInputParameter": "profile"}
    for executor in spec["deploymentSpec"]["executors"].values():
        assert executor["container"]["image"] == "ghcr.io/kat-platform/kat:latest"
        assert "pip install" not in " ".join(executor["container"]["command"])
    assert platform == {}  # no Kubernetes settings without --cluster


def test_teacher_is_trained_first_when_the_profile_asks(tmp_path):
    from pipelines.compile import compile_pipeline

    spec, _ = load_ir(compile_pipeline(tmp_path / "t.yaml", "smoke", ["pretrain.train_teacher=true"]))
    tasks = spec["root"]["dag"]["tasks"]
    assert set(tasks) == {"configure", "synthesize", "validate", "pretrain-teacher", "pretrain", "coldstart", "srpo",
                          "evaluate", "register"}
    assert "validate" in tasks["pretrain-teacher"]["dependentTasks"]
    teacher = tasks["pretrain"]["inputs"]["artifacts"]["teacher"]["taskOutputArtifact"]
    assert teacher == {"producerTask": "pretrain-teacher", "outputArtifactKey": "model"}
    assert spec["root"]["inputDefinitions"]["parameters"]["overrides"]["defaultValue"] == [
        "pretrain.train_teacher=true"]


def test_cluster_yaml_carries_the_kubernetes_settings(tmp_path):
    # one process per training stage (no TrainJob): the tasks train themselves, on a GPU node
    r = kat_here("pipeline", "compile", "--cluster", "--out", tmp_path / "c.yaml",
                 "--set", "pretrain.train_teacher=true",
                 "--set", "cluster.distributed.nodes=1", "--set", "cluster.distributed.gpus_per_node=1",
                 env={"KAT_BASE_IMAGE": "registry.example/kat:1.2.3"})
    assert r.returncode == 0, r.stderr
    spec, platform = load_ir(tmp_path / "c.yaml")
    assert spec["root"]["inputDefinitions"]["parameters"]["profile"]["defaultValue"] == "cluster"
    executors = spec["deploymentSpec"]["executors"]
    assert {e["container"]["image"] for e in executors.values()} == {"registry.example/kat:1.2.3"}
    for name in ("exec-pretrain", "exec-pretrain-teacher"):
        resources = executors[name]["container"]["resources"]
        assert resources["accelerator"]["resourceType"] == "nvidia.com/gpu"
        assert resources["accelerator"]["resourceCount"] == "1"
        k8s = platform[name]
        assert k8s["nodeSelector"]["labels"] == {"nvidia.com/gpu.present": "true"}
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in k8s["tolerations"]
        assert k8s["pvcMount"][0]["mountPath"] == "/kat/checkpoints"
        assert k8s["pvcMount"][0]["pvcNameParameter"]["runtimeValue"]["constant"] == "kat-checkpoints"
        env = {e["name"]: e["value"] for e in executors[name]["container"].get("env", [])}
        assert env["KAT_CHECKPOINT_DIR"] == "/kat/checkpoints"  # where a retried task resumes from
    for name in executors:  # credentials reach every task; GPUs and the PVC only the training ones
        secrets = {s["secretName"]: {k["envVar"] for k in s["keyToEnv"]} for s in platform[name]["secretAsEnv"]}
        assert secrets["kat-s3"] == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
        assert secrets["kat-mlflow"] == {"MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"}
        config_map = platform[name]["configMapAsEnv"][0]
        assert "MLFLOW_TRACKING_URI" in {k["envVar"] for k in config_map["keyToEnv"]}
    for name in ("exec-synthesize", "exec-validate"):
        assert "accelerator" not in executors[name]["container"].get("resources", {})
        assert "pvcMount" not in platform[name] and "nodeSelector" not in platform[name]


def test_compile_to_a_path_it_cannot_write_is_one_line(tmp_path):
    """`--out` naming a directory, or a path under a file: one `error:` line and exit code 1, nothing left beside
    it. Before: an IsADirectoryError / FileExistsError traceback."""
    (tmp_path / "adir").mkdir()
    (tmp_path / "afile").write_text("")
    for out in (tmp_path / "adir", tmp_path / "afile" / "x.yaml"):
        r = kat_here("pipeline", "compile", "--out", out, "--profile", "smoke")
        assert r.returncode == 1 and r.stderr.count("\n") == 1 and str(out) in r.stderr, r.stderr
        assert r.stderr.startswith("error: cannot write the pipeline to")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adir", "afile"]  # no temp file left


def test_bad_profile_fails_compile_in_one_line(tmp_path):
    r = kat_here("pipeline", "compile", "--out", tmp_path / "x.yaml", "--profile", "smoke", "--set", "trian.steps=3")
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1
    assert r.stderr.startswith("error: profile smoke with --set: unknown config key 'trian'")
    assert not (tmp_path / "x.yaml").exists()


@pytest.mark.parametrize("cron", ["0 3 * * *", "*/15 * * * 1-5", "30 2 1,15 jan-jun sun", "0 0 * * 7"])
def test_cron_accepted(cron):
    from pipelines.cron import check_cron

    assert check_cron(cron) == cron


@pytest.mark.parametrize("cron,field", [("0 3 * *", "5 fields"), ("60 * * * *", "minute"),
                                        ("0 24 * * *", "hour"), ("0 0 0 * *", "day of month"),
                                        ("0 0 * 13 *", "month"), ("*/0 * * * *", "minute"),
                                        ("0 5-2 * * *", "hour"), ("0 0 * * mon-xyz", "day of week")])
def test_bad_cron_is_named(cron, field):
    from pipelines.cron import check_cron

    with pytest.raises(KatError, match=field):
        check_cron(cron)


# ---------------------------------------------------------------------------------------------- local runs


def run_record(home: Path, stdout: str) -> dict:
    run_id = json.loads(stdout.strip().splitlines()[-1])["run_id"]
    return json.loads((home / "runs" / run_id / "run.json").read_text())


@pytest.fixture(scope="module")
def smoke_runs(smoke_run):
    """The session's smoke run (conftest: the smoke pipeline at its smallest), then the same command again (served
    from the cache), then once with a setting only registration reads changed, all on its KAT_HOME."""
    timings, records = [smoke_run.seconds], [smoke_run.record]
    for extra in ([], ["--set", "registry.acc_margin=0.02"]):
        t0 = time.perf_counter()
        r = subprocess.run([*KAT, "run", *smoke_run.args, *extra], cwd=smoke_run.cwd, env=smoke_run.env,
                           capture_output=True, text=True, timeout=600)
        timings.append(time.perf_counter() - t0)
        assert r.returncode == 0, r.stderr[-3000:]
        records.append(run_record(smoke_run.home, r.stdout))
    print(f"\nsmoke pipeline: first run {timings[0]:.1f}s, cached rerun {timings[1]:.1f}s")
    return smoke_run.home, smoke_run.out, records, timings


@pytest.mark.slow
def test_smoke_pipeline_produces_a_loadable_checkpoint(smoke_runs):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kat_core.manifest import dir_digest, read_manifest, verify_manifest

    home, out, (first, second, _), _ = smoke_runs
    assert first["status"] == "succeeded"
    assert [(s["name"], s["status"]) for s in first["stages"]] == [
        ("configure", "succeeded"), ("synthesize", "succeeded"), ("validate", "succeeded"), ("pretrain", "succeeded"),
        ("coldstart", "succeeded"), ("srpo", "succeeded"), ("evaluate", "succeeded"), ("register", "succeeded")]
    model_dir = Path(first["stages"][3]["outputs"]["model"])
    assert model_dir.is_relative_to(home / "pipeline_root")
    assert (out / "pretrain").resolve() == Path(second["stages"][3]["outputs"]["model"])  # the latest run's (cached)
    assert verify_manifest(model_dir) == []
    manifest = read_manifest(model_dir)
    assert manifest["stage"] == "pretrain"
    assert manifest["inputs"]["data"] == dir_digest(Path(first["stages"][1]["outputs"]["dataset"]))
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = tok("Compute 3+4.\n<judge>", return_tensors="pt", add_special_tokens=False)
    assert model.generate(**ids, max_new_tokens=4, do_sample=False).shape[1] > ids["input_ids"].shape[1]
    assert torch.isfinite(model(**ids).logits).all()
    assert json.loads((out / "run.json").read_text())["status"] == "succeeded"
    # the resumable work folder is gone once the checkpoint is in place
    assert list((home / "checkpoints").iterdir()) == []


@pytest.mark.slow
def test_identical_rerun_is_served_from_the_cache(smoke_runs):
    home, _, (first, second, _), (t_first, t_second, _) = smoke_runs
    assert [s["status"] for s in second["stages"]] == ["succeeded"] + ["cached"] * 7  # configure always runs
    # the same outputs, made by the first run; the pretrain stage did not run again
    assert [s["outputs"] for s in second["stages"]] == [s["outputs"] for s in first["stages"]]
    log = Path(second["log"]).read_text()
    assert "Executing task 'configure'" in log and "pretraining" not in log
    assert "Executing task 'synthesize'" not in log and "Executing task 'pretrain'" not in log
    assert "pretraining" in Path(first["log"]).read_text()
    assert t_second < 0.5 * t_first


@pytest.mark.slow
def test_a_changed_setting_reruns_only_the_stages_that_read_it(smoke_runs):
    _, _, (first, _, third), _ = smoke_runs
    # registry.acc_margin is read by registration alone: nothing before it runs again
    assert [(s["name"], s["status"]) for s in third["stages"]] == [("configure", "succeeded")] + [
        (s["name"], "cached") for s in first["stages"][1:-1]] + [("register", "succeeded")]
    assert [s["outputs"] for s in third["stages"][:-1]] == [s["outputs"] for s in first["stages"][:-1]]


@pytest.mark.slow
def test_failed_validation_stops_before_training(tmp_path):
    # the smoke data is not an exact 50/50 mix of modes (about 46% think-on): a 49% floor for each mode fails it
    r = kat("run", "--profile", "smoke", "--out", tmp_path / "out", "--set", "validate.mode_share_min=0.49",
            env={"KAT_HOME": str(tmp_path / "home")})
    assert r.returncode == 1
    last = r.stderr.strip().splitlines()[-1]
    failed = re.match(r"error: run local-\S+ failed at validate: validation failed: mode\.share "
                      r"\(observed (0\.\d+)", last)
    assert failed and float(failed.group(1)) < 0.49, last
    (run_dir,) = (tmp_path / "home" / "runs").iterdir()
    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "failed"
    assert [(s["name"], s["status"]) for s in record["stages"]] == [
        ("configure", "succeeded"), ("synthesize", "succeeded"), ("validate", "failed")]
    assert not list((tmp_path / "home" / "pipeline_root").glob("*/pretrain"))
    # the report explaining why was still written
    report = json.loads(Path(record["stages"][2]["error"].split("report: ")[1]).read_text())
    assert report["success"] is False and "mode.share" in report["failed"]
    # the failed task's report is recorded as its output, so the datasets view reads it from there
    assert Path(record["stages"][2]["outputs"]["report"], "validation.json").is_file()
    from kat_app.service import Service

    (dataset,) = Service(tmp_path / "home").datasets()
    assert dataset["validation"]["success"] is False and dataset["validation"]["failed"] == ["mode.share"]
    assert dataset["validation"]["docs"].endswith("/validate/report/docs/index.html")


@pytest.mark.slow
def test_killed_training_resumes_from_its_checkpoint(tmp_path):
    home = tmp_path / "home"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "KAT_HOME": str(home)}
    # pretraining as the smoke profile has it (30 steps, killed after its first checkpoint); the stages after
    # it at their smallest: what is tested here is the resume, not them
    after = [f for o in FAST if not o.startswith("train.") for f in ("--set", o)]
    proc = subprocess.Popen([*KAT, "run", "--profile", "smoke", "--out", tmp_path / "out", *after], env=env, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 300
        while not list(home.glob("checkpoints/pretrain-*/.output.work/checkpoints/step-*/manifest.json")):
            assert proc.poll() is None and time.time() < deadline, "no training checkpoint appeared"
            time.sleep(0.2)
        (run_id,) = [p.name for p in (home / "runs").iterdir()]
        r = kat_here("runs", "cancel", run_id, env={"KAT_HOME": str(home)})
        assert r.returncode == 0, r.stderr
        assert proc.wait(timeout=60) != 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert json.loads(kat_here("runs", "show", run_id, "--json", env={"KAT_HOME": str(home)}).stdout)["status"] \
        == "cancelled"

    r = kat("run", "--profile", "smoke", "--out", tmp_path / "out", *after, env={"KAT_HOME": str(home)})
    assert r.returncode == 0, r.stderr[-3000:]
    record = run_record(home, r.stdout)
    resumed = re.search(r"resumed from \S+ \(step (\d+)\)", Path(record["log"]).read_text())
    assert resumed and int(resumed.group(1)) >= 10
    curve = [json.loads(line)["step"] for line in (tmp_path / "out" / "pretrain" / "metrics.jsonl").open()]
    assert curve == list(range(1, 31))  # one continuous curve across the kill


def test_cancel_never_signals_a_process_that_took_a_dead_runs_pid(tmp_path):
    """A run killed without recording its end (SIGKILL, OOM) stays `running` with its pid in run.json; later the
    pid belongs to some other process. `kat runs cancel` must not SIGTERM that process (its process group, even).
    Before: it did; now the run reads as failed and cancel refuses."""
    from datetime import UTC, datetime, timedelta

    from pipelines.local import LocalBackend

    backend = LocalBackend(home=tmp_path)
    run_id = backend.prepare("smoke")
    other = subprocess.Popen(["sleep", "60"], start_new_session=True)  # the process that has the pid now
    try:
        info = backend.status(run_id)
        info.status, info.pid = "running", other.pid
        info.started_at = (datetime.now(UTC) - timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
        backend._save(info)
        assert backend.status(run_id).status == "failed"
        r = kat_here("runs", "cancel", run_id, env={"KAT_HOME": str(tmp_path)})
        assert r.returncode == 1 and r.stderr.count("\n") == 1 and "is failed" in r.stderr, r.stderr
        with pytest.raises(KatError, match="is not running"):
            backend.cancel(run_id)
        time.sleep(0.3)
        assert other.poll() is None  # not signalled
    finally:
        other.kill()
        other.wait()


def test_local_schedules_are_recorded(tmp_path):
    from kat_app.schedules import LocalSchedules
    from pipelines.local import LocalBackend

    env = {"KAT_HOME": str(tmp_path)}
    r = kat_here("schedule", "create", "--cron", "0 3 * * *", "--profile", "smoke", "--set", "train.steps=5", env=env)
    assert r.returncode == 0, r.stderr
    schedule_id = r.stdout.strip()
    listed = kat_here("schedule", "list", env=env).stdout
    assert schedule_id in listed and "0 3 * * *" in listed and "train.steps=5" in listed
    # kept in the scheduler's job store (kat serve / kat scheduler fire them), seen by the back end too
    (entry,) = LocalBackend(home=tmp_path, schedules=LocalSchedules(tmp_path)).list_schedules()
    assert (entry.schedule_id, entry.profile, entry.overrides, entry.enabled) == (
        schedule_id, "smoke", ["train.steps=5"], True)
    r = kat_here("schedule", "create", "--cron", "0 3 * *", "--profile", "smoke", env=env)
    assert r.returncode == 1 and r.stderr.strip().startswith("error: bad cron '0 3 * *': expected 5 fields")
    assert kat_here("schedule", "delete", schedule_id, env=env).returncode == 0
    assert LocalBackend(home=tmp_path, schedules=LocalSchedules(tmp_path)).list_schedules() == []
    r = kat_here("schedule", "delete", schedule_id, env=env)
    assert r.returncode == 1 and r.stderr.strip() == f"error: unknown schedule id {schedule_id!r} on the local back end"
    r = kat_here("runs", "show", "local-nope", env=env)
    assert r.returncode == 1 and r.stderr.strip().startswith("error: unknown run id 'local-nope'")


# ---------------------------------------------------------------------------------------------- kubeflow


@pytest.fixture
def kfp_server():
    with FakeKFP(token="t0ken") as server:
        yield server


def kfp_env(server, **extra):
    return {"KFP_HOST": server.url, "KFP_TOKEN": "t0ken", "KAT_HOME": "/nonexistent-kat-home", **extra}


def api_calls(server):
    return [(m, p) for m, p, _ in server.requests if not p.endswith("/healthz")]


def test_submit_and_watch_runs_on_kubeflow(kfp_server):
    env = kfp_env(kfp_server)
    r = kat_here("pipeline", "submit", "--backend", "kubeflow", "--profile", "smoke", "--set", "train.steps=5",
            "--name", "nightly", env=env)
    assert r.returncode == 0, r.stderr
    run_id = r.stdout.strip()
    run = kfp_server.runs[run_id]
    assert run["display_name"] == "nightly"
    assert run["runtime_config"]["parameters"] == {"profile": "smoke", "overrides": ["train.steps=5"]}
    assert set(run["pipeline_spec"]["root"]["dag"]["tasks"]) == {
        "configure", "synthesize", "validate", "pretrain", "coldstart", "srpo", "evaluate", "register"}
    (experiment,) = kfp_server.experiments.values()
    assert experiment["display_name"] == "kat" and run["experiment_id"] == experiment["experiment_id"]
    assert all(h.get("authorization") == "Bearer t0ken" for _, _, h in kfp_server.requests)

    # the cluster profile is submitted with its kfp-kubernetes settings; the experiment is reused
    r = kat_here("pipeline", "submit", "--backend", "kubeflow", "--profile", "cluster", env=env)
    assert r.returncode == 0, r.stderr
    cluster_run = kfp_server.runs[r.stdout.strip()]
    assert cluster_run["service_account"] == "kat-pipeline-runner"  # helm/kat-platform's: it may create TrainJobs
    assert "exec-pretrain" in cluster_run["pipeline_spec"]["platform_spec"]["platforms"]["kubernetes"][
        "deploymentSpec"]["executors"]
    assert len(kfp_server.experiments) == 1

    kfp_server.finish_run(run_id, "FAILED", {"synthesize": "SUCCEEDED", "validate": "FAILED"})
    listed = kat_here("runs", "list", "--backend", "kubeflow", env=env)
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.strip().splitlines()
    assert lines[1].startswith(run_id) and "failed" in lines[1] and "validate:failed" in lines[1]
    assert lines[0].split()[:2] == [cluster_run["run_id"], "pending"]
    shown = json.loads(kat_here("runs", "show", run_id, "--backend", "kubeflow", "--json", env=env).stdout)
    assert shown["status"] == "failed" and shown["profile"] == "smoke" and shown["overrides"] == ["train.steps=5"]
    assert [(s["name"], s["status"], s["seconds"]) for s in shown["stages"]] == [
        ("synthesize", "succeeded", 42.0), ("validate", "failed", 42.0)]

    assert kat_here("runs", "cancel", cluster_run["run_id"], "--backend", "kubeflow", env=env).returncode == 0
    assert kfp_server.runs[cluster_run["run_id"]]["state"] == "CANCELING"
    r = kat_here("runs", "show", "no-such-run", "--backend", "kubeflow", env=env)
    assert r.returncode == 1 and r.stderr.strip() == (
        f"error: run no-such-run: not found on {kfp_server.url} (run no-such-run not found)")


def test_schedules_are_kfp_recurring_runs(kfp_server):
    env = kfp_env(kfp_server)
    r = kat_here("schedule", "create", "--cron", "0 3 * * *", "--profile", "smoke", "--backend", "kubeflow", env=env)
    assert r.returncode == 0, r.stderr
    schedule_id = r.stdout.strip()
    job = kfp_server.recurring[schedule_id]
    assert job["trigger"]["cron_schedule"]["cron"] == "0 0 3 * * *"  # robfig/cron: seconds first
    assert job["runtime_config"]["parameters"] == {"profile": "smoke", "overrides": []}
    assert job["mode"] == "ENABLE" and job["max_concurrency"] == "1" and job["no_catchup"] is True
    listed = kat_here("schedule", "list", "--backend", "kubeflow", env=env).stdout.split()
    assert listed[:7] == [schedule_id, "0", "3", "*", "*", "*", "smoke"]

    before = len(kfp_server.requests)
    r = kat_here("schedule", "create", "--cron", "0 3 * * * *", "--profile", "smoke", "--backend", "kubeflow", env=env)
    assert r.returncode == 1 and r.stderr.strip().startswith("error: bad cron '0 3 * * * *'")
    assert len(kfp_server.requests) == before  # refused before reaching the server

    assert kat_here("schedule", "delete", schedule_id, "--backend", "kubeflow", env=env).returncode == 0
    assert kfp_server.recurring == {}
    r = kat_here("schedule", "delete", schedule_id, "--backend", "kubeflow", env=env)
    assert r.returncode == 1 and "not found" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_kubeflow_errors_are_one_line(kfp_server):
    r = kat_here("runs", "list", "--backend", "kubeflow", env=kfp_env(kfp_server, KFP_TOKEN="wrong"))
    assert r.returncode == 1
    assert r.stderr.strip() == (f"error: Kubeflow Pipelines at {kfp_server.url} answered HTTP 401 (Unauthorized); "
                                "set KFP_TOKEN or KFP_COOKIE")
    assert api_calls(kfp_server) == []

    before = len(kfp_server.requests)
    r = kat_here("pipeline", "submit", "--backend", "kubeflow", "--profile", "smoke", "--set", "trian.steps=1",
            env=kfp_env(kfp_server))
    assert r.returncode == 1 and "unknown config key 'trian'" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert len(kfp_server.requests) == before  # a bad config never reaches the server

    r = kat_here("pipeline", "submit", "--backend", "kubeflow", "--profile", "smoke",
            env=kfp_env(kfp_server, KFP_HOST="http://127.0.0.1:9"))
    assert r.returncode == 1
    assert r.stderr.strip().startswith("error: cannot reach Kubeflow Pipelines at http://127.0.0.1:9: ")
    assert len(r.stderr.strip().splitlines()) == 1

    r = kat_here("runs", "list", "--backend", "kubeflow", env={"KFP_HOST": ""})
    assert r.returncode == 1
    assert r.stderr.strip() == "error: no Kubeflow Pipelines endpoint: pass --host or set KFP_HOST"


def test_cookie_auth(tmp_path):
    from pipelines.kubeflow import KubeflowBackend

    with FakeKFP(cookie="authservice_session=abc") as server:
        backend = KubeflowBackend(host=server.url, cookie="authservice_session=abc")
        assert backend.list_runs() == []
        assert all("authservice_session=abc" in h.get("cookie", "") for _, _, h in server.requests)
        with pytest.raises(KatError, match="HTTP 401"):
            KubeflowBackend(host=server.url).list_schedules()
