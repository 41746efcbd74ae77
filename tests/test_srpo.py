"""Step-SRPO: advantages on hand-built groups, the two-arm decision loss, which tokens get which advantage,
clipping, the exact KL, a short run that follows the decision criterion, and a two-process run."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kat_core.autothink import CellTally, cell_of
from kat_core.config import AutoThinkConfig, SrpoConfig, load_config
from kat_core.rollout import Sample
from kat_core.train.srpo import (
    ALGORITHMS,
    Advantages,
    Scored,
    _rollout_batches,
    adaptthink_advantages,
    decision_loss,
    exact_kl,
    grpo_advantages,
    make_loss_fn,
    normalise,
    pool_decisions,
    ppo_token_loss,
    step_srpo_advantages,
)
from tests.helpers import free_port, kat, kat_here
from tests.tiny_autothink import tiny_checkpoint

CRIT = AutoThinkConfig(token_cost=0.2, token_budget=100, delta=0.0)


def off(correct: bool, forced: bool = False, tokens: int = 20) -> Scored:
    return Scored(mode="off", forced=forced, correct=correct, well_formed=True, tokens=tokens)


def on(correct: bool, forced: bool = False, tokens: int = 60) -> Scored:
    return Scored(mode="on", forced=forced, correct=correct, well_formed=True, tokens=tokens)


def close(a: list[float], b: list[float], tol: float = 1e-4) -> bool:
    return len(a) == len(b) and all(abs(x - y) <= tol for x, y in zip(a, b, strict=True))


def test_step_srpo_decision_comes_from_the_measured_values_not_the_samples():
    # the policy chose off twice (one right), forced samples: off right/wrong, on right/right
    group = [off(True), off(False), off(True, forced=True), off(False, forced=True), on(True, forced=True),
             on(True, forced=True)]
    # greedy: off right in 20 tokens (V = 0.96), on right in 60 (V = 0.88): off, by 0.08
    adv = step_srpo_advantages(group, ((1.0, 20), (1.0, 60)), SrpoConfig(), CRIT)
    assert adv.decision == pytest.approx(0.08)
    assert adv.judge == [0.0] * 6  # the shared description gets no mode advantage
    # answers: mean-centred within the same mode, forced samples included (off: mean 1/2; on: all right)
    assert close(adv.response, [0.5, -0.5, 0.5, -0.5, 0.0, 0.0])
    # the same samples with greedy think-off wrong: on is right, whatever the samples said
    assert step_srpo_advantages(group, ((0.0, 20), (1.0, 60)), SrpoConfig(), CRIT).decision == pytest.approx(-0.92)
    # delta (HiPO's omega) tips a near tie to think-off
    near = ((0.95, 20), (1.0, 60))  # V_off 0.91, V_on 0.88 -> off; with on cheaper than it is, delta decides
    assert step_srpo_advantages(group, ((0.9, 20), (1.0, 60)), SrpoConfig(), CRIT).decision == pytest.approx(-0.02)
    assert step_srpo_advantages(group, ((0.9, 20), (1.0, 60)), SrpoConfig(),
                                CRIT.model_copy(update={"delta": 0.05})).decision == pytest.approx(0.03)
    assert step_srpo_advantages(group, near, SrpoConfig(), CRIT).decision > 0


def test_malformed_samples_form_their_own_answer_subgroup():
    bad = Scored(mode=None, forced=False, correct=False, well_formed=False, tokens=100)
    adv = step_srpo_advantages([off(True), off(False), bad], ((1, 20), (1, 60)), SrpoConfig(), CRIT)
    assert close(adv.response, [0.5, -0.5, 0.0])


def test_baseline_rewards():
    group = [off(True), on(True), on(False), Scored(None, False, False, False, 100)]
    cfg = SrpoConfig(adv_std_floor=0.0)
    g = grpo_advantages(group, None, cfg, CRIT)
    values = [0.96, 0.88, -0.12, -1.0]  # V of each sample; malformed -1
    assert close(g.response, normalise(values)) and g.judge == g.response
    # adaptthink: correct + delta [off] - the group's think-on accuracy (forced on samples: 1 of 2 right)
    forced = [off(True, True), off(False, True), on(True, True), on(False, True)]
    a = adaptthink_advantages(forced, None, cfg, CRIT.model_copy(update={"delta": 0.05}))
    assert close(a.response, [0.55, -0.45, 0.5, -0.5]) and a.decision_by_sample == a.response
    plans = {name: algo.plan(SrpoConfig(group_size=4, samples_per_mode=2, policy_samples=1))
             for name, algo in ALGORITHMS.items()}
    assert plans == {"step_srpo": [None, "off", "on", "off", "on"], "grpo": [None] * 4, "decoupled": [None] * 4,
                     "adaptthink": ["off", "on", "off", "on"]}


def test_decision_loss_finds_the_cells_summed_preference():
    """Over the prompts of one cell the two-arm loss is minimised where the greedy decision is the sign of the
    summed preference (the feature-cell oracle), however the single prompts disagree."""
    for prefs, expected in (([0.9, -0.2, -0.2, -0.2], "off"), ([0.3, 0.3, -0.7], "on"), ([0.05] * 5, "off")):
        margin = torch.zeros((), requires_grad=True)  # log-odds of think-off: one logit for the whole cell
        opt = torch.optim.SGD([margin], lr=0.5)
        for _ in range(300):
            opt.zero_grad()
            pref = torch.tensor(prefs)
            loss = decision_loss(torch.zeros(len(prefs)), margin.expand(len(prefs)), pref).mean()
            loss.backward()
            opt.step()
        got = float(margin.detach())
        assert ("off" if got >= 0 else "on") == expected, (prefs, got)
    # a decided prompt costs nothing more: the loss falls to 0 as the better arm's probability goes to 1
    assert float(decision_loss(torch.tensor([-20.0]), torch.tensor([20.0]), torch.tensor([0.5]))) < 1e-9


def test_pooled_targets_make_a_cell_decide_firmly():
    """Per-prompt targets leave a near-tie cell at a soft decision (24 prompts at +0.05 and
    one miss at -0.93, p_off = 0.56): a little noise flips its greedy choice. Pooled by cell, every prompt pushes the
    same way and the cell's log-odds keep growing."""
    prefs = [0.05] * 24 + [-0.93]

    def trained_margin(targets: list[float]) -> float:
        margin = torch.zeros((), requires_grad=True)
        opt = torch.optim.SGD([margin], lr=2.0)
        for _ in range(400):
            opt.zero_grad()
            loss = decision_loss(torch.zeros(len(targets)), margin.expand(len(targets)), torch.tensor(targets))
            loss.mean().backward()
            opt.step()
        return float(margin.detach())

    soft = trained_margin(prefs)
    assert soft == pytest.approx(math.log(24 * 0.05 / 0.93), abs=0.05)  # the soft optimum, p_off = 0.56
    mean = sum(prefs) / len(prefs)
    assert trained_margin([mean] * len(prefs)) > 3 * soft
    # weighted by sign, not |A|: a cell that loses by 0.05 pushes as hard as one that wins by 0.9
    near, far = (float(decision_loss(torch.zeros(1), torch.zeros(1), torch.tensor([a]), by_sign=True))
                 for a in (0.05, 0.9))
    assert near == far == pytest.approx(math.log(2))


