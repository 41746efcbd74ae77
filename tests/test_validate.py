"""The validate stage: a valid dataset passes; each kind of breakage fails the check that names it."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from kat_core.config import ValidateConfig
from kat_core.data import validate as V
from kat_core.data.dataset import write_shards
from kat_core.errors import KatError, ValidationFailed
from kat_core.format import render
from kat_core.manifest import verify_manifest, write_manifest
from kat_core.tasks.base import _REGISTRY, Item, Task

# A fake evaluation suite: ten prompts sharing a long template (which must not count as overlap) and one
# long distinctive question to copy from.
TEMPLATE = "Read the problem below carefully and then write only the final number as your answer please."
FAKE_EVAL = {
    "fake": [(f"t{i}", f"{TEMPLATE} What is {i} times {i + 3}?") for i in range(10)]
    + [("long", "A farmer has seventeen sheep and buys nine more goats before the spring market opens in town.")]
}


@pytest.fixture(autouse=True)
def fake_eval_suites(monkeypatch):
    """Tests use FAKE_EVAL unless they ask for the real suites (`real_suites`)."""
    monkeypatch.setattr(V, "load_eval_prompts", lambda suites, tasks_config: FAKE_EVAL)


@pytest.fixture
def real_suites(monkeypatch):
    monkeypatch.undo()


class ToyTask(Task):
    """The family of make_records' items: "Add a and b." has the answer a + b."""

    name = "toy"

    def examples(self, split="test", n=None, seed=0):
        return []

    def verify(self, item, answer_text):
        return answer_text.strip() == item.answer

    def item_of(self, record):
        m = re.search(r"Add (\d+) and (\d+)\.", record.get("prompt") or "", re.I)
        return Item(id="toy", family="toy", prompt="", answer=str(int(m[1]) + int(m[2])), difficulty=1) if m else None


@pytest.fixture(autouse=True)
def toy_task():
    """answers.verified re-verifies every record with its family's task: make_records' family is `toy`."""
    with pytest.MonkeyPatch.context() as mp:  # its own context: real_suites undoes the other monkeypatch
        mp.setitem(_REGISTRY, "toy", ToyTask)
        yield


def make_records(n_items: int = 30) -> list[dict]:
    """n items, alternating think-on/off as tagged; every third also mirrored into the other mode."""
    records = []
    for i in range(n_items):
        a, b = 11 * i + 3, 7 * i + 5
        prompt = f"{TEMPLATE} Add {a} and {b}."  # shares the template with FAKE_EVAL, and must still pass
        tagged = "on" if i % 2 else "off"
        modes = [(tagged, "tagged")] + ([("off" if tagged == "on" else "on", "mirror")] if i % 3 == 0 else [])
        for mode, regime in modes:
            think = f"{a}+{b}={a + b}" if mode == "on" else None
            records.append({
                "id": f"item{i}-{mode}", "source_id": f"item{i}", "family": "toy", "prompt": prompt,
                "answer": str(a + b), "difficulty": 1 + i % 5, "mode": mode, "regime": regime,
                "complexity": 0.7 if tagged == "on" else 0.2,
                "completion": render(f"two numbers to add (item {i})", mode, str(a + b), think),
            })
    return records


def write_dataset(directory: Path, records: list[dict], *, shard_size: int = 25, raw_tail: bytes = b"") -> Path:
    directory.mkdir(parents=True)
    names = write_shards(directory, records, shard_size)
    if raw_tail:  # raw text appended to the first shard (before the manifest, so its digest still matches)
        with open(directory / names[0], "ab") as f:
            f.write(raw_tail)
    write_manifest(directory, stage="synthesize")
    return directory


