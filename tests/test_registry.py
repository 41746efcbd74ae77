"""The registry on a local SQLite store with real (tiny) checkpoints: registration with lineage, the
promotion gate, rollback, history, concurrent promotions, and `models:/kat@champion` loading back."""

import json
import os
import subprocess
import sys
import threading
import time
from contextlib import nullcontext

import pytest

from kat_core.errors import Invalid, KatError
from kat_core.platform.registry import EvalSummary, Margins, gate, items_digest, summary_from_report
from kat_core.platform.tracking import get_client

TINY = {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64, "max_seq_len": 96}


# ---- the gate and report extraction: pure functions ------------------------------------------------------


def s(acc, tok, items="same"):
    return EvalSummary(accuracy=acc, mean_tokens=tok, n=100, items_digest=items)


@pytest.mark.parametrize(("cand", "champ", "passed", "why"), [
    (s(0.70, 50), None, True, "first model"),
    (s(0.70, 50), s(0.60, 50), True, "higher accuracy"),            # better, same tokens
    (s(0.70, 40), s(0.60, 50), True, "higher accuracy"),            # better and cheaper
    (s(0.70, 51), s(0.60, 50), False, "but more tokens"),           # better but pricier
    (s(0.605, 40), s(0.60, 50), True, "fewer tokens"),              # equal (within 0.01), 20% fewer
    (s(0.595, 47), s(0.60, 50), True, "fewer tokens"),              # equal (within 0.01), 6% fewer
    (s(0.60, 48), s(0.60, 50), False, "not 5% fewer tokens"),       # equal, only 4% fewer
    (s(0.60, 50), s(0.60, 50), False, "not 5% fewer tokens"),       # identical
    (s(0.55, 20), s(0.60, 50), False, "lower accuracy"),            # worse even if much cheaper
    (s(0.90, 10, "a"), s(0.60, 50, "b"), False, "not comparable"),  # different items
])
def test_gate(cand, champ, passed, why):
    ok, reason = gate(cand, champ, Margins(acc_margin=0.01, tok_margin=0.05))
    assert ok is passed and why in reason, reason


def test_the_floor_keeps_a_malformed_or_useless_model_out_even_as_the_first():
    broken = EvalSummary(accuracy=0.0, mean_tokens=96.0, n=20, well_formed=0.0)  # the smoke model of issue 20
    ok, why = gate(broken, None)
    assert not ok and "not well-formed: 0.0%" in why and "registry.min_well_formed" in why, why
    ok, why = gate(EvalSummary(accuracy=0.01, mean_tokens=50.0, well_formed=0.9), None)
    assert not ok and "below the minimum 0.05 (registry.min_accuracy)" in why, why
    assert gate(EvalSummary(accuracy=0.3, mean_tokens=50.0, well_formed=0.9), None)[0]
    # better than a broken champion is not enough
    assert not gate(broken, EvalSummary(accuracy=0.0, mean_tokens=200.0, well_formed=0.0))[0]
    # the floors are configurable (0: off), and read from a report's well_formed_rate
    assert gate(broken, None, Margins(min_accuracy=0, min_well_formed=0)) == (
        True, "first model: there is no champion yet")
    report = {"overall": {"auto": {"n": 4, "accuracy": {"greedy": 0.5}, "mean_tokens": {"total": 9.0},
                                   "well_formed_rate": 0.25}}}
    assert summary_from_report(report).well_formed == 0.25
    assert "not well-formed: 25.0%" in gate(report, None)[1]
    from kat_core.config import load_config

    margins = Margins.from_config(load_config("smoke", ["registry.min_well_formed=0.2"]).registry)
    assert (margins.min_well_formed, margins.min_accuracy) == (0.2, 0.05) and gate(report, None, margins)[0]