def test_decisions_pool_by_feature_cell():
    """Every prompt of a cell gets the cell's mean preference (one miss in four makes the cell think); a cell
    with fewer than min_cell prompts gets its level's mean."""
    from kat_core.tasks.arith import ArithTask

    task = ArithTask()
    by_cell: dict[str, list] = {}
    for it in task.examples("pool", n=400):
        by_cell.setdefault(cell_of(task.intent_features(it)), []).append(it)
    l4 = sorted((c for c in by_cell if c.startswith("L4")), key=lambda c: -len(by_cell[c]))
    big, lone = by_cell[l4[0]][:4], by_cell[l4[1]][:1]
    tally = CellTally(min_cell=3)
    for it, pref in zip(big + lone, (0.05, 0.05, 0.05, -0.93, 0.5), strict=True):
        tally.add(cell_of(task.intent_features(it)), it.difficulty, pref)
    advs = [Advantages(judge=[], response=[], decision=1.0) for _ in range(5)]
    pool_decisions([(task, it) for it in big + lone], advs, tally)
    assert [a.decision for a in advs] == pytest.approx([-0.195] * 4 + [(0.15 - 0.93 + 0.5) / 5])
    assert tally.summary()[l4[0]] == {"n": 4, "mean": -0.195, "error": 0.245, "by": "cell", "preference_off": -0.195,
                                      "mode": "on"}
    # under the criterion's tie band (tie_z standard errors) that cell's edge for thinking is within the noise
    banded = CellTally(min_cell=3, tie_z=1.645)
    for it, pref in zip(big, (0.05, 0.05, 0.05, -0.93), strict=True):
        banded.add(cell_of(task.intent_features(it)), it.difficulty, pref)
    assert banded.summary()[l4[0]]["mode"] == "off"
    assert banded.preference(l4[0]) == pytest.approx(-0.195 + 1.645 * 0.245, abs=1e-3)
    assert tally.summary()[l4[1]]["n"] == 1


