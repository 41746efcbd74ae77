"""The majority-vote cold start: labels come from the model's own forced samples."""

import json
import math
import statistics

import pytest

from kat_core.autothink import cell_of, preference_off
from kat_core.config import AutoThinkConfig, TrainConfig
from kat_core.train.coldstart import label_items, sft_schedule, summarize
from tests.helpers import kat_here

pytestmark = pytest.mark.usefixtures("one_thread")

# a smoke-sized model that learns enough in two minutes to make the labels meaningful: levels 1 and 5 only, on
# enough items that it cannot simply memorise them (the cold start's prompts are held out from pretraining); no
# MTP head (mtp_depth=0): the labels never read it, and it made each step about 1.5x slower (the MTP path is
# tested in test_pretrain, and the cold start on an MTP checkpoint by the smoke pipeline runs)
SETTINGS = [
    "synth.levels=[1,5]", "synth.families={arith: 1000}", "synth.pool=240", "model.hidden_size=128",
    "model.num_heads=4", "model.intermediate_size=256", "model.mtp_depth=0", "train.steps=400", "train.lr=3e-3",
    "train.weight_decay=0.1",
    "train.micro_batch_size=16", "train.checkpoint_every=300", "coldstart.prompts=60", "coldstart.train.steps=10",
]


def kat(*args):
    """`kat ARGS -q` with SETTINGS, in this process (the CLI's own entry point; no Python started per command)."""
    return kat_here(*args, "-q", *(x for s in SETTINGS for x in ("--set", s)))


def measured(acc_off, acc_on, tokens_off=10, tokens_on=40, answer="1"):
    return {"acc_off": acc_off, "acc_on": acc_on, "tokens_off": tokens_off, "tokens_on": tokens_on, "well_formed": 2,
            "best_off": {"think": None, "answer": answer} if acc_off else None,
            "best_on": {"think": "x", "answer": answer} if acc_on else None}


def test_labels_are_the_cells_verdict_not_the_single_items():
    from kat_core.tasks.arith import ArithTask

    task = ArithTask()
    # the sign of each cell's mean decides here (tie_z 0); the tie band is test_a_think_on_edge_within_the_noise_...
    crit = AutoThinkConfig(token_cost=0.2, token_budget=100, delta=0.0, min_cell=2, tie_z=0.0)
    items = task.examples("pool", n=400)
    by_cell: dict[str, list] = {}
    for it in items:
        by_cell.setdefault(cell_of(task.intent_features(it)), []).append(it)
    easy, hard = (next(v for c, v in by_cell.items() if c.startswith(p) and len(v) >= 3) for p in ("L1", "L5"))
    pairs = [(task, it) for it in easy[:3] + hard[:3]]
    # V = accuracy - 0.2 x tokens / 100: direct right 0.98, wrong -0.02; thinking right 0.92, wrong -0.08
    sampled = [  # L1's cell: +1.06 (only direct right), -0.94 (only thinking right), +0.06 (both): off for all
        measured(1, 0), measured(0, 1), measured(1, 1),
        # L5's cell: -0.94, -0.94, +1.06: on for all three, the prompt that only direct got right included
        measured(0, 1), measured(0, 1), measured(1, 0)]
    labels, sft = label_items(pairs, sampled, crit)
    assert [r["label"] for r in labels] == ["off"] * 3 + ["on"] * 3
    assert [r["mode"] for r in sft] == ["off"] * 3 + ["on"] * 3
    assert labels[1]["preference_off"] == pytest.approx(preference_off((0, 10), (1, 40), crit)) == -0.94
    assert labels[0]["cell"] == cell_of(task.intent_features(easy[0])) and "cell" in labels[0]["reason"]
    # a cell with fewer prompts than min_cell takes its level's verdict
    alone = label_items(pairs[:1] + pairs[3:4], [measured(0, 1), measured(0, 1)],
                        crit.model_copy(update={"min_cell": 5}))[0]
    assert [r["label"] for r in alone] == ["on", "on"] and "level" in alone[0]["reason"]
    # both modes wrong: think-off (the same accuracy, fewer tokens), with the reference answer, counted
    wrong, sft = label_items(pairs[3:4], [measured(0, 0)], crit)
    assert wrong[0]["label"] == "off" and wrong[0]["sft_source"] == "reference"
    assert hard[0].answer in sft[0]["completion"] and summarize(wrong)["from_reference"] == 1
    assert summarize(labels)["prompts"] == 6


