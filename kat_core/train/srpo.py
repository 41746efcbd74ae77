"""The `srpo` stage: paired-mode Step-SRPO, and the baselines it is ablated against, behind one loop.

Every rollout takes `prompts_per_step` prompts from the dataset's held-out RL pool (stratified by level) and,
per algorithm (`ALGORITHMS`), samples some responses the policy chooses the mode of and some forced into a
mode (the judge pre-filled from intent features). Each response splits at its mode token into the *judge
segment* and the *response segment* (think + answer). The *decision* is the tail where the two canonical
forced judges of a prompt differ ("…: think</judge><think_on>" vs "…: direct</judge><think_off>"); the
shared description ("sum, 2 steps") is not the decision and gets no mode advantage.

**step_srpo** (paired-mode, after KAT's HiPO recipe). Per prompt, both modes are measured under the
evaluation's decoding (`autothink.decoding`: one greedy answer per mode, or the forced samples' mean at a
temperature), which gives the prompt's preference (kat_core.autothink, the one decision criterion)

    A_dec = V_off - V_on + delta,      V_m = accuracy_m - token_cost * tokens_m / token_budget

(`delta` is HiPO's bias `omega` toward think-off). The decision is trained on both arms at once: with
`l_m` the policy's log-probability of mode m's decision tail after the shared description and
`p_off = sigmoid(l_off - l_on)`, the decision loss per prompt is

    L_dec = -|A_dec| * log p_better,   better = off if A_dec >= 0 else on

Both arms are measured, so no decision is sampled and none needs an importance weight. With
`decision_target: cell` (the default), a prompt's A_dec is its feature cell's decision value over the whole
RL pool (mean preference + `autothink.tie_z` standard errors, kat_core.autothink.CellTally), measured once
(greedy, both modes) on the starting policy before the first step (`census`; a cell with fewer than
`autothink.min_cell` prompts takes its level's): every prompt of a cell pushes the same
way, towards the evaluation's feature-cell oracle (kat_core.eval.metrics), and every seed aims at the same
cells. With `decision_weighting: sign` each prompt's loss weighs 1 instead of |A_dec|. With per-prompt
targets (`prompt`) the loss is minimised at a *soft* decision, p_off = (sum of A_dec > 0) / (sum of |A_dec|)
over the cell, so a cell near the tie sits at p ~ 1/2 and its greedy decision flips with a seed; and a rare
miss of a direct answer (|A_dec| ~ 1 against ~ 0.05 for each prompt where both modes are right) pushed whole
levels towards thinking (measured: level 4's think-on rate 0.45-0.90 over six seeds where its cells' oracle is
think-off). A sample's own correctness never enters its mode reward, and the verdict does not depend on how
often the policy picks a mode.
The response segment of every sampled response (N forced per mode and the policy's own choices) gets the
answer advantage, mean-centred within the prompt's same-mode samples (forced ones included, so the mode the
policy rarely picks keeps training its answers):

    r_ans = 1 correct, 0 wrong, -1 malformed;   A_ans = r_ans - mean(r_ans over the prompt's same-mode samples)

**grpo**: G policy samples, one scalar reward `V(sample) = correct - token_cost * tokens / token_budget` on
every generated token, normalised within the group. **decoupled** (Thinkless): grpo's advantage, the control
(judge) tokens' loss weighted apart from the response tokens'. **adaptthink** (AdaptThink): G samples forced
half into each mode (the importance-sampling policy picks each mode with 1/2), reward
`correct + delta * [think-off] - mean think-on accuracy of the group`; the decision is trained with the clipped
importance ratio `exp(l_m) / (1/2)`, the response with the same advantage.

Loss per trained token t (PPO clipping; the exact KL to the frozen reference, the vocabulary being small):

    ratio_t = exp(logp_t - logp_old_t)
    loss_t  = -min(ratio_t * A_t, clip(ratio_t, 1 - eps, 1 + eps) * A_t) + beta * KL(pi(.|t) || pi_ref(.|t))

token-level aggregation over the rollout's generated tokens, plus the decision loss averaged over prompts.
`logp_old` and the reference are computed by the same forward pass (dtype and autocast) as the loss, right
after sampling, so the first update's ratio is exactly 1 and its KL exactly 0.

The loop (`srpo`) is the training engine's: `# 1 sample  # 2 score  # 3 advantages` build each rollout's
micro-batches (`_rollout_batches`), `# 4 update` is the engine's step over `make_loss_fn`, `# 5 log` its
metrics line, with the probe: every `probe_every` steps the greedy decision (the sign of `l_on - l_off`, no
generation) per level on a fixed probe set of RL prompts, and its regret against the probe's measured values.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import random
import shutil
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kat_core.autothink import CellTally, cell_of, decide, mode_value, preference_off, tally_for
from kat_core.chat import request_text
from kat_core.config import AutoThinkConfig, KatConfig, SrpoConfig
from kat_core.data.judge import judge_text
from kat_core.errors import KatError
from kat_core.format import forced_prefix, parse
from kat_core.tasks.base import Item, Task

log = logging.getLogger(__name__)

SUMMARY = "srpo.json"
EPS = 1e-6
LEVELS = (1, 2, 3, 4, 5)  # per-level metrics always carry these keys (ranks all-reduce one fixed key list)


# --------------------------------------------------------------------- rewards and advantages (pure)


@dataclass
class Scored:
    """What the rewards need to know about one sampled response."""

    mode: str | None  # the mode the response is in ("on"/"off"), None when it never chose one
    forced: bool  # its mode was pre-filled, not chosen by the policy
    correct: bool
    well_formed: bool
    tokens: int  # response tokens, forced prefix included (what the user pays for)


@dataclass
class Advantages:
    """One prompt's advantages: per sample (judge segment, response segment), and the decision's."""

    judge: list[float]
    response: list[float]
    decision: float = 0.0  # step_srpo: A_dec (>= 0: think-off is better); adaptthink: unused
    decision_by_sample: list[float] | None = None  # adaptthink: each forced sample's advantage for its mode


def answer_reward(s: Scored) -> float:
    if not s.well_formed or s.mode is None:
        return -1.0
    return 1.0 if s.correct else 0.0


def normalise(values: Sequence[float], std_floor: float = 0.0) -> list[float]:
    """(x - mean) / (max(std, std_floor) + eps), population std; all-equal values give zeros."""
    if not values:
        return []
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
    return [(v - mean) / (max(std, std_floor) + EPS) for v in values]


def centred_by_mode(group: Sequence[Scored], rewards: Sequence[float]) -> list[float]:
    """Each reward minus the mean of its same-mode samples (malformed ones form their own subgroup)."""
    members: dict[str | None, list[int]] = defaultdict(list)
    for i, s in enumerate(group):
        members[s.mode].append(i)
    out = [0.0] * len(group)
    for idx in members.values():
        mean = sum(rewards[i] for i in idx) / len(idx)
        for i in idx:
            out[i] = rewards[i] - mean
    return out


def sample_value(s: Scored, crit: AutoThinkConfig) -> float:
    """A whole sample's value under the decision criterion (malformed: -1, worse than any answer)."""
    if not s.well_formed or s.mode is None:
        return -1.0
    return mode_value(float(s.correct), s.tokens, crit)


