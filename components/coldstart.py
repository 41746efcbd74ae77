"""Component: the majority-vote cold start (kat_core.train.coldstart.coldstart)."""

from kfp import dsl

from components.runtime import BASE_IMAGE


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def coldstart(profile: str, overrides: list, pretrained: dsl.Input[dsl.Model], dataset: dsl.Input[dsl.Dataset],
              model: dsl.Output[dsl.Model]):
    """Label the dataset's held-out cold-start prompts by the decision criterion over the pretrained model's
    forced answers, then SFT into `model` (checkpoint + labels.jsonl + coldstart.json)."""
    from components.runtime import resumable, stage_config, track, user_errors
    from kat_core.train.coldstart import coldstart as run_stage

    with user_errors():
        config = stage_config(profile, overrides)
        inputs = {"model": pretrained.path, "data": dataset.path}
        with resumable(model.path, "coldstart", config, inputs) as out:
            result = run_stage(config, pretrained.path, out, data_dir=dataset.path, progress=False)
        track("coldstart", config, model.path, inputs=inputs)
    model.metadata.update({"label_off_share": result["label_off_share"], "in_sft": result["in_sft"]})
