"""Component: the majority-vote cold start (kat_core.train.coldstart.coldstart)."""

from kfp import dsl

from components.runtime import BASE_IMAGE


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def coldstart(profile: str, overrides: list, pretrained: dsl.Input[dsl.Model], model: dsl.Output[dsl.Model]):
    """Label prompts by majority vote over the pretrained model's forced samples, then SFT into `model`
    (checkpoint + labels.jsonl + coldstart.json)."""
    from components.runtime import resumable, stage_config, track, user_errors
    from kat_core.train.coldstart import coldstart as run_stage

    with user_errors():
        config = stage_config(profile, overrides)
        with resumable(model.path, "coldstart", config, {"model": pretrained.path}) as out:
            result = run_stage(config, pretrained.path, out, progress=False)
        track("coldstart", config, model.path, inputs={"model": pretrained.path})
    model.metadata.update({"label_off_share": result["label_off_share"], "in_sft": result["in_sft"]})