def test_a_report_with_nan_is_refused_not_crowned():
    """NaN compares false with everything, so an accuracy (or well-formed rate) of NaN passed the floors and
    became the first champion, and a NaN champion then kept every later candidate out ("lower accuracy nan").
    Now a non-finite number in a report is one KatError, as any other non-number is."""
    for report in ({"accuracy": float("nan"), "mean_tokens": 10.0}, {"accuracy": "nan", "mean_tokens": 10.0},
                   {"accuracy": 0.5, "mean_tokens": float("inf")},
                   {"accuracy": 0.5, "mean_tokens": 10.0, "well_formed_rate": float("nan")}):
        with pytest.raises(KatError, match="expected a finite number"):
            gate(report, None)


def test_gate_reads_report_dicts_and_margins():
    cand = {"accuracy": 0.62, "mean_tokens": 50, "items": [{"id": "b"}, {"id": "a"}]}
    champ = {"accuracy": 0.60, "mean_tokens": 50, "items": [{"id": "a"}, {"id": "b"}]}  # same items, any order
    assert gate(cand, champ)[0] is True
    assert gate(cand, champ, Margins(acc_margin=0.05))[0] is False  # +0.02 counts as equal, tokens not fewer


def test_summary_from_report_layouts():
    flat = summary_from_report({"accuracy": 0.5, "mean_tokens": 30.0, "items": ["x", "y"]})
    assert (flat.accuracy, flat.mean_tokens, flat.n) == (0.5, 30.0, 2) and flat.items_digest
    modes = summary_from_report({"modes": {"on": {"accuracy": 0.9, "mean_tokens": 90},
                                           "auto": {"accuracy": {"greedy": 0.7, "pass@1": 0.6},
                                                    "mean_tokens": {"total": 40, "think": 25, "answer": 15},
                                                    "n": 10}}})
    assert (modes.accuracy, modes.mean_tokens, modes.n) == (0.7, 40.0, 10)
    gsm8k = {"auto": {"accuracy": 0.0, "mean_tokens": 50, "n": 10}, "on": {"accuracy": 0.5, "mean_tokens": 99}}
    suites = summary_from_report({"suites": {"arith": {"auto": {"accuracy": 1.0, "mean_tokens": 10, "n": 30}},
                                             "gsm8k": {"modes": gsm8k}}})
    assert (suites.accuracy, suites.mean_tokens, suites.n) == (0.75, 20.0, 40)
    # the evaluation's report.json ("kat-eval-report/2"): overall.auto, and the digest it wrote itself
    block = {"n": 4, "accuracy": {"greedy": 0.5, "pass@1": None}, "mean_tokens": {"total": 33.5, "think": 20},
             "think_on_rate": 0.25}
    items = ["arith/1", "arith/2", "gsm8k/7", "gsm8k/9"]
    report = {"schema": "kat-eval-report/2", "items": items, "items_digest": items_digest(items),
              "overall": {"auto": block, "on": {**block, "accuracy": {"greedy": 0.9}}},
              "suites": {"arith": {"n": 2, "modes": {"auto": block}}}}
    summary = summary_from_report(report)
    assert (summary.accuracy, summary.mean_tokens, summary.n) == (0.5, 33.5, 4)
    assert summary.items_digest == report["items_digest"]
    assert summary_from_report(report, mode="on").accuracy == 0.9
    with pytest.raises(KatError, match="no accuracy/mean_tokens for mode 'auto'"):
        summary_from_report({"modes": {"on": {"accuracy": 1, "mean_tokens": 2}}})
    assert EvalSummary.from_json(suites.to_json()) == suites


# ---- against a registry ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    home = tmp_path_factory.mktemp("kat_home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KAT_HOME", str(home))
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{home / 'mlflow.db'}")
        mp.setenv("KAT_USER", "tester")
        yield home


@pytest.fixture(scope="module")
def checkpoints(tiny_tokenizer, tmp_path_factory):
    """Three real tiny checkpoints (different seeds) written by save_checkpoint, with a dataset input."""
    from kat_core.config import ModelConfig
    from kat_core.manifest import write_manifest
    from kat_core.model.checkpoint import save_checkpoint
    from kat_core.model.lm import build_model

    root = tmp_path_factory.mktemp("ckpts")
    data = root / "data"
    data.mkdir()
    (data / "train-00000.jsonl").write_text('{"prompt": "1+1"}\n')
    write_manifest(data, stage="synthesize")
    out = []
    for seed in range(3):
        model = build_model(ModelConfig(**TINY), tiny_tokenizer, seed=seed)
        out.append(save_checkpoint(root / f"ckpt{seed}", model, tiny_tokenizer, manifest={
            "stage": "srpo", "config": {"seed": seed}, "inputs": {"dataset": data}}))
    return data, out


