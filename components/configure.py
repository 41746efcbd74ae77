"""Component: the head of the DAG. Checks the whole config once (the one check `kat run`, the form and the API
make), opens the run's MLflow parent run with it, and hands each stage the overrides it depends on
(kat_core.config.STAGE_READS), so a stage's cache key changes only when its own settings do."""

from typing import NamedTuple

from kfp import dsl

from components.runtime import BASE_IMAGE


# The outputs are spelled out in the signature: KFP ships the function's source alone, and reads its outputs
# from there (one list per stage of kat_core.config.PIPELINE_STAGES, whose order a test checks).
@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def configure(profile: str, overrides: list) -> NamedTuple(
        "StageOverrides", synthesize=list, validate=list, pretrain=list, coldstart=list, srpo=list, evaluate=list,
        register=list):
    """Check the config of `profile` with `overrides` and return, per stage, the overrides it reads."""
    from collections import namedtuple

    from components.runtime import open_pipeline_run, stage_config, user_errors
    from kat_core.config import PIPELINE_STAGES, stage_overrides

    with user_errors():
        config = stage_config(profile, overrides)
        open_pipeline_run(config)
        scoped = {stage: stage_overrides(stage, list(overrides)) for stage in PIPELINE_STAGES}
    for stage, kept in scoped.items():
        print(f"{stage}: {' '.join(kept) or '(profile defaults)'}", flush=True)
    return namedtuple("StageOverrides", PIPELINE_STAGES)(**scoped)
