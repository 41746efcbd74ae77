"""The `validate` stage: check a dataset directory with Great Expectations (GX Core 1.x) before training.

Every check has a readable name; the report (`validation.json`) and the ValidationFailed message use it.

    files.manifest           the dataset's manifest.json is there, lists every shard, and its digests match
    files.nonempty           every shard holds at least one record (an empty or whitespace-only shard that the
                             manifest lists is a write that went wrong, not a shard)
    lines.utf8               every shard line is UTF-8 (an encoding error is reported as one, not as bad JSON)
    lines.json               every non-blank UTF-8 shard line is a JSON object
    records.count            at least one record
    schema.<field>           each field of the record schema (dataset.RECORD_FIELDS) is present, non-null, of
                             its type, and in its domain (mode on/off, regime tagged/mirror, difficulty 1..5,
                             complexity 0..1)
    records.unique_ids       record ids are unique
    grammar.well_formed      every completion parses under the response grammar (kat_core.format)
    grammar.answer_closed    every well-formed completion ends with </answer>. The grammar's parser tolerates a
                             missing </answer> at the end of a *generation* (decoding stops before it), and
                             then the rest of the text is the answer; training data is rendered whole, so
                             there an unclosed <answer> means the answer and whatever follows it ran together
                             (`<answer>390 and then more text`) and is malformed
    grammar.mode_matches     the completion's mode token is the record's `mode`
    grammar.prompt_plain     no prompt spells a control token (a grammar tag, end of text, padding): the
                             tokenizer matches a tag's spelling anywhere, so such a prompt would train the
                             model on a request that already holds a judge or a decision
    mode.share               the share of think-on records lies within [mode_share_min, mode_share_max], and
                             so does the share of think-off (the config bounds apply to *each* mode), over all
                             records, mirrors included: that is the balance training sees
    length.completion_min    completion >= min_tokens approximate tokens
    length.total_max         prompt + completion <= max_tokens approximate tokens
    duplicates.prompt_mode   (prompt, mode) is unique over all records
    duplicates.tagged_prompt the prompt is unique over the tagged records
    overlap.exact            no prompt equals a test prompt of an evaluation suite (after normalising)
    overlap.ngram            no prompt shares a word n-gram (n = config.ngram) with a test prompt
    overlap.near_duplicate   no prompt is a near-duplicate of a test prompt: character n-grams (n =
                             config.near_dup_n) of the normalised texts, shared / the smaller set >=
                             config.near_dup_threshold. Catches a short test question with a number changed
                             or words dropped, which no long word n-gram survives
    answers.verified         every record's `answer` and its completion's <answer> are right for its prompt,
                             by its family's own verifier (Task.item_of rebuilds the item from the record:
                             arith from the expression, benchmarks by source_id); all records of a family
                             when it has at most config.verify_max of them, else a seeded sample of that many

Duplicates: a mirror record repeats its item's prompt on purpose, in the *other* mode, so a prompt may appear
twice in the dataset, but never twice in one mode (that would be the same lesson counted twice) and never in
two tagged records (two items asking the same thing, i.e. the generator repeated itself). Prompts are compared
normalised (NFKC, case-folded, whitespace collapsed), like the overlap checks.

Token counts are approximate, since validation must not need the trained tokenizer: each grammar tag is one
token, each digit is one token (our BPE splits digits individually), each run of letters is one token and
each other non-space character is one token. A BPE splits rare long words further, so this slightly
undercounts words and counts exactly on the digit-heavy arithmetic traces.

Near-duplicates and overlap: `kat_core.data.overlap` says how prompts are compared with the evaluation prompts.

Outputs, in `report_dir` (default: `<dataset_dir>.validation`, a sibling, so the dataset directory and the
digests in its manifest stay untouched), written to a temp dir and renamed into place:
    validation.json   success, per-check results (observed values, counts, up to 5 examples), stats, timings;
                      `data_docs` is the absolute path of docs/index.html, `data_docs_pages` the validation
                      pages relative to the report directory
    docs/index.html   GX data docs (built by the context's `build_data_docs` into a filesystem site): the
                      expectation suites and their validation results; the CDN files the pages load are copied
                      under docs/static/vendor when `make install` fetched them (kat_core.data.docs_assets), so
                      the docs are styled offline
    manifest.json
On failure the report is still written, then `ValidationFailed` names the failed checks and the report.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import time
import warnings
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from kat_core.config import TasksConfig, ValidateConfig
from kat_core.data.dataset import RECORD_FIELDS, atomic_output_dir, check_replaceable, shard_paths
from kat_core.data.docs_assets import localize
from kat_core.data.overlap import EvalIndex, load_eval_prompts, normalize_prompt
from kat_core.errors import KatError, ValidationFailed
from kat_core.format import ANSWER_CLOSE, SPECIAL_TOKENS, parse
from kat_core.manifest import read_manifest, sha256_file, write_manifest
from kat_core.tokenizer import EOS, PAD

log = logging.getLogger(__name__)

REPORT = "validation.json"
DOCS_DIR = "docs"
_EXAMPLES = 5  # offending examples kept per check
_RESULT_FORMAT = {
    "result_format": "SUMMARY",
    # `location` (shard:line) is derived and always present, unlike `id`, which may be the broken field
    "unexpected_index_column_names": ["location"],
    "partial_unexpected_count": _EXAMPLES,
}

_TAG_ALTERNATIVES = "|".join(re.escape(t) for t in sorted(SPECIAL_TOKENS, key=len, reverse=True))
_TOKEN_RE = re.compile(rf"{_TAG_ALTERNATIVES}|\d|[^\W\d_]+|\S")
_GX_TYPES = {str: ["str"], int: ["int"], float: ["float", "int"]}  # JSON writes 1.0 as 1 in some writers
_DOMAINS: dict[str, list[Any]] = {"mode": ["on", "off"], "regime": ["tagged", "mirror"], "difficulty": [1, 2, 3, 4, 5]}


def approx_tokens(text: str) -> int:
    """Approximate token count (see the module docstring for the rule)."""
    return sum(1 for _ in _TOKEN_RE.finditer(text))


# --- reading ------------------------------------------------------------------------------------------

def _read_lines(shards: list[Path]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(one row per non-blank line: location, whether it is UTF-8 and whether it is a JSON object (None when
    it is not UTF-8: that is the encoding check's finding, not the JSON check's), the records with their
    location). Unlike dataset.iter_jsonl this does not stop at the first bad line: the report lists them."""
    lines, records = [], []
    for shard in shards:
        with open(shard, "rb") as f:  # bytes, so one line of bad UTF-8 is one bad line, not a crash
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                location = f"{shard.name}:{lineno}"
                try:
                    text = line.decode("utf-8")
                except UnicodeDecodeError as e:
                    bad = line[e.start:e.start + 1].hex()
                    lines.append({"location": location,
                                  "utf8": f"encoding error: not UTF-8 (byte 0x{bad} at column {e.start + 1})",
                                  "is_object": None})
                    continue
                try:
                    record = json.loads(text)
                except json.JSONDecodeError:
                    record = None
                is_object = isinstance(record, dict)
                lines.append({"location": location, "utf8": None, "is_object": is_object})
                if is_object:
                    records.append({**record, "location": location})
    return lines, records


