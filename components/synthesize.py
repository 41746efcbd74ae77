"""Component: the dual-regime dataset (kat_core.data.synth.synthesize)."""

from kfp import dsl

from components.runtime import BASE_IMAGE


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def synthesize(profile: str, overrides: list, dataset: dsl.Output[dsl.Dataset]):
    """Synthesize think-on/think-off records into the `dataset` directory (JSONL shards + manifest)."""
    from components.runtime import stage_config, track, user_errors
    from kat_core.data.synth import synthesize as run_stage

    with user_errors():
        config = stage_config(profile, overrides)
        manifest = run_stage(config, dataset.path, progress=False)
        track("synthesize", config, dataset.path)
    dataset.metadata.update({"records": manifest["records"], "items": manifest["items"],
                             "config_hash": manifest["config_hash"]})