def test_ppo_clipping_numerically():
    logp = torch.log(torch.tensor([1.5, 0.5, 1.0]))
    old = torch.zeros(3)
    adv = torch.tensor([1.0, -1.0, 2.0])
    loss, clipped = ppo_token_loss(logp, old, adv, clip_eps=0.2)
    # ratio 1.5, A>0 -> min(1.5, 1.2) = 1.2; ratio 0.5, A<0 -> min(-0.5, -0.8) = -0.8; ratio 1 -> 2
    assert torch.allclose(loss, torch.tensor([-1.2, 0.8, -2.0]))
    assert clipped.tolist() == [True, True, False]


def test_exact_kl():
    p = torch.tensor([0.5, 0.3, 0.2])
    ref = torch.tensor([0.2, 0.5, 0.3])
    assert math.isclose(float(exact_kl(p.log(), ref.log())), float((p * (p / ref).log()).sum()), rel_tol=1e-6)
    assert float(exact_kl(p.log(), p.log())) == 0.0


def _tiny(tiny_tokenizer, tmp_path_factory):
    from kat_core.model.checkpoint import load_checkpoint

    return load_checkpoint(tiny_checkpoint(tmp_path_factory.getbasetemp(), tiny_tokenizer))[0]


def test_which_tokens_get_which_advantage(tiny_tokenizer, tmp_path_factory):
    import contextlib

    from kat_core.format import THINK_OFF, THINK_ON, render
    from kat_core.tasks.arith import ArithTask
    from kat_core.train.srpo import _decision_tail, forced_pair

    tok = tiny_tokenizer
    model = _tiny(tiny_tokenizer, tmp_path_factory)
    task = ArithTask()
    item = task.examples("pool", n=5)[0]
    mode_ids = (tok.convert_tokens_to_ids(THINK_ON), tok.convert_tokens_to_ids(THINK_OFF))

    def ids(text: str) -> list[int]:
        return tok(text, add_special_tokens=False)["input_ids"]

    chosen = ids(render("sum, 2 steps: direct", "off", "7"))
    arms = forced_pair(task, item)
    forced_gen = ids("<think>3+4=7</think><answer>7</answer>")
    samples = [Sample(0, 0, "", chosen, [-0.1] * len(chosen), "stop"),
               Sample(0, 1, "", forced_gen, [-0.2] * len(forced_gen), "stop", forced_ids=ids(arms["on"]),
                      forced_mode="on")]
    adv = Advantages(judge=[0.7, 0.0], response=[-0.3, 0.4], decision=0.25)
    split = chosen.index(mode_ids[1]) + 1  # judge segment: up to and including <think_off>
    ctx, tails, common = _decision_tail(tok, task, item)
    for name in ("step_srpo", "decoupled"):
        cfg = SrpoConfig(algo=name, kl_beta=0.1)
        batch = _rollout_batches(samples, [adv], {}, tok, model, model, cfg, ALGORITHMS[name], [(task, item)], 2, 1,
                                 mode_ids, contextlib.nullcontext)[0]
        lo = len(ctx) - 1  # target index of the first generated token of the policy's sample
        a, w = batch["adv"], batch["weights"]
        assert torch.allclose(a[0, lo:lo + split], torch.tensor(0.7))
        assert torch.allclose(a[0, lo + split:lo + len(chosen)], torch.tensor(-0.3))
        lo2 = len(ctx) + len(ids(arms["on"])) - 1
        assert (w[1, :lo2] == 0).all()  # the forced prefix is not trained as a sample
        assert torch.allclose(a[1, lo2:lo2 + len(forced_gen)], torch.tensor(0.4))
        n = len(chosen) + len(forced_gen)
        if name == "step_srpo":
            assert torch.allclose(w[w > 0], torch.tensor(1 / n))  # token-level: every generated token the same
            # two decision rows: the mask covers each arm's tail after the shared description, nothing else
            assert batch["decision_on_rows"].tolist() == [2] and batch["decision_off_rows"].tolist() == [3]
            for row, m in ((2, "on"), (3, "off")):
                mask = batch["decision_mask"][row]
                assert int(mask.sum()) == len(tails[m]) - common > 0
                assert mask[len(ctx) + common - 1] == 1 and mask[len(ctx) + common - 2] == 0
            assert batch["decision_pref"].tolist() == [0.25]
        else:  # decoupled: control tokens per sample (weight / (policy samples * its control tokens)), response apart
            assert torch.allclose(w[0, lo:lo + split], torch.tensor(1 / split))
            assert torch.allclose(w[1, lo2:lo2 + len(forced_gen)], torch.tensor(1 / (n - split)))
            assert batch["decision_pref"].numel() == 0
        # old and reference log-probs are the model's own: the first update has ratio 1 and KL 0
        loss, parts = make_loss_fn(cfg)(model, batch)
        assert parts["kl"] == 0.0 and parts["clip_frac"] == 0.0
        assert torch.isfinite(loss)


