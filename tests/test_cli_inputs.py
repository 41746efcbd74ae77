"""Hostile or malformed input to the `kat` command: one `error:` line and exit code 1, never a traceback, and
no input replaced by an output (tests.helpers.kat_here runs the command in-process)."""

import json
import shutil

import pytest

from tests.helpers import kat_here

FEW = ["--set", "synth.families={arith: 20}", "--set", "synth.pool=10", "-q"]


def _one_line_error(r, *fragments):
    assert r.returncode == 1, r.stderr
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip() and not ln.startswith(("WARNING", "INFO"))]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert "Traceback" not in r.stderr
    for f in fragments:
        assert f in lines[0], lines[0]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "d"
    assert kat_here("data", "synth", "--out", out, *FEW).returncode == 0
    return out


@pytest.fixture
def broken(dataset, tmp_path):
    """A copy of the dataset, to break one file of."""
    copy = tmp_path / "broken"
    shutil.copytree(dataset, copy)
    return copy


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tiny_tokenizer):
    """A fresh (untrained) smoke-sized checkpoint: enough to load, tokenize and decode a few tokens."""
    from kat_core.config import load_config
    from kat_core.model import build_model, save_checkpoint

    out = tmp_path_factory.mktemp("ckpt") / "ckpt"
    config = load_config("smoke", ["model.hidden_size=32", "model.num_layers=1", "model.num_heads=2",
                                   "model.intermediate_size=64", "model.max_seq_len=64"])
    save_checkpoint(out, build_model(config.model, tiny_tokenizer), tiny_tokenizer)
    return out


# --- a dataset's files, broken -------------------------------------------------------------------------------

@pytest.mark.parametrize("command", ["validate", "stats"])
@pytest.mark.parametrize("content", [b"[1, 2]\n", b"\xff\xfe\x00", b'{"files": [1]}\n'])
def test_a_manifest_that_is_not_a_json_object_is_no_traceback(broken, command, content):
    (broken / "manifest.json").write_bytes(content)
    r = kat_here("data", command, broken)
    assert "Traceback" not in r.stderr, r.stderr
    if command == "validate":  # the integrity check names it
        _one_line_error(r, "files.manifest")
    else:  # stats are computed from the records, the manifest only adds the critic's numbers
        assert r.returncode == 0, r.stderr


def test_stats_of_a_shard_that_is_not_utf8_names_the_line(broken):
    with open(broken / "train-00000.jsonl", "ab") as f:
        f.write(b'{"id": "\xff"}\n')
    lines = sum(1 for _ in open(broken / "train-00000.jsonl", "rb"))
    _one_line_error(kat_here("data", "stats", broken), f"train-00000.jsonl:{lines}: not UTF-8 (byte 0xff")


@pytest.mark.parametrize("command", ["validate", "stats"])
def test_a_directory_where_a_shard_should_be_is_one_line(broken, command):
    (broken / "train-00001.jsonl").mkdir()
    _one_line_error(kat_here("data", command, broken), "train-00001.jsonl: a shard must be a regular file")


def test_stats_count_records_whose_fields_have_the_wrong_type(broken):
    (broken / "train-00000.jsonl").write_text(json.dumps({"difficulty": [1], "mode": {"a": 1}, "completion": 5})
                                              + "\n")
    r = kat_here("data", "stats", broken)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr


# --- an output that is, holds or lies inside an input ----------------------------------------------------------

@pytest.mark.parametrize("where", ["{d}", "{d}/report", "{d}/.."])
def test_validate_never_writes_its_report_over_or_into_the_dataset(broken, where):
    before = sorted(p.name for p in broken.iterdir())
    report = where.format(d=broken)
    _one_line_error(kat_here("data", "validate", broken, "--report", report), "is, holds or lies inside the input")
    assert sorted(p.name for p in broken.iterdir()) == before  # the dataset is as it was


@pytest.mark.parametrize("args", [
    ["train", "pretrain", "--data", "{d}", "--out", "{d}"],
    ["train", "pretrain", "--data", "{d}", "--out", "{d}/ckpt"],
    ["train", "coldstart", "--model", "{d}", "--data", "{d}", "--out", "{d}"],
    ["train", "srpo", "--model", "{d}", "--data", "{d}", "--out", "{d}/.."],
    ["train", "cache-teacher", "--teacher", "{d}", "--data", "{d}", "--out", "{d}"],
    ["model", "import", "{d}", "--out", "{d}"],
])
def test_stages_refuse_an_out_that_overlaps_their_input_before_any_work(broken, args):
    before = sorted(p.name for p in broken.iterdir())
    _one_line_error(kat_here(*[a.format(d=broken) for a in args]), "is, holds or lies inside the input")
    assert sorted(p.name for p in broken.iterdir()) == before


