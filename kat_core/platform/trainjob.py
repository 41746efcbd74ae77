"""Multi-node training: a stage runs as a Kubeflow Trainer `TrainJob` of N nodes x G GPUs (DeepSpeed runtime).

The pipeline task of a training stage stays the one place that decides, launches and waits:

    if launches_trainjob(config, stage):            # cluster.distributed: nodes x gpus_per_node > 1
        metrics = run_distributed(config, stage, entry="kat_core.train.pretrain:pretrain", out=out, ...)
    else:
        metrics = pretrain(config, ...)              # in the task's own process, as on one node

`run_distributed` copies the stage's inputs onto the shared checkpoints volume, builds the TrainJob with
`build_trainjob_spec` (a pure function: config in, manifest out), creates it through the `kubeflow` SDK's
TrainerClient (the `cluster` extra), streams its status until it completes, and returns what the stage
returned on rank 0. A retried task finds its TrainJob by name (derived from the resumable work key) and
waits for it again instead of starting a second one; a failed one is replaced, and the stage resumes from
its last checkpoint on the volume.

Inside the TrainJob the pods run `kat_core.platform.trainjob_pod` (mpirun on the launcher, the stage call on
every rank).

Nothing here imports kfp, and nothing heavy at module level.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from kat_core.errors import KatError

log = logging.getLogger(__name__)

API_VERSION = "trainer.kubeflow.org/v1alpha1"
SDK_PATCH_MANAGER = "trainer.kubeflow.org/kubeflow-sdk"  # the manager the SDK stamps on runtime patches
CONTAINER = "node"  # the trainer container of the MPI runtimes, in both the launcher and the node pods
REPLICATED_JOBS = ("launcher", "node")
MASTER_PORT = 29500
CALL_ENV = "KAT_TRAINJOB_CALL"
FORWARD_ENV = "KAT_FORWARD_ENV"
IMAGE_ENV = "KAT_TRAINJOB_IMAGE"  # set by the cluster pipeline on training tasks: the image it was compiled with
RESULT_FILE = "result.json"
POD_MODULE = "kat_core.platform.trainjob_pod"  # what the pods run: `python -m POD_MODULE launch|rank`
PASSTHROUGH = ("KAT_RUN_ID",)  # from the launching task's environment into the job's, when set
LABEL_PREFIX = "kat.platform"
DS_CONFIG_ANNOTATION = f"{LABEL_PREFIX}/deepspeed-config"
CHECKPOINTS_VOLUME = "kat-checkpoints"


def launches_trainjob(config: Any, stage: str) -> bool:
    """Whether `stage` runs as a TrainJob under this config: it is one of cluster.distributed.stages and
    nodes x gpus_per_node is more than one process."""
    dist = config.cluster.distributed
    return stage in dist.stages and dist.world_size > 1


# ------------------------------------------------------------------------------- batch and DeepSpeed


def _lookup(config: Any, dotted: str) -> Any:
    node = config
    for part in dotted.split("."):
        if not hasattr(node, part):
            raise KatError(f"config has no section {dotted!r}")
        node = getattr(node, part)
    return node


@dataclass(frozen=True)
class BatchPlan:
    micro_batch_size: int
    grad_accum: int
    world_size: int

    @property
    def global_batch_size(self) -> int:
        return self.micro_batch_size * self.grad_accum * self.world_size


def batch_plan(config: Any, train_key: str = "train") -> BatchPlan:
    """Micro-batch, accumulation and world size of the distributed run of the TrainConfig at `train_key`.

    With cluster.distributed.global_batch_size set, the accumulation is derived from it; it must be a
    multiple of micro_batch_size x world size, or the run would train on another batch than asked."""
    dist = config.cluster.distributed
    train = _lookup(config, train_key)
    micro, world = train.micro_batch_size, dist.world_size
    if dist.global_batch_size is None:
        return BatchPlan(micro, train.grad_accum, world)
    per_step = micro * world
    if dist.global_batch_size % per_step:
        lower = max(per_step, dist.global_batch_size // per_step * per_step)
        raise KatError(
            f"cluster.distributed.global_batch_size {dist.global_batch_size} is not a multiple of "
            f"{train_key}.micro_batch_size {micro} x world size {world} ({dist.nodes} nodes x "
            f"{dist.gpus_per_node} GPUs) = {per_step}; use {lower} or {lower + per_step}, or change the "
            "micro-batch or the number of GPUs")
    return BatchPlan(micro, dist.global_batch_size // per_step, world)


def job_overrides(config: Any, train_key: str = "train") -> list[str]:
    """The `--set` overrides the TrainJob's processes add to the run's: the DeepSpeed back end, bf16
    resolved (the runtime targets GPUs of Ampere or newer; set bf16: false for older ones), and the
    accumulation of the batch plan."""
    train = _lookup(config, train_key)
    plan = batch_plan(config, train_key)
    bf16 = True if train.bf16 == "auto" else bool(train.bf16)
    return [f"{train_key}.backend=deepspeed", f"{train_key}.bf16={str(bf16).lower()}",
            f"{train_key}.grad_accum={plan.grad_accum}"]


def trainjob_deepspeed_config(config: Any, train_key: str = "train") -> dict[str, Any]:
    """The DeepSpeed config every rank of the TrainJob will build (kat_core.train.engine.deepspeed_config of
    the job's TrainConfig), with the global batch DeepSpeed checks it against."""
    from kat_core.train.engine import deepspeed_config

    train = _lookup(config, train_key)
    plan = batch_plan(config, train_key)
    job_train = train.model_copy(update={"backend": "deepspeed", "grad_accum": plan.grad_accum})
    bf16 = True if train.bf16 == "auto" else bool(train.bf16)
    ds = deepspeed_config(job_train, bf16=bf16, cpu=False)
    ds["train_batch_size"] = plan.global_batch_size
    return ds


# ------------------------------------------------------------------------------------ the job's spec


@dataclass(frozen=True)
class StageCall:
    """What every rank runs: `entry(config, **paths, **kwargs, **{k: config.<dotted>})` with the config of
    `profile` and `overrides`; rank 0 writes the return value as JSON to `result`."""

    entry: str  # "package.module:function"
    profile: str
    overrides: list[str]
    paths: dict[str, str] = field(default_factory=dict)
    kwargs: dict[str, Any] = field(default_factory=dict)
    config_kwargs: dict[str, str] = field(default_factory=dict)
    result: str = ""

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


def job_name(stage: str, key: str) -> str:
    """A DNS-1035 name, stable for one resumable piece of work (so a retried task finds its job)."""
    digest = hashlib.sha256(key.encode()).hexdigest()[:10]
    safe = "".join(c if c.isalnum() else "-" for c in stage.lower()).strip("-")[:30]
    return f"kat-{safe}-{digest}"


def _secret_env(cluster: Any) -> list[dict[str, Any]]:
    """Credentials and endpoints from the platform's secrets and config map (helm/kat-platform): referenced,
    never copied into the job."""
    env = [{"name": k, "valueFrom": {"secretKeyRef": {"name": cluster.s3_secret, "key": k}}}
           for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")]
    env += [{"name": k, "valueFrom": {"secretKeyRef": {"name": cluster.mlflow_secret, "key": k, "optional": True}}}
            for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")]
    env += [{"name": k, "valueFrom": {"configMapKeyRef": {"name": cluster.config_map, "key": k, "optional": True}}}
            for k in ("MLFLOW_TRACKING_URI", "MLFLOW_S3_ENDPOINT_URL", "KAT_S3_ENDPOINT")]
    return env


def build_trainjob_spec(
    config: Any,
    stage: str,
    call: StageCall,
    *,
    name: str,
    train_key: str = "train",
    image: str | None = None,
    env: dict[str, str] | None = None,
    labels: dict[str, str] | None = None,
) -> dict[str, Any]:
    """The TrainJob manifest that runs `call` (plus the job's overrides: DeepSpeed, bf16, the batch plan's
    accumulation) on cluster.distributed.nodes x gpus_per_node processes.

    The trainer carries the image, the launcher command, the node count, each node's resources (GPUs as
    requests and limits), and plain env (the stage call, the names mpirun forwards, the checkpoints dir).
    Runtime patches (one per replicated job: launcher and node) add what the TrainJob's trainer cannot
    express: env from secrets and the config map, the checkpoints PVC and a memory-backed /dev/shm (NCCL),
    the service account, and the GPU node selector and tolerations. The runtime's own MPI settings (ssh
    keys, hostfile) come from Kubeflow Trainer."""
    cluster = config.cluster
    dist = cluster.distributed
    plan = batch_plan(config, train_key)  # raises the readable error before anything is built
    ds_config = trainjob_deepspeed_config(config, train_key)
    # every rank loads the run's config plus the job's overrides, so it builds exactly ds_config
    call = replace(call, overrides=[*call.overrides, *job_overrides(config, train_key)])
    plain = {
        CALL_ENV: call.to_json(),
        "KAT_CHECKPOINT_DIR": cluster.checkpoints_path,
        "MASTER_PORT": str(MASTER_PORT),
        "PYTHONUNBUFFERED": "1",
        "TOKENIZERS_PARALLELISM": "false",
        **(env or {}),
    }
    secret_env = _secret_env(cluster)
    plain[FORWARD_ENV] = ",".join(sorted({*plain, *(e["name"] for e in secret_env)} - {FORWARD_ENV}))
    resources = {"cpu": dist.cpu_per_node, "memory": dist.memory_per_node, cluster.accelerator: str(dist.gpus_per_node)}
    pod_patch: dict[str, Any] = {
        "serviceAccountName": cluster.service_account,
        "volumes": [
            {"name": CHECKPOINTS_VOLUME, "persistentVolumeClaim": {"claimName": cluster.checkpoints_pvc}},
            {"name": "dshm", "emptyDir": {"medium": "Memory"}},
        ],
        "containers": [{
            "name": CONTAINER,
            "env": secret_env,
            "volumeMounts": [{"name": CHECKPOINTS_VOLUME, "mountPath": cluster.checkpoints_path},
                             {"name": "dshm", "mountPath": "/dev/shm"}],
        }],
    }
    if cluster.node_selector:
        pod_patch["nodeSelector"] = dict(cluster.node_selector)
    if cluster.tolerations:
        pod_patch["tolerations"] = [dict(t) for t in cluster.tolerations]
    job_labels = {"app.kubernetes.io/part-of": "kat", f"{LABEL_PREFIX}/stage": stage, **(labels or {})}
    return {
        "apiVersion": API_VERSION,
        "kind": "TrainJob",
        "metadata": {
            "name": name,
            "labels": job_labels,
            # what every rank's engine builds from the job's config (for reading; DeepSpeed checks the batch)
            "annotations": {DS_CONFIG_ANNOTATION: json.dumps(ds_config, sort_keys=True)},
        },
        "spec": {
            "runtimeRef": {"name": dist.runtime, "kind": dist.runtime_kind},
            "activeDeadlineSeconds": dist.timeout_s,
            "trainer": {
                "image": image or cluster.images.ref("cuda"),
                "command": ["python", "-m", POD_MODULE, "launch", "--np", str(plan.world_size)],
                "numNodes": dist.nodes,
                "resourcesPerNode": {"requests": dict(resources), "limits": dict(resources)},
                "env": [{"name": k, "value": v} for k, v in sorted(plain.items())],
            },
            "runtimePatches": [{
                "manager": SDK_PATCH_MANAGER,
                "trainingRuntimeSpec": {"template": {"spec": {"replicatedJobs": [
                    {"name": job, "template": {"spec": {"template": {"spec": json.loads(json.dumps(pod_patch))}}}}
                    for job in REPLICATED_JOBS
                ]}}},
            }],
        },
    }


# ------------------------------------------------------------------- creating and watching (kubeflow SDK)


def _sdk_arguments(spec: dict[str, Any]) -> dict[str, Any]:
    """TrainerClient.train(...) arguments that create exactly `spec` (the SDK builds the object itself)."""
    try:
        from kubeflow.trainer import CustomTrainerContainer
        from kubeflow.trainer.options import (
            ActiveDeadlineSeconds,
            Annotations,
            ContainerPatch,
            JobSetSpecPatch,
            JobSetTemplatePatch,
            JobSpecPatch,
            JobTemplatePatch,
            Labels,
            Name,
            PodSpecPatch,
            PodTemplatePatch,
            ReplicatedJobPatch,
            RuntimePatch,
            TrainerCommand,
            TrainingRuntimeSpecPatch,
        )
    except ImportError as e:
        raise KatError(f"launching a TrainJob needs the kubeflow SDK: pip install 'kat-platform[cluster]' ({e})") \
            from None

    trainer = spec["spec"]["trainer"]

    def pod(p: dict[str, Any]) -> PodSpecPatch:
        return PodSpecPatch(
            service_account_name=p.get("serviceAccountName"), volumes=p.get("volumes"),
            node_selector=p.get("nodeSelector"), tolerations=p.get("tolerations"),
            containers=[ContainerPatch(name=c["name"], env=c.get("env"), volume_mounts=c.get("volumeMounts"))
                        for c in p.get("containers", [])])

    def job(j: dict[str, Any]) -> ReplicatedJobPatch:
        pod_spec = pod(j["template"]["spec"]["template"]["spec"])
        return ReplicatedJobPatch(name=j["name"], template=JobTemplatePatch(
            spec=JobSpecPatch(template=PodTemplatePatch(spec=pod_spec))))

    patches = []
    for patch in spec["spec"].get("runtimePatches", []):
        jobs = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
        patches.append(RuntimePatch(training_runtime_spec=TrainingRuntimeSpecPatch(template=JobSetTemplatePatch(
            spec=JobSetSpecPatch(replicated_jobs=[job(j) for j in jobs])))))
    options = [Name(name=spec["metadata"]["name"]), Labels(labels=spec["metadata"]["labels"]),
               Annotations(annotations=spec["metadata"]["annotations"]),
               TrainerCommand(command=trainer["command"]), *patches]
    if spec["spec"].get("activeDeadlineSeconds"):
        options.append(ActiveDeadlineSeconds(seconds=spec["spec"]["activeDeadlineSeconds"]))
    container = CustomTrainerContainer(
        image=trainer["image"], num_nodes=trainer["numNodes"],
        resources_per_node=dict(trainer["resourcesPerNode"]["requests"]),
        env={e["name"]: e["value"] for e in trainer.get("env", [])})
    return {"runtime": spec["spec"]["runtimeRef"]["name"], "trainer": container, "options": options}


def trainer_client(namespace: str | None = None) -> Any:
    """A TrainerClient for the cluster this process runs in (in-cluster config) or the kubeconfig's."""
    try:
        from kubeflow.common.types import KubernetesBackendConfig
        from kubeflow.trainer import TrainerClient
    except ImportError as e:
        raise KatError(f"launching a TrainJob needs the kubeflow SDK: pip install 'kat-platform[cluster]' ({e})") \
            from None
    try:
        return TrainerClient(KubernetesBackendConfig(namespace=namespace))
    except Exception as e:  # no kubeconfig, no in-cluster service account
        raise KatError(f"cannot reach the Kubernetes API to launch a TrainJob: {e}") from None


def _not_found(error: BaseException) -> bool:
    cause = error
    while cause is not None:
        if getattr(cause, "status", None) == 404:
            return True
        cause = cause.__cause__ or cause.__context__
    return False


def _describe(job: Any) -> str:
    steps = ", ".join(f"{s.name} {s.status or 'Pending'}" for s in (getattr(job, "steps", None) or []))
    return f"{job.status}" + (f" ({steps})" if steps else "")


def launch_and_wait(spec: dict[str, Any], client: Any, *, timeout_s: int, poll_s: int = 30,
                    say: Callable[[str], None] = print) -> Any:
    """Create the TrainJob of `spec` (or find it: a retried task re-attaches), report every status change
    through `say`, and return it when Complete. A Failed job (found or watched) is a KatError that names it
    and ends with the last lines of its launcher's log."""
    name = spec["metadata"]["name"]
    try:
        existing = client.get_job(name)
    except Exception as e:  # the SDK wraps everything in RuntimeError; a 404 underneath means "not there"
        if not _not_found(e):
            raise KatError(f"TrainJob {name}: cannot read it ({e})") from None
        existing = None
    if existing is not None and existing.status == "Failed":
        say(f"TrainJob {name} failed before; replacing it (training resumes from its last checkpoint)")
        client.delete_job(name)
        existing = None
    if existing is None:
        try:
            client.train(**_sdk_arguments(spec))
        except KatError:
            raise
        except Exception as e:
            raise KatError(f"TrainJob {name}: could not create it ({e.__cause__ or e})") from None
        say(f"TrainJob {name} created: {spec['spec']['trainer']['numNodes']} nodes on runtime "
            f"{spec['spec']['runtimeRef']['name']}")
    else:
        say(f"TrainJob {name} exists ({existing.status}); waiting for it")

    seen: list[str] = []

    def report(job: Any) -> None:
        line = _describe(job)
        if not seen or seen[-1] != line:
            seen.append(line)
            say(f"TrainJob {name}: {line}")

    try:
        return client.wait_for_job_status(name, status={"Complete"}, timeout=timeout_s,
                                          polling_interval=min(poll_s, max(1, timeout_s - 1)), callbacks=[report])
    except TimeoutError:
        raise KatError(f"TrainJob {name} did not complete within {timeout_s} s; it keeps running "
                       f"(kubectl get trainjob {name})") from None
    except RuntimeError as e:
        tail = ""
        try:
            tail = "".join(list(client.get_job_logs(name, step="node-0"))[-20:]).strip()
        except Exception:  # logs are a courtesy; the failure is the message
            pass
        raise KatError(f"TrainJob {name} failed ({e})" + (f"; last log lines:\n{tail}" if tail else "")) from None


# ------------------------------------------------------------------ what the launching task calls


def stage_inputs(paths: dict[str, str], dest: Path, shared_root: Path) -> dict[str, str]:
    """Copy each input (file or directory) not already on the shared volume to dest/<name>, so every node
    of the TrainJob can read it; returns the paths to hand the stage."""
    staged = {}
    for name, path in paths.items():
        src = Path(path)
        if src.resolve().is_relative_to(shared_root.resolve()):
            staged[name] = str(src)
            continue
        target = dest / name
        tmp = dest / f".{name}.tmp"
        for stale in (tmp, target):
            if stale.is_dir():
                shutil.rmtree(stale)
            elif stale.exists():
                stale.unlink()
        dest.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, tmp)
        else:
            shutil.copy2(src, tmp)
        tmp.rename(target)
        staged[name] = str(target)
    return staged


def run_distributed(
    config: Any,
    stage: str,
    *,
    entry: str,
    out: str | Path,
    profile: str,
    overrides: list[str],
    paths: dict[str, str] | None = None,
    kwargs: dict[str, Any] | None = None,
    config_kwargs: dict[str, str] | None = None,
    train_key: str = "train",
    out_kwarg: str = "out_dir",
    client: Any = None,
    say: Callable[[str], None] = print,
) -> Any:
    """Run `entry` as a TrainJob of `stage` and return what it returned on rank 0.

    `out` is where the stage writes (the directory `components.runtime.resumable` yields): it must lie on
    the checkpoints volume (KAT_CHECKPOINT_DIR), which every node mounts. `paths` are the stage's input
    keyword arguments (copied onto that volume), `kwargs` plain JSON keyword arguments, `config_kwargs`
    keyword arguments taken from the config by dotted key (e.g. {"train_cfg": "pretrain.teacher_train"}),
    `train_key` the TrainConfig the stage trains with (its accumulation follows the batch plan)."""
    root = os.environ.get("KAT_CHECKPOINT_DIR")
    out = Path(out)
    if not root or not out.resolve().is_relative_to(Path(root).resolve()):
        raise KatError(f"stage {stage} runs as a TrainJob, so it must write to the shared checkpoints volume: "
                       f"KAT_CHECKPOINT_DIR is {root or 'unset'} and the output is {out} (compile the pipeline "
                       "with --cluster, which mounts the checkpoints PVC)")
    work = out.parent
    work.mkdir(parents=True, exist_ok=True)
    result = work / RESULT_FILE
    result.unlink(missing_ok=True)
    call = StageCall(
        entry=entry, profile=profile, overrides=list(overrides),
        paths={**stage_inputs(paths or {}, work / "inputs", Path(root)), out_kwarg: str(out)},
        kwargs=dict(kwargs or {}), config_kwargs=dict(config_kwargs or {}), result=str(result))
    env = {k: os.environ[k] for k in PASSTHROUGH if os.environ.get(k)}
    spec = build_trainjob_spec(config, stage, call, name=job_name(stage, str(work)), train_key=train_key,
                               image=os.environ.get(IMAGE_ENV) or None, env=env)
    launch_and_wait(spec, client or trainer_client(), timeout_s=config.cluster.distributed.timeout_s,
                    poll_s=config.cluster.distributed.poll_s, say=say)
    if not result.is_file():
        raise KatError(f"TrainJob {spec['metadata']['name']} completed without writing {result}")
    return json.loads(result.read_text())


def train_stage(config: Any, stage: str, *, entry: str, out: str | Path, profile: str, overrides: list[str],
                paths: dict[str, str] | None = None, kwargs: dict[str, Any] | None = None,
                config_kwargs: dict[str, str] | None = None, train_key: str = "train", out_kwarg: str = "out_dir",
                **launch: Any) -> Any:
    """The one dispatch of a training stage: a Kubeflow Trainer TrainJob when this config asks for more than
    one process for `stage` (`run_distributed`), else `entry` called in this process with the same keyword
    arguments the TrainJob's ranks get (paths, the output under `out_kwarg`, kwargs, config values)."""
    if launches_trainjob(config, stage):
        return run_distributed(config, stage, entry=entry, out=out, profile=profile, overrides=overrides,
                               paths=paths, kwargs=kwargs, config_kwargs=config_kwargs, train_key=train_key,
                               out_kwarg=out_kwarg, **launch)
    return call_entry(entry, config, {**(paths or {}), out_kwarg: out, **(kwargs or {})}, config_kwargs or {})


def call_entry(entry: str, config: Any, kwargs: dict[str, Any], config_kwargs: dict[str, str]) -> Any:
    """Call `module:function` with the config, `kwargs`, and each `config_kwargs` name set to its dotted
    config value: the stage call, in a task's own process or on a TrainJob's ranks."""
    module, _, func = entry.partition(":")
    fn = getattr(importlib.import_module(module), func)
    resolved = {k: _lookup(config, dotted) for k, dotted in config_kwargs.items()}
    return fn(config, **kwargs, **resolved)
