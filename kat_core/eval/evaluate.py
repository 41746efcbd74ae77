"""The `evaluate` stage: a model over task suites in auto and forced modes -> report.json, report.md, plots.

    evaluate("ckpt/", ["arith"], out_dir="eval/", limit=50)

Per suite, the test items (`limit` of them, seeded), each in every evaluation mode: "auto" is unforced (the
model writes its own judge and picks its mode); "on"/"off" pre-fill `forced_prefix(judge_text(features,
mode), mode)`, the same judge the cold start trains on. One greedy response per item and mode (accuracy,
tokens, think-on rate) and `n_samples` sampled ones at `temperature` (pass@1, and the forced modes' per-item
accuracy, from which the oracles of `metrics.mode_selection` are measured when the criterion's decoding is a
temperature; greedy decoding, the default, values the modes by the greedy responses). A response is correct when it is
well formed and the suite's verifier accepts its answer (math through math-verify, code in the sandbox).

Every mode lays the request out as training does (`kat_core.chat`: the model's own chat template when its
tokenizer has one, a user turn with the assistant's turn opened). A fourth mode, "plain", asks what a base
model can do before it speaks the grammar: nothing is forced, and the whole
response goes to the suite's verifier, which extracts the answer as it always does (arith: the stated final
integer; math: math-verify). Plain is reported beside auto/on/off as a mode of its own; its `well_formed_rate`
says how often the model wrote the grammar unasked. Malformed responses in auto/on/off stay counted there
(`well_formed_rate`) and are never correct.

Items whose prompt and longest forced prefix plus `max_new_tokens` do not fit the model's context
(`max_position_embeddings`) are skipped and counted, never silently truncated: a cut prompt is a different
question.

`compare(a, b)` puts two models (or two finished evaluations) side by side on the same items.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kat_core.chat import control_tokens, request_text
from kat_core.data.dataset import check_apart, iter_jsonl
from kat_core.data.judge import judge_text
from kat_core.errors import KatError
from kat_core.eval.metrics import MODES, ItemResult, Outcome
from kat_core.format import forced_prefix, parse
from kat_core.tasks.base import Item, Task

if TYPE_CHECKING:
    from kat_core.verdict import VerdictGuard

log = logging.getLogger(__name__)

REPORT_JSON, REPORT_MD, ITEMS_JSONL = "report.json", "report.md", "items.jsonl"
CALIBRATION_SEED = 7919  # the oracle's calibration items are drawn at the evaluation's seed + this
PLAIN = "plain"
EVAL_MODES = (*MODES, PLAIN)


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def forced_for(task: Task, item: Item, mode: str) -> str | None:
    """The prefix that forces an evaluation mode on an item; None for auto and plain."""
    if mode in ("auto", PLAIN):
        return None
    return forced_prefix(judge_text(task.intent_features(item), mode), mode)


def _context(task: Task, item: Item, mode: str) -> tuple[str, str | None]:
    """(prompt, forced prefix) of an item in an evaluation mode. Every mode lays the prompt out the same way
    (kat_core.chat: the model's chat template when it has one); plain only expects no grammar."""
    return item.prompt, forced_for(task, item, mode)


def fitting_items(task: Task, items: list[Item], tokenizer, modes: Sequence[str], max_len: int | None,
                  max_new_tokens: int) -> tuple[list[Item], int]:
    """(items whose longest context plus the token budget fits `max_len`, how many did not)."""
    if not max_len:
        return items, 0

    def length(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    kept = []
    for item in items:
        longest = max(length(request_text(tokenizer, p)) + length(f or "")
                      for p, f in (_context(task, item, m) for m in modes))
        if longest + max_new_tokens <= max_len:
            kept.append(item)
    return kept, len(items) - len(kept)


def check_plain_prompts(task: Task, items: list[Item], tokenizer) -> None:
    """Refuse a suite whose item spells one of the model's control tokens: the tokenizer would read the
    spelling as the token (a grammar tag in a question is a judge or a decision written for the model), and the
    evaluation would score a forged decision (`chat.control_tokens`)."""
    bad = [(it, found) for it in items if (found := control_tokens(tokenizer, it.prompt))]
    if bad:
        item, found = bad[0]
        raise KatError(f"{task.name}: item {item.id!r}{f' and {len(bad) - 1} more' if len(bad) > 1 else ''} "
                       f"spell{'s' if len(bad) == 1 else ''} this model's control tokens ({', '.join(map(repr, found))}"
                       "); a question cannot hold them, since the model would read them as its grammar's tags")


def score(task: Task, item: Item, sample, cache: dict[tuple[str, str], bool], plain: bool = False,
          guard: VerdictGuard | None = None) -> Outcome:
    """Verify one rollout `Sample`. `cache` maps (item id, answer) to the verdict: greedy and sampled answers
    repeat a lot, and a code verdict costs a sandbox run. `plain`: the whole text is the answer the verifier
    reads (or the grammar's answer, when the model wrote the grammar anyway). `guard` finds the verdict word
    the model drew, whose raw probability the outcome keeps (`verdict_p`)."""
    parsed = parse(sample.text)
    correct = False
    if parsed.well_formed or plain:
        answer = (parsed.answer or "") if parsed.well_formed else sample.text
        key = (item.id, answer)
        if key not in cache:
            cache[key] = bool(task.verify(item, answer))
        correct = cache[key]
    tokens = {k: int(v) for k, v in sample.segment_counts.items()}
    at = guard.verdict_index(sample.token_ids) if guard is not None and not sample.forced_ids else None
    return Outcome(mode=parsed.mode, correct=correct, well_formed=parsed.well_formed, tokens=tokens,
                   finish_reason=sample.finish_reason,
                   verdict_p=None if at is None else round(math.exp(sample.logprobs[at]), 4))


def run_suite(model, tokenizer, task: Task, items: list[Item], modes: Sequence[str], *, n_samples: int,
              temperature: float, top_p: float, max_new_tokens: int, seed: int, batch_size: int,
              progress: bool, draft=None, draft_tokens: int = 0) -> tuple[list[ItemResult], dict[str, Any]]:
    """Generate and verify every item in every mode -> (one ItemResult per item, the drafts' acceptance per
    grammar segment when `draft` (MTP heads) decodes speculatively, else {})."""
    from tqdm import tqdm

    from kat_core.rollout import generate

    # all modes in one rollout call: the engine drops finished rows, so short think-off rows and long
    # think-on rows share batches at no cost
    contexts = [_context(task, it, m) for m in modes for it in items]
    prompts, forced = [c[0] for c in contexts], [c[1] for c in contexts]
    speculative = {"draft": draft, "draft_tokens": draft_tokens} if draft is not None else {}
    greedy = generate(model, tokenizer, prompts, forced=forced, n=1, temperature=0.0,
                      max_new_tokens=max_new_tokens, seed=seed, batch_size=batch_size, progress=progress,
                      **speculative)
    sampled = []
    if n_samples > 0:
        sampled = generate(model, tokenizer, prompts, forced=forced, n=n_samples, temperature=temperature,
                           top_p=top_p, max_new_tokens=max_new_tokens, seed=seed, batch_size=batch_size,
                           progress=progress, **speculative)
    from kat_core.autothink import cell_of

    results = [ItemResult(id=it.id, suite=task.name, level=int(it.difficulty), cell=cell_of(task.intent_features(it)))
               for it in items]
    cache: dict[tuple[str, str], bool] = {}
    from kat_core.verdict import VerdictGuard

    guard = VerdictGuard.of(tokenizer)
    total = len(greedy) + len(sampled)
    with tqdm(total=total, desc=f"{task.name} verify", unit="resp", disable=not progress) as bar:
        for s in greedy:
            m, i = divmod(s.prompt_index, len(items))
            results[i].greedy[modes[m]] = score(task, items[i], s, cache, plain=modes[m] == PLAIN, guard=guard)
            bar.update()
        for s in sampled:
            m, i = divmod(s.prompt_index, len(items))
            results[i].sampled.setdefault(modes[m], []).append(score(task, items[i], s, cache,
                                                                     plain=modes[m] == PLAIN))
            bar.update()
    from kat_core.speculative import acceptance

    return results, acceptance(greedy + sampled)


def calibration_items(task: Task, evaluated: list[Item], n: int, seed: int) -> list[Item]:
    """Up to `n` test items for the feature-cell oracle to decide its cells on: another seed's draw of the test
    split, less every prompt that is evaluated (a small test split may leave fewer, or none)."""
    asked = {it.prompt for it in evaluated}
    drawn = task.examples("test", n=n + len(evaluated), seed=seed + CALIBRATION_SEED)
    return [it for it in drawn if it.prompt not in asked][:n]


def _check_modes(modes: Sequence[str]) -> list[str]:
    modes = list(dict.fromkeys(modes))
    bad = [m for m in modes if m not in EVAL_MODES]
    if bad or not modes:
        raise KatError(f"unknown evaluation mode(s) {', '.join(bad) or '(none)'}; choose from {', '.join(EVAL_MODES)}")
    return modes


def evaluate(
    model_dir: str | Path,
    suites: Sequence[str] = ("arith",),
    modes: Sequence[str] = MODES,
    *,
    out_dir: str | Path,
    limit: int | None = None,
    n_samples: int = 4,
    temperature: float = 0.7,
    top_p: float = 1.0,
    max_new_tokens: int = 160,
    seed: int = 0,
    batch_size: int = 64,
    criterion=None,
    oracle_items: int = 0,
    draft_tokens: int = 0,
    benchmarks_dir: str | None = None,
    device: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Evaluate the model in `model_dir` and write report.json, report.md, items.jsonl and the plots to
    `out_dir` (atomically, with a manifest). Returns the report (schema in `report.py`). `criterion`: the
    decision criterion the oracles use (an AutoThinkConfig; default its defaults). `oracle_items` > 0: that many
    other test items per suite (none of the evaluated ones) are answered in both forced modes, and the feature-cell
    oracle decides its cells on them (a 500-item split holds 20-30 items of a cell, too few to tell an edge of
    0.15 from a tie; metrics.mode_selection). `draft_tokens` > 0 decodes
    speculatively with the checkpoint's MTP module (same greedy outputs, same sampled distribution; plain
    decoding, with one log line, when it has none); the report then has the drafts' acceptance per segment.
    `device`: a torch device; default CUDA when there is one, else the CPU."""
    from kat_core.config import AutoThinkConfig
    from kat_core.data.dataset import atomic_output_dir
    from kat_core.eval.report import build_report, write_report
    from kat_core.model.lm import load_model
    from kat_core.tasks.base import get_task

    modes = _check_modes(modes)
    if not suites:
        raise KatError("no evaluation suites given")
    if n_samples < 0 or max_new_tokens < 1 or (limit is not None and limit < 1) or oracle_items < 0:
        raise KatError("n_samples must be >= 0, max_new_tokens >= 1, limit >= 1 and oracle_items >= 0")
    criterion = criterion or AutoThinkConfig()
    calibrate = oracle_items > 0 and "on" in modes and "off" in modes and "auto" in modes
    tasks = [get_task(s, benchmarks_dir=benchmarks_dir) for s in suites]  # unknown suites fail before loading
    started = time.perf_counter()
    model, tokenizer = load_model(model_dir)
    model.to(device or default_device()).eval()
    from kat_core.speculative import load_drafter

    draft = load_drafter(model_dir, model, draft_tokens)
    acceptance: dict[str, Any] = {}
    max_len = getattr(model.config, "max_position_embeddings", None)
    results: dict[str, list[ItemResult]] = {}
    calibration: dict[str, list[ItemResult]] = {}
    skipped: dict[str, int] = {}
    for task in tasks:
        items = task.examples("test", n=limit, seed=seed)
        check_plain_prompts(task, items, tokenizer)
        items, skipped[task.name] = fitting_items(task, items, tokenizer, modes, max_len, max_new_tokens)
        if skipped[task.name]:
            log.warning("%s: skipped %d item(s) that do not fit the model's %s-token context with %d new tokens",
                        task.name, skipped[task.name], max_len, max_new_tokens)
        results[task.name], acceptance[task.name] = run_suite(
            model, tokenizer, task, items, modes, n_samples=n_samples, temperature=temperature, top_p=top_p,
            max_new_tokens=max_new_tokens, seed=seed, batch_size=batch_size, progress=progress, draft=draft,
            draft_tokens=draft_tokens) if items else ([], {})
        extra = calibration_items(task, items, oracle_items, seed) if calibrate and items else []
        check_plain_prompts(task, extra, tokenizer)
        extra, _ = fitting_items(task, extra, tokenizer, ("on", "off"), max_len, max_new_tokens)
        if extra:
            log.info("%s: %d other test items in both forced modes, for the feature-cell oracle", task.name, len(extra))
            # sampled answers only where the criterion values the modes by them
            calibration[task.name], _ = run_suite(
                model, tokenizer, task, extra, ("on", "off"),
                n_samples=n_samples if criterion.temperature > 0 else 0, temperature=temperature, top_p=top_p,
                max_new_tokens=max_new_tokens, seed=seed, batch_size=batch_size, progress=progress, draft=draft,
                draft_tokens=draft_tokens)
    settings = {
        "suites": list(suites), "modes": modes, "limit": limit, "n_samples": n_samples,
        "temperature": temperature, "top_p": top_p, "max_new_tokens": max_new_tokens, "seed": seed,
        "criterion": criterion.model_dump(), "oracle_items": sum(len(c) for c in calibration.values()),
        "max_len": max_len,
        "draft_tokens": draft_tokens if draft is not None else 0,
    }
    report = build_report(results, skipped, settings, model=str(model_dir),
                          seconds=time.perf_counter() - started, calibration=calibration)
    if draft is not None:
        report["speculative"] = acceptance
    out = Path(out_dir)
    with atomic_output_dir(out) as tmp:
        write_report(tmp, report, results, inputs={"model": Path(model_dir)} if Path(model_dir).is_dir() else None)
    log.info("evaluation report written to %s", out / REPORT_JSON)
    return report


# --- two models side by side ---------------------------------------------------------------------------------

def load_report(source: str | Path) -> tuple[dict[str, Any], Path | None]:
    """A report.json file or an evaluation dir -> (report, its dir, for items.jsonl)."""
    path = Path(source)
    file = path / REPORT_JSON if path.is_dir() else path
    if not file.is_file():
        raise KatError(f"no evaluation report at {source} (expected {REPORT_JSON} or an evaluation dir)")
    try:
        report = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise KatError(f"{file} is not valid JSON: {e}") from None
    # the parts a comparison reads: any other JSON file (a validation.json, `[1]`) was a KeyError deep in it
    if not (isinstance(report, dict) and all(isinstance(report.get(k), dict) for k in ("overall", "suites"))):
        raise KatError(f"{file} is not an evaluation report (`kat eval` writes one with `overall` and `suites`)")
    return report, file.parent


def is_report(source: str | Path) -> bool:
    path = Path(source)
    return (path.is_file() and path.suffix == ".json") or (path / REPORT_JSON).is_file()


def read_items(eval_dir: Path | None) -> dict[str, ItemResult]:
    if eval_dir is None or not (eval_dir / ITEMS_JSONL).is_file():
        return {}
    path = eval_dir / ITEMS_JSONL
    rows = []
    for record in iter_jsonl(path):  # a line that is not a JSON object: one line naming it
        try:
            rows.append(ItemResult.from_dict(record))
        except (KeyError, TypeError, ValueError, AttributeError) as e:  # an object of another shape
            raise KatError(f"{path}: not an evaluation's item record ({type(e).__name__}: {e})") from None
    return {r.id: r for r in rows}


def compare(
    a: str | Path,
    b: str | Path,
    *,
    out_dir: str | Path,
    suites: Sequence[str] = ("arith",),
    modes: Sequence[str] = MODES,
    progress: bool = True,
    **eval_options: Any,
) -> dict[str, Any]:
    """Compare A (the baseline, e.g. the champion) with B (e.g. the candidate). Each is a finished evaluation
    (report.json or its dir) or a model dir, which is evaluated first into `out_dir/a` or `out_dir/b` with
    the same suites, modes and options, hence on the same items. Writes compare.json, compare.md and
    compare.png to `out_dir`; returns the comparison (see `report.comparison`)."""
    from kat_core.eval.report import comparison, write_comparison

    out = Path(out_dir)
    # a model dir is evaluated into out/a or out/b: never inside the model, nor over it
    check_apart(out, [s for s in (a, b) if not is_report(s)])
    loaded = []
    for label, source in (("a", a), ("b", b)):
        if not is_report(source):
            evaluate(source, suites, modes, out_dir=out / label, progress=progress, **eval_options)
            source = out / label
        report, where = load_report(source)
        loaded.append((report, read_items(where), str(source)))
    (ra, items_a, src_a), (rb, items_b, src_b) = loaded
    if ra.get("items_digest") != rb.get("items_digest"):
        raise KatError(f"{src_a} and {src_b} were evaluated on different items; evaluate both with the same "
                       "suites, limit and seed")
    result = comparison(ra, rb, items_a, items_b, names=(src_a, src_b))
    write_comparison(out, result)
    log.info("comparison written to %s", out)
    return result
