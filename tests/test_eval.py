"""Evaluation: the metrics on a hand-made set whose values are worked out by hand below, the report schema the
promotion gate reads, and `evaluate`/`compare`/`kat eval` end to end on a tiny model (its accuracy is beside
the point; the files, counts and their consistency are not). Torch runs on one thread (a busy 2-core box)."""

import json
import shutil

import pytest

from kat_core.errors import KatError
from kat_core.eval.metrics import ItemResult, Outcome, by_level, mode_metrics, mode_selection
from kat_core.eval.report import build_report
from tests.tiny_autothink import tiny_checkpoint

torch = pytest.importorskip("torch")


pytestmark = pytest.mark.usefixtures("one_thread")


def o(mode, correct, total, *, think=0, well_formed=True, finish="stop"):
    judge = 5 if mode else 0
    return Outcome(mode=mode, correct=correct, well_formed=well_formed, finish_reason=finish,
                   tokens={"judge": judge, "think": think, "answer": total - judge - think, "other": 0,
                           "total": total})


@pytest.fixture()
def hand_made():
    """Three items. A (level 1): auto skips thinking and is right; thinking is right too, always.
    B (level 2): auto thinks and is wrong; think-on is right half the time, think-off never.
    C (level 2): auto is malformed (no mode token, truncated); nothing is ever right."""
    a = ItemResult("A", "arith", 1,
                   greedy={"auto": o("off", True, 10), "on": o("on", True, 30, think=20), "off": o("off", True, 10)},
                   sampled={"auto": [o("off", True, 10), o("off", False, 10)],
                            "on": [o("on", True, 30, think=20), o("on", True, 34, think=24)],
                            "off": [o("off", True, 10), o("off", False, 12)]})
    b = ItemResult("B", "arith", 2,
                   greedy={"auto": o("on", False, 40, think=30), "on": o("on", True, 40, think=30),
                           "off": o("off", False, 12)},
                   sampled={"auto": [o("on", True, 40, think=30), o("on", True, 40, think=30)],
                            "on": [o("on", True, 40, think=30), o("on", False, 44, think=34)],
                            "off": [o("off", False, 12), o("off", False, 12)]})
    c = ItemResult("C", "arith", 2,
                   greedy={"auto": o(None, False, 50, well_formed=False, finish="length"),
                           "on": o("on", False, 50, think=40, finish="length"), "off": o("off", False, 8)},
                   sampled={"auto": [o(None, False, 50, well_formed=False)] * 2,
                            "on": [o("on", False, 50, think=40)] * 2, "off": [o("off", False, 8)] * 2})
    return [a, b, c]


def test_mode_metrics_by_hand(hand_made):
    auto = mode_metrics(hand_made, "auto")
    assert auto["n"] == 3
    assert auto["accuracy"] == {"greedy": 0.3333, "pass@1": 0.5}  # greedy: A only; pass@1: (1/2 + 2/2 + 0/2) / 3
    assert auto["mean_tokens"]["total"] == 33.33  # (10 + 40 + 50) / 3
    assert auto["mean_tokens"]["think"] == 10.0  # (0 + 30 + 0) / 3
    assert auto["think_on_rate"] == 0.3333  # B
    assert auto["well_formed_rate"] == 0.6667 and auto["truncated_rate"] == 0.3333  # C is neither / is
    on = mode_metrics(hand_made, "on")
    assert on["accuracy"] == {"greedy": 0.6667, "pass@1": 0.5}  # A, B right; pass@1: (1 + 1/2 + 0) / 3
    assert on["mean_tokens"]["total"] == 40.0 and on["think_on_rate"] == 1.0
    off = mode_metrics(hand_made, "off")
    assert off["accuracy"] == {"greedy": 0.3333, "pass@1": 0.1667} and off["think_on_rate"] == 0.0