@pytest.fixture(scope="module")
def pipeline_run(home, checkpoints):
    from kat_core.platform import tracking

    data, _ = checkpoints
    parent = tracking.start_pipeline_run("autothink", params={"seed": 0}, kfp_run_id="kfp-7", profile="smoke",
                                         config_hash="cfg-7", code_version="code-7")
    tracking.log_stage(parent, "synthesize", data)
    return parent


REPORT_A = {"modes": {"auto": {"accuracy": 0.60, "mean_tokens": 50.0, "n": 3}}, "items": ["i1", "i2", "i3"]}
REPORT_WORSE = {"modes": {"auto": {"accuracy": 0.40, "mean_tokens": 30.0, "n": 3}}, "items": ["i1", "i2", "i3"]}
REPORT_BETTER = {"modes": {"auto": {"accuracy": 0.80, "mean_tokens": 45.0, "n": 3}}, "items": ["i3", "i2", "i1"]}


@pytest.fixture(scope="module")
def registered(home, checkpoints, pipeline_run):
    """v1 (first, becomes champion), v2 (worse: stays out), v3 (better: promoted) under the name "kat"."""
    from kat_core.platform import registry

    _, (c0, c1, c2) = checkpoints
    versions, verdicts = [], []
    for ckpt, report in ((c0, REPORT_A), (c1, REPORT_WORSE), (c2, REPORT_BETTER)):
        v = registry.register_model(ckpt, report, pipeline_run, name="kat")
        versions.append(v)
        verdicts.append(registry.promote_if_better("kat", v, who="pipeline:kfp-7"))
    return versions, verdicts


def aliases(name="kat"):
    from kat_core.platform.tracking import get_client

    return {a: int(v) for a, v in get_client().get_registered_model(name).aliases.items()}


def test_registration_gate_and_lineage(registered, checkpoints, pipeline_run):
    from kat_core.manifest import dir_digest
    from kat_core.platform import registry

    (v1, v2, v3), verdicts = registered
    assert (v1, v2, v3) == (1, 2, 3)
    assert verdicts[0] == (True, "first model: there is no champion yet")
    assert verdicts[1][0] is False and "lower accuracy" in verdicts[1][1]  # the worse model is not promoted
    assert verdicts[2][0] is True and "higher accuracy" in verdicts[2][1]
    assert aliases() == {"candidate": 3, "champion": 3}

    data, ckpts = checkpoints
    info = registry.show_version("kat", v2)
    assert info["pipeline_run_id"] == pipeline_run and info["kfp_run_id"] == "kfp-7"
    assert info["config_hash"] == "cfg-7" and info["code_version"] == "code-7" and info["profile"] == "smoke"
    assert info["data"] == {"synthesize": dir_digest(data)} and info["inputs"] == {"dataset": dir_digest(data)}
    assert info["checkpoint_digest"] == dir_digest(ckpts[1])
    assert info["evaluation"]["accuracy"] == 0.4 and info["evaluation"]["mean_tokens"] == 30.0
    assert registry.show_version("kat", "champion")["version"] == 3

    # the register run sits under the pipeline run, with the report and lineage beside the model
    from kat_core.platform.tracking import get_client

    run = get_client().get_run(info["register_run_id"])
    assert run.data.tags["mlflow.parentRunId"] == pipeline_run and run.data.metrics["eval.accuracy"] == 0.4
    assert {"report.json", "lineage.json"} <= {a.path for a in get_client().list_artifacts(run.info.run_id)}


