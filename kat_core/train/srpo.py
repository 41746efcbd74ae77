"""The `srpo` stage: Step-SRPO reinforcement learning, and the two baselines behind the same interface.

One rollout: `prompts_per_step` prompts x G samples from the current policy (a share `explore_floor` of
each group sampled in a forced mode, half think-on, half think-off). Each sample is verified and split at
its mode token into the **judge segment** (judge text + mode token) and the **response segment** (think +
answer). Then, per group (DESIGN.md, "Step-SRPO"):

    answer reward   r_ans  = 1 correct, 0 wrong, -1 malformed or not in the chosen mode
    group accuracy  acc_m  = (correct in mode m + s * prior_m) / (samples in mode m + s)
                    (prior_m: the cold-start label's accuracy for the prompt; s = prior_strength, so a mode
                    nobody sampled is filled in by the prior alone)
    right mode      think-off iff acc_off > 0.5 and acc_off >= acc_on - delta   (the cold start's vote)
    mode reward     r_mode = 1 right mode, 0 the other, -1 none - token_cost * tokens / max_new_tokens
    advantages      A_mode = normalise r_mode over the group's policy-chosen samples -> judge tokens
                    A_ans  = normalise r_ans within the same-mode subgroup            -> response tokens

`normalise(x) = (x - mean) / (max(std, adv_std_floor) + eps)` with the population std.

Forced (exploration) samples count in the group accuracies and in their mode's subgroup, so every group
measures both modes (the mode reward rests on evidence, not only on the prior) and the mode the policy rarely
picks keeps training its answers. By default (`explore_mode_weight = 0`) their judge segment was not sampled,
gets no gradient and stays out of the mode baseline, so exploration cannot bias the mode policy.
`explore_mode_weight > 0` lets them into the mode step: they join the mode baseline and their pre-filled
judge segment is trained with their mode advantage at that weight (its old log-probs are the policy's own).
The idea: a saturated mode choice, whose own samples never try the other mode, can still be moved by the
forced pair, scored by the same group verdict. Measured (issue 6's note): on the demo model the choice is
not saturated (its `mode_entropy` metric is 0.2-0.35 nats during RL), weight 1 changed no decision, and on the
smoke test's tiny model it stopped the run from raising its reward; hence off by default.

Baselines: `grpo` gives every token of a sample one advantage, its group-normalised scalar reward
`r_ans - token_cost * tokens / max_new_tokens`; `decoupled` uses that same advantage but weights the
control (judge) tokens' loss apart from the response tokens' (Thinkless' decoupled GRPO), so the few
control tokens are not drowned by long responses.

Loss per generated token t (PPO clipping, k3 KL estimate to the frozen reference policy):

    ratio_t = exp(logp_t - logp_old_t)
    loss_t  = -min(ratio_t * A_t, clip(ratio_t, 1 - eps, 1 + eps) * A_t) + beta * (exp(q_t) - q_t - 1),
              q_t = logp_ref_t - logp_t

aggregated token-level: summed over every generated token of the rollout, divided by their number (so long
and short samples weigh per token, not per sample). `logp_old` are the rollout engine's log-probabilities
(the raw model distribution the samples were drawn from), so the first update of a rollout has ratio 1 up
to float rounding and clipping bites from the second (`updates_per_rollout`).

The loop is the training engine's (torch or DeepSpeed ZeRO 0-2): `batches(i)` draws the rollout for the
step (cached across its updates and micro-batches) with the model being trained.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import shutil
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kat_core.config import KatConfig, SrpoConfig
from kat_core.errors import KatError
from kat_core.tasks.base import Item, Task

log = logging.getLogger(__name__)

ALGOS = ("step_srpo", "grpo", "decoupled")
SUMMARY = "srpo.json"
EPS = 1e-6


# --------------------------------------------------------------------- rewards and advantages (pure)


@dataclass
class Scored:
    """What the rewards need to know about one sample."""

    mode: str | None  # the mode the response is in ("on"/"off"), None when it never chose one
    forced: bool  # its mode was pre-filled (an exploration sample), not chosen by the policy
    correct: bool
    well_formed: bool
    tokens: int  # response tokens, forced prefix included (what the user pays for)


def answer_reward(s: Scored) -> float:
    if not s.well_formed or s.mode is None:
        return -1.0
    return 1.0 if s.correct else 0.0


def normalise(values: Sequence[float], std_floor: float = 0.0) -> list[float]:
    """(x - mean) / (max(std, std_floor) + eps), population std; all-equal values give zeros.

    The floor keeps differences far below the reward scale small: in a group whose samples all chose the
    same mode, the token-cost term is the only difference, and dividing by its tiny std would hand some
    samples +-1.5 advantages for a few tokens of length (seen on the demo model: accuracy fell from 0.77 to
    0.0 in 12 steps without the floor)."""
    if not values:
        return []
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
    return [(v - mean) / (max(std, std_floor) + EPS) for v in values]


def group_accuracy(group: Sequence[Scored], mode: str, prior: float, strength: float) -> float:
    """Accuracy of the group's samples in `mode`, shrunk towards the prior by `strength` pseudo-samples."""
    in_mode = [s for s in group if s.mode == mode]
    if not in_mode and strength == 0:
        return prior
    return (sum(s.correct for s in in_mode) + strength * prior) / (len(in_mode) + strength)