def test_eval_refuses_an_out_inside_the_model(checkpoint, tmp_path):
    _one_line_error(kat_here("eval", checkpoint, "--out", checkpoint / "eval",
                             env={"KAT_HOME": str(tmp_path / "home")}), "is, holds or lies inside the input")
    _one_line_error(kat_here("eval", "compare", checkpoint, checkpoint, "--out", checkpoint,
                             env={"KAT_HOME": str(tmp_path / "home")}), "is, holds or lies inside the input")
    assert not (checkpoint / "eval").exists() and not (checkpoint / "a").exists()


# --- reports and checkpoints, broken ---------------------------------------------------------------------------

@pytest.mark.parametrize("content, fragment", [
    (b"[1]\n", "is not an evaluation report"),
    (b'{"validation": "passed"}\n', "is not an evaluation report"),
    (b"\xff\xfe", "is not valid JSON"),
])
def test_eval_compare_of_a_json_file_that_is_no_report_is_one_line(tmp_path, content, fragment):
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "report.json").write_bytes(content)
    _one_line_error(kat_here("eval", "compare", tmp_path / "a", tmp_path / "b", "--out", tmp_path / "cmp"),
                    fragment)
    assert not (tmp_path / "cmp").exists()


@pytest.mark.parametrize("line, fragment", [("trunc{", "malformed JSON"), ('{"x": 1}', "not an evaluation's item")])
def test_eval_compare_of_broken_items_is_one_line(tmp_path, line, fragment):
    report = {"overall": {}, "suites": {}, "items_digest": "x"}
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "report.json").write_text(json.dumps(report))
    (tmp_path / "b" / "items.jsonl").write_text(line + "\n")
    _one_line_error(kat_here("eval", "compare", tmp_path / "a", tmp_path / "b", "--out", tmp_path / "cmp"),
                    "items.jsonl", fragment)


@pytest.mark.parametrize("content", ["[1]", "{}", '{"added_tokens": [], "model": 3}'])
def test_a_malformed_tokenizer_json_is_one_line(checkpoint, tmp_path, content):
    copy = tmp_path / "ckpt"
    shutil.copytree(checkpoint, copy)
    (copy / "tokenizer.json").write_text(content)
    _one_line_error(kat_here("generate", copy, "Compute 2+3."), "cannot load the tokenizer of", str(copy))


def test_eval_names_its_report_after_the_dir_when_the_manifest_is_broken(checkpoint, tmp_path):
    copy = tmp_path / "ckpt"
    shutil.copytree(checkpoint, copy)
    (copy / "manifest.json").write_text("[1]")
    home = tmp_path / "home"
    r = kat_here("eval", copy, "--limit", "1", "--samples", "0", "--max-new-tokens", "2", "--modes", "off", "-q",
                 env={"KAT_HOME": str(home)})
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert [p.name for p in (home / "eval").iterdir()] == ["ckpt"]


# --- numbers and environment -----------------------------------------------------------------------------------

@pytest.mark.parametrize("budget", ["2000", str(10**12)])
def test_generate_refuses_a_budget_past_the_models_context(checkpoint, budget):
    _one_line_error(kat_here("generate", checkpoint, "Compute 2+3.", "--max-new-tokens", budget),
                    "context is", f"--max-new-tokens {budget} does not fit")


def test_generate_default_budget_fits_the_context(checkpoint):
    r = kat_here("generate", checkpoint, "Compute 2+3.", "--json")  # default 256 > this model's 64 positions
    assert r.returncode == 0, r.stderr
    record = json.loads(r.stdout)
    assert record["tokens"]["total"] < 64


def test_a_thread_count_in_the_environment_that_is_no_number_is_one_line(tmp_path):
    _one_line_error(kat_here("train", "pretrain", "--data", tmp_path / "d", "--out", tmp_path / "o",
                             env={"KAT_TORCH_THREADS": "abc"}), "KAT_TORCH_THREADS='abc'")


def test_tasks_show_refuses_a_negative_count():
    r = kat_here("tasks", "show", "arith", "-n", "-1")
    assert r.returncode == 2 and "Invalid value" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_tasks_show_refuses_a_count_it_would_spend_forever_on():
    r = kat_here("tasks", "show", "arith", "-n", "99999999999")
    assert r.returncode == 2 and "Traceback" not in r.stderr


def test_an_unknown_schedule_id_is_named_as_unknown(tmp_path, monkeypatch):
    monkeypatch.setenv("KAT_HOME", str(tmp_path))
    r = kat_here("schedule", "pause", "nope")
    _one_line_error(r, "no local schedule 'nope'")


@pytest.mark.parametrize("option", ["--limit", "--oracle-items"])
def test_eval_refuses_a_count_it_would_spend_forever_on(checkpoint, option):
    r = kat_here("eval", "run", checkpoint, option, "99999999999")
    assert r.returncode == 2 and "Traceback" not in r.stderr and option in r.stderr