def step_srpo_advantages(group: Sequence[Scored], values: tuple[tuple[float, float], tuple[float, float]],
                         cfg: SrpoConfig, crit: AutoThinkConfig) -> Advantages:
    """`values` = ((acc_off, tokens_off), (acc_on, tokens_on)) under the evaluation's decoding."""
    return Advantages(judge=[0.0] * len(group), response=centred_by_mode(group, [answer_reward(s) for s in group]),
                      decision=preference_off(values[0], values[1], crit))


def grpo_advantages(group: Sequence[Scored], values, cfg: SrpoConfig, crit: AutoThinkConfig) -> Advantages:
    adv = normalise([sample_value(s, crit) for s in group], cfg.adv_std_floor)
    return Advantages(judge=adv, response=adv)


def adaptthink_advantages(group: Sequence[Scored], values, cfg: SrpoConfig, crit: AutoThinkConfig) -> Advantages:
    """AdaptThink's constrained reward with the group's think-on accuracy as the reference's."""
    on = [s.correct for s in group if s.forced and s.mode == "on"]
    ref_on = sum(on) / len(on) if on else 0.0
    adv = [answer_reward(s) + (crit.delta if s.mode == "off" else 0.0) - ref_on for s in group]
    return Advantages(judge=[0.0] * len(group), response=adv, decision_by_sample=adv)


@dataclass(frozen=True)
class Algorithm:
    """One registered RL algorithm: what it samples per prompt and how it turns scores into advantages."""

    name: str
    plan: Callable[[SrpoConfig], list[str | None]]  # per sample: None (policy's choice) or the forced mode
    advantages: Callable[..., Advantages]
    greedy_values: bool = False  # measures both modes greedily per prompt (under greedy decoding)
    control_weighted: bool = False  # decoupled: judge tokens' loss weighted apart


def _paired_plan(cfg: SrpoConfig) -> list[str | None]:
    return [None] * cfg.policy_samples + ["off", "on"] * cfg.samples_per_mode


def _policy_plan(cfg: SrpoConfig) -> list[str | None]:
    return [None] * cfg.group_size


def _half_forced_plan(cfg: SrpoConfig) -> list[str | None]:
    return ["off", "on"] * max(1, cfg.group_size // 2)


ALGORITHMS: dict[str, Algorithm] = {
    a.name: a for a in (
        Algorithm("step_srpo", _paired_plan, step_srpo_advantages, greedy_values=True),
        Algorithm("grpo", _policy_plan, grpo_advantages),
        Algorithm("decoupled", _policy_plan, grpo_advantages, control_weighted=True),
        Algorithm("adaptthink", _half_forced_plan, adaptthink_advantages),
    )
}
ALGOS = tuple(ALGORITHMS)


# ---------------------------------------------------------------------------------- the token losses


def ppo_token_loss(logp, old_logp, adv, clip_eps: float):
    """-> (per-token clipped surrogate loss, mask of tokens where the clipped branch was taken)."""
    import torch

    ratio = torch.exp(logp - old_logp)
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps) * adv
    return -torch.minimum(unclipped, clipped), clipped < unclipped


def exact_kl(logp_all, ref_logp_all):
    """KL(pi || pi_ref) per position from full log-distributions (..., V): sum_v p (log p - log ref)."""
    import torch

    return (torch.exp(logp_all) * (logp_all - ref_logp_all)).sum(-1)