def _file_rows(dataset_dir: Path, shards: list[Path]) -> list[dict[str, Any]]:
    """One row per file the manifest lists or shard on disk, with its integrity status."""
    manifest = read_manifest(dataset_dir)
    if manifest is None:
        return [{"location": "manifest.json", "status": "missing or unreadable", "records": None}]
    listed = manifest.get("files") if isinstance(manifest.get("files"), dict) else {}
    shard_names = {s.name for s in shards}
    rows = []
    for name, digest in sorted(listed.items()):
        path = dataset_dir / name
        status = "missing" if not path.is_file() else "ok" if sha256_file(path) == digest else "digest mismatch"
        rows.append({"location": name, "status": status,
                     "records": _nonblank_lines(path) if name in shard_names else None})
    rows += [{"location": s.name, "status": "not in manifest", "records": _nonblank_lines(s)}
             for s in shards if s.name not in listed]
    return rows


def _nonblank_lines(path: Path) -> int:
    with open(path, "rb") as f:
        return sum(1 for line in f if line.strip())


DERIVED_COLUMNS = (  # the keys `_derive` gives each row
    "well_formed", "answer_closed", "completion_mode", "record_mode", "is_on", "completion_tokens", "total_tokens",
    "prompt_tag", "prompt_key", "tagged_prompt_key", "complexity_value", "eval_exact", "eval_ngram", "eval_near",
    "answer_problem",
)


