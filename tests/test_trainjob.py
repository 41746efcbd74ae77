"""Multi-node training through Kubeflow Trainer: the TrainJob spec built from the config, the DeepSpeed batch
plan, the kubeflow SDK creating exactly that spec, launching and watching, the MPI entry points, a 2-rank
run of the stage call, and the cluster pipeline's settings for tasks that launch TrainJobs."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from kat_core.config import load_config
from kat_core.errors import KatError
from kat_core.platform import trainjob as tj
from kat_core.platform import trainjob_pod as pod

ROOT = Path(__file__).resolve().parents[1]
K8S_VERSION = "1.37.0"


def cluster(*overrides):
    return load_config("cluster", list(overrides))


def call(**kw):
    return tj.StageCall(entry="kat_core.train.pretrain:pretrain", profile="cluster", overrides=["seed=1"],
                        paths={"data_dir": "/kat/checkpoints/w/inputs/data_dir"},
                        result="/kat/checkpoints/w/result.json", **kw)


def pod_patches(spec):
    jobs = spec["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    return {j["name"]: j["template"]["spec"]["template"]["spec"] for j in jobs}


# ------------------------------------------------------------------------------------------- the spec


def test_spec_for_the_cluster_profile():
    config = cluster()
    spec = tj.build_trainjob_spec(config, "pretrain", call(), name="kat-pretrain-0123456789",
                                  env={"KAT_RUN_ID": "run-7"})
    assert spec["apiVersion"] == "trainer.kubeflow.org/v1alpha1" and spec["kind"] == "TrainJob"
    assert spec["metadata"]["labels"]["kat.platform/stage"] == "pretrain"
    assert spec["spec"]["runtimeRef"] == {"name": "deepspeed-distributed", "kind": "ClusterTrainingRuntime"}
    trainer = spec["spec"]["trainer"]
    # 2 nodes x 8 GPUs: one pod per node, each asking (and limited to) 8 GPUs; one MPI process per GPU
    assert trainer["numNodes"] == 2
    assert trainer["resourcesPerNode"]["requests"] == trainer["resourcesPerNode"]["limits"] == {
        "cpu": "16", "memory": "128Gi", "nvidia.com/gpu": "8"}
    assert trainer["command"] == ["python", "-m", "kat_core.platform.trainjob_pod", "launch", "--np", "16"]
    assert trainer["image"] == "ghcr.io/kat-platform/kat-cuda:0.1.0"
    env = {e["name"]: e["value"] for e in trainer["env"]}
    assert env["KAT_CHECKPOINT_DIR"] == "/kat/checkpoints" and env["KAT_RUN_ID"] == "run-7"
    sent = json.loads(env["KAT_TRAINJOB_CALL"])
    # the run's overrides, then the job's: DeepSpeed, bf16, and the accumulation for 512 = 16 x 2 x 16
    assert sent["overrides"] == ["seed=1", "train.backend=deepspeed", "train.bf16=true", "train.grad_accum=2"]
    assert sent["entry"] == "kat_core.train.pretrain:pretrain" and sent["result"].endswith("result.json")
    forwarded = set(env["KAT_FORWARD_ENV"].split(","))
    assert {"KAT_TRAINJOB_CALL", "KAT_RUN_ID", "AWS_ACCESS_KEY_ID", "MLFLOW_TRACKING_URI"} <= forwarded
    # secrets are referenced, never copied in; the same patch on the launcher and the node pods
    patches = pod_patches(spec)
    assert set(patches) == {"launcher", "node"} and patches["launcher"] == patches["node"]
    pod = patches["node"]
    assert pod["serviceAccountName"] == "kat-pipeline-runner"
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert {"name": "kat-checkpoints", "persistentVolumeClaim": {"claimName": "kat-checkpoints"}} in pod["volumes"]
    container = pod["containers"][0]
    assert container["name"] == "node"
    assert {"name": "kat-checkpoints", "mountPath": "/kat/checkpoints"} in container["volumeMounts"]
    refs = {e["name"]: e["valueFrom"] for e in container["env"]}
    assert refs["AWS_SECRET_ACCESS_KEY"] == {"secretKeyRef": {"name": "kat-s3", "key": "AWS_SECRET_ACCESS_KEY"}}
    assert refs["MLFLOW_TRACKING_PASSWORD"]["secretKeyRef"]["optional"] is True
    assert refs["MLFLOW_TRACKING_URI"]["configMapKeyRef"]["name"] == "kat-platform"
    assert not any("value" in e for e in container["env"])


def test_spec_pod_parts_are_valid_kubernetes():
    """What the runtime patch adds to each pod (volumes, env from secrets, mounts, selector, tolerations)
    validates against the Kubernetes schemas as part of a Pod."""
    import kubernetes_validate

    spec = tj.build_trainjob_spec(cluster(), "pretrain", call(), name="kat-pretrain-0123456789")
    pod = pod_patches(spec)["node"]
    pod["containers"][0]["image"] = spec["spec"]["trainer"]["image"]
    pod["containers"][0]["resources"] = spec["spec"]["trainer"]["resourcesPerNode"]
    pod["containers"][0]["env"] += spec["spec"]["trainer"]["env"]
    manifest = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": spec["metadata"]["name"]}, "spec": pod}
    kubernetes_validate.validate(manifest, K8S_VERSION, strict=True)
    broken = json.loads(json.dumps(manifest))
    broken["spec"]["volumes"][0]["persistentVolumeClaim"] = {"claim": "kat-checkpoints"}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)


def test_deepspeed_config_follows_the_profile():
    config = cluster()
    ds = tj.trainjob_deepspeed_config(config)
    assert ds["zero_optimization"]["stage"] == 3 and ds["bf16"]["enabled"] is True
    assert ds["train_micro_batch_size_per_gpu"] == 16 and ds["gradient_accumulation_steps"] == 2
    assert ds["train_batch_size"] == 512 == 16 * 2 * 16
    spec = tj.build_trainjob_spec(config, "pretrain", call(), name="kat-pretrain-0123456789")
    assert json.loads(spec["metadata"]["annotations"]["kat.platform/deepspeed-config"]) == ds
    # without a global batch the profile's accumulation stands, and the global batch follows the world size
    free = cluster("cluster.distributed.global_batch_size=null", "train.grad_accum=3",
                   "cluster.distributed.nodes=4")
    ds = tj.trainjob_deepspeed_config(free)
    assert ds["gradient_accumulation_steps"] == 3 and ds["train_batch_size"] == 16 * 3 * 32
    # another stage's TrainConfig: its own micro-batch, and the overrides name its key
    other = cluster("coldstart.train.micro_batch_size=4", "cluster.distributed.global_batch_size=128")
    assert tj.batch_plan(other, "coldstart.train").grad_accum == 2
    assert "coldstart.train.grad_accum=2" in tj.job_overrides(other, "coldstart.train")


def test_inconsistent_batch_is_a_readable_error():
    config = cluster("cluster.distributed.global_batch_size=500")
    with pytest.raises(KatError) as e:
        tj.build_trainjob_spec(config, "pretrain", call(), name="kat-pretrain-0123456789")
    message = str(e.value)
    assert "global_batch_size 500 is not a multiple of train.micro_batch_size 16 x world size 16" in message
    assert "(2 nodes x 8 GPUs) = 256; use 256 or 512" in message
    with pytest.raises(KatError, match="global_batch_size 8 .* use 16 or 32"):
        tj.batch_plan(cluster("cluster.distributed.global_batch_size=8", "cluster.distributed.nodes=1",
                              "cluster.distributed.gpus_per_node=1"))


def test_which_stages_launch_a_trainjob():
    assert tj.launches_trainjob(cluster(), "pretrain") and tj.launches_trainjob(cluster(), "srpo")
    assert not tj.launches_trainjob(cluster(), "coldstart")  # not a distributed stage
    assert not tj.launches_trainjob(load_config("smoke"), "pretrain")  # one process: in the task itself
    assert not tj.launches_trainjob(cluster("cluster.distributed.nodes=1", "cluster.distributed.gpus_per_node=1"),
                                    "pretrain")
    assert tj.launches_trainjob(cluster("cluster.distributed.nodes=1"), "pretrain")  # one node, 8 GPUs
    name = tj.job_name("pretrain-teacher", "/kat/checkpoints/pretrain-teacher-abc")
    assert name == tj.job_name("pretrain-teacher", "/kat/checkpoints/pretrain-teacher-abc")  # a retry finds it
    assert name.startswith("kat-pretrain-teacher-") and len(name) <= 63 and name.replace("-", "").isalnum()
    assert name != tj.job_name("pretrain-teacher", "/kat/checkpoints/pretrain-teacher-abd")


# ------------------------------------------------------------------------- the SDK, launching, watching

RUNTIME = {  # the shape of Kubeflow Trainer's deepspeed-distributed ClusterTrainingRuntime (OpenMPI)
    "apiVersion": "trainer.kubeflow.org/v1alpha1", "kind": "ClusterTrainingRuntime",
    "metadata": {"name": "deepspeed-distributed", "labels": {"trainer.kubeflow.org/framework": "deepspeed"}},
    "spec": {
        "mlPolicy": {"numNodes": 1, "mpi": {"numProcPerNode": 1, "mpiImplementation": "OpenMPI",
                                             "sshAuthMountPath": "/home/mpiuser/.ssh", "runLauncherAsNode": True}},
        "template": {"spec": {"replicatedJobs": [
            {"name": "node", "template": {"spec": {"template": {"spec": {"containers": [
                {"name": "node", "image": "example.org/ds-runtime", "command": ["/usr/sbin/sshd"]}]}}}}},
            {"name": "launcher",
             "template": {"metadata": {"labels": {"trainer.kubeflow.org/trainjob-ancestor-step": "trainer"}},
                          "spec": {"template": {"spec": {"containers": [
                              {"name": "node", "image": "example.org/ds-runtime"}]}}}}},
        ]}},
    },
}


class _Async:
    def __init__(self, value):
        self.value = value

    def get(self, timeout=None):
        return self.value


class FakeCustomObjects:
    """The Kubernetes custom-objects API the SDK's Kubernetes back end talks to: serves the runtime, keeps
    what is created."""

    def __init__(self):
        self.created = []

    def get_namespaced_custom_object(self, group, version, namespace, plural, name, async_req=False):
        from kubernetes.client import ApiException

        raise ApiException(status=404, reason="Not Found")  # no namespaced runtime: the cluster one is used

    def get_cluster_custom_object(self, group, version, plural, name, async_req=False):
        assert (group, plural, name) == ("trainer.kubeflow.org", "clustertrainingruntimes", "deepspeed-distributed")
        return _Async(RUNTIME)

    def create_namespaced_custom_object(self, group, version, namespace, plural, body):
        self.created.append((namespace, plural, body))


def sdk_client(statuses=None, existing=None, logs=()):
    """A real TrainerClient over the SDK's real Kubernetes back end, with the API faked underneath and the
    job's status scripted: `existing` before creation, then `statuses` one per poll."""
    from kubeflow.trainer import TrainerClient
    from kubeflow.trainer.backends.kubernetes.backend import KubernetesBackend

    class Backend(KubernetesBackend):
        def __init__(self):
            self.custom_api, self.core_api, self.namespace = FakeCustomObjects(), None, "kat"
            self.deleted, self.polls, self.calls = [], list(statuses or []), 0
            self.state = existing

        def get_job(self, name):
            self.calls += 1
            if self.calls > 1 and self.polls:  # the first call is the existence check
                self.state = self.polls.pop(0)
            if self.state is None:
                from kubernetes.client import ApiException

                try:
                    raise ApiException(status=404, reason="Not Found")
                except ApiException as e:  # as the SDK does: any failure becomes a RuntimeError
                    raise RuntimeError(f"Failed to get TrainJob: kat/{name}") from e
            steps = [SimpleNamespace(name="node-0", status="Running" if self.state == "Running" else None)]
            return SimpleNamespace(name=name, status=self.state, steps=steps)

        def delete_job(self, name):
            self.deleted.append(name)
            self.state = None

        def get_job_logs(self, name, follow=False, step="node-0"):
            yield from logs

    client = TrainerClient.__new__(TrainerClient)
    client.backend = Backend()
    return client