def test_a_think_on_edge_within_the_noise_is_a_tie_and_goes_to_think_off():
    """One missed direct answer among 16 prompts, where thinking costs 0.058 of value, tips the sign of the
    cell's mean towards thinking (measured: the evaluation's oracle did so on a level-4 cell whose 91 fresh
    items preferred direct answers by +0.047); the criterion calls that a tie. Eight misses are not noise. A
    cell under min_cell prompts takes its level's verdict: a level-5 cell of 3 prompts, one direct answer
    wrong (alone: a tie), thinks when the rest of its level does."""
    from kat_core.tasks.arith import ArithTask

    task = ArithTask()
    crit = AutoThinkConfig()  # token_cost 0.2 per 160 tokens, delta 0.02, tie_z 1.645, min_cell 4
    cells: dict[str, list] = {}
    for it in task.examples("pool", n=600):
        cells.setdefault(cell_of(task.intent_features(it)), []).append(it)
    largest = lambda level: max((c for c in cells if c.startswith(level)), key=lambda c: len(cells[c]))  # noqa: E731
    l4 = cells[largest("L4")][:16]
    l5 = cells[largest("L5")][:16]
    small = next(v for c, v in cells.items() if c.startswith("L5") and c != largest("L5") and len(v) >= 3)[:3]
    pairs = [(task, it) for it in l4 + l5 + small]
    wrong_off, right_both = measured(0, 1, 16, 46), measured(1, 1, 16, 46)
    sampled = ([wrong_off] + [right_both] * 15  # level 4: one direct miss
               + [wrong_off] * 8 + [right_both] * 8  # level 5: half the direct answers wrong
               + [wrong_off] + [right_both] * 2)  # a small level-5 cell: 1 of 3 direct answers wrong
    labels, _ = label_items(pairs, sampled, crit)
    assert sum(r["preference_off"] for r in labels[:16]) / 16 < 0  # the sign alone would think
    assert {r["label"] for r in labels[:16]} == {"off"} and "+-" in labels[0]["reason"]
    assert {r["label"] for r in labels[16:32]} == {"on"}
    assert {r["label"] for r in labels[32:]} == {"on"} and "level" in labels[32]["reason"]
    sign_only, _ = label_items(pairs, sampled, crit.model_copy(update={"tie_z": 0.0}))
    assert {r["label"] for r in sign_only} == {"on"}


def test_a_tie_where_thinking_is_measurably_more_accurate_thinks():
    """A value tie can hide a real loss: direct answers wrong 5 times in 40 where thinking costs 80 more tokens
    (mean preference -0.005 +- 0.053, a tie) is an accuracy edge of 0.125 +- 0.053 for thinking, which stands
    out of the noise: accuracy breaks the tie (`accuracy_first`). One miss in 16 (0.06 +- 0.06) does not."""
    from kat_core.tasks.arith import ArithTask

    task = ArithTask()
    crit = AutoThinkConfig()  # token_cost 0.2 per 160 tokens, delta 0.02, tie_z 1.645, accuracy_first
    cells: dict[str, list] = {}
    for it in task.examples("pool", n=1500):
        cells.setdefault(cell_of(task.intent_features(it)), []).append(it)
    l4, l3 = (max((v for c, v in cells.items() if c.startswith(lv)), key=len) for lv in ("L4", "L3"))
    assert len(l4) >= 40 and len(l3) >= 16
    pairs = [(task, it) for it in l4[:40] + l3[:16]]
    wrong_off, right_both = measured(0, 1, 16, 96), measured(1, 1, 16, 96)
    sampled = [wrong_off] * 5 + [right_both] * 35 + [wrong_off] + [right_both] * 15
    labels, _ = label_items(pairs, sampled, crit)
    assert -0.01 < sum(r["preference_off"] for r in labels[:40]) / 40 < 0  # a value tie
    assert {r["label"] for r in labels[:40]} == {"on"} and {r["label"] for r in labels[40:]} == {"off"}
    cheap_first, _ = label_items(pairs, sampled, crit.model_copy(update={"accuracy_first": False}))
    assert {r["label"] for r in cheap_first} == {"off"}


