"""The AutoThink pipeline: configure -> synthesize -> validate -> [pretrain-teacher ->] pretrain -> coldstart ->
srpo -> evaluate -> register.

The run's parameters are `profile` and `overrides` (a list of `key=value`), so a run is reproducible from
them alone. The `configure` task checks the whole config and gives every stage the profile and the overrides
that stage depends on (kat_core.config.STAGE_READS): a stage's cache key holds only its own settings, so
changing `evaluate.limit` re-runs evaluation, not training. `configure` itself is never cached: it opens
the run's MLflow parent run with the whole config, and it takes a few seconds. The DAG's shape is decided when
the pipeline is built: the teacher task exists only when the profile says `pretrain.train_teacher`.

Adding a stage is a few lines in `build_pipeline`: call its component with `**params` and its inputs, and
pass the task through `training` if it trains.
"""

import os
from dataclasses import dataclass, field
from typing import Any

from kfp import dsl, kubernetes

from components.coldstart import coldstart
from components.configure import configure
from components.evaluate import evaluate
from components.pretrain import pretrain, pretrain_teacher
from components.register import register
from components.runtime import CHECKPOINT_DIR_ENV
from components.srpo import srpo
from components.synthesize import synthesize
from components.validate import validate
from kat_core.config import ClusterConfig, KatConfig

PIPELINE_NAME = "kat-autothink"
CACHE_SALT_ENV = "KAT_CACHE_SALT"
TRAINJOB_IMAGE_ENV = "KAT_TRAINJOB_IMAGE"  # kat_core.platform.trainjob.IMAGE_ENV


# The environment variables every task gets from the platform's secrets and config map (helm/kat-platform
# creates them under these keys)
S3_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
MLFLOW_KEYS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
CONFIG_MAP_KEYS = ("MLFLOW_TRACKING_URI", "MLFLOW_S3_ENDPOINT_URL", "KAT_S3_ENDPOINT")


@dataclass(frozen=True)
class ClusterOptions:
    """A config's `cluster` section (kat_core.config.ClusterConfig: the one declaration of the cluster's
    settings) resolved for one pipeline build: the images of the tasks and the stages that launch a TrainJob
    instead of training in their own process."""

    settings: ClusterConfig = field(default_factory=ClusterConfig)
    image: str | None = None  # data and evaluation tasks (None: the components' base image)
    training_image: str | None = None  # training tasks and their TrainJobs
    distributed_stages: frozenset[str] = frozenset()

    @classmethod
    def from_config(cls, config: KatConfig) -> "ClusterOptions":
        """The cluster profile's settings. KAT_BASE_IMAGE, when set, is the image of every task (a one-off
        build)."""
        from kat_core.platform.trainjob import launches_trainjob

        c = config.cluster
        override = os.environ.get("KAT_BASE_IMAGE")
        return cls(settings=c, image=override or c.images.ref("cpu"), training_image=override or c.images.ref("cuda"),
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
            c = cluster.settings
            kubernetes.use_secret_as_env(task, c.s3_secret, {k: k for k in S3_KEYS})
            kubernetes.use_secret_as_env(task, c.mlflow_secret, {k: k for k in MLFLOW_KEYS},
                                         optional=True)  # a tracking server without auth has no secret
            kubernetes.use_config_map_as_env(task, c.config_map, {k: k for k in CONFIG_MAP_KEYS})
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
                c = cluster.settings
                task.set_cpu_request(c.cpu_request).set_memory_request(c.memory_request)
                if c.gpus:
                    task.set_accelerator_type(c.accelerator).set_accelerator_limit(c.gpus)
                    for key, value in c.node_selector.items():
                        kubernetes.add_node_selector(task, key, value)
                    for toleration in c.tolerations:
                        kubernetes.add_toleration(task, **toleration)
            # the checkpoints PVC is where a retried or re-run training task resumes from (and, for a TrainJob,
            # where its nodes read the inputs and write the output)
            kubernetes.mount_pvc(task, cluster.settings.checkpoints_pvc, cluster.settings.checkpoints_path)
            task.set_env_variable(CHECKPOINT_DIR_ENV, cluster.settings.checkpoints_path)
        return task

    @dsl.pipeline(name=PIPELINE_NAME,
                  description="AutoThink (KAT-V1): data, gate, MTP+KD, cold start, Step-SRPO, eval, registry")
    def autothink(profile: str = default_profile, overrides: list = default_overrides):
        head = common(configure(profile=profile, overrides=overrides)).set_caching_options(enable_caching=False)

        def params(stage: str) -> dict[str, Any]:
            return {"profile": profile, "overrides": head.outputs[stage]}

        data = common(synthesize(**params("synthesize")))
        report = common(validate(**params("validate"), dataset=data.outputs["dataset"]))
        gate = {"dataset": data.outputs["dataset"], "validation": report.outputs["report"]}
        teacher = training(pretrain_teacher(**params("pretrain"), **gate)) if config.pretrain.train_teacher else None
        student = training(pretrain(**params("pretrain"), **gate,
                                    **({"teacher": teacher.outputs["model"]} if teacher else {})))
        tuned = training(coldstart(**params("coldstart"), pretrained=student.outputs["model"],
                                   dataset=data.outputs["dataset"]))
        policy = training(srpo(**params("srpo"), coldstart=tuned.outputs["model"], dataset=data.outputs["dataset"]))
        evaluation = common(evaluate(**params("evaluate"), model=policy.outputs["model"]))
        # registration only of an evaluated model: it takes the report as an input
        common(register(**params("register"), model=policy.outputs["model"], report=evaluation.outputs["report"]))

    return autothink
