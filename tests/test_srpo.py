"""Step-SRPO: advantages on hand-built groups, which tokens get which advantage, clipping, the KL estimator,
and a short run that raises the reward."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kat_core.config import SrpoConfig, load_config
from kat_core.rollout import Sample
from kat_core.train.srpo import (
    Scored,
    _micro_batches,
    k3_kl,
    normalise,
    plan_group,
    ppo_token_loss,
    right_mode,
    scalar_advantages,
    step_srpo_advantages,
)
from tests.tiny_autothink import tiny_checkpoint

# no token cost, no smoothing, no std floor: the hand computations below stay short
PLAIN = SrpoConfig(token_cost=0.0, prior_strength=0.0, adv_std_floor=0.0, delta=0.1)


def off(correct: bool, forced: bool = False, tokens: int = 20) -> Scored:
    return Scored(mode="off", forced=forced, correct=correct, well_formed=True, tokens=tokens)


def on(correct: bool, forced: bool = False, tokens: int = 60) -> Scored:
    return Scored(mode="on", forced=forced, correct=correct, well_formed=True, tokens=tokens)


def close(a: list[float], b: list[float], tol: float = 1e-4) -> bool:
    return all(math.isclose(x, y, abs_tol=tol) for x, y in zip(a, b, strict=True))


def test_think_off_right():
    # off 3/3 correct, on 2/2 correct: think-off is majority-correct and within delta -> off is right.
    group = [off(True), off(True), on(True), on(True), off(True, forced=True), on(True, forced=True)]
    a_mode, a_ans, info = step_srpo_advantages(group, (0.5, 0.5), PLAIN)
    assert info["right"] == "off"
    # policy samples' mode rewards 1, 1, 0, 0: mean 0.5, std 0.5 -> +1, +1, -1, -1; forced samples get 0
    assert close(a_mode, [1, 1, -1, -1, 0, 0])
    # with explore_mode_weight > 0 the forced samples take part: rewards 1, 1, 0, 0, 1, 0 -> +-1
    a_mode, *_ = step_srpo_advantages(group, (0.5, 0.5), PLAIN.model_copy(update={"explore_mode_weight": 1.0}))
    assert close(a_mode, [1, 1, -1, -1, 1, -1])
    # every subgroup all correct: nothing to learn about the answers
    assert close(a_ans, [0] * 6)


def test_think_on_needed():
    # off 1/4 correct, on 3/3 correct: think-off is not majority-correct -> on is right
    group = [off(False), off(True), on(True), on(True), off(False, forced=True), on(True, forced=True),
             off(False, forced=True)]
    a_mode, a_ans, info = step_srpo_advantages(group, (0.5, 0.5), PLAIN)
    assert info["right"] == "on"
    assert close(a_mode, [-1, -1, 1, 1, 0, 0, 0])  # rewards 0, 0, 1, 1
    # forced samples in the mode step: rewards 0, 0, 1, 1, 0, 1, 0; mean 3/7, std sqrt(12)/7
    joined = PLAIN.model_copy(update={"explore_mode_weight": 1.0})
    s = math.sqrt(12) / 7
    assert close(step_srpo_advantages(group, (0.5, 0.5), joined)[0],
                 [-3 / 7 / s, -3 / 7 / s, 4 / 7 / s, 4 / 7 / s, -3 / 7 / s, 4 / 7 / s, -3 / 7 / s])
    # a saturated policy (all its own samples chose off) gets a mode signal only from the forced pair
    group = [off(False), off(False), off(True), off(False), on(True, forced=True), off(False, forced=True)]
    assert close(step_srpo_advantages(group, (0.5, 0.5), PLAIN)[0], [0] * 6)
    a_mode = step_srpo_advantages(group, (0.5, 0.5), joined)[0]
    assert a_mode[4] > 2 and all(a < 0 for i, a in enumerate(a_mode) if i != 4)
    # off subgroup (samples 0, 1, 4, 6): rewards 0, 1, 0, 0; mean 0.25, std sqrt(3)/4
    s = math.sqrt(3) / 4
    assert close(a_ans, [-0.25 / s, 0.75 / s, 0, 0, -0.25 / s, 0, -0.25 / s])


def test_all_wrong():
    # nothing is correct: think-off is not majority-correct, so the group says think harder (on)
    group = [off(False), off(False), off(False), on(False)]
    a_mode, a_ans, info = step_srpo_advantages(group, (0.5, 0.5), PLAIN)
    assert info["right"] == "on"
    s = math.sqrt(3) / 4  # rewards 0, 0, 0, 1
    assert close(a_mode, [-0.25 / s] * 3 + [0.75 / s])
    assert close(a_ans, [0, 0, 0, 0])


def test_one_mode_missing_the_prior_decides():
    # nobody sampled think-off: its accuracy is the cold-start prior's; with think-on at 3/4 ...
    group = [on(True), on(True), on(True), on(False)]
    cfg = PLAIN.model_copy(update={"prior_strength": 1.0})
    # ... a prior saying think-off was as good (0.9 vs on (3 + 0.9) / 5 = 0.78) makes off right
    assert right_mode(group, (0.9, 0.9), cfg) == "off"
    a_mode, a_ans, info = step_srpo_advantages(group, (0.9, 0.9), cfg)
    assert info["r_mode"] == [0.0, 0.0, 0.0, 0.0]  # all chose the wrong mode equally: no mode signal
    assert close(a_mode, [0, 0, 0, 0])
    s = math.sqrt(3) / 4  # answer rewards 1, 1, 1, 0 within the on subgroup
    assert close(a_ans, [0.25 / s] * 3 + [-0.75 / s])
    # a prior saying think-off fails keeps on right
    assert right_mode(group, (0.1, 0.9), cfg) == "on"


def test_token_cost_and_malformed():
    cfg = PLAIN.model_copy(update={"token_cost": 0.2, "max_new_tokens": 100})
    bad = Scored(mode=None, forced=False, correct=False, well_formed=False, tokens=100)
    group = [off(True, tokens=10), off(True, tokens=30), bad]
    _, a_ans, info = step_srpo_advantages(group, (0.5, 0.5), cfg)
    # off right; costs 0.02, 0.06, 0.2; no mode at all is worse than the wrong mode (-1)
    assert close(info["r_mode"], [1 - 0.02, 1 - 0.06, -1 - 0.2])
    assert info["r_ans"] == [1.0, 1.0, -1.0]
    # grpo: one scalar reward per sample, answer reward minus token cost, normalised over the group
    adv, rewards = scalar_advantages(group, cfg)
    assert close(rewards, [0.98, 0.94, -1.2])
    assert close(adv, normalise(rewards))


def test_std_floor_keeps_token_noise_small():
    # all chose the right mode; only the token cost differs (0.01 apart): without the floor that is +-1
    rewards = [0.99, 0.98]
    assert close(normalise(rewards), [1, -1], tol=1e-3)  # eps 1e-6 against a std of 0.005
    assert close(normalise(rewards, std_floor=0.1), [0.05, -0.05])


def test_exploration_plan():
    assert plan_group(SrpoConfig(group_size=8, explore_floor=0.25)) == [None] * 6 + ["on", "off"]
    assert plan_group(SrpoConfig(group_size=8, explore_floor=0.0)) == [None] * 8
    assert plan_group(SrpoConfig(group_size=2, explore_floor=0.9)) == [None, None]  # two policy samples stay


def test_ppo_clipping_numerically():
    logp = torch.log(torch.tensor([1.5, 1.5, 0.5, 0.5, 1.1]))
    old = torch.zeros(5)
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0, 1.0])
    loss, clipped = ppo_token_loss(logp, old, adv, clip_eps=0.2)
    # ratio 1.5, A>0: min(1.5, 1.2) -> 1.2 (clipped); ratio 1.5, A<0: min(-1.5, -1.2) -> -1.5 (not clipped);
    # ratio 0.5, A>0: min(0.5, 0.8) -> 0.5; ratio 0.5, A<0: min(-0.5, -0.8) -> -0.8 (clipped); 1.1 inside
    assert torch.allclose(loss, torch.tensor([-1.2, 1.5, -0.5, 0.8, -1.1]), atol=1e-6)
    assert clipped.tolist() == [True, False, False, True, False]
    # a clipped token passes no gradient
    logp = logp.clone().requires_grad_(True)
    ppo_token_loss(logp, old, adv, clip_eps=0.2)[0].sum().backward()
    assert logp.grad[0] == 0 and logp.grad[3] == 0 and logp.grad[1] != 0


def test_k3_kl_is_an_unbiased_kl_estimate():
    p = torch.tensor([0.5, 0.3, 0.2])
    ref = torch.tensor([0.2, 0.5, 0.3])
    exact = float((p * (p / ref).log()).sum())
    per_token = k3_kl(p.log(), ref.log())
    assert (per_token >= 0).all()
    assert math.isclose(float((p * per_token).sum()), exact, rel_tol=1e-5)  # expectation under p = KL(p||ref)
    assert float(k3_kl(p.log(), p.log()).abs().max()) == 0.0


def test_judge_tokens_get_the_mode_advantage_and_response_tokens_the_answer_advantage(tiny_tokenizer,
                                                                                        tmp_path_factory):
    from kat_core.format import THINK_OFF, THINK_ON, forced_prefix, render
    from kat_core.model.checkpoint import load_checkpoint
    from kat_core.train.srpo import _token_logp

    tok = tiny_tokenizer
    model = load_checkpoint(tiny_checkpoint(tmp_path_factory.getbasetemp(), tok))[0]
    mode_ids = (tok.convert_tokens_to_ids(THINK_ON), tok.convert_tokens_to_ids(THINK_OFF))

    def ids(text: str) -> list[int]:
        return tok(text, add_special_tokens=False)["input_ids"]

    class Pair:
        prompt = "What is 3+4?"

    chosen = ids(render("1-digit sum: direct", "off", "3+4=7"))
    forced_pre = ids(forced_prefix("1-digit sum: think", "on"))
    forced_gen = ids("<think>3+4=7</think><answer>3+4=7</answer>")
    samples = [
        Sample(0, 0, "", chosen, [-0.1] * len(chosen), "stop"),
        Sample(0, 1, "", forced_gen, [-0.2] * len(forced_gen), "stop", forced_ids=forced_pre, forced_mode="on"),
    ]
    split = chosen.index(mode_ids[1]) + 1  # judge segment: up to and including <think_off>
    for algo, weight in (("step_srpo", 1.0), ("step_srpo", 0.0), ("decoupled", 1.0)):
        cfg = SrpoConfig(algo=algo, kl_beta=0.0, explore_mode_weight=weight)
        stats: dict[str, float] = {}
        batch = _micro_batches(samples, [off(True), on(True, forced=True)], [(0.7, -0.3), (-0.5, 0.4)], stats,
                               tok, model, None, cfg, mode_ids, [(None, Pair())], 2, 1)[0]
        prompt_len = len(ids(Pair.prompt.strip() + "\n"))
        lo = prompt_len - 1  # target index of the first generated token
        adv, weights = batch["adv"], batch["weights"]
        assert torch.allclose(adv[0, lo:lo + split], torch.tensor(0.7))
        assert torch.allclose(adv[0, lo + split:lo + len(chosen)], torch.tensor(-0.3))
        assert (weights[0, :lo] == 0).all() and (weights[0, lo + len(chosen):] == 0).all()
        assert torch.allclose(batch["old_logp"][0, lo:lo + len(chosen)], torch.tensor(-0.1))
        # the forced sample: generated tokens get the answer advantage; its pre-filled judge segment (lo..lo2)
        # is trained with its mode advantage only by step_srpo with explore_mode_weight > 0
        lo2 = prompt_len + len(forced_pre) - 1
        assert (weights[1, :lo] == 0).all()
        assert torch.allclose(adv[1, lo2:lo2 + len(forced_gen)], torch.tensor(0.4))
        trained_prefix = algo == "step_srpo" and weight > 0
        if algo == "step_srpo":  # token-level: every trained token weighs the same (forced judge: x its weight)
            total = len(chosen) + len(forced_gen) + (len(forced_pre) if trained_prefix else 0)
            assert torch.allclose(weights[0, :lo2 + len(forced_gen)][weights[0, :lo2 + len(forced_gen)] > 0],
                                  torch.tensor(1 / total))
            assert torch.allclose(weights[1, lo2:lo2 + len(forced_gen)], torch.tensor(1 / total))
        else:  # decoupled: control tokens per sample (weight / (samples * its control tokens)), response apart
            assert torch.allclose(weights[0, lo:lo + split], torch.tensor(1 / (2 * split)))
            n_resp = len(chosen) - split + len(forced_gen)
            assert torch.allclose(weights[1, lo2:lo2 + len(forced_gen)], torch.tensor(1 / n_resp))
        if trained_prefix:
            assert torch.allclose(weights[1, lo:lo2], torch.tensor(weight / total))
            assert torch.allclose(adv[1, lo:lo2], torch.tensor(-0.5))
            # its old log-probs are the policy's own (the rollout did not sample them): ratio 1 at the start
            policy = _token_logp(model, batch["input_ids"], batch["attention_mask"], batch["targets"])
            assert torch.allclose(batch["old_logp"][1, lo:lo2], policy[1, lo:lo2])
        else:
            assert (weights[1, :lo2] == 0).all()
        assert "mode_entropy" not in stats  # one forced sample: no on/off pair to compare


def test_mode_entropy_compares_the_forced_pair(tiny_tokenizer, tmp_path_factory):
    from kat_core.format import forced_prefix
    from kat_core.model.checkpoint import load_checkpoint
    from kat_core.train.srpo import _token_logp, binary_entropy

    tok = tiny_tokenizer
    model = load_checkpoint(tiny_checkpoint(tmp_path_factory.getbasetemp(), tok))[0]

    class Pair:
        prompt = "What is 43+5?"

    def ids(text: str) -> list[int]:
        return tok(text, add_special_tokens=False)["input_ids"]

    answer = ids("<answer>48</answer>")
    pre = {m: ids(forced_prefix(f"sum, 3 steps: {'think' if m == 'on' else 'direct'}", m)) for m in ("on", "off")}
    samples = [Sample(0, i, "", answer, [-0.1] * len(answer), "stop", forced_ids=pre[m], forced_mode=m)
               for i, m in enumerate(("on", "off"))]
    stats: dict[str, float] = {}
    _micro_batches(samples, [on(True, forced=True), off(True, forced=True)], [(0.0, 0.0)] * 2, stats, tok, model,
                   None, SrpoConfig(), (0, 1), [(None, Pair())], 2, 1)
    judge = []
    for m in ("on", "off"):
        seq = ids(Pair.prompt + "\n") + pre[m] + answer
        x = torch.tensor([seq])
        lp = _token_logp(model, x, torch.ones_like(x), x[:, 1:])[0]
        p0 = len(ids(Pair.prompt + "\n")) - 1
        judge.append(float(lp[p0:p0 + len(pre[m])].sum()))
    p_on = 1 / (1 + math.exp(judge[1] - judge[0]))
    assert math.isclose(stats["mode_entropy"], binary_entropy(p_on), rel_tol=1e-4)
    assert binary_entropy(0.5) == pytest.approx(math.log(2)) and binary_entropy(1.0) == 0


@pytest.fixture(scope="module")
def smoke_setup(tmp_path_factory, tiny_tokenizer):
    """A smoke dataset and the tiny grammar-shaped checkpoint (levels 1-2: short, learnable)."""
    from kat_core.data.synth import synthesize

    base = tmp_path_factory.mktemp("srpo")
    overrides = ["synth.levels=[1,2]", "srpo.prompts_per_step=8", "srpo.group_size=8", "srpo.max_new_tokens=48",
                 "srpo.kl_beta=0.0", "srpo.temperature=0.7", "srpo.train.lr=1e-3", "srpo.train.steps=40",
                 "srpo.updates_per_rollout=1", "srpo.train.checkpoint_every=20"]
    config = load_config("smoke", overrides)
    synthesize(config, base / "data", progress=False)
    return config, overrides, base / "data", tiny_checkpoint(tmp_path_factory.getbasetemp(), tiny_tokenizer)


def mean_reward(ckpt: Path, config, data: Path) -> float:
    """What Step-SRPO maximises, mode reward + answer reward, on a fixed set of prompts with a fixed seed."""
    from kat_core.model.checkpoint import load_checkpoint
    from kat_core.train.srpo import load_prompts, rollout

    model, tok, _ = load_checkpoint(ckpt)
    pairs = load_prompts(config, data)[:32]
    *_, stats = rollout(model, tok, pairs, lambda item: (0.5, 0.5), config.srpo, seed=123)
    return stats["reward_mode"] + stats["reward_answer"]


def test_short_run_raises_mean_reward(smoke_setup, tmp_path):
    from kat_core.train.srpo import srpo

    config, _, data, ckpt = smoke_setup
    before = mean_reward(ckpt, config, data)
    summary = srpo(config, ckpt, data, tmp_path / "out", progress=False)
    after = mean_reward(tmp_path / "out", config, data)
    # measured: about -0.6 before, +0.4 after (this tiny model gets nothing right, so the group teaches it to
    # think, and to finish its responses)
    assert after > before + 0.3, (before, after)
    lines = [json.loads(x) for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 40
    for key in ("reward_mode", "reward_answer", "accuracy", "mean_tokens", "think_on_rate", "clip_frac",
                "mode_entropy", "think_on_L1", "right_off_share", "right_off_L1"):
        assert key in lines[-1], key
    assert summary["algo"] == "step_srpo"
    # a checkpoint plain transformers loads
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(tmp_path / "out")


def test_cli_runs_each_algorithm_and_rejects_bad_input(smoke_setup, tmp_path):
    config, overrides, data, ckpt = smoke_setup
    base = [sys.executable, "-m", "kat_app.cli", "train", "srpo", "--model", str(ckpt), "--data", str(data),
            "--profile", "smoke", "-q"]
    sets = [x for o in overrides if "steps" not in o for x in ("--set", o)] + ["--set", "srpo.train.steps=2"]
    for algo in ("grpo", "decoupled"):
        out = tmp_path / algo
        r = subprocess.run(base + ["--algo", algo, "--out", str(out)] + sets, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        assert json.loads((out / "srpo.json").read_text())["algo"] == algo
    # bad input: one readable line, exit 1, nothing written
    cases = [
        (["--algo", "ppo"], "ppo"),
        (["--model", str(tmp_path / "missing")], "not a KAT checkpoint"),
        (["--data", str(tmp_path)], "no train-"),
    ]
    for extra, needle in cases:
        out = tmp_path / "bad"
        args = base + ["--out", str(out)] + sets + extra
        r = subprocess.run(args, capture_output=True, text=True)
        assert r.returncode != 0 and needle in r.stderr, r.stderr
        assert "Traceback" not in r.stderr
        assert not out.exists()
