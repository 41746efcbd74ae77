"""Component: reinforcement learning after the cold start (kat_core.train.srpo.srpo).

Step-SRPO by default (`srpo.algo`; grpo and decoupled are the baselines). It takes the cold-start model,
whose labels.jsonl is the mode prior, and the validated dataset, whose prompts it samples. With
cluster.distributed asking for more than one process, the stage runs as a Kubeflow Trainer TrainJob.
"""

from kfp import dsl

from components.runtime import BASE_IMAGE


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def srpo(profile: str, overrides: list, coldstart: dsl.Input[dsl.Model], dataset: dsl.Input[dsl.Dataset],
         model: dsl.Output[dsl.Model]):
    """RL-train the cold-start model into `model` (checkpoint + metrics.jsonl + srpo.json)."""
    from components.runtime import resumable, stage_config, track, user_errors
    from kat_core.platform.trainjob import train_stage

    with user_errors():
        config = stage_config(profile, overrides)
        inputs = {"model": coldstart.path, "data": dataset.path}
        with resumable(model.path, "srpo", config, inputs) as out:
            summary = train_stage(
                config, "srpo", entry="kat_core.train.srpo:srpo", out=out, profile=profile,
                overrides=list(overrides), kwargs={"progress": False},
                paths={"checkpoint": coldstart.path, "data_dir": dataset.path}, train_key="srpo.train")
        track("srpo", config, model.path, inputs=inputs)
    final = summary.get("final", {}) if isinstance(summary, dict) else {}
    model.metadata.update({"algo": config.srpo.algo, **{k: final[k] for k in ("accuracy", "mean_tokens",
                                                                             "think_on_rate") if k in final}})