@pytest.mark.slow
def test_coldstart_on_a_quickly_trained_model(tmp_path):
    assert kat("data", "synth", "--out", tmp_path / "data").returncode == 0
    r = kat("train", "pretrain", "--data", tmp_path / "data", "--out", tmp_path / "ckpt")
    assert r.returncode == 0, r.stderr
    r = kat("train", "coldstart", "--model", tmp_path / "ckpt", "--data", tmp_path / "data", "--out", tmp_path / "cs")
    assert r.returncode == 0, r.stderr
    labels = [json.loads(line) for line in (tmp_path / "cs" / "labels.jsonl").read_text().splitlines()]
    assert len(labels) == 60
    crit = AutoThinkConfig()
    def mean_error(values):
        return statistics.fmean(values), statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else 0.0

    for row in labels:  # every label is its cell's verdict over the measured values: think-on needs its edge
        cell = [r["preference_off"] for r in labels if r["cell"] == row["cell"]]  # beyond tie_z standard errors
        level = [r["preference_off"] for r in labels if r["difficulty"] == row["difficulty"]]
        mean, error = mean_error(cell)
        mean, error = (mean, error) if len(cell) >= crit.min_cell else mean_error(level)  # too few: the level
        assert row["label"] == ("off" if mean + crit.tie_z * error >= -1e-3 else "on")
    prompts = {r["prompt"] for r in labels}
    pretrained_on = {json.loads(x)["prompt"] for x in (tmp_path / "data" / "train-00000.jsonl").read_text().split("\n")
                     if x.strip()}
    assert not prompts & pretrained_on  # held out from pretraining
    level1 = [r for r in labels if r["difficulty"] == 1]
    level5 = [r for r in labels if r["difficulty"] == 5]
    # what the labels rest on was measured: direct answers work at level 1 and not at level 5 (thinking is at
    # least as good there); which mode wins where is the criterion's call above, not this test's (a model this
    # small gets few level-5 items right in either mode, and then the cheap mode is the right one)
    mean = lambda rows, key: sum(r[key] for r in rows) / len(rows)  # noqa: E731
    assert mean(level1, "acc_off") > 0.5 > mean(level5, "acc_off")
    assert mean(level5, "acc_on") >= mean(level5, "acc_off")
    # measured, not assigned: the outcomes differ between prompts of a level (greedy: right or wrong per mode)
    assert len({(r["acc_off"], r["acc_on"]) for r in level1}) > 1
    summary = json.loads((tmp_path / "cs" / "coldstart.json").read_text())
    assert set(summary["per_level"]) == {"1", "5"}
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(tmp_path / "cs")
    assert summary["rounds"] == [{"round": 1, "measured_on": "the student", "trained": True}]

    # a second round relabels the same prompts on the first round's model: the one just made (deterministic),
    # measured here by hand
    from kat_core.config import load_config
    from kat_core.data.dataset import read_pool
    from kat_core.manifest import sha256_file
    from kat_core.model.checkpoint import load_checkpoint
    from kat_core.train.coldstart import sample_both_modes, stratified

    config = load_config("smoke", SETTINGS)
    pairs = stratified(read_pool(tmp_path / "data", "coldstart"), 60, config.seed)
    model, tokenizer, _ = load_checkpoint(tmp_path / "cs")
    expected, _ = label_items(pairs, sample_both_modes(model.eval(), tokenizer, pairs, config.coldstart,
                                                       config.autothink, config.seed), config.autothink)
    r = kat("train", "coldstart", "--model", tmp_path / "ckpt", "--data", tmp_path / "data", "--out",
            tmp_path / "cs2", "--set", "coldstart.rounds=2")
    assert r.returncode == 0, r.stderr
    relabelled = [json.loads(line) for line in (tmp_path / "cs2" / "labels.jsonl").read_text().splitlines()]
    assert [(r["acc_off"], r["acc_on"], r["label"]) for r in relabelled] == \
        [(r["acc_off"], r["acc_on"], r["label"]) for r in expected]
    changed = sum(a["label"] != b["label"] for a, b in zip(labels, expected, strict=True))
    second = json.loads((tmp_path / "cs2" / "coldstart.json").read_text())["rounds"][1]
    assert second["labels_changed"] == changed and second["trained"] == bool(changed)
    weights = [sha256_file(tmp_path / d / "model.safetensors") for d in ("cs", "cs2")]
    same_weights = weights[0] == weights[1]
    assert same_weights == (not changed)  # trained on only where a label changed

    # the decision check measures the fine-tuned model on the RL prompts; it trains only where a cell disagrees
    r = kat("train", "coldstart", "--model", tmp_path / "ckpt", "--data", tmp_path / "data", "--out",
            tmp_path / "cs3", "--set", "coldstart.align_steps=20")
    assert r.returncode == 0, r.stderr
    decisions = json.loads((tmp_path / "cs3" / "coldstart.json").read_text())["decisions"]
    assert decisions["checked_on"] == len(read_pool(tmp_path / "data", "rl"))
    assert "decisions checked on" in r.stderr
    aligned = sha256_file(tmp_path / "cs3" / "model.safetensors") != weights[0]
    assert aligned == bool(decisions["disagreed"]) == (decisions["trained_steps"] > 0), decisions


