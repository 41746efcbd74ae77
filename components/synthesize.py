"""Component: the dual-regime dataset (kat_core.data.synth.synthesize, through the artifact store: a dataset of
the same recipe stored earlier is fetched instead of synthesized again)."""

from kfp import dsl

from components.runtime import BASE_IMAGE


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def synthesize(profile: str, overrides: list, dataset: dsl.Output[dsl.Dataset]):
    """Synthesize think-on/think-off records into the `dataset` directory (JSONL shards + manifest), or fetch
    them from the artifact store when this recipe's dataset is stored there (kat_core.platform.artifacts)."""
    from components.runtime import stage_config, track, user_errors
    from kat_core.platform.artifacts import dataset as run_stage

    with user_errors():
        config = stage_config(profile, overrides)
        manifest, fetched = run_stage(config, dataset.path)
        track("synthesize", config, dataset.path)
    dataset.metadata.update({"records": manifest["records"], "items": manifest["items"],
                             "config_hash": manifest["config_hash"], "fetched": fetched})