def failing(tmp_path: Path, records: list[dict], config: ValidateConfig | None = None, **kw) -> tuple[dict, str]:
    """Validate a dataset that must fail: (the report written anyway, the error message)."""
    dataset = write_dataset(tmp_path / "ds", records, **kw)
    with pytest.raises(ValidationFailed) as info:
        V.validate_dataset(dataset, config=config)
    report = json.loads(Path(info.value.report_path).read_text())
    assert report["success"] is False
    return report, str(info.value)


def check(report: dict, name: str) -> dict:
    return next(c for c in report["checks"] if c["name"] == name)


def test_valid_dataset_passes_and_writes_report_and_docs(tmp_path):
    dataset = write_dataset(tmp_path / "ds", make_records())
    summary = V.validate_dataset(dataset)

    assert summary["success"] and summary["failed"] == []
    assert all(c["success"] for c in summary["checks"])
    names = {c["name"] for c in summary["checks"]}
    assert {"files.manifest", "lines.json", "schema.completion", "grammar.well_formed", "mode.share",
            "length.total_max", "duplicates.tagged_prompt", "overlap.ngram"} <= names
    # the report goes beside the dataset, so the dataset and its digests are untouched
    report_dir = tmp_path / "ds.validation"
    assert summary["report_dir"] == str(report_dir.resolve())
    assert verify_manifest(dataset) == []
    assert json.loads((report_dir / "validation.json").read_text()) == summary
    assert (report_dir / "manifest.json").is_file()
    stats = summary["stats"]
    assert stats["records"] == 40 and stats["modes"] == {"off": 20, "on": 20}
    assert check(summary, "mode.share")["observed"] == pytest.approx(0.5)
    assert stats["eval_common_ngrams_ignored"] > 0  # the shared template was recognised as such
    # GX's HTML data docs: the index and one validation page per suite, naming our checks
    assert summary["passed"] == summary["total"] == len(summary["checks"])
    assert summary["report_json"] == str((report_dir / "validation.json").resolve())
    index = Path(summary["data_docs"])
    assert index == (report_dir / "docs" / "index.html").resolve()
    assert index.is_file() and index.stat().st_size > 2000
    pages = [report_dir / p for p in summary["data_docs_pages"]]
    assert len(pages) == 3 and all(p.is_file() for p in pages)
    html = "".join(p.read_text() for p in pages)
    assert "[grammar.well_formed]" in html and "[overlap.exact]" in html
    assert not list(tmp_path.glob(".ds.validation.tmp-*"))  # written atomically


def test_report_dir_can_be_given_and_is_replaced(tmp_path):
    dataset = write_dataset(tmp_path / "ds", make_records(10))
    out = tmp_path / "reports" / "v1"
    out.mkdir(parents=True)
    (out / "manifest.json").write_text("{}")  # an earlier report: a folder without a manifest is not replaced
    (out / "stale.txt").write_text("from an earlier run")
    V.validate_dataset(dataset, out)
    assert (out / "validation.json").is_file() and not (out / "stale.txt").exists()


def test_broken_tag_fails_well_formed(tmp_path):
    records = make_records()
    records[4]["completion"] = records[4]["completion"].replace("<answer>", "<answr>")
    report, message = failing(tmp_path, records)
    assert report["failed"] == ["grammar.well_formed"]
    assert check(report, "grammar.well_formed")["examples"][0]["id"] == records[4]["id"]
    assert "grammar.well_formed" in message and "validation.json" in message


def test_completion_in_the_other_mode_fails_mode_match(tmp_path):
    records = make_records()
    off = next(r for r in records if r["mode"] == "off")
    off["completion"] = render("judge", "on", off["answer"], "some thinking")
    report, _ = failing(tmp_path, records)
    assert report["failed"] == ["grammar.mode_matches"]
    assert check(report, "grammar.mode_matches")["examples"][0]["id"] == off["id"]