@pytest.fixture
def no_sleep(monkeypatch):
    import kubeflow.trainer.backends.kubernetes.backend as backend

    monkeypatch.setattr(backend.time, "sleep", lambda s: None)


def test_sdk_creates_exactly_the_built_spec(no_sleep):
    spec = tj.build_trainjob_spec(cluster(), "pretrain", call(), name="kat-pretrain-0123456789")
    client = sdk_client(statuses=["Created", "Running", "Running", "Complete"])
    said = []
    job = tj.launch_and_wait(spec, client, timeout_s=600, poll_s=1, say=said.append)
    [(namespace, plural, body)] = client.backend.custom_api.created
    assert (namespace, plural) == ("kat", "trainjobs")
    assert body == spec  # what the SDK sends is what build_trainjob_spec describes, field for field
    assert job.status == "Complete"
    # each status change once, in order
    assert said[0] == "TrainJob kat-pretrain-0123456789 created: 2 nodes on runtime deepspeed-distributed"
    assert [s.split(": ", 1)[1] for s in said[1:]] == ["Created (node-0 Pending)", "Running (node-0 Running)",
                                                       "Complete (node-0 Pending)"]


def test_a_retried_task_reattaches_or_replaces_a_failed_job(no_sleep):
    spec = tj.build_trainjob_spec(cluster(), "pretrain", call(), name="kat-pretrain-0123456789")
    running = sdk_client(existing="Running", statuses=["Complete"])
    said = []
    tj.launch_and_wait(spec, running, timeout_s=600, poll_s=1, say=said.append)
    assert running.backend.custom_api.created == [] and "exists (Running)" in said[0]  # no second job
    failed = sdk_client(existing="Failed", statuses=["Running", "Complete"])
    said = []
    tj.launch_and_wait(spec, failed, timeout_s=600, poll_s=1, say=said.append)
    assert failed.backend.deleted == ["kat-pretrain-0123456789"] and len(failed.backend.custom_api.created) == 1
    assert "replacing it" in said[0]