def decision_loss(l_on, l_off, pref, by_sign: bool = False):
    """-w * log p_better per prompt (tensors of shape (P,)): the two-arm decision loss of step_srpo, with
    w = |A_dec| (`by_sign` False) or 1 (True: every prompt's decision pushes equally hard)."""
    import torch.nn.functional as F

    margin = (l_off - l_on) * torch_sign(pref)  # log-odds of the better arm
    return -(1.0 if by_sign else pref.abs()) * F.logsigmoid(margin)


def torch_sign(x):
    """+1 where think-off is better or tied (x >= 0), -1 elsewhere."""
    import torch

    return torch.where(x >= 0, torch.ones_like(x), -torch.ones_like(x))


def _forward_logp(model, batch):
    """Full log-distributions (B, L-1, V) at every next-token position, in fp32."""
    import torch

    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    return torch.log_softmax(logits[:, :-1].float(), dim=-1)


def _decision_logp(logp_all, batch):
    """(l_on, l_off) per prompt from the decision rows: the summed log-prob of each arm's decision tail."""
    tok = logp_all.gather(-1, batch["targets"].unsqueeze(-1)).squeeze(-1)
    per_row = (tok * batch["decision_mask"]).sum(-1)
    return per_row[batch["decision_on_rows"]], per_row[batch["decision_off_rows"]]


def make_loss_fn(cfg: SrpoConfig) -> Callable:
    """The engine's loss for one micro-batch of a rollout (see `_rollout_batches` for the tensors)."""
    import torch

    def loss_fn(model, batch):
        logp_all = _forward_logp(model, batch)
        logp = logp_all.gather(-1, batch["targets"].unsqueeze(-1)).squeeze(-1)
        mask = batch["weights"] > 0
        per_token, clipped = ppo_token_loss(logp, batch["old_logp"], batch["adv"], cfg.clip_eps)
        loss = (per_token * batch["weights"]).sum()
        parts: dict[str, float] = {"clip_frac": float((clipped & mask).sum() / mask.sum().clamp(min=1))}
        if batch["decision_pref"].numel():
            l_on, l_off = _decision_logp(logp_all, batch)
            if batch["decision_kind"] == "paired":
                dec = decision_loss(l_on, l_off, batch["decision_pref"], by_sign=cfg.decision_weighting == "sign")
            else:  # adaptthink: the clipped importance ratio against the 1/2 - 1/2 sampling policy
                l_arm = torch.where(batch["decision_arm_on"], l_on[batch["decision_prompt"]],
                                    l_off[batch["decision_prompt"]])
                dec, _ = ppo_token_loss(l_arm, torch.full_like(l_arm, math.log(0.5)), batch["decision_pref"],
                                        cfg.clip_eps)
            loss = loss + cfg.decision_weight * (dec * batch["decision_weight"]).sum()
            parts["decision_loss"] = float(dec.detach().mean())
        if cfg.kl_beta > 0:
            kl_mask = batch["kl_weights"]
            kl = exact_kl(logp_all, batch["ref_logp_all"])
            loss = loss + cfg.kl_beta * (kl * kl_mask).sum()
            parts["kl"] = float((kl.detach() * (kl_mask > 0)).sum() / (kl_mask > 0).sum().clamp(min=1))
        return loss, {**parts, **batch["stats"]}

    return loss_fn


# -------------------------------------------------------------------------------------------- prompts


def load_prompts(config: KatConfig, data_dir: Path, validation: Path | None = None) -> list[tuple[Task, Item]]:
    """The dataset's held-out RL prompts (pool.jsonl, use "rl"), `srpo.prompts` of them at most, stratified."""
    from kat_core.data.dataset import read_pool, stratified
    from kat_core.train.pretrain import check_dataset

    check_dataset(data_dir, require_report=False, report_dir=validation)  # refuses a dataset that failed validation
    pairs = read_pool(data_dir, "rl", config.tasks.benchmarks_dir)
    return stratified(pairs, config.srpo.prompts or len(pairs), config.seed)


def split_probe(pairs: list[tuple[Task, Item]], per_level: int) -> tuple[list, list]:
    """(probe, training prompts): the first `per_level` prompts of each level are the fixed probe set."""
    taken: dict[int, int] = defaultdict(int)
    probe, rest = [], []
    for pair in pairs:
        level = pair[1].difficulty
        if taken[level] < per_level:
            taken[level] += 1
            probe.append(pair)
        else:
            rest.append(pair)
    return probe, rest or probe


def level_sampler(pairs: list[tuple[Task, Item]], per_rollout: int, seed: int) -> Callable[[int], list[int]]:
    """rollout index -> prompt indices: levels in turn (the start rotating), a seeded prompt of each."""
    by_level: dict[int, list[int]] = defaultdict(list)
    for i, (_, item) in enumerate(pairs):
        by_level[item.difficulty].append(i)
    levels = sorted(by_level)

    def pick(r: int) -> list[int]:
        rng = random.Random(seed * 1_000_003 + r)
        return [rng.choice(by_level[levels[(r * per_rollout + j) % len(levels)]]) for j in range(per_rollout)]

    return pick