_CONTROL_SPELLINGS = (*SPECIAL_TOKENS, EOS, PAD)


def _control_spelling(text: str) -> str | None:
    """The first control token's spelling in `text` (what the trained tokenizer would read as that token)."""
    return next((t for t in _CONTROL_SPELLINGS if t in text), None)


def _derive(records: list[dict[str, Any]], index: EvalIndex, problems: dict[int, str] | None = None
            ) -> list[dict[str, Any]]:
    """Columns the checks read, computed per record. A derived value is None when its input has the wrong
    type, so a broken field fails its schema check only, not every check downstream of it. `problems`: what
    answer re-verification found, by record position."""
    problems = problems or {}
    rows = []
    for position, r in enumerate(records):
        prompt, completion = r.get("prompt"), r.get("completion")
        mode = r.get("mode") if r.get("mode") in ("on", "off") else None
        parsed = parse(completion) if isinstance(completion, str) else None
        prompt_tokens = approx_tokens(prompt) if isinstance(prompt, str) else None
        completion_tokens = approx_tokens(completion) if isinstance(completion, str) else None
        key = normalize_prompt(prompt) if isinstance(prompt, str) else None
        complexity = r.get("complexity")
        rows.append({
            "well_formed": parsed.well_formed if parsed else None,
            # only asked of well-formed completions, so a broken one fails grammar.well_formed alone
            "answer_closed": completion.rstrip().endswith(ANSWER_CLOSE) if parsed and parsed.well_formed else None,
            "completion_mode": parsed.mode if parsed else None,
            "record_mode": mode,
            "prompt_tag": _control_spelling(prompt) if isinstance(prompt, str) else None,
            "is_on": None if mode is None else int(mode == "on"),
            "completion_tokens": completion_tokens,
            "total_tokens": (
                prompt_tokens + completion_tokens if prompt_tokens is not None and completion_tokens is not None
                else None
            ),
            "prompt_key": key,
            "tagged_prompt_key": key if r.get("regime") == "tagged" else None,
            "complexity_value": (
                float(complexity) if isinstance(complexity, int | float) and not isinstance(complexity, bool)
                else None
            ),
            "eval_exact": index.exact_match(prompt) if isinstance(prompt, str) else None,
            "eval_ngram": index.ngram_match(prompt) if isinstance(prompt, str) else None,
            "eval_near": index.near_match(prompt) if isinstance(prompt, str) else None,
            "answer_problem": problems.get(position),
        })
    return rows


def _verify_answers(records: list[dict[str, Any]], config: ValidateConfig, tasks_config: TasksConfig | None
                    ) -> tuple[dict[int, str], dict[str, Any]]:
    """Re-verify answers with each family's verifier: ({record position: what is wrong}, stats). Per family,
    all records when there are at most `config.verify_max`, else a seeded sample of that many."""
    from kat_core.tasks import get_task

    options = {"benchmarks_dir": tasks_config.benchmarks_dir} if tasks_config and tasks_config.benchmarks_dir else {}
    by_family: dict[str, list[int]] = {}
    for position, r in enumerate(records):
        if isinstance(r.get("family"), str):  # a missing family fails schema.family
            by_family.setdefault(r["family"], []).append(position)
    problems: dict[int, str] = {}
    checked: dict[str, int] = {}
    for family, positions in sorted(by_family.items()):
        if len(positions) > config.verify_max:
            positions = sorted(random.Random(f"validate:{family}").sample(positions, config.verify_max))
        checked[family] = len(positions)
        try:
            task = get_task(family, **options)
        except KatError:
            problems.update({p: f"no task {family!r} to verify its answers with" for p in positions})
            continue
        for position in positions:
            problem = _answer_problem(task, records[position])
            if problem:
                problems[position] = problem
    return problems, {"answers_checked": checked, "answers_wrong": len(problems)}