def test_champion_loads_back_and_generates(registered, checkpoints, tiny_tokenizer):
    import mlflow

    from kat_core.manifest import dir_digest
    from kat_core.platform import registry

    model = mlflow.pyfunc.load_model(registry.model_uri("kat", "champion"))
    out = model.predict(["12+7=?", "3*4=?"], params={"max_new_tokens": 6})
    assert len(out) == 2 and all(isinstance(t, str) for t in out)
    assert all(len(tiny_tokenizer(t, add_special_tokens=False)["input_ids"]) <= 6 for t in out)
    # greedy and deterministic: the same answer as the checkpoint loaded directly
    assert model.predict(["12+7=?"], params={"max_new_tokens": 6}) == out[:1]

    local = registry.download_checkpoint("kat", "champion")
    assert dir_digest(local) == dir_digest(checkpoints[1][2])  # v3 is ckpt2, byte for byte


def test_rollback_restores_previous_champion_and_history(registered):
    from kat_core.platform import registry

    event = registry.rollback("kat", "v3 regressed on code", who="oncall")
    assert (event.previous, event.version, event.action) == (3, 1, "rollback")
    assert aliases()["champion"] == 1  # back to v1: v2 was never champion
    with pytest.raises(KatError, match="no previous champion"):
        registry.rollback("kat", "again")

    event = registry.promote("kat", 3, "fixed upstream", who="alice")
    assert (event.previous, event.version) == (1, 3)
    assert registry.promote("kat", 3, "again") is None  # already champion: nothing moves, nothing recorded

    moves = [(e.alias, e.previous, e.version, e.action, e.who) for e in registry.history("kat")]
    assert moves == [
        ("candidate", None, 1, "register", "tester"),
        ("champion", None, 1, "promote", "pipeline:kfp-7"),
        ("candidate", 1, 2, "register", "tester"),
        ("candidate", 2, 3, "register", "tester"),
        ("champion", 1, 3, "promote", "pipeline:kfp-7"),
        ("champion", 3, 1, "rollback", "oncall"),
        ("champion", 1, 3, "promote", "alice"),
    ]
    assert registry.history("kat")[-2].reason == "v3 regressed on code"
    assert all(e.at.endswith("Z") for e in registry.history("kat"))


def test_manual_promotion_respects_the_gate_unless_forced(registered):
    from kat_core.platform import registry

    assert aliases()["champion"] == 3
    with pytest.raises(KatError, match="gate keeps kat v2 out: lower accuracy"):
        registry.promote("kat", 2, "try", gate_margins=Margins())
    assert aliases()["champion"] == 3
    registry.promote("kat", 2, "demo needs the short one", who="bob")  # a person overrides the gate
    assert aliases()["champion"] == 2
    registry.rollback("kat", "back", who="bob")
    # forced past the gate: the history says so, and why the gate said no
    registry.promote("kat", 2, "forced on purpose", who="bob", gate_margins=Margins(), force=True)
    assert aliases()["champion"] == 2
    assert registry.history("kat")[-1].reason.startswith("forced on purpose; gate overridden (forced): lower accuracy")
    registry.rollback("kat", "back", who="bob")
    assert aliases()["champion"] == 3


def test_refuses_to_register_a_tampered_checkpoint(home, checkpoints, tmp_path):
    import shutil

    from kat_core.platform import registry

    bad = tmp_path / "bad"
    shutil.copytree(checkpoints[1][0], bad)
    (bad / "config.json").write_text((bad / "config.json").read_text().replace("}", ' , "x": 1}', 1))
    with pytest.raises(KatError, match="refusing to register .*digest mismatch for config.json"):
        registry.register_model(bad, REPORT_A, name="kat-tampered")
    assert registry.list_models() and "kat-tampered" not in {m["name"] for m in registry.list_models()}


def test_unknown_model_and_version_are_one_line_errors(registered):
    from kat_core.platform import registry

    with pytest.raises(KatError, match="not found"):
        registry.promote("kat", 99, "nope")
    with pytest.raises(KatError, match="not found"):
        registry.history("no-such-model")


