"""Components: pretraining with MTP, and distillation from a teacher (kat_core.train.pretrain.pretrain).

Two components over the same stage, so the two tasks are named by their role in the DAG and the UI:
`pretrain-teacher` trains the larger teacher (config.pretrain.teacher_model/teacher_train), `pretrain` the
student, distilled from `teacher` when one is given. Both take the validation report as an input: that
is what makes training wait for (and only follow) a passed validation.

With cluster.distributed asking for more than one process (nodes x gpus_per_node), the task launches the
stage as a Kubeflow Trainer TrainJob and waits for it (kat_core.platform.trainjob); otherwise it trains in
its own process.
"""

from kfp import dsl

from components.runtime import BASE_IMAGE


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def pretrain(
    profile: str,
    overrides: list,
    dataset: dsl.Input[dsl.Dataset],
    validation: dsl.Input[dsl.Artifact],
    model: dsl.Output[dsl.Model],
    teacher: dsl.Input[dsl.Model] = None,
):
    """Pretrain the student into `model` (an HF checkpoint with MTP weights), distilled from `teacher`."""
    from components.runtime import resumable, stage_config, track, user_errors
    from kat_core.platform.trainjob import train_stage

    with user_errors():
        config = stage_config(profile, overrides)
        inputs = {"data": dataset.path, **({"teacher": teacher.path} if teacher else {})}
        with resumable(model.path, "pretrain", config, inputs) as out:
            # nodes x GPUs > 1: a Kubeflow Trainer TrainJob; else in this task's process
            metrics = train_stage(
                config, "pretrain", entry="kat_core.train.pretrain:pretrain", out=out, profile=profile,
                overrides=list(overrides), kwargs={"progress": False},
                paths={"data_dir": dataset.path, "validation": validation.path,
                       **({"teacher": teacher.path} if teacher else {})})
        track("pretrain", config, model.path, inputs=inputs)
    model.metadata.update({k: v for k, v in metrics.items() if k in ("step", "loss", "ce", "kd", "mtp")})


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def pretrain_teacher(
    profile: str,
    overrides: list,
    dataset: dsl.Input[dsl.Dataset],
    validation: dsl.Input[dsl.Artifact],
    model: dsl.Output[dsl.Model],
):
    """Pretrain the teacher (pretrain.teacher_model / teacher_train, else the student's sizes) into `model`."""
    from components.runtime import resumable, stage_config, track, user_errors
    from kat_core.platform.trainjob import train_stage

    with user_errors():
        config = stage_config(profile, overrides)
        with resumable(model.path, "pretrain-teacher", config, {"data": dataset.path}) as out:
            metrics = train_stage(
                config, "pretrain-teacher", entry="kat_core.train.pretrain:pretrain", out=out, profile=profile,
                overrides=list(overrides), kwargs={"progress": False},
                paths={"data_dir": dataset.path, "validation": validation.path},
                config_kwargs={"model_cfg": "pretrain.teacher_model", "train_cfg": "pretrain.teacher_train"},
                train_key="pretrain.teacher_train" if config.pretrain.teacher_train else "train")
        track("pretrain-teacher", config, model.path, inputs={"data": dataset.path})
    model.metadata.update({k: v for k, v in metrics.items() if k in ("step", "loss", "ce", "mtp")})