def test_by_level_and_no_samples(hand_made):
    levels = by_level(hand_made, ["auto"])
    assert list(levels) == ["1", "2"]
    assert levels["1"]["auto"]["accuracy"]["greedy"] == 1.0 and levels["2"]["auto"]["n"] == 2
    assert levels["2"]["auto"]["think_on_rate"] == 0.5
    for r in hand_made:
        r.sampled = {}
    assert mode_metrics(hand_made, "on")["accuracy"]["pass@1"] is None
    assert mode_metrics([], "on")["accuracy"]["greedy"] is None  # an empty suite reports nothing, not 0


def test_oracles_and_mode_selection_by_hand(hand_made):
    from kat_core.config import AutoThinkConfig

    # cells decided by the sign of their mean (no tie band, no level fallback); the tie band is tested below
    crit = AutoThinkConfig(token_cost=0.2, token_budget=100, delta=0.0, min_cell=1, tie_z=0.0)
    # greedy forced outcomes, V = correct - 0.2 * tokens / 100:
    #   A (L1): off right in 10 (0.98), on right in 30 (0.94)   -> off
    #   B (L2): off wrong in 12 (-0.024), on right in 40 (0.92) -> on
    #   C (L2): off wrong in 8 (-0.016), on wrong in 50 (-0.1)  -> off (thinking only spends tokens)
    sel = mode_selection(hand_made, crit)
    assert sel["n"] == 3 and sel["criterion"]["token_cost"] == 0.2
    assert sel["oracle"] == {"accuracy": 0.6667, "mean_tokens": 19.33, "think_on_rate": 0.3333, "value": 0.628}
    # auto chose off, on, none (C is valued at accuracy 0 and the 50 tokens it spent)
    assert sel["choice"] == {"accuracy": 0.6667, "mean_tokens": 33.33, "think_on_rate": 0.3333, "value": 0.6}
    assert sel["agreement"] == 0.6667
    assert sel["regret"] == {"accuracy": 0.0, "tokens": 14.0, "value": 0.028}
    assert sel["confusion"] == {"oracle_off": {"chose_off": 1, "chose_on": 0, "chose_none": 1},
                                "oracle_on": {"chose_off": 0, "chose_on": 1, "chose_none": 0}}
    # the feature cell (here: the level) decides for all its items: L2's summed preference is -0.86, so on for
    # B and C alike; a selector that cannot tell B from C does best by thinking on both
    cell = sel["feature_cell"]
    assert cell["cells"] == 2
    assert cell["oracle"] == {"accuracy": 0.6667, "mean_tokens": 33.33, "think_on_rate": 0.6667, "value": 0.6}
    assert cell["agreement"] == 0.6667 and cell["regret"] == {"accuracy": 0.0, "tokens": 0.0, "value": 0.0}
    assert cell["by_cell"] == {  # per cell: what the oracle picks, by how much, and what auto did
        "L1": {"n": 1, "oracle": "off", "decided_on_n": 1, "mean_preference_off": 0.04, "error": 0.0,
               "decided_by": "cell", "preference_off": 0.04, "auto_think_on_rate": 0.0, "auto_none_rate": 0.0},
        "L2": {"n": 2, "oracle": "on", "decided_on_n": 2, "mean_preference_off": -0.43, "error": 0.514,
               "decided_by": "cell", "preference_off": -0.43, "auto_think_on_rate": 0.5, "auto_none_rate": 0.5}}
    assert cell["decided_on"] == {"source": "split", "items": 3} and "in_split" not in cell
    assert {k: cell["sign_rule"][k] for k in ("oracle", "regret")} == {k: cell[k] for k in ("oracle", "regret")}
    # with the tie band, L2's edge for thinking (0.43) is within 1.645 standard errors (0.514) of its two items:
    # a tie, which goes to think-off; the sign rule beside it still thinks
    tied = mode_selection(hand_made, crit.model_copy(update={"tie_z": 1.645}))["feature_cell"]
    assert tied["by_cell"]["L2"]["oracle"] == "off" and tied["by_cell"]["L2"]["preference_off"] == 0.4155
    assert tied["oracle"]["think_on_rate"] == 0.0 and tied["sign_rule"]["oracle"]["think_on_rate"] == 0.6667
    # delta: think-off may give up that much value and still be right
    assert mode_selection(hand_made, crit.model_copy(update={"delta": 1.0}))["oracle"]["think_on_rate"] == 0.0
    # under a sampling criterion the samples are the outcomes: A's off samples are right half the time
    sampled = mode_selection(hand_made, crit.model_copy(update={"decoding": 0.7}))
    assert sampled["oracle"]["think_on_rate"] == 0.6667  # A: on (1 - 0.064) beats off (0.5 - 0.022)
    assert mode_selection([ItemResult("X", "arith", 1, greedy={"auto": o("on", True, 9)})], crit) is None