def _answer_problem(task, record: dict[str, Any]) -> str | None:
    """What is wrong with a record's answers, or None: its `answer` and its completion's <answer> must both be
    right for the item the task rebuilds from the record."""
    try:
        item = task.item_of(record)
    except KatError as e:  # the task's data is missing: every record of the family says so
        return f"cannot verify: {e}"
    if item is None:
        return f"no {task.name} item matches this record (prompt or source_id)"
    answer = record.get("answer")
    if isinstance(answer, str) and not task.verify(item, answer):
        return f"answer {_clip(answer, 40)!r} is wrong for the prompt (expected {_clip(item.answer, 40)!r})"
    completion = record.get("completion")
    parsed = parse(completion) if isinstance(completion, str) else None
    if parsed is not None and parsed.well_formed and not task.verify(item, parsed.answer or ""):
        return f"the completion's answer {_clip(parsed.answer or '', 40)!r} is wrong for the prompt"
    return None


# --- expectations -------------------------------------------------------------------------------------

def _mode_bounds(config: ValidateConfig) -> tuple[float, float]:
    """Bounds on the think-on share such that both modes' shares lie within the configured bounds."""
    lo = max(config.mode_share_min, 1 - config.mode_share_max)
    hi = min(config.mode_share_max, 1 - config.mode_share_min)
    if lo > hi:
        raise KatError(
            f"validate.mode_share_min={config.mode_share_min} and validate.mode_share_max={config.mode_share_max} "
            "cannot hold for both modes at once (need mode_share_min <= 0.5 <= mode_share_max)"
        )
    return lo, hi


# A check is one or more GX expectations: (check name, what this expectation asserts, the expectation).
Check = tuple[str, str, Any]


def _file_checks(gx) -> list[Check]:
    E = gx.expectations
    return [("files.manifest", "every manifest file is present with its digest, and every shard is listed",
             E.ExpectColumnValuesToBeInSet(column="status", value_set=["ok"])),
            ("files.nonempty", "records (non-blank lines of a shard) >= 1",
             E.ExpectColumnValuesToBeBetween(column="records", min_value=1))]


def _line_checks(gx) -> list[Check]:
    E = gx.expectations
    return [("lines.utf8", "utf8 (what is wrong with a line's encoding) is always null",
             E.ExpectColumnValuesToBeNull(column="utf8")),
            ("lines.json", "every non-blank UTF-8 line is a JSON object",
             E.ExpectColumnValuesToBeInSet(column="is_object", value_set=[True]))]