# ------------------------------------------------------------------------------------------ rollouts


def forced_pair(task: Task, item: Item) -> dict[str, str]:
    features = task.intent_features(item)
    return {m: forced_prefix(judge_text(features, m), m) for m in ("on", "off")}


def score(task: Task, item: Item, sample) -> Scored:
    parsed = parse(sample.text)
    mode = parsed.mode if parsed.mode in ("on", "off") else None
    correct = parsed.well_formed and mode is not None and task.verify(item, parsed.answer or "")
    return Scored(mode=mode, forced=sample.forced_mode is not None, correct=bool(correct),
                  well_formed=parsed.well_formed, tokens=sample.segment_counts["total"])


def measure_modes(model, tokenizer, pairs: list[tuple[Task, Item]], max_new_tokens: int, seed: int
                  ) -> list[tuple[tuple[float, float], tuple[float, float]]]:
    """Greedy forced answers in both modes -> per prompt ((acc_off, tokens_off), (acc_on, tokens_on))."""
    from kat_core.rollout import generate

    prompts = [item.prompt for _, item in pairs for _ in ("off", "on")]
    forced = [forced_pair(task, item)[m] for task, item in pairs for m in ("off", "on")]
    samples = generate(model, tokenizer, prompts, forced=forced, n=1, max_new_tokens=max_new_tokens,
                       temperature=0.0, seed=seed, batch_size=len(prompts))
    out = []
    for i, (task, item) in enumerate(pairs):
        off, on = (score(task, item, samples[2 * i + j]) for j in (0, 1))
        out.append(((float(off.correct), off.tokens), (float(on.correct), on.tokens)))
    return out


def sampled_values(group: Sequence[Scored]) -> tuple[tuple[float, float], tuple[float, float]]:
    """The forced samples' mean (accuracy, tokens) per mode (a mode without samples: 0 accuracy, 0 tokens)."""
    def mean(mode: str) -> tuple[float, float]:
        xs = [s for s in group if s.forced and s.mode == mode]
        return (sum(s.correct for s in xs) / len(xs), sum(s.tokens for s in xs) / len(xs)) if xs else (0.0, 0.0)
    return mean("off"), mean("on")


