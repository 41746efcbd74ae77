"""Component: the data gate (kat_core.data.validate.validate_dataset)."""

from kfp import dsl

from components.runtime import BASE_IMAGE


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def validate(profile: str, overrides: list, dataset: dsl.Input[dsl.Dataset], report: dsl.Output[dsl.Artifact]):
    """Validate `dataset` into `report` (JSON + Great Expectations data docs). A failed expectation fails
    the task with the reason on its `error:` line, so nothing downstream (training) runs."""
    from components.runtime import stage_config, track, user_errors
    from kat_core.data.validate import validate_dataset

    with user_errors():
        config = stage_config(profile, overrides)
        summary = validate_dataset(dataset.path, report.path, config.validate_, config.tasks)
        track("validate", config, report.path, inputs={"data": dataset.path},
              params={"passed": summary["passed"], "total": summary["total"]})
    report.metadata.update({"passed": summary["passed"], "total": summary["total"]})