def _record_checks(gx, config: ValidateConfig) -> list[Check]:
    E = gx.expectations
    checks: list[Check] = [("records.count", "at least one record", E.ExpectTableRowCountToBeBetween(min_value=1))]
    for name, typ in RECORD_FIELDS.items():
        check, types = f"schema.{name}", _GX_TYPES[typ]
        checks += [
            (check, f"column {name} exists", E.ExpectColumnToExist(column=name)),
            (check, f"{name} is never null", E.ExpectColumnValuesToNotBeNull(column=name)),
            (check, f"{name} values are {' or '.join(types)}",
             E.ExpectColumnValuesToBeInTypeList(column=name, type_list=types)),
        ]
        if name in _DOMAINS:
            checks.append((check, f"{name} values are in {_DOMAINS[name]}",
                           E.ExpectColumnValuesToBeInSet(column=name, value_set=_DOMAINS[name])))
    lo, hi = _mode_bounds(config)
    n = config.ngram
    checks += [
        ("schema.complexity", "complexity values are in [0, 1]",
         E.ExpectColumnValuesToBeBetween(column="complexity_value", min_value=0, max_value=1)),
        ("records.unique_ids", "id values are unique", E.ExpectColumnValuesToBeUnique(column="id")),
        ("grammar.well_formed", "well_formed (the completion parses under the grammar) is always True",
         E.ExpectColumnValuesToBeInSet(column="well_formed", value_set=[True])),
        ("grammar.answer_closed", "answer_closed (a well-formed completion ends with </answer>) is always True",
         E.ExpectColumnValuesToBeInSet(column="answer_closed", value_set=[True])),
        ("grammar.mode_matches", "record_mode (a valid mode) equals completion_mode (the completion's mode token)",
         E.ExpectColumnPairValuesToBeEqual(
             column_A="record_mode", column_B="completion_mode", ignore_row_if="either_value_is_missing")),
        ("grammar.prompt_plain", "prompt_tag (a control token's spelling in the prompt) is always null",
         E.ExpectColumnValuesToBeNull(column="prompt_tag")),
        ("mode.share", f"the mean of is_on (think-on share) is in [{lo:g}, {hi:g}]",
         E.ExpectColumnMeanToBeBetween(column="is_on", min_value=lo, max_value=hi)),
        ("length.completion_min", f"completion_tokens >= {config.min_tokens}",
         E.ExpectColumnValuesToBeBetween(column="completion_tokens", min_value=config.min_tokens)),
        ("length.total_max", f"total_tokens (prompt + completion) <= {config.max_tokens}",
         E.ExpectColumnValuesToBeBetween(column="total_tokens", max_value=config.max_tokens)),
        ("duplicates.prompt_mode", "(prompt_key, mode) pairs are unique",
         E.ExpectCompoundColumnsToBeUnique(column_list=["prompt_key", "mode"])),
        # mirror rows have a null key, and GX leaves nulls out of a uniqueness check
        ("duplicates.tagged_prompt", "prompt_key is unique among tagged records",
         E.ExpectColumnValuesToBeUnique(column="tagged_prompt_key")),
        # the columns hold the matched `suite/item id`, so the report shows what was copied from where
        ("overlap.exact", "eval_exact (the evaluation prompt equal to this prompt) is always null",
         E.ExpectColumnValuesToBeNull(column="eval_exact")),
        ("overlap.ngram", f"eval_ngram (an evaluation prompt sharing a {n}-gram) is always null",
         E.ExpectColumnValuesToBeNull(column="eval_ngram")),
        ("overlap.near_duplicate",
         f"eval_near (an evaluation prompt sharing >= {config.near_dup_threshold:g} of its informative character "
         f"{config.near_dup_n}-grams) is always null",
         E.ExpectColumnValuesToBeNull(column="eval_near")),
        ("answers.verified", "answer_problem (what the family's verifier found wrong) is always null",
         E.ExpectColumnValuesToBeNull(column="answer_problem")),
    ]
    return checks


_DESCRIPTIONS = {
    "files.manifest": "the dataset's manifest.json lists every shard and its digests match",
    "files.nonempty": "every shard holds at least one record",
    "lines.utf8": "every shard line is valid UTF-8 (an encoding error)",
    "lines.json": "every non-blank UTF-8 shard line is a JSON object",
    "records.count": "the dataset has at least one record",
    "records.unique_ids": "record ids are unique",
    "grammar.well_formed": "every completion parses under the response grammar",
    "grammar.answer_closed": "every completion closes its <answer> (no text after an unclosed <answer>)",
    "grammar.mode_matches": "the completion's mode token is the record's mode",
    "grammar.prompt_plain": "no prompt spells a control token (a grammar tag, end of text, padding)",
    "mode.share": "the share of each mode is within [mode_share_min, mode_share_max]",
    "length.completion_min": "completion has at least min_tokens (approximate) tokens",
    "length.total_max": "prompt + completion has at most max_tokens (approximate) tokens",
    "duplicates.prompt_mode": "no (normalised prompt, mode) appears twice",
    "duplicates.tagged_prompt": "no normalised prompt appears in two tagged records",
    "overlap.exact": "no prompt equals an evaluation test prompt (normalised)",
    "overlap.ngram": "no prompt shares a word n-gram with an evaluation test prompt",
    "overlap.near_duplicate": "no prompt is a near-duplicate of an evaluation test prompt (character n-grams)",
    "answers.verified": "every record's answers are right for its prompt, by its family's verifier",
}


def _description(name: str) -> str:
    if name.startswith("schema."):
        field_name = name.removeprefix("schema.")
        domain = f", in {_DOMAINS[field_name]}" if field_name in _DOMAINS else ""
        domain = ", in [0, 1]" if field_name == "complexity" else domain
        return f"field {field_name!r} is present, non-null, of type {RECORD_FIELDS[field_name].__name__}{domain}"
    return _DESCRIPTIONS[name]


# --- running GX ---------------------------------------------------------------------------------------