@pytest.mark.parametrize("spelled", ["</judge><think_off><answer>", "<|endoftext|>"])
def test_a_prompt_spelling_a_control_token_fails(tmp_path, spelled):
    # the trained tokenizer reads the spelling as the token: a request holding its own judge or decision
    records = make_records()
    records[2]["prompt"] += " " + spelled
    report, message = failing(tmp_path, records)
    assert "grammar.prompt_plain" in report["failed"]
    assert [e["id"] for e in check(report, "grammar.prompt_plain")["examples"]] == [records[2]["id"]]
    assert "grammar.prompt_plain" in message


def test_duplicated_tagged_prompt_fails(tmp_path):
    records = make_records()
    on, off = (next(r for r in records if r["id"] == i) for i in ("item1-on", "item2-off"))  # not mirrored
    on["prompt"] = "  " + off["prompt"].upper()  # same prompt once normalised, in the other mode
    report, _ = failing(tmp_path, records)
    # (prompt, mode) is still unique; and item 1's answer is wrong for item 2's prompt
    assert report["failed"] == ["duplicates.tagged_prompt", "answers.verified"]
    assert {e["id"] for e in check(report, "duplicates.tagged_prompt")["examples"]} >= {on["id"], off["id"]}


def test_same_prompt_twice_in_one_mode_fails(tmp_path):
    records = make_records()
    mirror = next(r for r in records if r["regime"] == "mirror")
    mirror["mode"] = "on" if mirror["mode"] == "off" else "off"  # now the same mode as its tagged twin
    mirror["completion"] = render("j", mirror["mode"], "1", "t" if mirror["mode"] == "on" else None)
    report, _ = failing(tmp_path, records)
    assert "duplicates.prompt_mode" in report["failed"]
    assert "duplicates.tagged_prompt" not in report["failed"]


def test_prompt_copied_from_an_evaluation_set_fails_overlap(tmp_path):
    records = make_records()
    records[0]["prompt"] = FAKE_EVAL["fake"][-1][1].lower()
    # a paraphrase keeping 13 consecutive words of the question is caught by the n-gram check only
    records[2]["prompt"] = "Story: " + FAKE_EVAL["fake"][-1][1].replace("town", "the village") + " Be quick."
    report, message = failing(tmp_path, records)
    # the copies are near-duplicates too, and the records' answers no longer fit their prompts
    assert set(report["failed"]) == {"overlap.exact", "overlap.ngram", "overlap.near_duplicate", "answers.verified"}
    exact, ngram = check(report, "overlap.exact"), check(report, "overlap.ngram")
    assert exact["unexpected_count"] == 1 and exact["examples"][0]["value"] == "fake/long"
    assert ngram["unexpected_count"] == 2
    assert {e["id"] for e in ngram["examples"]} == {records[0]["id"], records[2]["id"]}
    assert "overlap.exact (1 rows, e.g. item0-off)" in message


def test_short_prompts_only_checked_exactly(tmp_path, monkeypatch):
    records = make_records()
    monkeypatch.setattr(V, "load_eval_prompts", lambda suites, tasks_config: {"fake": [("a", "Compute 7*8.")]})
    records[1]["prompt"] = "compute   7*8."
    report, _ = failing(tmp_path, records)
    assert report["failed"] == ["overlap.exact", "answers.verified"]  # not near: too short to judge


def test_bad_mode_share_fails(tmp_path):
    records = [r for r in make_records() if r["mode"] == "off"]
    report, message = failing(tmp_path, records)
    assert report["failed"] == ["mode.share"]
    assert check(report, "mode.share")["observed"] == 0.0
    assert "mode.share (observed 0.0)" in message


def test_missing_field_fails_its_schema_check_only(tmp_path):
    records = make_records()
    del records[3]["answer"]
    del records[5]["completion"]
    report, _ = failing(tmp_path, records)
    assert report["failed"] == ["schema.answer", "schema.completion"]
    assert check(report, "schema.answer")["examples"][0]["id"] == records[3]["id"]


def test_field_missing_everywhere_fails_without_crashing(tmp_path):
    records = make_records()
    for r in records:
        del r["complexity"]
    report, _ = failing(tmp_path, records)
    assert report["failed"] == ["schema.complexity"]


