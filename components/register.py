"""Component: register the evaluated model in MLflow and promote it through the gate
(kat_core.platform.registry)."""

from kfp import dsl

from components.runtime import BASE_IMAGE


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def register(profile: str, overrides: list, model: dsl.Input[dsl.Model], report: dsl.Input[dsl.Artifact],
             registered: dsl.Output[dsl.Artifact]):
    """Log the model with its lineage under the pipeline's MLflow parent run, alias it `candidate`, and make
    it `champion` only when the gate says it beats the current one (the first model always does)."""
    import json
    from pathlib import Path

    from components.runtime import open_pipeline_run, stage_config, user_errors
    from kat_core.platform.artifacts import ArtifactStore
    from kat_core.platform.gate import Margins
    from kat_core.platform.registry import promote_if_better, register_model

    with user_errors():
        config = stage_config(profile, overrides)
        parent = open_pipeline_run(config)  # the DAG's head made it; a lone task makes its own
        evaluation = json.loads((Path(report.path) / "report.json").read_text())
        name = config.registry.model_name
        margins = Margins.from_config(config.registry)  # the one gate configuration, recorded with the version
        version = register_model(model.path, evaluation, parent, name, margins=margins)
        promoted, reason = promote_if_better(name, version, margins)
        stored = ArtifactStore.from_env().put("models", model.path)  # content-addressed: once per checkpoint
    result = {"name": name, "version": version, "champion": promoted, "gate": reason, "parent_run": parent,
              "checkpoint": stored}
    Path(registered.path).write_text(json.dumps(result, indent=2) + "\n")
    registered.metadata.update(result)
    print(f"registered {name} version {version}; {'champion' if promoted else 'candidate'}: {reason}", flush=True)
