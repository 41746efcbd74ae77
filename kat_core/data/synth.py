"""Dual-regime data synthesis (the `synthesize` stage).

For every training item the tagger picks its regime from intent features:
- think-off: `<judge>…</judge><think_off><answer>gold</answer>`, the judge written from the features;
- think-on: the multi-agent loop (solver drafts, thinker writes the reasoning, critic verifies the
  answer against ground truth and checks each step); a rejected draft is retried up to
  `max_attempts` times, and every reject is written aside to `rejects.jsonl` with its reason.
A configurable share of items (`mirror_share`) is also rendered in the other regime, so a pretrained
model can be forced into either mode on any item. Beside the shards, `pool.jsonl` holds the held-out prompts
(task items of the families' `pool` split, never in the shards) that the cold start and RL read.
"""

from __future__ import annotations

import random
import time
from collections import Counter
from pathlib import Path
from typing import Any

from kat_core.config import KatConfig
from kat_core.data.agents import Agents, make_agents
from kat_core.data.dataset import POOL, POOL_USES, REJECTS, atomic_output_dir, write_jsonl, write_shards
from kat_core.data.judge import judge_text
from kat_core.data.tagger import Tagger
from kat_core.errors import KatError
from kat_core.format import SPECIAL_TOKENS, render
from kat_core.manifest import write_manifest
from kat_core.tasks.base import Item, Task, get_task


def training_items(config: KatConfig) -> list[tuple[Task, Item]]:
    """The task mix: `synth.families` items from each family's train split."""
    pairs = []
    for family, n in config.synth.families.items():
        options: dict[str, Any] = {"benchmarks_dir": config.tasks.benchmarks_dir}
        if family == "arith":
            options["levels"] = config.synth.levels
        task = get_task(family, **options)
        if "train" not in task.splits:
            raise KatError(
                f"task family {family!r} has no train split (it is an evaluation set); "
                "synthesis draws from train splits, e.g. arith"
            )
        pairs += [(task, item) for item in task.examples("train", n=n, seed=config.seed)]
    return pairs


def pool_items(config: KatConfig) -> list[tuple[Task, Item, str]]:
    """The held-out prompt pool: `synth.pool` items from the families' `pool` splits (spread over the levels),
    alternately for the cold start and for RL, so the two never share a prompt. (task, item, use) triples."""
    if not config.synth.pool:
        return []
    tasks = []
    for family in config.synth.families:
        options: dict[str, Any] = {"benchmarks_dir": config.tasks.benchmarks_dir}
        if family == "arith":
            options["levels"] = config.synth.levels
        task = get_task(family, **options)
        if "pool" in task.splits:
            tasks.append(task)
    out = []
    for i, task in enumerate(tasks):
        n = config.synth.pool // len(tasks) + (i < config.synth.pool % len(tasks))
        items = sorted(task.examples("pool", n=n, seed=config.seed), key=lambda it: (it.difficulty, it.id))
        out += [(task, item, POOL_USES[j % 2]) for j, item in enumerate(items)]
    return out


def _record(item: Item, mode: str, regime: str, complexity: float, completion: str) -> dict[str, Any]:
    return {
        "id": f"{item.id}:{mode}",
        "source_id": item.id,
        "family": item.family,
        "prompt": item.prompt,
        "answer": item.answer,
        "difficulty": item.difficulty,
        "mode": mode,
        "regime": regime,
        "complexity": round(complexity, 4),
        "completion": completion,
    }