def rollout(model, tokenizer, pairs: list[tuple[Task, Item]], algo: Algorithm, cfg: SrpoConfig,
            crit: AutoThinkConfig, seed: int, tally: CellTally | None = None, draft=None, draft_tokens: int = 0
            ) -> tuple[list[Any], list[Scored], list[Advantages], dict[str, float]]:
    """# 1 sample and # 2 score one rollout, # 3 its advantages -> (samples, scored, advantages per prompt, stats).
    With a `tally` (step_srpo, decision_target cell), each prompt's decision advantage becomes its feature
    cell's preference from the census. `draft` (MTP heads): sampled speculatively, the same distribution
    (kat_core.speculative); the stats then have the drafts' acceptance per segment."""
    from kat_core.rollout import generate

    plan = algo.plan(cfg)
    prompts, forced = [], []
    for task, item in pairs:
        arms = forced_pair(task, item)
        for mode in plan:
            prompts.append(item.prompt)
            forced.append(None if mode is None else arms[mode])
    # 1 sample (the rollout temperature is the criterion's when the modes are valued at a temperature)
    temperature = crit.temperature or cfg.temperature
    speculative = {"draft": draft, "draft_tokens": draft_tokens} if draft is not None else {}
    samples = generate(model, tokenizer, prompts, forced=forced, n=1, max_new_tokens=cfg.max_new_tokens,
                       temperature=temperature, seed=seed, batch_size=len(prompts), **speculative)
    # 2 score
    scored = [score(*pairs[i // len(plan)], s) for i, s in enumerate(samples)]
    groups = [scored[g * len(plan):(g + 1) * len(plan)] for g in range(len(pairs))]
    if algo.greedy_values and crit.temperature == 0:
        values = measure_modes(model, tokenizer, pairs, cfg.max_new_tokens, seed)
    else:
        values = [sampled_values(g) for g in groups]
    # 3 advantages
    advantages = [algo.advantages(g, v, cfg, crit) for g, v in zip(groups, values, strict=True)]
    if tally is not None:
        pool_decisions(pairs, advantages, tally)
    stats = rollout_stats(pairs, groups, values, crit)
    if draft is not None:  # the same keys on every rank: 0 for a segment without drafts
        from kat_core.speculative import acceptance

        rates = acceptance(samples)
        stats.update({f"draft_accept_{seg}": rates.get(seg, {}).get("rate", 0.0) for seg in ("judge", "think",
                                                                                               "answer")})
    return samples, scored, advantages, stats


def pool_decisions(pairs: list[tuple[Task, Item]], advantages: list[Advantages], tally: CellTally) -> None:
    """Give every prompt its feature cell's preference from the census (`census`) as its A_dec. The greedy
    decision a selector can make is per cell: one prompt's rare miss (|A_dec| ~ 1 where the cell's mean is
    ~ +0.05) would otherwise push every similar prompt of its level towards thinking."""
    for (task, item), adv in zip(pairs, advantages, strict=True):
        adv.decision = tally.preference(cell_of(task.intent_features(item)))


def census(model, tokenizer, pairs: list[tuple[Task, Item]], tally: CellTally, cfg: SrpoConfig,
           crit: AutoThinkConfig, seed: int, chunk: int = 64) -> float:
    """Measure both modes of every RL prompt (greedy) into the tally before the first step -> seconds taken.
    A rollout's handful of prompts per cell is too few to settle a cell near the criterion's tie (measured: 5-19
    prompts per level-4 cell over a demo run, whose verdicts then differed from seed to seed); the whole pool,
    measured once on the starting policy, gives every seed the same cells to aim at."""
    t0 = time.perf_counter()
    for lo in range(0, len(pairs), chunk):
        part = pairs[lo:lo + chunk]
        for (task, item), (off, on) in zip(part, measure_modes(model, tokenizer, part, cfg.max_new_tokens, seed),
                                           strict=True):
            tally.add(cell_of(task.intent_features(item)), item.difficulty, preference_off(off, on, crit),
                      on[0] - off[0])
    seconds = time.perf_counter() - t0
    log.info("census: both modes of %d RL prompts measured in %.0f s; cells: %s", len(pairs), seconds,
             ", ".join(f"{c} {v['mode']} ({v['preference_off']:+.3f}, n {v['n']})" for c, v in tally.summary().items()))
    return seconds


def _by_level(flags: list[tuple[int, float]], prefix: str) -> dict[str, float]:
    """{prefix + level: mean} for every level in LEVELS (0 where the rollout has none of it)."""
    by: dict[int, list[float]] = defaultdict(list)
    for level, x in flags:
        by[level].append(float(x))
    return {f"{prefix}{lvl}": (sum(by[lvl]) / len(by[lvl]) if by[lvl] else 0.0) for lvl in LEVELS}


def rollout_stats(pairs, groups: list[list[Scored]], values, crit: AutoThinkConfig) -> dict[str, float]:
    """What the policy did (its own choices), what the sampled answers scored, what the measured modes say
    (`right_off`: the criterion's verdict per prompt). A fixed key list, whatever the rollout holds, so ranks
    can all-reduce it."""
    chosen = [(item.difficulty, s) for (_, item), g in zip(pairs, groups, strict=True) for s in g if not s.forced]
    every = [s for g in groups for s in g]

    def share(xs) -> float:
        xs = list(xs)
        return sum(xs) / len(xs) if xs else 0.0

    right_off = [decide(preference_off(*v, crit)) == "off" for v in values]
    stats = {
        "reward_answer": share(answer_reward(s) for s in every),
        "accuracy": share(s.correct for _, s in chosen),
        "mean_tokens": share(s.tokens for _, s in chosen),
        "think_on_rate": share(s.mode == "on" for _, s in chosen),
        "malformed_rate": share(s.mode is None or not s.well_formed for _, s in chosen),
        "acc_off": share(v[0][0] for v in values),
        "acc_on": share(v[1][0] for v in values),
        "right_off_share": share(right_off),
    }
    levels = [item.difficulty for _, item in pairs]
    stats.update(_by_level([(lvl, s.mode == "on") for lvl, s in chosen], "think_on_L"))
    stats.update(_by_level(list(zip(levels, right_off, strict=True)), "right_off_L"))
    return stats


# ------------------------------------------------------------------------------- tensors for the loss


def _decision_tail(tokenizer, task: Task, item: Item) -> tuple[list[int], dict[str, list[int]], int]:
    """(prompt ids, each arm's forced-prefix ids, where the two arms start to differ)."""
    def encode(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    arms = {m: encode(t) for m, t in forced_pair(task, item).items()}
    common = 0
    while common < min(map(len, arms.values())) and arms["on"][common] == arms["off"][common]:
        common += 1
    return encode(request_text(tokenizer, item.prompt)), arms, common


def _judge_split(s, mode_ids: tuple[int, int]) -> int:
    """Generated tokens in a sample's judge segment: up to and including its first mode token (none when the
    mode was forced; all of them when it never chose one: it failed at the judge step)."""
    if s.forced_ids:
        return 0
    return next((k + 1 for k, t in enumerate(s.token_ids) if t in mode_ids), len(s.token_ids))


def _pad_rows(rows: list[list[int]], pad: int):
    import torch

    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    att = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r)
        att[i, :len(r)] = 1
    return ids, att


def _rollout_batches(samples, advantages: list[Advantages], stats: dict[str, float], tokenizer, model, ref_model,
                     cfg: SrpoConfig, algo: Algorithm, pairs, group: int, chunks: int, mode_ids: tuple[int, int],
                     autocast: Callable) -> list[dict[str, Any]]:
    """The rollout as `chunks` micro-batches, each holding whole prompts: their sampled rows (prompt + forced
    prefix + generated tokens) and two decision rows (prompt + each arm's forced prefix). Tensors aligned with
    the next-token targets (B, L-1): targets, old_logp, adv, weights (PPO tokens), kl_weights, decision_mask;
    ref_logp_all (B, L-1, V); per prompt: decision_pref, decision_weight, the decision rows' indices."""
    import torch

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    tails = [_decision_tail(tokenizer, task, item) for task, item in pairs]
    n_resp = sum(len(s.token_ids) for s in samples)  # every generated token weighs the same
    decision_rows = 2 * len(pairs) if algo.name in ("step_srpo", "adaptthink") else 0
    n_kl = n_resp + sum(len(arms["on"]) + len(arms["off"]) - 2 * c for _, arms, c in tails) * bool(decision_rows)
    n_ctrl = sum(1 for s in samples if not s.forced_ids)
    n_resp_only = sum(len(s.token_ids) - _judge_split(s, mode_ids) for s in samples)  # decoupled: response part
    out = []
    order = list(range(len(pairs)))
    for part in (order[k::chunks] for k in range(chunks)):
        rows, spans = [], []  # spans: (row, start target index, n tokens, kind, payload)
        for p in part:
            ctx, arms, common = tails[p]
            for j in range(group):
                i = p * group + j
                s = samples[i]
                rows.append(ctx + s.forced_ids + s.token_ids)
                spans.append(("sample", len(rows) - 1, len(ctx) + len(s.forced_ids) - 1, i, p))
        dec_on, dec_off = [], []
        if decision_rows:
            for p in part:
                ctx, arms, common = tails[p]
                for m, where in (("on", dec_on), ("off", dec_off)):
                    rows.append(ctx + arms[m])
                    where.append(len(rows) - 1)
                    spans.append(("decision", len(rows) - 1, len(ctx) + common - 1, len(arms[m]) - common, p))
        input_ids, attention = _pad_rows(rows, pad)
        b, width = input_ids.shape
        targets = input_ids[:, 1:].clone()
        adv, weights, kl_w, dec_mask = (torch.zeros((b, width - 1)) for _ in range(4))
        for kind, r, lo, a, p in spans:
            if kind == "sample":
                s, adv_p = samples[a], advantages[p]
                n, j = len(s.token_ids), a - p * group
                split = _judge_split(s, mode_ids)
                adv[r, lo:lo + split] = adv_p.judge[j]
                adv[r, lo + split:lo + n] = adv_p.response[j]
                if algo.control_weighted:  # control tokens per sample, weighted apart; response token-level
                    if split:
                        weights[r, lo:lo + split] = cfg.control_weight / (max(n_ctrl, 1) * split)
                    weights[r, lo + split:lo + n] = 1 / max(n_resp_only, 1)
                else:
                    weights[r, lo:lo + n] = 1 / max(n_resp, 1)
                kl_w[r, lo:lo + n] = 1 / max(n_kl, 1)
            else:
                dec_mask[r, lo:lo + a] = 1.0
                kl_w[r, lo:lo + a] = 1 / max(n_kl, 1)
        batch = {"input_ids": input_ids, "attention_mask": attention, "targets": targets, "adv": adv,
                 "weights": weights * chunks,  # the engine divides by grad_accum
                 "kl_weights": kl_w * chunks, "decision_mask": dec_mask,
                 "decision_on_rows": torch.tensor(dec_on, dtype=torch.long),
                 "decision_off_rows": torch.tensor(dec_off, dtype=torch.long),
                 "stats": stats, "num_tokens": int((weights > 0).sum())}
        if algo.name == "step_srpo":
            batch["decision_kind"] = "paired"
            batch["decision_pref"] = torch.tensor([advantages[p].decision for p in part])
            batch["decision_weight"] = torch.full((len(part),), chunks / len(pairs))
        elif algo.name == "adaptthink":  # one decision term per forced sample, on its arm
            prompt_idx, arm_on, prefs = [], [], []
            for k, p in enumerate(part):
                for j in range(group):
                    s = samples[p * group + j]
                    prompt_idx.append(k)
                    arm_on.append(s.forced_mode == "on")
                    prefs.append(advantages[p].decision_by_sample[j])
            batch.update(decision_kind="importance", decision_prompt=torch.tensor(prompt_idx, dtype=torch.long),
                         decision_arm_on=torch.tensor(arm_on), decision_pref=torch.tensor(prefs),
                         decision_weight=torch.full((len(prefs),), chunks / (len(pairs) * group)))
        else:
            batch.update(decision_kind="none", decision_pref=torch.zeros(0), decision_weight=torch.zeros(0))
        # old and reference log-probs from the same forward (dtype, autocast) as the loss: ratio 1, KL 0 at first
        with torch.no_grad(), autocast():
            was = model.training
            model.eval()
            try:
                old_all = _forward_logp(model, batch)
            finally:
                model.train(was)
            batch["old_logp"] = old_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
            if ref_model is not None:
                batch["ref_logp_all"] = _forward_logp(ref_model, batch)
        out.append(batch)
    return out


# ------------------------------------------------------------------------------------------- the probe


def decision_rows(tokenizer, pairs: list[tuple[Task, Item]],
                  continuation: Callable[[Task, Item, str], list[int]] | None = None) -> dict[str, Any]:
    """Both arms of every prompt's decision as rows (on, off, on, off, ...): the prompt and the forced judge
    of each mode, `decision_mask` over the tokens where the two differ (the verdict word and the mode token).
    `continuation(task, item, mode)`: the token ids each arm goes on with (a response), none by default."""
    import torch

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rows, spans = [], []
    for task, item in pairs:
        ctx, arms, common = _decision_tail(tokenizer, task, item)
        for m in ("on", "off"):
            rows.append(ctx + arms[m] + (continuation(task, item, m) if continuation else []))
            spans.append((len(ctx) + common - 1, len(arms[m]) - common))
    input_ids, attention = _pad_rows(rows, pad)
    mask = torch.zeros((len(rows), input_ids.shape[1] - 1))
    for r, (lo, n) in enumerate(spans):
        mask[r, lo:lo + n] = 1
    return {"input_ids": input_ids, "attention_mask": attention, "targets": input_ids[:, 1:], "decision_mask": mask}


def arm_log_odds(logp_all, batch: dict[str, Any]):
    """`l_on - l_off` per prompt of a `decision_rows` batch, from its rows' full log-distributions."""
    logp = logp_all.gather(-1, batch["targets"].unsqueeze(-1)).squeeze(-1)
    per_row = (logp * batch["decision_mask"]).sum(-1)
    return per_row[0::2] - per_row[1::2]


def decision_log_odds(model, batch: dict[str, Any]):
    """`l_on - l_off` per prompt of a `decision_rows` batch (a tensor, with the graph when gradients are on)."""
    return arm_log_odds(_forward_logp(model, batch), batch)


def probe_decisions(model, tokenizer, probe: list[tuple[Task, Item]], autocast: Callable) -> list[float]:
    """The greedy decision's log-odds `l_on - l_off` per probe prompt (one forward pass, no generation)."""
    import torch

    batch = decision_rows(tokenizer, probe)
    was = model.training
    model.eval()
    try:
        with torch.no_grad(), autocast():
            return decision_log_odds(model, batch).tolist()
    finally:
        model.train(was)


def probe_stats(log_odds: list[float], probe: list[tuple[Task, Item]], values, crit: AutoThinkConfig
                ) -> dict[str, float]:
    """The greedy decision per level (`decide_on_L<k>`) and its regret in value units against the probe's
    measured values (best mode's value minus the chosen one's, averaged)."""
    chosen, regret = [], []
    for lo, (_, item), (off, on) in zip(log_odds, probe, values, strict=True):
        pick = "on" if lo > 0 else "off"
        v = {"off": mode_value(*off, crit) + crit.delta, "on": mode_value(*on, crit)}
        chosen.append((item.difficulty, pick == "on"))
        regret.append(max(v.values()) - v[pick])
    out = _by_level(chosen, "decide_on_L")
    out["decide_regret"] = sum(regret) / len(regret)
    return out


# ---------------------------------------------------------------------------------------- the stage


def srpo(config: KatConfig, checkpoint: str | Path, data_dir: str | Path, out_dir: str | Path, *,
         algo: str | None = None, progress: bool = True, validation: str | Path | None = None) -> dict[str, Any]:
    """RL-train the cold-start `checkpoint` on the dataset's held-out RL prompts into `out_dir` (a checkpoint
    plus metrics.jsonl and srpo.json). `algo` overrides `srpo.algo`."""
    import contextlib

    import torch

    from kat_core.format import THINK_OFF, THINK_ON
    from kat_core.model.checkpoint import LABELS, check_checkpoint, load_checkpoint, save_checkpoint
    from kat_core.speculative import drafter
    from kat_core.train.engine import _use_bf16, train

    cfg = config.srpo.model_copy(update={"algo": algo}) if algo else config.srpo
    if cfg.algo not in ALGORITHMS:
        raise KatError(f"unknown algorithm {cfg.algo!r}; choose one of {', '.join(ALGOS)}")
    method, crit = ALGORITHMS[cfg.algo], config.autothink
    checkpoint, data_dir, out_dir = Path(checkpoint), Path(data_dir), Path(out_dir)
    check_checkpoint(checkpoint)
    if cfg.train.backend == "deepspeed" and cfg.train.zero_stage == 3:
        raise KatError("srpo samples with the model being trained, which ZeRO-3 partitions; use zero_stage <= 2")
    probe, pairs = split_probe(load_prompts(config, data_dir, Path(validation) if validation else None),
                               cfg.probe_per_level)
    model, tokenizer, heads = load_checkpoint(checkpoint)
    # the checkpoint's MTP module drafts the rollouts when asked; it is not trained here, drafts only get rarer
    draft = drafter(heads, config.speculative.draft_tokens, checkpoint)
    mode_ids = (tokenizer.convert_tokens_to_ids(THINK_ON), tokenizer.convert_tokens_to_ids(THINK_OFF))
    ref_model = copy.deepcopy(model).eval().requires_grad_(False) if cfg.kl_beta > 0 else None
    device_type = next(model.parameters()).device.type
    bf16 = cfg.train.backend == "torch" and _use_bf16(cfg.train.bf16, device_type, "torch")
    autocast = ((lambda: torch.autocast(device_type, dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext)

    group = len(method.plan(cfg))
    per_rollout = min(cfg.prompts_per_step, len(pairs))
    rows_per_prompt = group + (2 if method.name in ("step_srpo", "adaptthink") else 0)
    chunks = max(1, min(per_rollout, math.ceil(per_rollout * rows_per_prompt / cfg.train.micro_batch_size)))
    train_cfg = cfg.train.model_copy(update={"grad_accum": chunks})
    pick = level_sampler(pairs, per_rollout, seed=config.seed)
    probe_values = measure_modes(model, tokenizer, probe, cfg.max_new_tokens, config.seed) if probe else []
    cache: dict[tuple[int, int], list[dict[str, Any]]] = {}
    tally = tally_for(crit) if method.name == "step_srpo" and cfg.decision_target == "cell" else None
    census_s = census(model, tokenizer, pairs, tally, cfg, crit, config.seed) if tally is not None else 0.0

    def batches(i: int) -> dict[str, Any]:
        # global micro-batch i -> (optimizer step, micro-batch, rank); one rollout per updates_per_rollout steps
        world = max(1, int(torch.distributed.get_world_size()) if torch.distributed.is_initialized() else 1)
        rank, step0, micro = i % world, i // (chunks * world), (i // world) % chunks
        key = (step0 // cfg.updates_per_rollout, rank)
        if key not in cache:
            cache.clear()
            chosen = [pairs[j] for j in pick(key[0] * world + rank)]
            t0 = time.perf_counter()
            samples, _, advantages, stats = rollout(model, tokenizer, chosen, method, cfg, crit,
                                                    seed=config.seed * 1_000_003 + key[0] * world + rank,
                                                    tally=tally, draft=draft,
                                                    draft_tokens=config.speculative.draft_tokens)
            stats["rollout_s"] = time.perf_counter() - t0
            if probe and key[0] % max(1, cfg.probe_every // cfg.updates_per_rollout) == 0:
                stats.update(probe_stats(probe_decisions(model, tokenizer, probe, autocast), probe, probe_values,
                                         crit))
            cache[key] = _rollout_batches(samples, advantages, stats, tokenizer, model, ref_model, cfg, method,
                                          chosen, group, chunks, mode_ids, autocast)
        return cache[key][micro]

    work = out_dir.parent / f".{out_dir.name}.work"
    log.info("%s: %d RL prompts (+%d probe), %d per rollout x %d samples, %d steps -> %s", cfg.algo, len(pairs),
             len(probe), per_rollout, group, train_cfg.steps, out_dir)
    # 4 update and 5 log: the engine's loop (optimizer steps over the rollouts' micro-batches, metrics.jsonl)
    result = train(model, make_loss_fn(cfg), batches, train_cfg, work, progress=progress, seed=config.seed)
    _check_ranks_agree(result.model, result.world_size)
    if result.rank != 0:
        return result.metrics
    final_probe = probe_stats(probe_decisions(result.model, tokenizer, probe, autocast), probe, probe_values,
                              crit) if probe else {}
    summary = {"algo": cfg.algo, "steps": result.step, "world_size": result.world_size, "final": result.metrics,
               "probe": final_probe, "curve": summarize_curve(result.metrics_path),
               "cells": tally.summary() if tally is not None else None, "census_s": round(census_s, 1)}

    def write_more(tmp: Path) -> None:
        shutil.copy(result.metrics_path, tmp / "metrics.jsonl")
        (tmp / SUMMARY).write_text(json.dumps(summary, indent=2) + "\n")
        if (checkpoint / LABELS).is_file():  # the cold start's labels travel with the model (lineage)
            shutil.copy(checkpoint / LABELS, tmp / LABELS)

    save_checkpoint(out_dir, result.model, tokenizer, heads,
                    extra={"stage": "srpo", "algo": cfg.algo, "final": result.metrics},
                    write_more=write_more,
                    manifest={"stage": "srpo", "config": config, "inputs": {"model": checkpoint, "data": data_dir}})
    shutil.rmtree(work, ignore_errors=True)
    log.info("checkpoint written to %s", out_dir)
    return summary


def weights_checksum(model) -> float:
    """A float64 sum over every parameter, weighted by position: equal weights give equal sums."""
    import torch

    total = torch.zeros((), dtype=torch.float64)
    for k, p in enumerate(model.parameters()):
        total += (k + 1) * p.detach().double().sum()
    return float(total)


def _check_ranks_agree(model, world_size: int) -> None:
    """After a multi-process run every rank must hold the same weights (DDP/ZeRO keep them equal); a
    divergence means the ranks trained different models, so fail rather than save one of them."""
    if world_size <= 1:
        return
    import torch
    import torch.distributed as dist

    mine = torch.tensor([weights_checksum(model)], dtype=torch.float64)
    every = [torch.zeros_like(mine) for _ in range(world_size)]
    dist.all_gather(every, mine)
    if any(abs(float(x) - float(mine)) > 1e-6 * max(1.0, abs(float(mine))) for x in every):
        raise KatError(f"ranks ended with different weights: {[float(x) for x in every]}")
    log.info("all %d ranks hold the same weights (checksum %.6f)", world_size, float(mine))


def summarize_curve(metrics_path: Path, keys: Sequence[str] = ("reward_answer", "accuracy", "mean_tokens",
                                                               "think_on_rate", "decide_regret")) -> dict[str, Any]:
    """First and last quarter means of the main per-step metrics: did the run move them?"""
    lines = [json.loads(x) for x in metrics_path.read_text().splitlines() if x.strip()]
    if not lines:
        return {}
    q = max(1, len(lines) // 4)
    out = {}
    for k in keys:
        head = [x[k] for x in lines[:q] if k in x]
        tail = [x[k] for x in lines[-q:] if k in x]
        if head and tail:
            out[k] = {"first": round(sum(head) / len(head), 4), "last": round(sum(tail) / len(tail), 4)}
    return out