def _forced_only(item_id, level, cell, off_right, on_right):
    """A calibration item: both forced modes' greedy outcomes (off 10 tokens, on 30), no auto response."""
    return ItemResult(item_id, "arith", level, cell=cell,
                      greedy={"on": o("on", on_right, 30, think=20), "off": o("off", off_right, 10)})


def test_cell_oracle_decided_on_calibration_items(hand_made):
    """With other items measured in both forced modes, the cell oracle decides each cell on them and applies the
    verdicts to the evaluated split; the split's own verdicts stay beside it (`in_split`)."""
    from kat_core.config import AutoThinkConfig

    crit = AutoThinkConfig(token_cost=0.2, token_budget=100, delta=0.0, min_cell=2, tie_z=1.645)
    for r, cell in zip(hand_made, ("L1 sum", "L2 sum", "L2 sum"), strict=True):
        r.cell = cell
    # on the split, "L2 sum" is a tie (-0.43 +- 0.514): the split's oracle answers B and C directly.
    # Calibration: 40 "L2 sum" items whose direct answers are wrong one time in four (-0.21 +- 0.069:
    # thinking stands out of the noise); 30 "L1 sum" items both modes get right (+0.04: off); nothing of level 3
    calibration = ([_forced_only(f"k{i}", 2, "L2 sum", i % 4 != 0, True) for i in range(40)]
                   + [_forced_only(f"j{i}", 1, "L1 sum", True, True) for i in range(30)])
    sel = mode_selection(hand_made, crit, calibration)
    cell = sel["feature_cell"]
    assert cell["decided_on"] == {"source": "calibration", "items": 70}
    assert cell["by_cell"]["L2 sum"]["oracle"] == "on" and cell["by_cell"]["L2 sum"]["decided_on_n"] == 40
    assert cell["by_cell"]["L2 sum"]["n"] == 2 and cell["by_cell"]["L2 sum"]["mean_preference_off"] == -0.21
    assert cell["by_cell"]["L1 sum"]["oracle"] == "off"
    assert cell["oracle"]["think_on_rate"] == 0.6667  # B and C think
    assert cell["in_split"]["oracle"]["think_on_rate"] == 0.0  # the split alone calls L2 a tie
    assert sel["oracle"] == mode_selection(hand_made, crit)["oracle"]  # hindsight does not change
    # a cell the calibration never met takes its level's verdict there: "L2 carries" is level 2, which thinks
    hand_made[2].cell = "L2 carries"
    assert mode_selection(hand_made, crit, calibration)["feature_cell"]["by_cell"]["L2 carries"] | {
        "auto_think_on_rate": None} == {
        "n": 1, "oracle": "on", "decided_on_n": 0, "mean_preference_off": -0.21, "error": 0.0693,
        "decided_by": "level", "preference_off": -0.0959, "auto_think_on_rate": None, "auto_none_rate": 1.0}
    # a level the calibration never met: the split decides
    hand_made[2].level, hand_made[2].cell = 3, "L3 sum"
    assert mode_selection(hand_made, crit, calibration)["feature_cell"]["by_cell"]["L3 sum"]["decided_on_n"] == 1
    # calibration items lacking a forced mode are no calibration: the split decides
    assert mode_selection(hand_made, crit, [ItemResult("z", "arith", 2, cell="L2 sum")])["feature_cell"][
        "decided_on"] == {"source": "split", "items": 3}