def test_wrong_types_and_domains_fail_schema(tmp_path):
    records = make_records()
    records[0]["difficulty"] = "3"
    records[1]["regime"] = "mirrored"
    records[2]["complexity"] = 1.5
    records[3]["id"] = 17
    records[4]["mode"] = "maybe"
    report, _ = failing(tmp_path, records)
    assert report["failed"] == ["schema.id", "schema.difficulty", "schema.mode", "schema.regime", "schema.complexity"]
    assert report["stats"]["mode_share_on"] is not None  # the valid modes still count


def test_malformed_json_line_fails_lines_check(tmp_path):
    report, message = failing(tmp_path, make_records(), raw_tail=b'{"id": "broken", \n[1, 2]\n\n{"id": "\xff"}\n')
    assert report["failed"] == ["lines.utf8", "lines.json"]
    lines = check(report, "lines.json")
    assert lines["unexpected_count"] == 2  # the blank line is skipped, the bad byte is the encoding check's
    assert [e["at"] for e in lines["examples"]] == ["train-00000.jsonl:26", "train-00000.jsonl:27"]
    encoding = check(report, "lines.utf8")
    assert encoding["unexpected_count"] == 1 and encoding["examples"][0]["at"] == "train-00000.jsonl:29"
    assert report["stats"]["records"] == 40  # the good lines were still validated
    assert "lines.json" in message
    # the one-line reason says it is an encoding problem, and where
    assert "lines.utf8 (1 rows, e.g. train-00000.jsonl:29: encoding error: not UTF-8 (byte 0xff at column 9))" \
        in message


def test_length_bounds(tmp_path):
    records = make_records()
    report, _ = failing(tmp_path, records, ValidateConfig(min_tokens=30, max_tokens=35))
    assert set(report["failed"]) == {"length.completion_min", "length.total_max"}


def test_changed_shard_fails_manifest_check(tmp_path):
    dataset = write_dataset(tmp_path / "ds", make_records())
    (dataset / "train-00001.jsonl").write_text("")  # emptied after the manifest was written
    with pytest.raises(ValidationFailed) as info:
        V.validate_dataset(dataset)
    report = json.loads(Path(info.value.report_path).read_text())
    assert "files.manifest" in report["failed"]
    assert check(report, "files.manifest")["examples"][0]["value"] == "digest mismatch"


def test_user_errors_are_kat_errors(tmp_path):
    with pytest.raises(KatError, match="dataset directory not found"):
        V.validate_dataset(tmp_path / "nope")
    dataset = write_dataset(tmp_path / "ds", make_records(4))
    with pytest.raises(KatError, match="mode_share_min"):
        V.validate_dataset(dataset, config=ValidateConfig(mode_share_min=0.6, mode_share_max=0.9))


def test_approx_tokens():
    # tags 1 each, digits 1 each, a letter run 1, other characters 1 each
    assert V.approx_tokens("<answer>123 apples, ok</answer>") == 1 + 3 + 1 + 1 + 1 + 1
    assert V.approx_tokens("<think_on><think>x_y</think>") == 2 + 3 + 1


# --- against the real evaluation suites ---------------------------------------------------------------

def test_real_gsm8k_question_is_caught(tmp_path, real_suites):
    from kat_core.tasks import get_task

    item = get_task("gsm8k").examples("test")[0]
    records = make_records()
    records[0]["prompt"] = item.prompt
    report, _ = failing(tmp_path, records, ValidateConfig(overlap_suites=["gsm8k"]))
    assert {"overlap.exact", "overlap.ngram"} <= set(report["failed"])
    assert check(report, "overlap.exact")["examples"][0]["value"] == f"gsm8k/{item.id}"
    assert report["stats"]["eval_suites"] == {"gsm8k": 1319}