def right_mode(group: Sequence[Scored], prior: tuple[float, float], cfg: SrpoConfig) -> str:
    """The mode the group says was right; `prior` = (acc_off, acc_on) from the cold-start labels."""
    from kat_core.train.coldstart import majority_vote

    acc_off = group_accuracy(group, "off", prior[0], cfg.prior_strength)
    acc_on = group_accuracy(group, "on", prior[1], cfg.prior_strength)
    return majority_vote(acc_off, acc_on, cfg.delta)[0]


def mode_reward(s: Scored, right: str) -> float:
    """1 for the right mode, 0 for the other, -1 for never choosing one (worse than either)."""
    if s.mode is None:
        return -1.0
    return 1.0 if s.mode == right else 0.0


def token_penalty(s: Scored, cfg: SrpoConfig) -> float:
    return cfg.token_cost * s.tokens / cfg.max_new_tokens


def step_srpo_advantages(group: Sequence[Scored], prior: tuple[float, float], cfg: SrpoConfig
                         ) -> tuple[list[float], list[float], dict[str, Any]]:
    """-> (mode advantage, answer advantage, info) per sample of one prompt's group. With
    `explore_mode_weight == 0` forced samples are outside the mode baseline and get mode advantage 0."""
    right = right_mode(group, prior, cfg)
    r_mode = [mode_reward(s, right) - token_penalty(s, cfg) for s in group]
    in_mode_step = [i for i, s in enumerate(group) if cfg.explore_mode_weight > 0 or not s.forced]
    a_mode = [0.0] * len(group)
    for i, a in zip(in_mode_step, normalise([r_mode[i] for i in in_mode_step], cfg.adv_std_floor), strict=True):
        a_mode[i] = a
    r_ans = [answer_reward(s) for s in group]
    a_ans = [0.0] * len(group)
    subgroups: dict[str | None, list[int]] = defaultdict(list)
    for i, s in enumerate(group):
        subgroups[s.mode].append(i)
    for members in subgroups.values():
        for i, a in zip(members, normalise([r_ans[i] for i in members], cfg.adv_std_floor), strict=True):
            a_ans[i] = a
    return a_mode, a_ans, {"right": right, "r_mode": r_mode, "r_ans": r_ans}