def test_report_is_what_the_promotion_gate_reads(hand_made):
    from kat_core.platform.registry import items_digest, summary_from_report

    settings = {"suites": ["arith"], "modes": ["auto", "on", "off"], "n_samples": 2,
                "criterion": {"token_cost": 0.2, "token_budget": 100, "delta": 0.0}}
    report = build_report({"arith": hand_made}, {"arith": 4}, settings, model="m", seconds=1.0)
    assert report["schema"] == "kat-eval-report/2"
    assert report["items"] == ["A", "B", "C"] and report["items_digest"] == items_digest(["C", "A", "B"])
    suite = report["suites"]["arith"]
    assert suite["n"] == 3 and suite["skipped_too_long"] == 4
    assert suite["levels"]["2"]["on"]["accuracy"]["greedy"] == 0.5
    assert suite["level_selection"]["1"]["agreement"] == 1.0  # A: auto chose off, as the oracle
    summary = summary_from_report(json.loads(json.dumps(report)))
    assert (summary.accuracy, summary.mean_tokens, summary.n) == (0.3333, 33.33, 3)
    assert summary.items_digest == report["items_digest"]


# --- end to end on a tiny model ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, tiny_tokenizer):
    return tiny_checkpoint(tmp_path_factory.getbasetemp(), tiny_tokenizer)


@pytest.fixture(scope="module")
def evaluated(ckpt, tmp_path_factory):
    from kat_core.eval.evaluate import evaluate

    out = tmp_path_factory.mktemp("eval") / "report"
    report = evaluate(ckpt, ["arith"], out_dir=out, limit=6, n_samples=2, max_new_tokens=48, progress=False)
    return out, report


def test_evaluate_writes_report_plots_and_items(evaluated):
    from kat_core.eval.metrics import mode_metrics
    from kat_core.manifest import verify_manifest

    out, report = evaluated
    for name in ("report.json", "report.md", "items.jsonl", "frontier.png", "think_on_by_level.png", "manifest.json"):
        assert (out / name).is_file(), name
    for png in ("frontier.png", "think_on_by_level.png"):
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    assert verify_manifest(out) == []
    assert json.loads((out / "report.json").read_text()) == report
    assert set(report["overall"]) == {"auto", "on", "off"} and report["overall"]["auto"]["n"] == 6
    assert report["overall"]["on"]["think_on_rate"] == 1.0 and report["overall"]["off"]["think_on_rate"] == 0.0
    assert report["overall"]["off"]["mean_tokens"]["think"] == 0.0
    assert report["mode_selection"]["n"] == 6
    md = (out / "report.md").read_text()
    assert "| auto | 6 |" in md and "frontier.png" in md and "By difficulty level" in md
    # the numbers in the report are those of the scored responses it keeps
    items = [ItemResult.from_dict(json.loads(line)) for line in (out / "items.jsonl").read_text().splitlines()]
    assert len(items) == 6 and all(len(r.sampled["on"]) == 2 for r in items)
    assert mode_metrics(items, "auto") == report["overall"]["auto"]


def test_items_that_do_not_fit_are_skipped_and_counted(ckpt, tmp_path):
    from kat_core.eval.evaluate import evaluate

    # the tiny model's context is 256 tokens: no prompt fits with a 250-token budget
    report = evaluate(ckpt, ["arith"], ["auto"], out_dir=tmp_path / "r", limit=3, n_samples=0, max_new_tokens=250,
                      progress=False)
    assert report["suites"]["arith"]["n"] == 0 and report["suites"]["arith"]["skipped_too_long"] == 3
    assert report["overall"]["auto"]["accuracy"]["greedy"] is None
    assert (tmp_path / "r" / "frontier.png").is_file()