def test_a_later_round_reports_the_cells_whose_label_changed():
    from kat_core.train.coldstart import relabelled

    before = [{"cell": "L4 a", "label": "on"}, {"cell": "L4 a", "label": "on"}, {"cell": "L3 b", "label": "off"},
              {"cell": "L5 c", "label": "on"}]
    after = [{"cell": "L4 a", "label": "off"}, {"cell": "L4 a", "label": "off"}, {"cell": "L3 b", "label": "on"},
             {"cell": "L5 c", "label": "on"}]
    assert relabelled(before, after) == {"labels_changed": 3, "cells_changed": {"L3 b": "off -> on",
                                                                                "L4 a": "on -> off"}}
    assert relabelled(before, before) == {"labels_changed": 0, "cells_changed": {}}
    with pytest.raises(ValueError):  # not the same prompts
        relabelled(before, after[:2])


def test_min_well_formed_fails_the_stage_on_a_model_without_the_grammar(tmp_path, tiny_tokenizer):
    """An untrained model writes no well-formed answer: with coldstart.min_well_formed set the stage stops with
    one readable error before any training, and writes nothing."""
    from kat_core.config import load_config
    from kat_core.data.synth import synthesize
    from kat_core.errors import KatError
    from kat_core.model import build_model, save_checkpoint
    from kat_core.train.coldstart import coldstart

    config = load_config("smoke", ["coldstart.prompts=4", "coldstart.max_new_tokens=8",
                                   "coldstart.min_well_formed=0.5", "synth.pool=20"])
    synthesize(config, tmp_path / "data", progress=False)
    save_checkpoint(tmp_path / "ckpt", build_model(config.model, tiny_tokenizer), tiny_tokenizer)
    with pytest.raises(KatError, match=r"only 0 of 8 forced answers .* well formed"):
        coldstart(config, tmp_path / "ckpt", tmp_path / "out", data_dir=tmp_path / "data", progress=False)
    assert not (tmp_path / "out").exists()