def test_a_failed_job_is_one_readable_error_with_its_log(no_sleep):
    spec = tj.build_trainjob_spec(cluster(), "pretrain", call(), name="kat-pretrain-0123456789")
    client = sdk_client(statuses=["Running", "Failed"], logs=["step 10 loss 2.1\n", "CUDA out of memory\n"])
    with pytest.raises(KatError) as e:
        tj.launch_and_wait(spec, client, timeout_s=600, poll_s=1, say=lambda s: None)
    assert str(e.value).startswith("TrainJob kat-pretrain-0123456789 failed")
    assert str(e.value).endswith("CUDA out of memory")
    slow = sdk_client(statuses=["Running"] * 10)
    with pytest.raises(KatError, match="did not complete within 3 s; it keeps running"):
        tj.launch_and_wait(spec, slow, timeout_s=3, poll_s=1, say=lambda s: None)


# --------------------------------------------------------------------------------- the MPI entry points


def test_launcher_command_and_master_address():
    hostfile = "job-launcher-0-0.job slots=8\njob-node-0-0.job slots=8\n"
    argv, master = pod.mpirun_argv("/etc/mpi/hostfile", hostfile, 16, ["PATH", "KAT_TRAINJOB_CALL"])
    assert master == "job-launcher-0-0.job"  # ranks fill hosts in order: rank 0 is on the first
    assert argv[:5] == ["mpirun", "--hostfile", "/etc/mpi/hostfile", "-np", "16"]
    assert argv[argv.index("-x") : argv.index("-x") + 4] == ["-x", "PATH", "-x", "KAT_TRAINJOB_CALL"]
    assert argv[-4:] == ["python", "-m", "kat_core.platform.trainjob_pod", "rank"]
    with pytest.raises(KatError, match="has 16 slots on 2 hosts, fewer than the 24 processes"):
        pod.mpirun_argv("/etc/mpi/hostfile", hostfile, 24, [])
    assert pod.read_hostfile("# comment\nh1\nh2 slots=4 max_slots=4\n") == [("h1", 1), ("h2", 4)]
    assert pod.rank_env({"OMPI_COMM_WORLD_RANK": "5", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
                        "OMPI_COMM_WORLD_SIZE": "16"}) == {"RANK": "5", "LOCAL_RANK": "1", "WORLD_SIZE": "16"}