def test_the_decision_loss_moves_the_greedy_decision(tiny_tokenizer, tmp_path_factory):
    """A few optimizer steps on prompts whose measured values say 'think' turn the greedy decision to think-on
    on those prompts (the probe reads it without generating)."""
    import contextlib

    from kat_core.format import THINK_OFF, THINK_ON
    from kat_core.tasks.arith import ArithTask
    from kat_core.train.srpo import probe_decisions

    tok = tiny_tokenizer
    model = _tiny(tiny_tokenizer, tmp_path_factory)
    task = ArithTask()
    pairs = [(task, it) for it in task.examples("pool", n=6)]
    mode_ids = (tok.convert_tokens_to_ids(THINK_ON), tok.convert_tokens_to_ids(THINK_OFF))
    cfg = SrpoConfig(kl_beta=0.0, policy_samples=0, samples_per_mode=1)
    before = probe_decisions(model, tok, pairs, contextlib.nullcontext)
    answer = tok("<answer>1</answer>", add_special_tokens=False)["input_ids"]
    samples = [Sample(p, j, "", answer, [-1.0] * len(answer), "stop",
                      forced_ids=tok(_arm(t, it, m), add_special_tokens=False)["input_ids"], forced_mode=m)
               for p, (t, it) in enumerate(pairs) for j, m in enumerate(("off", "on"))]
    advs = [Advantages(judge=[0.0, 0.0], response=[0.0, 0.0], decision=-0.9) for _ in pairs]  # think-on is better
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(8):
        batch = _rollout_batches(samples, advs, {}, tok, model, None, cfg, ALGORITHMS["step_srpo"], pairs, 2, 1,
                                 mode_ids, contextlib.nullcontext)[0]
        opt.zero_grad()
        loss, _ = make_loss_fn(cfg)(model, batch)
        loss.backward()
        opt.step()
    after = probe_decisions(model, tok, pairs, contextlib.nullcontext)
    assert all(a > b for a, b in zip(after, before, strict=True)) and all(a > 0 for a in after), (before, after)


def _arm(task, item, mode):
    from kat_core.train.srpo import forced_pair

    return forced_pair(task, item)[mode]


@pytest.fixture(scope="module")
def smoke_setup(tmp_path_factory, tiny_tokenizer):
    """A smoke dataset and the tiny grammar-shaped checkpoint (levels 1-2: short, learnable)."""
    from kat_core.data.synth import synthesize

    base = tmp_path_factory.mktemp("srpo")
    overrides = ["synth.levels=[1,2]", "srpo.prompts_per_step=8", "srpo.group_size=4", "srpo.max_new_tokens=48",
                 "srpo.temperature=0.7", "srpo.train.lr=1e-3", "srpo.train.steps=12", "srpo.probe_every=4",
                 "srpo.probe_per_level=6", "srpo.updates_per_rollout=1", "srpo.train.checkpoint_every=20"]
    config = load_config("smoke", overrides)
    synthesize(config, base / "data", progress=False)
    return config, overrides, base / "data", tiny_checkpoint(tmp_path_factory.getbasetemp(), tiny_tokenizer)