def test_cli_models(registered):
    from typer.testing import CliRunner

    from kat_app.cli import app

    runner = CliRunner()

    def kat(*args):
        result = runner.invoke(app, ["models", *args])
        assert result.exit_code == 0, (result.output, result.exception)
        return result.output

    assert aliases()["champion"] == 3
    listing = kat("list")
    assert "kat " in listing and "champion=v3" in listing and "candidate=v3" in listing
    shown = kat("show", "kat", "2")
    for fragment in ("kat v2", "KFP run:               kfp-7", "config hash:           cfg-7",
                     "code version:          code-7", "data synthesize: ", "accuracy 0.4000"):
        assert fragment in shown, shown
    assert '"version": 3' in kat("show", "kat", "champion", "--json")
    kat("promote", "kat", "1", "--reason", "cli test", "--force", "--who", "carol")
    assert aliases()["champion"] == 1
    kat("rollback", "kat", "-r", "cli test done")
    assert aliases()["champion"] == 3
    assert "carol: cli test" in kat("history", "kat").splitlines()[-2]

    # as a user runs it: the gate's refusal is one line and exit code 1
    r = subprocess.run([sys.executable, "-m", "kat_app.cli", "models", "promote", "kat", "2", "-r", "try"],
                       capture_output=True, text=True, timeout=120)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 1 and len(lines) == 1, r.stderr
    assert lines[0].startswith("error: the promotion gate keeps kat v2 out: lower accuracy")
    assert "Traceback" not in r.stderr and aliases()["champion"] == 3


def _chain_is_consistent(events):
    champ = [e for e in events if e.alias == "champion"]
    return all(b.previous == a.version for a, b in zip(champ, champ[1:], strict=False))