def _quiet_gx() -> None:
    # GX's own analytics and INFO chatter are noise in a pipeline log; the env var is read by GX versions
    # that still ship analytics
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
    gx_log = logging.getLogger("great_expectations")
    if gx_log.level == logging.NOTSET:
        gx_log.setLevel(logging.WARNING)


def _context(docs_dir: Path):
    """An ephemeral GX context (nothing persisted but the data docs site, which we point at `docs_dir`),
    with progress bars and analytics off."""
    import great_expectations as gx
    from great_expectations.data_context.types.base import (
        DataContextConfig,
        InMemoryStoreBackendDefaults,
        ProgressBarsConfig,
    )

    config = DataContextConfig(
        store_backend_defaults=InMemoryStoreBackendDefaults(),
        analytics_enabled=False,
        progress_bars=ProgressBarsConfig(globally=False, metric_calculations=False),
        data_docs_sites={
            "kat": {
                "class_name": "SiteBuilder",
                "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(docs_dir)},
                "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
            }
        },
    )
    return gx.get_context(project_config=config, mode="ephemeral")


def _run_suite(context, source, name: str, checks: list[Check], rows: list[dict[str, Any]], columns: list[str]):
    """Validate `rows` (as a DataFrame of Python objects) against `checks`; the GX suite result. `columns`
    are the frame's columns when there are no rows, so an empty dataset fails on its count, not on
    every check that can't find its column."""
    import great_expectations as gx
    import pandas as pd

    # object dtype keeps the values as JSON gave them, so the type checks see str/int/float, not a
    # column dtype pandas inferred (or coerced) on the way in
    df = pd.DataFrame(rows, dtype=object) if rows else pd.DataFrame(columns=columns, dtype=object)
    for column in ("is_on", "completion_tokens", "total_tokens", "complexity_value", "records"):
        if column in df:  # numeric checks want numbers (None becomes NaN, which they skip)
            df[column] = pd.to_numeric(df[column])
    for check, text, expectation in checks:
        expectation.meta = {"kat_check": check}
        # the data docs show the description in place of GX's generic sentence: our check names in the HTML
        expectation.description = f"[{check}] {text}"
    # a suite built whole and added once: adding expectations to a stored suite re-serialises it each time
    suite = context.suites.add(gx.ExpectationSuite(name=f"kat_{name}", expectations=[e for _, _, e in checks]))
    batch = source.add_dataframe_asset(name).add_batch_definition_whole_dataframe("all")
    definition = context.validation_definitions.add(gx.ValidationDefinition(name=name, data=batch, suite=suite))
    return definition.run(batch_parameters={"dataframe": df}, result_format=_RESULT_FORMAT)


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def _summarise(results: Iterable, order: list[str], id_of: dict[str, Any]) -> list[dict[str, Any]]:
    """One entry per check, merging its GX results: success, observed values, counts, examples."""
    by_check: dict[str, list] = {name: [] for name in order}
    for r in results:
        by_check[r.expectation_config.meta["kat_check"]].append(r)
    entries = []
    for name, parts in by_check.items():
        entry: dict[str, Any] = {
            "name": name, "description": _description(name), "success": all(r.success for r in parts),
            "expectations": [],
        }
        examples: list[dict[str, Any]] = []
        for r in parts:
            res = r.result or {}
            part: dict[str, Any] = {
                "type": r.expectation_config.type,
                "asserts": (r.expectation_config.description or "").removeprefix(f"[{name}] "),
                "success": bool(r.success),
            }
            if "observed_value" in res:
                part["observed"] = _jsonable(res["observed_value"])
            if "unexpected_count" in res:
                part["unexpected_count"] = res["unexpected_count"]
                part["element_count"] = res.get("element_count")
            error = _exception_message(r.exception_info)
            if error:
                part["error"] = error
            entry["expectations"].append(part)
            for hit in res.get("partial_unexpected_index_list") or []:
                location = hit.pop("location", None)
                value = next(iter(hit.values()), None) if len(hit) == 1 else hit
                record_id = id_of.get(location)
                examples.append({"id": location if record_id is None else record_id, "at": location,
                                 "value": _clip(value)})
        counts = [p["unexpected_count"] for p in entry["expectations"] if "unexpected_count" in p]
        if counts:
            entry["unexpected_count"] = max(counts)
        observed = [p["observed"] for p in entry["expectations"] if "observed" in p]
        if len(observed) == 1:
            entry["observed"] = observed[0]
        entry["examples"] = _dedupe(examples)[:_EXAMPLES]
        entries.append(entry)
    return entries


