"""Component: evaluation of the trained model (kat_core.eval.evaluate.evaluate)."""

from kfp import dsl

from components.runtime import BASE_IMAGE


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def evaluate(profile: str, overrides: list, model: dsl.Input[dsl.Model], report: dsl.Output[dsl.Artifact]):
    """Accuracy, tokens and think-on rate per suite, mode (auto/on/off) and level into `report`
    (report.json, report.md, plots)."""
    from components.runtime import stage_config, track, user_errors
    from kat_core.eval.evaluate import evaluate as run_stage

    with user_errors():
        config = stage_config(profile, overrides)
        e = config.evaluate
        result = run_stage(model.path, e.suites, e.modes, out_dir=report.path, limit=e.limit, n_samples=e.n_samples,
                           temperature=e.temperature, max_new_tokens=e.max_new_tokens, seed=config.seed,
                           criterion=config.autothink, oracle_items=e.oracle_items,
                           draft_tokens=config.speculative.draft_tokens,
                           benchmarks_dir=config.tasks.benchmarks_dir, progress=False)
        track("evaluate", config, report.path, inputs={"model": model.path})
    auto = result.get("overall", {}).get("auto", {})
    report.metadata.update({"auto_accuracy": (auto.get("accuracy") or {}).get("greedy")})