@pytest.mark.parametrize("locked", [True, False])
def test_concurrent_promotions_threads(registered, checkpoints, monkeypatch, locked):
    """Two promotions at once, each slowed down between reading and moving the alias. With the lock the
    history is a chain whose last entry is the alias; without it (the control) both see the same
    'previous' champion, which shows the test can see a race."""
    from kat_core.platform import registry

    name = f"race-{locked}"
    for ckpt in checkpoints[1][:3]:
        registry.register_model(ckpt, REPORT_A, name=name)
    registry.promote(name, 1, "start")

    client_class = type(registry.get_client())
    real = client_class.set_registered_model_alias

    def slow(self, *args, **kwargs):
        time.sleep(1.0)  # wide enough that, unlocked, both threads read before either moves
        return real(self, *args, **kwargs)

    monkeypatch.setattr(client_class, "set_registered_model_alias", slow)
    if not locked:
        monkeypatch.setattr(registry, "_alias_lock", lambda name: nullcontext())
    barrier = threading.Barrier(2)
    errors = []

    def go(version):
        barrier.wait()
        try:
            registry.promote(name, version, f"race to v{version}", who=f"t{version}")
        except Exception as e:  # noqa: BLE001 - surfaced below
            errors.append(e)

    threads = [threading.Thread(target=go, args=(v,)) for v in (2, 3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    events = registry.history(name)
    champion = aliases(name)["champion"]
    if locked:
        assert _chain_is_consistent(events) and events[-1].version == champion
        assert sorted(e.version for e in events if e.action == "promote")[-2:] == [2, 3]
    else:
        assert not _chain_is_consistent(events)


def test_concurrent_promotions_processes(registered, home):
    """Two processes promoting back and forth at the same time leave one consistent chain."""
    from kat_core.platform import registry

    name = "kat"
    code = ("import sys; from kat_core.platform.registry import promote\n"
            "for v in map(int, sys.argv[1:]): promote('kat', v, 'proc', who=f'pid-{v}')\n")
    env = {**os.environ}
    procs = [subprocess.Popen([sys.executable, "-c", code, *order], env=env, stderr=subprocess.PIPE, text=True)
             for order in (["1", "3", "1", "3"], ["3", "1", "3", "1"])]
    for p in procs:
        assert p.wait(timeout=240) == 0, p.stderr.read()
    events = registry.history(name)
    assert _chain_is_consistent(events)
    assert events[-1].alias == "champion" and events[-1].version == aliases(name)["champion"]
    assert json.loads(events[-1].to_json())["reason"] == "proc"


def test_a_model_name_with_a_quote_does_not_break_the_listing(registered, checkpoints):
    """MLflow accepts a registered model named `o'brien` (e.g. `registry.model_name` of a user's profile); it
    must not break `kat models list` for every model in the registry. Before: the listing put the name into a
    search filter and failed with "Invalid clause(s) in filter string"."""
    from typer.testing import CliRunner

    from kat_app.cli import app
    from kat_core.platform import registry

    _, (c0, _, _) = checkpoints
    odd = ["o'brien", 'say "hi"', "both'\""]
    for name in odd:
        registry.register_model(c0, REPORT_A, name=name)
    listed = {m["name"]: m for m in registry.list_models()}
    assert {"kat", *odd} <= set(listed)
    assert all(listed[n]["versions"] == 1 and listed[n]["aliases"] == {"candidate": 1} for n in odd)
    assert listed["kat"]["versions"] == 3
    result = CliRunner().invoke(app, ["models", "list"])
    assert result.exit_code == 0 and "o'brien" in result.output, (result.output, result.exception)
    # one model's versions (the dashboard's model page): quoted with the quote the name does not hold
    client = get_client(registry.resolve_tracking_uri(None))
    for name in odd[:2]:
        (mv,) = client.search_model_versions(registry.versions_filter(name))
        assert mv.name == name
    with pytest.raises(Invalid, match="both quote characters"):
        registry.versions_filter(odd[2])


def test_a_refused_history_event_leaves_the_alias_where_it_was(registered, checkpoints):
    """An alias move is two registry writes: the alias, then its history event. When the event is refused (a
    reason longer than the registry takes: 100,000 characters here, 5,000 in a SQL server's column) the alias
    must not stay moved. Before: champion moved with no event, and `rollback` then refused to work ("moved
    outside kat?")."""
    from kat_core.platform import registry

    _, (c0, c1, _) = checkpoints
    first = registry.register_model(c0, REPORT_A, name="long-reason")
    second = registry.register_model(c1, REPORT_A, name="long-reason")
    registry.promote("long-reason", first, "first", who="t")
    before = registry.history("long-reason")
    with pytest.raises(KatError, match="MLflow at"):
        registry.promote("long-reason", second, "x" * 100_001, who="t")
    assert aliases("long-reason")["champion"] == first
    assert registry.history("long-reason") == before
    registry.promote("long-reason", second, "short", who="t")
    assert registry.rollback("long-reason", "back", who="t").version == first


def test_an_unreadable_evaluation_summary_tag_is_one_line(registered, checkpoints):
    """Version tags can be edited by hand (the MLflow UI); a `kat.eval.summary` that is no longer JSON must make
    `kat models show` and `kat models promote` fail in one line; `registry.promote(force=True)` still promotes
    (the gate "not judged"). Before: a JSONDecodeError traceback from all three."""
    from kat_core.platform import registry
    from kat_core.platform.tracking import get_client
    from tests.helpers import kat_here

    _, (c0, _, _) = checkpoints
    first = registry.register_model(c0, REPORT_A, name="hand-edited")
    second = registry.register_model(c0, REPORT_A, name="hand-edited")
    registry.promote("hand-edited", first, "first", who="t")
    get_client().set_model_version_tag("hand-edited", str(second), registry.TAG_SUMMARY, "{accuracy: 0.9")
    for args in (["show", "hand-edited", str(second)], ["promote", "hand-edited", str(second), "-r", "try"]):
        r = kat_here("models", *args)
        assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
        assert "unreadable evaluation summary" in r.stderr and registry.TAG_SUMMARY in r.stderr, r.stderr
    event = registry.promote("hand-edited", second, "anyway", who="t", gate_margins=registry.Margins(), force=True)
    assert "not judged" in event.reason and aliases("hand-edited")["champion"] == second