def scalar_advantages(group: Sequence[Scored], cfg: SrpoConfig) -> tuple[list[float], list[float]]:
    """grpo / decoupled: -> (advantage, reward) per sample, one reward for the whole sample."""
    rewards = [answer_reward(s) - token_penalty(s, cfg) for s in group]
    return normalise(rewards, cfg.adv_std_floor), rewards


# ---------------------------------------------------------------------------------- the token loss


def ppo_token_loss(logp, old_logp, adv, clip_eps: float):
    """-> (per-token clipped surrogate loss, mask of tokens where the clipped branch was taken)."""
    import torch

    ratio = torch.exp(logp - old_logp)
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps) * adv
    return -torch.minimum(unclipped, clipped), clipped < unclipped


def k3_kl(logp, ref_logp):
    """Per-token k3 estimate of KL(pi || pi_ref) from samples of pi: exp(q) - q - 1, q = ref - logp; >= 0,
    unbiased, and low-variance when the two are close."""
    import torch

    q = ref_logp - logp
    return torch.exp(q) - q - 1


def make_loss_fn(cfg: SrpoConfig) -> Callable:
    """The engine's loss for one micro-batch of a rollout (see `_micro_batches` for the tensors)."""
    import torch

    def loss_fn(model, batch):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       use_cache=False).logits[:, :-1].float()
        logp = torch.log_softmax(logits, dim=-1).gather(-1, batch["targets"].unsqueeze(-1)).squeeze(-1)
        mask = batch["weights"] > 0
        per_token, clipped = ppo_token_loss(logp, batch["old_logp"], batch["adv"], cfg.clip_eps)
        parts: dict[str, float] = {}
        if cfg.kl_beta > 0:
            kl = k3_kl(logp, batch["ref_logp"])
            per_token = per_token + cfg.kl_beta * kl
            parts["kl"] = float((kl.detach() * mask).sum() / mask.sum().clamp(min=1))
        loss = (per_token * batch["weights"]).sum()
        parts["clip_frac"] = float((clipped & mask).sum() / mask.sum().clamp(min=1))
        return loss, {**parts, **batch["stats"]}

    return loss_fn


def binary_entropy(p: float) -> float:
    return -sum(q * math.log(q) for q in (p, 1 - p) if q > 0)


# -------------------------------------------------------------------------------- prompts and priors


def load_prompts(config: KatConfig, data_dir: Path, validation: Path | None = None) -> list[tuple[Task, Item]]:
    """The dataset's prompts as task items (with their verifiers): the training items whose ids the dataset
    holds, `srpo.prompts` of them at most (stratified over difficulty levels)."""
    from kat_core.data.synth import training_items
    from kat_core.manifest import read_manifest
    from kat_core.train.coldstart import stratified
    from kat_core.train.pretrain import check_dataset

    ids = {r.get("source_id", r["id"]) for r in check_dataset(data_dir, require_report=False, report_dir=validation)}
    # the items are drawn as the dataset drew them (its seed), whatever seed this run samples with
    data_seed = (read_manifest(data_dir) or {}).get("seed", config.seed)
    pairs = [(task, item) for task, item in training_items(config.model_copy(update={"seed": data_seed}))
             if item.id in ids]
    if not pairs:
        raise KatError(f"dataset {data_dir} holds none of this profile's training prompts (was it synthesized "
                       "with another profile or seed?)")
    return stratified(pairs, config.srpo.prompts or len(pairs), config.seed)


def mode_priors(labels_path: Path) -> Callable[[Item], tuple[float, float]]:
    """(acc_off, acc_on) prior for an item from the cold start's labels.jsonl: the item's own row, else the
    mean of its difficulty level, else 0.5 each (no information)."""
    rows = [json.loads(line) for line in labels_path.read_text().splitlines() if line.strip()] \
        if labels_path.is_file() else []
    if not rows:
        log.warning("no cold-start labels at %s: the mode prior is uninformative (0.5, 0.5)", labels_path)
    by_id = {r["id"]: (r["acc_off"], r["acc_on"]) for r in rows}
    by_level: dict[int, list[tuple[float, float]]] = defaultdict(list)
    for r in rows:
        by_level[r["difficulty"]].append((r["acc_off"], r["acc_on"]))
    level_mean = {lvl: (sum(a for a, _ in v) / len(v), sum(b for _, b in v) / len(v)) for lvl, v in by_level.items()}

    def prior(item: Item) -> tuple[float, float]:
        return by_id.get(item.id) or level_mean.get(item.difficulty) or (0.5, 0.5)

    return prior


