"""The AutoThink pipeline: synthesize -> validate -> [pretrain-teacher ->] pretrain -> coldstart -> srpo ->
evaluate -> register.

Every task takes the two pipeline parameters, `profile` and `overrides` (a list of `key=value`), and loads
its config from them, so a run is reproducible from its parameters alone. The DAG's shape is decided when
the pipeline is built: the teacher task exists only when the profile says `pretrain.train_teacher`.

Adding a stage is a few lines in `build_pipeline`: call its component with `**params` and its inputs, and
pass the task through `training` if it trains.
"""

import os
from dataclasses import dataclass, field
from typing import Any

from kfp import dsl, kubernetes

from components.coldstart import coldstart
from components.evaluate import evaluate
from components.pretrain import pretrain, pretrain_teacher
from components.register import register
from components.runtime import CHECKPOINT_DIR_ENV
from components.srpo import srpo
from components.synthesize import synthesize
from components.validate import validate

PIPELINE_NAME = "kat-autothink"
CACHE_SALT_ENV = "KAT_CACHE_SALT"
TRAINJOB_IMAGE_ENV = "KAT_TRAINJOB_IMAGE"  # kat_core.platform.trainjob.IMAGE_ENV


@dataclass(frozen=True)
class ClusterOptions:
    """What a GPU Kubernetes cluster needs on top of the plain pipeline (kfp-kubernetes settings).

    The secrets and the config map are the platform's (the Helm chart creates them); their keys become
    the environment variables of the same name."""

    accelerator: str = "nvidia.com/gpu"
    gpus: int = 1
    cpu_request: str = "4"
    memory_request: str = "16G"
    node_selector: dict[str, str] = field(default_factory=lambda: {"nvidia.com/gpu.present": "true"})
    tolerations: tuple[dict[str, Any], ...] = ({"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},)
    s3_secret: str = "kat-s3"
    s3_keys: tuple[str, ...] = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
    mlflow_secret: str = "kat-mlflow"
    mlflow_keys: tuple[str, ...] = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
    config_map: str = "kat-platform"
    config_map_keys: tuple[str, ...] = ("MLFLOW_TRACKING_URI", "MLFLOW_S3_ENDPOINT_URL", "KAT_S3_ENDPOINT")
    checkpoints_pvc: str = "kat-checkpoints"
    checkpoints_path: str = "/kat/checkpoints"
    image: str | None = None  # data and evaluation tasks (None: the components' base image)
    training_image: str | None = None  # training tasks and their TrainJobs
    distributed_stages: frozenset[str] = frozenset()  # tasks that launch a TrainJob instead of training

    @classmethod
    def from_config(cls, config: Any) -> "ClusterOptions":
        """The settings of the config's `cluster` section (the cluster profile's). KAT_BASE_IMAGE, when set,
        is the image of every task (a one-off build)."""
        from kat_core.platform.trainjob import launches_trainjob

        c = config.cluster
        override = os.environ.get("KAT_BASE_IMAGE")
        return cls(
            accelerator=c.accelerator, gpus=c.gpus, cpu_request=c.cpu_request, memory_request=c.memory_request,
            node_selector=dict(c.node_selector), tolerations=tuple(dict(t) for t in c.tolerations),
            s3_secret=c.s3_secret, mlflow_secret=c.mlflow_secret, config_map=c.config_map,
            checkpoints_pvc=c.checkpoints_pvc, checkpoints_path=c.checkpoints_path,
            image=override or c.images.ref("cpu"), training_image=override or c.images.ref("cuda"),
            distributed_stages=frozenset(s for s in c.distributed.stages if launches_trainjob(config, s)))


def build_pipeline(
    profile: str = "demo",
    overrides: list[str] | None = None,
    *,
    cluster: ClusterOptions | None = None,
    retries: int = 2,
    cache_salt: str | None = None,
):
    """The pipeline function for `profile` (its default parameters and its DAG shape).

    `cluster` adds the kfp-kubernetes settings; `retries` is the retry count of training tasks (transient
    failures: preemption, evictions); `cache_salt` goes into every task's environment, which is part of
    the cache key, so the local runner never serves results made by other code or another config."""
    from kat_core.config import load_config

    config = load_config(profile, overrides)  # the shape is static: fail on a bad profile at build time
    default_profile, default_overrides = profile, list(overrides or [])

    def common(task: dsl.PipelineTask) -> dsl.PipelineTask:
        task.set_caching_options(enable_caching=True)
        if cache_salt:
            task.set_env_variable(CACHE_SALT_ENV, cache_salt)
        if cluster:
            if cluster.image:
                task.container_spec.image = cluster.image
            kubernetes.use_secret_as_env(task, cluster.s3_secret, {k: k for k in cluster.s3_keys})
            kubernetes.use_secret_as_env(task, cluster.mlflow_secret, {k: k for k in cluster.mlflow_keys},
                                         optional=True)  # a tracking server without auth has no secret
            kubernetes.use_config_map_as_env(task, cluster.config_map, {k: k for k in cluster.config_map_keys})
        return task

    def training(task: dsl.PipelineTask) -> dsl.PipelineTask:
        common(task)
        if retries:
            task.set_retry(num_retries=retries, backoff_duration="60s", backoff_factor=2.0,
                           backoff_max_duration="1800s")
        if cluster:
            if cluster.training_image:
                task.container_spec.image = cluster.training_image
            if task.name in cluster.distributed_stages:
                # the task only copies inputs, launches and watches a TrainJob (the GPUs are the job's)
                task.set_env_variable(TRAINJOB_IMAGE_ENV, task.container_spec.image)
                task.set_cpu_request("1").set_memory_request("4G")
            else:
                task.set_cpu_request(cluster.cpu_request).set_memory_request(cluster.memory_request)
                if cluster.gpus:
                    task.set_accelerator_type(cluster.accelerator).set_accelerator_limit(cluster.gpus)
                    for key, value in cluster.node_selector.items():
                        kubernetes.add_node_selector(task, key, value)
                    for toleration in cluster.tolerations:
                        kubernetes.add_toleration(task, **toleration)
            # the checkpoints PVC is where a retried or re-run training task resumes from (and, for a TrainJob,
            # where its nodes read the inputs and write the output)
            kubernetes.mount_pvc(task, cluster.checkpoints_pvc, cluster.checkpoints_path)
            task.set_env_variable(CHECKPOINT_DIR_ENV, cluster.checkpoints_path)
        return task

    @dsl.pipeline(name=PIPELINE_NAME,
                  description="AutoThink (KAT-V1): data, gate, MTP+KD, cold start, Step-SRPO, eval, registry")
    def autothink(profile: str = default_profile, overrides: list = default_overrides):
        params = {"profile": profile, "overrides": overrides}
        data = common(synthesize(**params))
        report = common(validate(**params, dataset=data.outputs["dataset"]))
        gate = {"dataset": data.outputs["dataset"], "validation": report.outputs["report"]}
        teacher = training(pretrain_teacher(**params, **gate)) if config.pretrain.train_teacher else None
        student = training(pretrain(**params, **gate, **({"teacher": teacher.outputs["model"]} if teacher else {})))
        tuned = training(coldstart(**params, pretrained=student.outputs["model"], dataset=data.outputs["dataset"]))
        policy = training(srpo(**params, coldstart=tuned.outputs["model"], dataset=data.outputs["dataset"]))
        evaluation = common(evaluate(**params, model=policy.outputs["model"]))
        # registration only of an evaluated model: it takes the report as an input
        common(register(**params, model=policy.outputs["model"], report=evaluation.outputs["report"]))

    return autothink