def test_launch_entry_execs_mpirun_with_the_jobs_env(tmp_path, monkeypatch):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("kat-x-launcher-0-0.kat-x slots=2\nkat-x-node-0-0.kat-x slots=2\n")
    for name in ("PYTHONPATH", "MASTER_ADDR", "MASTER_PORT", "LD_LIBRARY_PATH"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("KAT_FORWARD_ENV", "KAT_TRAINJOB_CALL,AWS_ACCESS_KEY_ID,NOT_SET_HERE")
    monkeypatch.setenv("KAT_TRAINJOB_CALL", "{}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.delenv("NOT_SET_HERE", raising=False)
    execs = []
    monkeypatch.setattr(tj.os, "execvp", lambda file, argv: execs.append(argv))
    assert pod.main(["launch", "--np", "4", "--hostfile", str(hostfile)]) == 0
    [argv] = execs
    forwarded = [argv[i + 1] for i, word in enumerate(argv) if word == "-x"]
    # only names set on the launcher (mpirun refuses unknown ones), rank 0's host and port among them
    assert forwarded == ["PATH", "HOME", "MASTER_ADDR", "MASTER_PORT", "KAT_TRAINJOB_CALL", "AWS_ACCESS_KEY_ID"]
    assert os.environ["MASTER_ADDR"] == "kat-x-launcher-0-0.kat-x" and os.environ["MASTER_PORT"] == "29500"
    assert argv[argv.index("-np") + 1] == "4"
    assert pod.main(["launch", "--np", "5", "--hostfile", str(hostfile)]) == 1  # too few slots: one error line


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RanksClient:
    """Runs a TrainJob the way its pods would, on this machine: one `python -m kat_core.platform.trainjob_pod
    rank` process per rank, with the job's env and OpenMPI's per-rank variables (what mpirun sets)."""

    def __init__(self):
        self.trainer = None

    def get_job(self, name):
        if self.trainer is None:
            from kubernetes.client import ApiException

            raise RuntimeError("Failed to get TrainJob") from ApiException(status=404, reason="Not Found")
        return SimpleNamespace(status="Complete", steps=[])

    def train(self, runtime, trainer, options):
        self.trainer = trainer
        world = int(trainer.num_nodes)
        env = {**os.environ, **trainer.env, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()),
               "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
        procs = [subprocess.Popen([sys.executable, "-m", "kat_core.platform.trainjob_pod", "rank"], cwd=ROOT,
                                  env={**env, "OMPI_COMM_WORLD_RANK": str(r), "OMPI_COMM_WORLD_LOCAL_RANK": str(r),
                                       "OMPI_COMM_WORLD_SIZE": str(world)},
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for r in range(world)]
        for p in procs:
            out, _ = p.communicate(timeout=180)
            assert p.returncode == 0, out
        return "job"

    def wait_for_job_status(self, name, status, timeout, polling_interval, callbacks):
        job = self.get_job(name)
        for callback in callbacks:
            callback(job)
        return job


def test_run_distributed_stages_inputs_and_returns_rank0_result(tmp_path, monkeypatch):
    """Two ranks (2 nodes x 1 GPU) run the stage call from the job's env: inputs copied onto the shared volume,
    a gloo process group formed from the mapped rank variables, rank 0's output and result handed back."""
    shared = tmp_path / "pvc"
    data = tmp_path / "kfp-inputs" / "dataset"
    data.mkdir(parents=True)
    (data / "rows.txt").write_text("3 rows")
    out = shared / "pretrain-abc" / "output"
    monkeypatch.setenv("KAT_CHECKPOINT_DIR", str(shared))
    monkeypatch.setenv("KAT_RUN_ID", "run-42")
    overrides = ["cluster.distributed.nodes=2", "cluster.distributed.gpus_per_node=1",
                 "cluster.distributed.global_batch_size=64", "train.micro_batch_size=8"]
    config = load_config("smoke", overrides)
    said = []
    result = tj.run_distributed(config, "pretrain", entry="tests.trainjob_stage:stage", out=out, profile="smoke",
                                overrides=overrides, paths={"data_dir": str(data)}, kwargs={"note": "hi"},
                                config_kwargs={"train_cfg": "coldstart.train"}, client=RanksClient(),
                                say=said.append)
    assert result == {"rank": 0, "world": 2, "sum": 3, "note": "hi", "env_rank": "0", "grad_accum": 4,
                      "backend": "deepspeed", "train_cfg_steps": config.coldstart.train.steps}
    assert (out / "weights.txt").read_text() == "trained on 3 rows"
    staged = shared / "pretrain-abc" / "inputs" / "data_dir" / "rows.txt"
    assert staged.read_text() == "3 rows"  # every node reads the copy on the volume
    assert said[0].startswith("TrainJob kat-pretrain-") and "created: 2 nodes" in said[0]


def test_run_distributed_needs_the_shared_volume(tmp_path, monkeypatch):
    monkeypatch.delenv("KAT_CHECKPOINT_DIR", raising=False)
    with pytest.raises(KatError, match="must write to the shared checkpoints volume: KAT_CHECKPOINT_DIR is unset"):
        tj.run_distributed(cluster(), "pretrain", entry="x:y", out=tmp_path / "o", profile="cluster", overrides=[],
                           client=RanksClient())
    monkeypatch.setenv("KAT_CHECKPOINT_DIR", str(tmp_path / "pvc"))
    with pytest.raises(KatError, match="shared checkpoints volume"):
        tj.run_distributed(cluster(), "pretrain", entry="x:y", out=tmp_path / "elsewhere" / "o", profile="cluster",
                           overrides=[], client=RanksClient())


# ------------------------------------------------------------------------- the compiled cluster pipeline


def test_cluster_pipeline_with_trainjobs(tmp_path):
    """The cluster profile (2 nodes x 8 GPUs): the pretraining and SRPO tasks launch TrainJobs, so they run on
    the CUDA image without GPUs of their own, with the PVC and credentials; the cold start trains in its task
    on a GPU node; data and evaluation tasks use the CPU image."""
    from pipelines.compile import compile_pipeline

    env = {k: os.environ.pop(k) for k in ["KAT_BASE_IMAGE"] if k in os.environ}
    try:
        path = compile_pipeline(tmp_path / "c.yaml", "cluster", ["pretrain.train_teacher=true",
                                                                 "cluster.images.tag=2.0.1"], cluster=True)
    finally:
        os.environ.update(env)
    docs = list(yaml.safe_load_all(path.read_text()))
    executors = docs[0]["deploymentSpec"]["executors"]
    platform = docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    images = {name: e["container"]["image"] for name, e in executors.items()}
    cuda, cpu = "ghcr.io/kat-platform/kat-cuda:2.0.1", "ghcr.io/kat-platform/kat:2.0.1"
    assert images == {"exec-configure": cpu, "exec-synthesize": cpu, "exec-validate": cpu,
                      "exec-pretrain-teacher": cuda, "exec-pretrain": cuda, "exec-coldstart": cuda, "exec-srpo": cuda,
                      "exec-evaluate": cpu, "exec-register": cpu}
    for name in ("exec-pretrain", "exec-pretrain-teacher", "exec-srpo"):
        container = executors[name]["container"]
        assert "accelerator" not in container.get("resources", {})
        assert "nodeSelector" not in platform[name] and "tolerations" not in platform[name]
        env = {e["name"]: e["value"] for e in container["env"]}
        assert env == {"KAT_TRAINJOB_IMAGE": cuda, "KAT_CHECKPOINT_DIR": "/kat/checkpoints"}
        assert platform[name]["pvcMount"][0]["mountPath"] == "/kat/checkpoints"
        assert {s["secretName"] for s in platform[name]["secretAsEnv"]} == {"kat-s3", "kat-mlflow"}
    coldstart = executors["exec-coldstart"]["container"]
    assert coldstart["resources"]["accelerator"]["resourceType"] == "nvidia.com/gpu"
    assert platform["exec-coldstart"]["nodeSelector"]["labels"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in \
        platform["exec-coldstart"]["tolerations"]
    # a CPU-only cluster (kind): no GPU requests, selectors or tolerations anywhere; the PVC stays
    path = compile_pipeline(tmp_path / "cpu.yaml", "smoke", ["cluster.gpus=0"], cluster=True)
    docs = list(yaml.safe_load_all(path.read_text()))
    for name, e in docs[0]["deploymentSpec"]["executors"].items():
        assert "accelerator" not in e["container"].get("resources", {}), name
        assert "nodeSelector" not in docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"][name]
    assert "pvcMount" in docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]["exec-pretrain"]


def test_pretrain_component_launches_a_trainjob_when_distributed(tmp_path, monkeypatch):
    """components/pretrain.py: with nodes x GPUs > 1 the task hands the stage to run_distributed (entry,
    inputs, the volume it writes to) and puts what the job wrote where KFP expects the model."""
    import components.runtime as runtime
    from components.pretrain import pretrain, pretrain_teacher

    monkeypatch.setenv("KAT_CHECKPOINT_DIR", str(tmp_path / "pvc"))
    monkeypatch.setattr(runtime, "track", lambda *a, **k: None)  # MLflow is not the subject here
    calls = []

    def fake_run_distributed(config, stage, **kw):
        calls.append((stage, kw))
        Path(kw["out"]).mkdir(parents=True)
        (Path(kw["out"]) / "model.safetensors").write_text("weights")
        return {"step": 7, "loss": 1.5}

    monkeypatch.setattr(tj, "run_distributed", fake_run_distributed)
    data, report = tmp_path / "data", tmp_path / "report"
    for d in (data, report):
        d.mkdir()
        (d / "x.json").write_text("{}")
    model = SimpleNamespace(path=str(tmp_path / "model"), metadata={})
    overrides = ["cluster.distributed.nodes=2", "pretrain.teacher_train={steps: 5}"]
    pretrain.python_func(profile="cluster", overrides=overrides, dataset=SimpleNamespace(path=str(data)),
                         validation=SimpleNamespace(path=str(report)), model=model)
    stage, kw = calls[0]
    assert stage == "pretrain" and kw["entry"] == "kat_core.train.pretrain:pretrain"
    assert kw["paths"] == {"data_dir": str(data), "validation": str(report)} and kw["overrides"] == overrides
    assert Path(kw["out"]).is_relative_to(tmp_path / "pvc")  # the shared volume
    assert (Path(model.path) / "model.safetensors").read_text() == "weights"
    assert model.metadata == {"step": 7, "loss": 1.5}
    teacher = SimpleNamespace(path=str(tmp_path / "teacher"), metadata={})
    pretrain_teacher.python_func(profile="cluster", overrides=overrides, dataset=SimpleNamespace(path=str(data)),
                                 validation=SimpleNamespace(path=str(report)), model=teacher)
    stage, kw = calls[1]
    assert stage == "pretrain-teacher" and kw["train_key"] == "pretrain.teacher_train"  # its own batch plan
    assert kw["config_kwargs"] == {"model_cfg": "pretrain.teacher_model", "train_cfg": "pretrain.teacher_train"}