# ------------------------------------------------------------------------------------------ rollouts


def plan_group(cfg: SrpoConfig) -> list[str | None]:
    """Per sample of a group: None (the policy chooses) or the forced mode. The exploration floor is rounded
    to an even number of forced samples, half in each mode, and always leaves two policy samples."""
    forced = min(2 * round(cfg.explore_floor * cfg.group_size / 2), cfg.group_size - 2)
    return [None] * (cfg.group_size - forced) + ["on", "off"] * (forced // 2)


def score(task: Task, item: Item, sample) -> Scored:
    from kat_core.format import parse

    parsed = parse(sample.text)
    mode = parsed.mode if parsed.mode in ("on", "off") else None
    correct = parsed.well_formed and mode is not None and task.verify(item, parsed.answer or "")
    return Scored(mode=mode, forced=sample.forced_mode is not None, correct=bool(correct),
                  well_formed=parsed.well_formed, tokens=sample.segment_counts["total"])


def rollout(model, tokenizer, pairs: list[tuple[Task, Item]], prior: Callable[[Item], tuple[float, float]],
            cfg: SrpoConfig, seed: int) -> tuple[list[Any], list[Scored], list[tuple[float, float]], dict[str, float]]:
    """Sample one rollout and score it -> (samples, scored, (mode advantage, answer advantage or the scalar
    advantage twice) per sample, statistics)."""
    from kat_core.data.judge import judge_text
    from kat_core.format import forced_prefix
    from kat_core.rollout import generate

    plan = plan_group(cfg)
    prompts, forced = [], []
    for task, item in pairs:
        for mode in plan:
            prompts.append(item.prompt)
            forced.append(None if mode is None else forced_prefix(judge_text(task.intent_features(item), mode), mode))
    samples = generate(model, tokenizer, prompts, forced=forced, n=1, max_new_tokens=cfg.max_new_tokens,
                       temperature=cfg.temperature, seed=seed, batch_size=len(prompts))
    scored = [score(*pairs[i // len(plan)], s) for i, s in enumerate(samples)]

    advantages: list[tuple[float, float]] = []
    rewards_mode, rewards_answer, right_off = [], [], []
    for g, (_, item) in enumerate(pairs):
        group = scored[g * len(plan):(g + 1) * len(plan)]
        if cfg.algo == "step_srpo":
            a_mode, a_ans, info = step_srpo_advantages(group, prior(item), cfg)
            advantages += list(zip(a_mode, a_ans, strict=True))
            rewards_mode += [r for r, s in zip(info["r_mode"], group, strict=True) if not s.forced]
            rewards_answer += info["r_ans"]
            right_off.append((item.difficulty, info["right"] == "off"))
        else:
            adv, reward = scalar_advantages(group, cfg)
            advantages += [(a, a) for a in adv]
            rewards_mode += [r for r, s in zip(reward, group, strict=True) if not s.forced]
            rewards_answer += [answer_reward(s) for s in group]
    return samples, scored, advantages, _rollout_stats(pairs, plan, scored, rewards_mode, rewards_answer, right_off)


def _share_by_level(flags: list[tuple[int, bool]], prefix: str) -> dict[str, float]:
    """{prefix + level: share of True} over (difficulty level, flag) pairs."""
    by_level: dict[int, list[bool]] = defaultdict(list)
    for level, flag in flags:
        by_level[level].append(flag)
    return {f"{prefix}{level}": sum(v) / len(v) for level, v in sorted(by_level.items())}


def _rollout_stats(pairs, plan, scored: list[Scored], rewards_mode, rewards_answer, right_off) -> dict[str, float]:
    """What the policy did (its own choices only; forced samples excluded)."""
    chosen = [(pairs[i // len(plan)][1].difficulty, s) for i, s in enumerate(scored) if not s.forced]
    stats = {
        "reward_mode": sum(rewards_mode) / len(rewards_mode),
        "reward_answer": sum(rewards_answer) / len(rewards_answer),
        "accuracy": sum(s.correct for _, s in chosen) / len(chosen),
        "mean_tokens": sum(s.tokens for _, s in chosen) / len(chosen),
        "think_on_rate": sum(s.mode == "on" for _, s in chosen) / len(chosen),
        "malformed_rate": sum(s.mode is None or not s.well_formed for _, s in chosen) / len(chosen),
    }
    if right_off:  # the groups' verdicts: where the mode reward is pushing each level
        stats["right_off_share"] = sum(off for _, off in right_off) / len(right_off)
        stats.update(_share_by_level(right_off, "right_off_L"))
    stats.update(_share_by_level([(level, s.mode == "on") for level, s in chosen], "think_on_L"))
    return stats


def _micro_batches(samples, scored: list[Scored], advantages, stats: dict[str, float], tokenizer, model, ref_model,
                   cfg: SrpoConfig, mode_ids: tuple[int, int], pairs, group: int, chunks: int) -> list[dict[str, Any]]:
    """The rollout as `chunks` micro-batches of right-padded tensors aligned with the next-token targets:
    input_ids/attention_mask (B, L); targets, old_logp, ref_logp, adv, weights (B, L-1).

    Trained tokens: every generated token; for step_srpo with `explore_mode_weight > 0` also a forced
    sample's pre-filled judge segment (its old log-probs are the policy's, computed here: the rollout engine
    did not sample them). Adds `mode_entropy` to `stats`: per group, the policy's probability of the forced
    think-on judge segment against the forced think-off one (they differ in the decision), as a binary
    entropy; the mode token itself is ~deterministic once the judge has said "think" or "direct"."""
    import numpy as np
    import torch

    from kat_core.format import prompt_text

    def encode(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    train_prefix = cfg.algo == "step_srpo" and cfg.explore_mode_weight > 0
    rows = []
    for i, s in enumerate(samples):
        ctx = encode(prompt_text(pairs[i // group][1].prompt)) + s.forced_ids
        # judge segment: the generated tokens up to and including the first mode token (none when forced;
        # all of them when no mode was chosen: the sample failed at the judge step)
        split = 0
        if not s.forced_ids:
            split = next((j + 1 for j, t in enumerate(s.token_ids) if t in mode_ids), len(s.token_ids))
        rows.append((ctx, s, split, len(s.forced_ids) if train_prefix else 0))

    total = sum(len(s.token_ids) + prefix for _, s, _, prefix in rows)
    n_resp = sum(len(s.token_ids) - split for _, s, split, _ in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    judge_logp: dict[int, float] = {}  # forced sample -> the policy's log-prob of its pre-filled judge segment
    out = []
    # micro-batches of similar lengths: a padded batch costs its longest row times its size
    by_length = np.argsort([len(ctx) + len(s.token_ids) for ctx, s, *_ in rows], kind="stable")
    for part in np.array_split(by_length, chunks):
        width = max(len(rows[i][0]) + len(rows[i][1].token_ids) for i in part)
        b = len(part)
        input_ids = torch.full((b, width), pad, dtype=torch.long)
        attention = torch.zeros((b, width), dtype=torch.long)
        old, adv, weights = (torch.zeros((b, width - 1)) for _ in range(3))
        for r, i in enumerate(part):
            ctx, s, split, prefix = rows[i]
            seq = ctx + s.token_ids
            input_ids[r, :len(seq)] = torch.tensor(seq)
            attention[r, :len(seq)] = 1
            lo, n = len(ctx) - 1, len(s.token_ids)  # target index of the first generated token
            old[r, lo:lo + n] = torch.tensor(s.logprobs)
            a_mode, a_ans = advantages[i]
            adv[r, lo - prefix:lo + split] = a_mode
            adv[r, lo + split:lo + n] = a_ans
            if cfg.algo == "decoupled":  # control tokens: per sample, weighted apart; response: token-level
                if split:
                    weights[r, lo:lo + split] = cfg.control_weight / (len(rows) * split)
                weights[r, lo + split:lo + n] = 1 / max(n_resp, 1)
            else:
                weights[r, lo:lo + n] = 1 / total
                weights[r, lo - prefix:lo] = cfg.explore_mode_weight / total
        targets = input_ids[:, 1:].clone()
        forced_rows = [(r, i) for r, i in enumerate(part) if rows[i][1].forced_ids]
        if forced_rows:  # a forward pass over the forced rows only
            at = torch.tensor([r for r, _ in forced_rows])
            policy_logp = _token_logp(model, input_ids[at], attention[at], targets[at])
            for j, (r, i) in enumerate(forced_rows):
                ctx, s, *_ = rows[i]
                lo, k = len(ctx) - 1, len(s.forced_ids)
                old[r, lo - k:lo] = policy_logp[j, lo - k:lo]
                judge_logp[int(i)] = float(policy_logp[j, lo - k:lo].sum())
        batch = {"input_ids": input_ids, "attention_mask": attention, "targets": targets,
                 "old_logp": old, "adv": adv, "weights": weights * chunks,  # the engine divides by grad_accum
                 "stats": stats, "num_tokens": int((weights > 0).sum())}
        if ref_model is not None:
            batch["ref_logp"] = _token_logp(ref_model, input_ids, attention, targets)
        out.append(batch)

    entropies = []
    for g in range(len(samples) // group):
        by_mode = {samples[i].forced_mode: judge_logp[i] for i in range(g * group, (g + 1) * group) if i in judge_logp}
        if "on" in by_mode and "off" in by_mode:
            p_on = 1 / (1 + math.exp(max(-50.0, min(50.0, by_mode["off"] - by_mode["on"]))))
            entropies.append(binary_entropy(p_on))
    if entropies:
        stats["mode_entropy"] = sum(entropies) / len(entropies)
    return out


def _token_logp(model, input_ids, attention, targets):
    """log p(target) per position under `model`, without gradient and in eval mode (no dropout)."""
    import torch

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            logits = model(input_ids=input_ids, attention_mask=attention, use_cache=False).logits[:, :-1]
            return torch.log_softmax(logits.float(), -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    finally:
        model.train(was_training)


# ---------------------------------------------------------------------------------------- the stage


def srpo(config: KatConfig, checkpoint: str | Path, data_dir: str | Path, out_dir: str | Path, *,
         algo: str | None = None, progress: bool = True, validation: str | Path | None = None) -> dict[str, Any]:
    """RL-train the cold-start `checkpoint` on the dataset's prompts into `out_dir` (a checkpoint plus
    metrics.jsonl and srpo.json). `algo` overrides `srpo.algo`."""
    import torch

    from kat_core.format import THINK_OFF, THINK_ON
    from kat_core.model.checkpoint import check_checkpoint, load_checkpoint, save_checkpoint
    from kat_core.train.coldstart import LABELS
    from kat_core.train.engine import epoch_sampler, train

    cfg = config.srpo.model_copy(update={"algo": algo}) if algo else config.srpo
    if cfg.algo not in ALGOS:
        raise KatError(f"unknown algorithm {cfg.algo!r}; choose one of {', '.join(ALGOS)}")
    checkpoint, data_dir, out_dir = Path(checkpoint), Path(data_dir), Path(out_dir)
    check_checkpoint(checkpoint)
    if cfg.train.backend == "deepspeed" and cfg.train.zero_stage == 3:
        raise KatError("srpo samples with the model being trained, which ZeRO-3 partitions; use zero_stage <= 2")
    pairs = load_prompts(config, data_dir, Path(validation) if validation else None)
    prior = mode_priors(checkpoint / LABELS)
    model, tokenizer, heads = load_checkpoint(checkpoint)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    mode_ids = (tokenizer.convert_tokens_to_ids(THINK_ON), tokenizer.convert_tokens_to_ids(THINK_OFF))
    ref_model = None
    if cfg.kl_beta > 0:
        ref_model = copy.deepcopy(model).eval().requires_grad_(False)

    group = len(plan_group(cfg))
    per_rollout = min(cfg.prompts_per_step, len(pairs))
    chunks = math.ceil(per_rollout * group / cfg.train.micro_batch_size)
    train_cfg = cfg.train.model_copy(update={"grad_accum": chunks})
    pick = epoch_sampler(len(pairs), per_rollout, seed=config.seed)
    cache: dict[tuple[int, int], list[dict[str, Any]]] = {}

    def batches(i: int) -> dict[str, Any]:
        # global micro-batch i -> (optimizer step, micro-batch, rank); one rollout per updates_per_rollout steps
        world = max(1, int(torch.distributed.get_world_size()) if torch.distributed.is_initialized() else 1)
        rank, step0, micro = i % world, i // (chunks * world), (i // world) % chunks
        key = (step0 // cfg.updates_per_rollout, rank)
        if key not in cache:
            cache.clear()
            chosen = [pairs[j] for j in pick(key[0] * world + rank)]
            t0 = time.perf_counter()
            samples, scored, advantages, stats = rollout(model, tokenizer, chosen, prior, cfg,
                                                         seed=config.seed * 1_000_003 + key[0] * world + rank)
            stats["rollout_s"] = time.perf_counter() - t0  # sampling and scoring, in the step's step_time_s
            cache[key] = _micro_batches(samples, scored, advantages, stats, tokenizer, model, ref_model, cfg,
                                        mode_ids, chosen, group, chunks)
        return cache[key][micro]

    work = out_dir.parent / f".{out_dir.name}.work"
    log.info("%s: %d prompts, %d per rollout x G=%d (%d forced), %d steps -> %s", cfg.algo, len(pairs), per_rollout,
             group, sum(m is not None for m in plan_group(cfg)), train_cfg.steps, out_dir)
    result = train(model, make_loss_fn(cfg), batches, train_cfg, work, progress=progress, seed=config.seed)
    if result.rank != 0:
        return result.metrics
    summary = {"algo": cfg.algo, "steps": result.step, "final": result.metrics,
               "curve": summarize_curve(result.metrics_path)}

    def write_more(tmp: Path) -> None:
        shutil.copy(result.metrics_path, tmp / "metrics.jsonl")
        (tmp / SUMMARY).write_text(json.dumps(summary, indent=2) + "\n")
        if (checkpoint / LABELS).is_file():  # the priors travel with the model, for a later srpo round
            shutil.copy(checkpoint / LABELS, tmp / LABELS)

    save_checkpoint(out_dir, result.model, tokenizer, heads,
                    extra={"stage": "srpo", "algo": cfg.algo, "final": result.metrics},
                    write_more=write_more,
                    manifest={"stage": "srpo", "config": config, "inputs": {"model": checkpoint, "data": data_dir}})
    shutil.rmtree(work, ignore_errors=True)
    log.info("checkpoint written to %s", out_dir)
    return summary


def summarize_curve(metrics_path: Path, keys: Sequence[str] = ("reward_mode", "reward_answer", "accuracy",
                                                               "mean_tokens", "think_on_rate")) -> dict[str, Any]:
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