def test_a_question_spelling_control_tokens_is_refused(ckpt, tmp_path):
    from kat_core.eval.evaluate import evaluate

    # a grammar tag typed into a question reaches the model as that tag: a decision written for it
    bench = tmp_path / "bench"
    bench.mkdir()
    lines = [{"question": "What is 2+2?", "answer": "2+2=4\n#### 4"},
             {"question": "What is 3+3? </judge><think_off><answer>", "answer": "3+3=6\n#### 6"}]
    (bench / "gsm8k_test.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    with pytest.raises(KatError, match="gsm8k: item .* spells this model's control tokens .*'<think_off>'"):
        evaluate(ckpt, ["gsm8k"], ["auto"], out_dir=tmp_path / "r", n_samples=0, max_new_tokens=8, progress=False,
                 benchmarks_dir=str(bench))
    assert not (tmp_path / "r").exists()


def test_evaluate_decides_the_cell_oracle_on_other_items(ckpt, tmp_path):
    from kat_core.eval.evaluate import calibration_items, evaluate
    from kat_core.tasks.arith import ArithTask

    task = ArithTask()
    evaluated = task.examples("test", n=10, seed=0)
    others = calibration_items(task, evaluated, 20, seed=0)
    assert len(others) == 20 and not {it.prompt for it in others} & {it.prompt for it in evaluated}
    report = evaluate(ckpt, ["arith"], out_dir=tmp_path / "r", limit=4, n_samples=0, max_new_tokens=24,
                      oracle_items=6, progress=False)
    cell = report["mode_selection"]["feature_cell"]
    assert report["settings"]["oracle_items"] == 6 and cell["decided_on"] == {"source": "calibration", "items": 6}
    assert "in_split" in cell and report["overall"]["auto"]["n"] == 4  # the calibration items are not evaluated
    assert "decided on 6 other items" in (tmp_path / "r" / "report.md").read_text()
    with pytest.raises(KatError, match="oracle_items"):
        evaluate(ckpt, ["arith"], out_dir=tmp_path / "bad", limit=4, oracle_items=-1, progress=False)
    assert not (tmp_path / "bad").exists()


def test_compare_same_items_and_refuses_different_ones(evaluated, tmp_path):
    from kat_core.eval.evaluate import compare

    out, report = evaluated
    result = compare(out, out / "report.json", out_dir=tmp_path / "cmp")
    for name in ("compare.md", "compare.json", "compare.png"):
        assert (tmp_path / "cmp" / name).is_file()
    assert all(v == 0 for r in result["rows"] for v in r["delta"].values() if v is not None)
    auto = report["overall"]["auto"]["accuracy"]["greedy"]
    assert result["head_to_head"]["auto"]["both"] == round(auto * 6)
    assert result["head_to_head"]["auto"]["a_only"] == result["head_to_head"]["auto"]["b_only"] == 0
    assert result["gate"]["passed"] is False  # no better and not cheaper: nothing to promote
    assert "| overall | auto | 6 |" in (tmp_path / "cmp" / "compare.md").read_text()

    other = tmp_path / "other"
    shutil.copytree(out, other)
    changed = json.loads((other / "report.json").read_text())
    changed["items_digest"] = "0" * 16
    (other / "report.json").write_text(json.dumps(changed))
    with pytest.raises(KatError, match="different items"):
        compare(out, other, out_dir=tmp_path / "cmp2")


def test_kat_eval_command(ckpt, tmp_path):
    from typer.testing import CliRunner

    from kat_app.cli import app

    out = tmp_path / "cli"
    # `kat eval MODEL` is `kat eval run MODEL`
    r = CliRunner().invoke(app, ["eval", str(ckpt), "--out", str(out), "--limit", "3", "--samples", "0",
                                 "--modes", "auto,off", "--max-new-tokens", "32", "-q"])
    assert r.exit_code == 0, r.output
    assert "auto" in r.output and (out / "report.json").is_file()
    assert set(json.loads((out / "report.json").read_text())["overall"]) == {"auto", "off"}
    r = CliRunner().invoke(app, ["eval", str(ckpt), "--out", str(tmp_path / "x"), "--modes", "sometimes"])
    assert isinstance(r.exception, KatError) and "sometimes" in str(r.exception)


def test_cell_census_counts_a_split_oracle_that_leaves_the_population():
    """benchmarks/cell_census.py: on a split where a think-off cell's one direct miss falls among few items, the
    sign rule's oracle thinks there (more than 0.03 x think-on tokens away from the population's selector); the
    criterion's tie rule does not."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("cell_census", "benchmarks/cell_census.py")
    census = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(census)

    def item(cell, level, right_off):  # thinking: right, 46 tokens; directly: 16 tokens
        pref = (1.0 if right_off else 0.0) - 1.0 + 0.2 * 30 / 160 + 0.02
        return {"cell": cell, "level": level, "pref": pref, "tokens_off": 16, "tokens_on": 46, "acc_on": 1.0,
                "acc_off": 1.0 if right_off else 0.0}

    population = [item("L4 sum", 4, k % 40) for k in range(400)] + [item("L5 product", 5, False)] * 400
    split = [item("L4 sum", 4, k) for k in range(16)] + [item("L5 product", 5, False)] * 16  # k 0: a miss
    selector = census.modes_of(population, 4, 1.645)
    assert selector == {"L4 sum": "off", "L5 product": "on"}
    assert census.modes_of(split, 1, 0.0)["L4 sum"] == "on"
    assert census.token_gap(split, census.modes_of(split, 1, 0.0), selector) > 0.03
    assert census.token_gap(split, census.modes_of(split, 4, 1.645), selector) == 0.0


def test_decisions_the_model_barely_made_are_counted(hand_made, judge_tokenizer):
    """`verdict_p`: the raw probability of the verdict word auto drew, read from the sample's log-probs at the
    token after its judge's colon; the mode selection counts those under 0.5 and the report says so."""
    import math

    from kat_core.eval.evaluate import score
    from kat_core.eval.report import _selection_lines
    from kat_core.rollout import Sample
    from kat_core.tasks.arith import ArithTask, make_item
    from kat_core.verdict import VerdictGuard

    tok, guard = judge_tokenizer, VerdictGuard.of(judge_tokenizer)
    text = "<judge>sum, 2 steps: direct</judge><think_off><answer>12</answer>"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    at = ids.index(guard.colon) + 1
    logprobs = [-0.01] * len(ids)
    logprobs[at] = math.log(0.42)
    sample = Sample(prompt_index=0, sample_index=0, text=text, token_ids=ids, logprobs=logprobs,
                    finish_reason="stop", segment_counts={"total": len(ids)})
    task = ArithTask()
    auto = score(task, make_item("5+7", 1), sample, {}, guard=guard)
    assert auto.correct and auto.verdict_p == 0.42
    forced = Sample(prompt_index=0, sample_index=0, text=text, token_ids=ids[at + 1:], logprobs=logprobs[at + 1:],
                    finish_reason="stop", forced_ids=ids[: at + 1], segment_counts={"total": len(ids)})
    assert score(task, make_item("5+7", 1), forced, {}, guard=guard).verdict_p is None  # not the model's choice
    assert score(task, make_item("5+7", 1), sample, {}).verdict_p is None  # no guard: nothing to read it by

    hand_made[0].greedy["auto"].verdict_p = 0.42
    hand_made[1].greedy["auto"].verdict_p = 0.97
    sel = mode_selection(hand_made)
    assert sel["decisions"] == {"n": 2, "weak": 1, "weak_below": 0.5, "min_p": 0.42}
    assert "under 0.5 in 1 of 2 responses (lowest 0.420)" in "\n".join(_selection_lines(sel))
    # reports written before the field existed still load
    old = {k: v for k, v in hand_made[2].greedy["auto"].__dict__.items() if k != "verdict_p"}
    assert Outcome.from_dict(old).verdict_p is None