def test_short_run_follows_the_criterion(smoke_setup, tmp_path):
    """The tiny model gets (almost) nothing right in either mode, so think-off is right almost everywhere (the
    same accuracy for fewer tokens): the run must keep the greedy decision there (the probe's regret stays ~0)."""
    from kat_core.train.srpo import srpo

    config, _, data, ckpt = smoke_setup
    summary = srpo(config, ckpt, data, tmp_path / "out", progress=False)
    lines = [json.loads(x) for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == config.srpo.train.steps
    for key in ("reward_answer", "accuracy", "mean_tokens", "think_on_rate", "clip_frac", "kl", "decision_loss",
                "think_on_L1", "think_on_L5", "right_off_share", "right_off_L1", "acc_off", "acc_on"):
        assert key in lines[-1], key
    probes = [x for x in lines if "decide_regret" in x]
    assert len(probes) >= config.srpo.train.steps // config.srpo.probe_every
    assert lines[0]["kl"] == 0.0 and lines[0]["clip_frac"] == 0.0  # one dtype: ratio 1 and KL 0 at the start
    assert summary["algo"] == "step_srpo" and summary["probe"]["decide_regret"] <= probes[0]["decide_regret"]
    assert summary["probe"]["decide_regret"] <= 0.05, summary["probe"]
    # the census measured every RL prompt of the pool once: its cells are the decision's targets
    from kat_core.train.srpo import load_prompts, split_probe

    rl = split_probe(load_prompts(config, data), config.srpo.probe_per_level)[1]
    assert sum(c["n"] for c in summary["cells"].values()) == len(rl)
    assert {c["mode"] for c in summary["cells"].values()} <= {"on", "off"}
    # a checkpoint plain transformers loads
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(tmp_path / "out")


def test_two_processes_end_with_the_same_weights(smoke_setup, tmp_path):
    """The RL stage on 2 CPU processes (gloo): 3 steps, rollout statistics all-reduced over one key list, and
    every rank holding the same weights at the end (srpo checks it and fails otherwise)."""
    config, overrides, data, ckpt = smoke_setup
    script = Path(__file__).parent / "srpo_two_ranks.py"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                        str(free_port()), str(script), str(ckpt), str(data), str(tmp_path / "out"), *overrides],
                       capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((tmp_path / "out" / "srpo.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 3
    assert "all 2 ranks hold the same weights" in r.stderr


def _without_pool(data: Path, to: Path) -> Path:
    """A copy of a dataset as an older synthesis wrote it: shards, no held-out pool."""
    import shutil

    shutil.copytree(data, to)
    (to / "pool.jsonl").unlink()
    return to


def _empty_dir(path):
    path.mkdir()
    return path


def test_cli_runs_each_algorithm_and_rejects_bad_input(smoke_setup, tmp_path):
    config, overrides, data, ckpt = smoke_setup
    base = ["train", "srpo", "--model", ckpt, "--data", data, "--profile", "smoke", "-q"]
    sets = [x for o in overrides if "steps" not in o for x in ("--set", o)] + ["--set", "srpo.train.steps=2"]
    from kat_core.train.srpo import srpo

    for algo in ("grpo", "decoupled"):  # in-process: the same stage the CLI calls
        short = load_config("smoke", [*overrides, "srpo.train.steps=2"])
        assert srpo(short, ckpt, data, tmp_path / algo, algo=algo, progress=False)["algo"] == algo
    r = kat(*base, "--algo", "adaptthink", "--out", tmp_path / "adaptthink", *sets)  # the real command
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "adaptthink" / "srpo.json").read_text())["algo"] == "adaptthink"
    # bad input: one readable line, exit 1 (2 for a usage error), nothing written; in this process, as `kat` runs
    cases = [
        (["--algo", "ppo"], "ppo"),
        (["--model", tmp_path / "missing"], "not a KAT checkpoint"),
        (["--data", _empty_dir(tmp_path / "empty")], "no train-"),
        (["--data", _without_pool(data, tmp_path / "old-data")], "no pool.jsonl"),
    ]
    for extra, needle in cases:
        out = tmp_path / "bad"
        r = kat_here(*base, "--out", out, *sets, *extra)
        assert r.returncode in (1, 2) and needle in r.stderr, r.stderr
        assert "Traceback" not in r.stderr
        assert not out.exists()