def test_real_arith_test_prompt_is_caught(tmp_path, real_suites):
    from kat_core.tasks import get_task

    test_item = get_task("arith").examples("test")[0]
    records = make_records()
    records[0]["prompt"] = test_item.prompt
    report, _ = failing(tmp_path, records, ValidateConfig(overlap_suites=["arith"]))
    # arith prompts are shorter than an n-gram and too short to call near; the toy answer does not fit
    assert report["failed"] == ["overlap.exact", "answers.verified"]


def test_empty_dataset_fails_on_its_count(tmp_path):
    report, _ = failing(tmp_path, [])
    assert report["failed"] == ["files.nonempty", "records.count", "mode.share"]


def test_unreadable_manifest_fails_without_crashing(tmp_path):
    dataset = write_dataset(tmp_path / "ds", make_records())
    (dataset / "manifest.json").write_text("{")
    with pytest.raises(ValidationFailed) as info:
        V.validate_dataset(dataset)
    report = json.loads(Path(info.value.report_path).read_text())
    assert report["failed"] == ["files.manifest"]


# --- broken data: what the validation let through before issue 17 -----------------------------------------

def test_text_after_an_unclosed_answer_is_malformed(tmp_path):
    records = make_records()
    records[0]["completion"] = records[0]["completion"].removesuffix("</answer>") + " and then more text follows"
    records[1]["completion"] = records[1]["completion"].removesuffix("</answer>")  # unclosed at the very end
    report, message = failing(tmp_path, records)
    # the parser tolerates both (a generation may stop before </answer>); training data may not. (The toy
    # verifier also rejects "14 and then more text follows" as an answer.)
    assert report["failed"] == ["grammar.answer_closed", "answers.verified"]
    assert check(report, "grammar.answer_closed")["unexpected_count"] == 2
    assert "grammar.answer_closed (2 rows" in message


def test_an_empty_or_blank_shard_the_manifest_lists_fails(tmp_path):
    dataset = tmp_path / "ds"
    dataset.mkdir()
    write_shards(dataset, make_records(), 100)
    (dataset / "train-00001.jsonl").write_bytes(b"")
    (dataset / "train-00002.jsonl").write_bytes(b"   \n\n \t\n")
    write_manifest(dataset, stage="synthesize")  # listed, digests and all
    with pytest.raises(ValidationFailed) as info:
        V.validate_dataset(dataset)
    report = json.loads(Path(info.value.report_path).read_text())
    assert report["failed"] == ["files.nonempty"]
    assert [e["at"] for e in check(report, "files.nonempty")["examples"]] == ["train-00001.jsonl", "train-00002.jsonl"]


def test_a_wrong_answer_fails_reverification(tmp_path):
    records = make_records()
    wrong = records[4]  # answer and completion agree with each other, not with the prompt
    wrong["answer"] = str(int(wrong["answer"]) + 1)
    wrong["completion"] = render("j", wrong["mode"], wrong["answer"], "t" if wrong["mode"] == "on" else None)
    lying = records[5]  # right answer field, wrong answer in the completion
    lying["completion"] = render("j", lying["mode"], "12345", "t" if lying["mode"] == "on" else None)
    records[0]["family"] = "nosuchtask"  # a family without a task cannot be verified
    report, message = failing(tmp_path, records)
    assert report["failed"] == ["answers.verified"]
    found = {e["id"]: e["value"] for e in check(report, "answers.verified")["examples"]}
    assert "is wrong for the prompt" in found[wrong["id"]] and "completion's answer" in found[lying["id"]]
    assert found[records[0]["id"]] == "no task 'nosuchtask' to verify its answers with"
    assert report["stats"]["answers_checked"] == {"nosuchtask": 1, "toy": 39}
    assert report["stats"]["answers_wrong"] == 3