def _exception_message(info: Any) -> str | None:
    # GX reports either one {raised_exception, exception_message} or a dict of them keyed by metric
    if not isinstance(info, dict):
        return None
    infos = [info] if "raised_exception" in info else [v for v in info.values() if isinstance(v, dict)]
    messages = [i.get("exception_message") for i in infos if i.get("raised_exception")]
    return "; ".join(m for m in messages if m) or None


def _clip(value: Any, limit: int = 160) -> Any:
    """A JSON-able copy of a value with long strings cut short (examples are for reading, not recovery)."""
    value = _jsonable(value)
    if isinstance(value, dict):
        return {k: _clip(v, limit) for k, v in value.items()}
    if isinstance(value, str) and len(value) > limit:
        return value[: limit - 1] + "…"
    return value


def _dedupe(examples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    seen, out = set(), []
    for e in examples:
        if e["at"] not in seen:
            seen.add(e["at"])
            out.append(e)
    return out


# --- the stage ----------------------------------------------------------------------------------------

def default_report_dir(dataset_dir: str | os.PathLike) -> Path:
    """`<dataset_dir>.validation`: beside the dataset, not in it, so the dataset's digests stay valid."""
    dataset_dir = Path(dataset_dir).resolve()
    return dataset_dir.with_name(dataset_dir.name + ".validation")


def validate_dataset(
    dataset_dir: str | os.PathLike,
    report_dir: str | os.PathLike | None = None,
    config: ValidateConfig | None = None,
    tasks_config: TasksConfig | None = None,
) -> dict[str, Any]:
    """Validate a dataset directory; write the report; return its summary. Raises ValidationFailed (after
    writing the report) when a check fails, KatError when the dataset or an evaluation suite can't be read."""
    start = time.perf_counter()
    config = config or ValidateConfig()
    dataset_dir = Path(dataset_dir)
    report_dir = Path(report_dir) if report_dir is not None else default_report_dir(dataset_dir)
    _mode_bounds(config)  # a contradictory config is the user's error, before any work
    check_replaceable(report_dir, inputs=[dataset_dir])  # --report DATASET would replace the dataset
    timings: dict[str, float] = {}

    def lap(name: str, since: float) -> float:
        now = time.perf_counter()
        timings[name] = round(now - since, 3)
        return now

    shards = shard_paths(dataset_dir)
    lines, records = _read_lines(shards)
    files = _file_rows(dataset_dir, shards)
    t = lap("read_s", start)
    index = EvalIndex.build(load_eval_prompts(config.overlap_suites, tasks_config), config.ngram,
                             config.near_dup_n, config.near_dup_threshold)
    t = lap("eval_index_s", t)
    problems, answer_stats = _verify_answers(records, config, tasks_config)
    t = lap("verify_answers_s", t)
    rows = [{**r, **d} for r, d in zip(records, _derive(records, index, problems), strict=True)]
    t = lap("derive_s", t)

    _quiet_gx()
    with warnings.catch_warnings():  # GX imports the deprecated sre_* modules; not our users' concern
        warnings.simplefilter("ignore", DeprecationWarning)
        import great_expectations as gx

    t = lap("gx_import_s", t)
    with atomic_output_dir(report_dir) as tmp:
        context = _context(tmp / DOCS_DIR)
        source = context.data_sources.add_pandas("kat_dataset")
        record_checks = _record_checks(gx, config)
        runs = [
            _run_suite(context, source, "files", _file_checks(gx), files, ["location", "status", "records"]),
            _run_suite(context, source, "lines", _line_checks(gx), lines, ["location", "utf8", "is_object"]),
            _run_suite(context, source, "records", record_checks, rows,
                       [*RECORD_FIELDS, "location", *DERIVED_COLUMNS]),
        ]
        t = lap("gx_validate_s", t)
        context.build_data_docs(site_names=["kat"])
        localize(tmp / DOCS_DIR)  # the pages' Bootstrap, jQuery, ... from local copies: styled offline
        t = lap("gx_docs_s", t)

        order = list(dict.fromkeys(["files.manifest", "files.nonempty", "lines.utf8", "lines.json"]
                                   + [name for name, _, _ in record_checks]))
        id_of = {r["location"]: r.get("id") for r in records}
        checks = _summarise((r for run in runs for r in run.results), order, id_of)
        failed = [c["name"] for c in checks if not c["success"]]
        pages = sorted(str(p.relative_to(tmp)) for p in (tmp / DOCS_DIR / "validations").rglob("*.html"))
        summary = {
            "success": not failed,
            "failed": failed,
            "passed": len(checks) - len(failed),
            "total": len(checks),
            "dataset_dir": str(dataset_dir.resolve()),
            "report_dir": str(report_dir.resolve()),
            "report_json": str((report_dir / REPORT).resolve()),
            "data_docs": str((report_dir / DOCS_DIR / "index.html").resolve()),
            "data_docs_pages": pages,
            "checks": checks,
            "stats": {**_stats(records, lines, rows, index), **answer_stats},
            "config": config.model_dump(mode="json"),
            "gx_version": gx.__version__,
            "timings": timings,
            "elapsed_s": round(time.perf_counter() - start, 3),
        }
        (tmp / REPORT).write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
        # the input digest reads the dataset's manifest, so only when that is sound (else files.manifest failed)
        manifest = read_manifest(dataset_dir)
        sound = isinstance(manifest, dict) and isinstance(manifest.get("files"), dict)
        write_manifest(tmp, stage="validate", config=config, inputs={"dataset": dataset_dir} if sound else {},
                       extra={"success": not failed})

    report_path = summary["report_json"]
    log.info("validation %s: %s (data docs: %s)", "failed" if failed else "passed", report_path, summary["data_docs"])
    if failed:
        reasons = ", ".join(_reason(c) for c in checks if not c["success"])
        raise ValidationFailed(f"validation failed: {reasons}; report: {report_path}", report_path)
    return summary


_SAYS_WHY = ("lines.utf8", "answers.verified")


def _reason(check: dict[str, Any]) -> str:
    """`name (3 rows, e.g. gsm8k-12)`: the check's name with how much failed and one example."""
    details = []
    if check.get("unexpected_count"):
        details.append(f"{check['unexpected_count']} rows")
    elif "observed" in check:
        details.append(f"observed {check['observed']}")
    if check["examples"]:
        example = check["examples"][0]
        # where the finding is a sentence (an encoding error, a wrong answer), the first one is the reason
        said = f": {example['value']}" if check["name"] in _SAYS_WHY and isinstance(example["value"], str) else ""
        details.append(f"e.g. {example['id']}{said}")
    return f"{check['name']} ({', '.join(details)})" if details else check["name"]


def _stats(
    records: list[dict[str, Any]], lines: list[dict[str, Any]], rows: list[dict[str, Any]], index: EvalIndex
) -> dict[str, Any]:
    def counts(key: str) -> dict[str, int]:
        return dict(sorted(Counter(str(r.get(key)) for r in records).items()))

    on = [r["is_on"] for r in rows if r["is_on"] is not None]
    lengths = [r["completion_tokens"] for r in rows if r["completion_tokens"] is not None]
    totals = [r["total_tokens"] for r in rows if r["total_tokens"] is not None]
    return {
        "records": len(records),
        "lines": len(lines),
        "bad_lines": sum(not line["is_object"] for line in lines),
        "families": counts("family"),
        "modes": counts("mode"),
        "regimes": counts("regime"),
        "mode_share_on": round(sum(on) / len(on), 4) if on else None,
        "completion_tokens": _spread(lengths),
        "total_tokens": _spread(totals),
        "eval_suites": index.sizes,
        "eval_ngrams": len(index.ngrams),
        "eval_common_ngrams_ignored": index.common_ngrams,
    }


def _spread(values: list[int]) -> dict[str, float] | None:
    if not values:
        return None
    ordered = sorted(values)
    return {"min": ordered[0], "median": ordered[len(ordered) // 2], "mean": round(sum(values) / len(values), 1),
            "max": ordered[-1]}