def test_thinking_examples_are_copied_under_the_models_own_misreadings(judge_tokenizer):
    """Each misreading of a thinking prompt the model wrote itself gives a copy of the prompt's SFT example: the
    same verified trace and answer under that judge, whose judge and decision weigh 0 in the loss (the trace
    learns to follow the request; no wrong description or verdict is taught). Direct examples get no copy."""
    from kat_core.format import parse
    from kat_core.tasks.arith import ArithTask
    from kat_core.train.data import encode_example

    task = ArithTask()
    crit = AutoThinkConfig(token_cost=0.2, token_budget=100, delta=0.0, min_cell=1, tie_z=0.0)
    items = [it for it in task.examples("pool", n=400) if it.difficulty in (1, 5)][:40]
    pairs = [(task, it) for it in items]
    sampled = [measured(1, 1) if it.difficulty == 1 else measured(0, 1) for it in items]
    labels, plain = label_items(pairs, sampled, crit)
    easy, hard = (next(it for it in items if it.difficulty == d) for d in (1, 5))
    misread = {hard.id: ["product plus sum, 9 steps", "product, 2 steps, carries"], easy.id: ["sum, 5 steps"]}
    _, noisy = label_items(pairs, sampled, crit, misread)
    assert noisy[:len(plain)] == plain and label_items(pairs, sampled, crit, {})[1] == plain
    copies = noisy[len(plain):]
    original = next(r for r in plain if r["source_id"] == hard.id)
    assert [parse(c["completion"]).judge for c in copies] == ["product plus sum, 9 steps: think",
                                                               "product, 2 steps, carries: think"]
    want = parse(original["completion"])
    for copy in copies:
        got = parse(copy["completion"])
        assert copy["judge_context"] and got.well_formed and got.mode == "on" == original["mode"]
        assert (got.think, got.answer) == (want.think, want.answer) and copy["source_id"] == hard.id
        # trained: exactly a tail of the example after the mode token (think, answer, EOS), as in the original
        weighted, whole = encode_example(copy, judge_tokenizer), encode_example(original, judge_tokenizer)
        first = next(k for k, w in enumerate(weighted.weights) if w > 0)
        assert all(w > 0 for w in weighted.weights[first:])
        trained = judge_tokenizer.decode(weighted.ids[first:])
        assert "judge" not in trained and "think_o" not in trained and want.answer in trained
        assert weighted.ids[first:] == whole.ids[len(whole.ids) - len(weighted.ids) + first:]
    # a misreading that is a direct-labelled prompt's own thinking description brings that prompt's verified trace
    # under it, masked alike: else the description would be seen in SFT only over the other cell's traces
    from kat_core.data.judge import judge_text

    easy_on = judge_text(task.intent_features(easy), "on")
    _, balanced = label_items(pairs, sampled, crit, {hard.id: [easy_on.rpartition(":")[0]]})
    extra = balanced[len(plain):]
    assert len(extra) == 1 + sum(1 for _, it in pairs if it.difficulty == 1
                                 and judge_text(task.intent_features(it), "on") == easy_on)
    for copy in extra:
        got = parse(copy["completion"])
        assert copy["judge_context"] and got.judge == easy_on and got.mode == "on" and got.think == "x"
    # the copies come on top: the SFT's steps grow by their share, so each labelled example is seen as often
    train = TrainConfig(steps=180)
    assert sft_schedule(train, plain) == train
    assert sft_schedule(train, noisy).steps == math.ceil(180 * len(noisy) / len(plain))


def test_own_judges_keeps_the_models_misreadings_only(tmp_path_factory, judge_tokenizer):
    """own_judges samples the model's own judges and keeps, per prompt, each description that differs from the
    canonical one, once (an untrained model misreads nearly everything; a description it gets right is dropped)."""
    from kat_core.data.judge import judge_text
    from kat_core.model.checkpoint import load_checkpoint
    from kat_core.tasks.arith import ArithTask
    from kat_core.train.coldstart import own_judges
    from tests.tiny_autothink import tiny_checkpoint

    model, tokenizer, _ = load_checkpoint(tiny_checkpoint(tmp_path_factory.getbasetemp(), judge_tokenizer))
    task = ArithTask(levels=[1, 3, 4])
    pairs = [(task, it) for it in task.examples("pool", n=12)]
    found = own_judges(model.eval(), tokenizer, pairs, k=3, seed=0)
    assert set(found) <= {it.id for _, it in pairs}
    for task_, item in pairs:
        canonical = judge_text(task_.intent_features(item), "on").rpartition(":")[0]
        descriptions = found.get(item.id, [])
        assert canonical not in descriptions and len(set(descriptions)) == len(descriptions) <= 3
        assert all(d and "<" not in d for d in descriptions)
    assert own_judges(model, tokenizer, pairs, k=3, seed=0) == found  # seeded