def test_answer_verification_can_be_limited(tmp_path):
    records = make_records()
    records[4]["answer"] = "0"  # wrong, but not checked: verify_max=0 turns re-verification off
    dataset = write_dataset(tmp_path / "ds", records)
    report = V.validate_dataset(dataset, config=ValidateConfig(verify_max=0))
    assert report["success"] and report["stats"]["answers_checked"] == {"toy": 0}


def test_a_near_duplicate_of_a_short_gsm8k_question_is_caught(tmp_path, real_suites):
    from kat_core.tasks import get_task

    def number_in_every_13_gram(words: list[str]) -> int | None:
        """The index of a word that is a number and lies in every 13-word window, if there is one."""
        return next((k for k, w in enumerate(words) if w.isdigit() and len(words) - 13 <= k <= 12), None)

    questions = [item.prompt.split() for item in get_task("gsm8k").examples("test")]
    words = next(q for q in questions if number_in_every_13_gram(q) is not None)
    k = number_in_every_13_gram(words)
    changed = " ".join(words[:k] + [str(int(words[k]) + 1)] + words[k + 1:])
    dropped = " ".join(w for i, w in enumerate(words) if i % 8 != 7)
    records = make_records()
    records[0]["prompt"], records[2]["prompt"] = changed, dropped
    report, _ = failing(tmp_path, records, ValidateConfig(overlap_suites=["gsm8k"]))
    # no 13-word n-gram survives either edit of a question this short: only the near-duplicate check sees them
    assert "overlap.ngram" not in report["failed"] and "overlap.exact" not in report["failed"]
    near = check(report, "overlap.near_duplicate")
    assert near["unexpected_count"] == 2 and near["examples"][0]["value"].startswith("gsm8k/")


def test_a_large_family_is_verified_on_a_seeded_sample():
    records = make_records(60)  # 80 records
    config = ValidateConfig(verify_max=10)
    problems, stats = V._verify_answers(records, config, None)
    assert stats == {"answers_checked": {"toy": 10}, "answers_wrong": 0} and problems == {}
    for r in records:
        r["answer"] = "0"  # all wrong: the sample finds exactly its 10, the same 10 each time
    first, _ = V._verify_answers(records, config, None)
    again, _ = V._verify_answers(records, config, None)
    assert len(first) == 10 and first == again


def test_data_docs_are_styled_offline(tmp_path):
    """The GX pages load Bootstrap, jQuery, ... from local copies (make install fetches them with npm): in a
    browser that can reach no network, the page is styled and its scripts run."""
    import os

    from playwright.sync_api import sync_playwright

    from kat_core.data.docs_assets import assets_dir
    from tests.test_dashboard import CHROMIUM

    assert (assets_dir() / "bootstrap@4.3.1" / "package.json").is_file(), (
        f"no data docs assets in {assets_dir()}: run `make install` (python -m kat_core.data.docs_assets fetch)")
    summary = V.validate_dataset(write_dataset(tmp_path / "ds", make_records(10)))
    page_path = tmp_path / "ds.validation" / summary["data_docs_pages"][0]
    assert "https://" not in "".join(re.findall(r"<(?:link|script)\b[^>]*>", page_path.read_text()))
    blocked = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"] if os.geteuid() == 0 else [])
        page = browser.new_page()
        page.route("http*://**/*", lambda route: (blocked.append(route.request.url), route.abort()))
        page.goto(page_path.as_uri())
        page.wait_for_load_state("load")
        jquery = page.evaluate("typeof window.jQuery")
        font = page.evaluate("getComputedStyle(document.body).fontFamily")
        table_styled = page.evaluate("getComputedStyle(document.querySelector('table')).borderCollapse")
        browser.close()
    assert jquery == "function"  # the scripts ran: jQuery, Bootstrap and bootstrap-table came from disk
    assert "Segoe UI" in font  # Bootstrap 4's font stack: its stylesheet applied
    assert table_styled == "collapse"
    assert all("great-expectations-web-assets" in u or "greatexpectations.io" in u for u in blocked), blocked