class _ThinkOnSynth:
    """The solver → thinker → critic loop, with the bookkeeping that measures the critic."""

    def __init__(self, agents: Agents, max_attempts: int, rng: random.Random):
        self.agents, self.max_attempts, self.rng = agents, max_attempts, rng
        self.rejects: list[dict[str, Any]] = []
        self.injected = Counter()  # errors planted by the programmatic solver, by kind
        self.caught = Counter()  # of those, how many the critic rejected
        self.false_rejects = 0  # clean drafts the critic rejected anyway

    def __call__(self, task: Task, item: Item) -> tuple[str, str] | None:
        for attempt in range(1, self.max_attempts + 1):
            draft = self.agents.draft(task, item, self.rng)
            think = self.agents.think(task, item, draft)
            if any(tag in think or tag in draft.answer for tag in SPECIAL_TOKENS):
                verdict_ok, reason = False, "grammar_tag_in_text"
            else:
                verdict = self.agents.critic(task, item, think, draft.answer)
                verdict_ok, reason = verdict.ok, verdict.reason
            if draft.injected:
                self.injected[draft.injected] += 1
                self.caught[draft.injected] += not verdict_ok
            elif not verdict_ok:
                self.false_rejects += 1
            if verdict_ok:
                return think, draft.answer.strip()
            self.rejects.append({
                "source_id": item.id, "attempt": attempt, "reason": reason, "injected": draft.injected,
                "think": think, "answer": draft.answer,
            })
        return None

    def stats(self) -> dict[str, Any]:
        injected = sum(self.injected.values())
        return {
            "injected_errors": dict(self.injected),
            "caught_errors": dict(self.caught),
            "catch_rate": round(sum(self.caught.values()) / injected, 4) if injected else None,
            "false_rejects": self.false_rejects,
        }


def synthesize(config: KatConfig, out_dir: str | Path, *, progress: bool = True) -> dict[str, Any]:
    """Run the synthesis stage into `out_dir` (written atomically); returns the manifest."""
    from tqdm import tqdm

    started = time.perf_counter()
    cfg = config.synth
    rng = random.Random(config.seed)
    tagger = Tagger(threshold=cfg.tag_threshold)
    agents = make_agents(cfg.agent_backend, error_rate=cfg.draft_error_rate, openai=cfg.openai)
    think_on = _ThinkOnSynth(agents, cfg.max_attempts, rng)
    pairs = training_items(config)

    records: list[dict[str, Any]] = []
    dropped = 0
    for task, item in tqdm(pairs, desc="synthesize", unit="item", disable=not progress):
        features = task.intent_features(item)
        complexity = tagger.complexity(features)
        tagged = "off" if complexity < tagger.threshold else "on"
        modes = [(tagged, "tagged")]
        if rng.random() < cfg.mirror_share:
            modes.append(("on" if tagged == "off" else "off", "mirror"))
        for mode, regime in modes:
            if mode == "off":
                completion = render(judge_text(features, "off"), "off", task.answer_text(item))
            else:
                result = think_on(task, item)
                if result is None:
                    if regime == "tagged":  # the item is dropped, its mirror with it
                        dropped += 1
                        break
                    continue
                think, answer = result
                completion = render(judge_text(features, "on"), "on", answer, think=think)
            records.append(_record(item, mode, regime, complexity, completion))
    rng.shuffle(records)
    elapsed = time.perf_counter() - started

    with atomic_output_dir(Path(out_dir)) as tmp:
        shards = write_shards(tmp, records, cfg.shard_size)
        write_jsonl(tmp / REJECTS, think_on.rejects)
        pool = pool_items(config)
        write_jsonl(tmp / POOL, [{**item.to_dict(), "use": use} for _, item, use in pool])
        return write_manifest(
            tmp,
            stage="synthesize",
            config=config,
            extra={
                "seed": config.seed,
                "shards": shards,
                "records": len(records),
                "items": len(pairs),
                "items_dropped": dropped,
                "pool": dict(Counter(use for *_, use in pool)),
                "counts": _counts(records),
                "rejects": dict(Counter(r["reason"] for r in think_on.rejects)),
                "critic": think_on.stats(),
                "agent_backend": cfg.agent_backend,
                "seconds": round(elapsed, 3),
                "items_per_s": round(len(pairs) / elapsed, 1) if elapsed else None,
            },
        )


def _counts(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Counts per family, per level and mode, and per regime (what `kat data stats` shows)."""
    by_level: dict[str, Counter] = {}
    for r in records:
        by_level.setdefault(str(r["difficulty"]), Counter())[r["mode"]] += 1
    return {
        "family": dict(Counter(r["family"] for r in records)),
        "mode": dict(Counter(r["mode"] for r in records)),
        "regime": dict(Counter(r["regime"] for r in records)),
        "level_mode": {lvl: dict(c) for lvl, c in sorted(by_level.items())},
    }
