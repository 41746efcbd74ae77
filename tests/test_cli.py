"""The `kat` command: exit codes and one-line errors. Start-up time, the absence of heavy imports and one
end-to-end data flow run as real subprocesses; argument and error checks run in-process (tests.helpers.kat_here:
the same `main`, without starting a Python each time)."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import kat_here

KAT = [sys.executable, "-m", "kat_app.cli"]


def kat(*args, cwd=None):
    return subprocess.run([*KAT, *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=300)


def kat_in(*args, env=None):
    return kat_here(*args, env=env)


def test_help_is_fast():
    kat("--help")  # warm the file cache
    started = time.perf_counter()
    r = kat("--help")
    assert r.returncode == 0 and "data" in r.stdout
    assert time.perf_counter() - started < 1.0


def test_no_heavy_imports_at_start():
    code = "import sys, kat_app.cli; print(sorted(m for m in ('torch','transformers','great_expectations'," \
           "'mlflow','deepspeed','kfp') if m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "[]"


def _one_line_error(r, *fragments):
    assert r.returncode == 1, r.stderr
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert "Traceback" not in r.stderr
    for f in fragments:
        assert f in lines[0], lines[0]


def test_synth_validate_stats_end_to_end(tmp_path):
    data = tmp_path / "d"
    r = kat("data", "synth", "--profile", "smoke", "--out", data, "-q")
    assert r.returncode == 0, r.stderr
    r = kat("data", "validate", data)
    assert r.returncode == 0, r.stderr
    assert "validation passed" in r.stderr
    r = kat("data", "stats", data)
    assert r.returncode == 0 and "think-off" in r.stdout and "level" in r.stdout


def test_config_typo_names_the_key(tmp_path):
    r = kat_in("data", "synth", "--out", tmp_path / "d", "--set", "synth.mirror_shar=0.2")
    _one_line_error(r, "synth.mirror_shar", "synth.mirror_share")
    assert not (tmp_path / "d").exists()


def test_a_profile_key_overrides_only_itself_within_a_section():
    from kat_core.config import SrpoConfig, load_config

    # setting one key of srpo.train keeps the srpo section's own defaults for the rest (lr, warm-up), not
    # TrainConfig's class defaults (a learning rate 50x too high for RL)
    config = load_config("smoke", ["srpo.train.steps=7"])
    assert config.srpo.train.steps == 7 and config.srpo.train.lr == SrpoConfig().train.lr
    assert config.coldstart.train.lr == 3e-4  # the smoke profile sets other coldstart.train keys
    # a dict-valued field is replaced, not merged
    assert load_config("smoke", ["cluster.node_selector={pool: gpu}"]).cluster.node_selector == {"pool": "gpu"}


def test_unknown_family_lists_the_known_ones(tmp_path):
    r = kat_in("data", "synth", "--out", tmp_path / "d", "--set", "synth.families={algebra: 3}")
    _one_line_error(r, "algebra", "arith", "gsm8k")


def test_missing_benchmark_says_where_it_looked(tmp_path, monkeypatch):
    r = kat_in("tasks", "show", "gsm8k", env={"KAT_BENCHMARKS_DIR": str(tmp_path)})
    _one_line_error(r, str(tmp_path / "gsm8k_test.jsonl"), "KAT_BENCHMARKS_DIR")


def test_malformed_jsonl_names_file_and_line(tmp_path):
    data = tmp_path / "d"
    assert kat_in("data", "synth", "--out", data, "-q", "--set", "synth.families={arith: 20}").returncode == 0
    shard = data / "train-00000.jsonl"
    lines = shard.read_text().splitlines()
    lines[2] = '{"id": "broken", '
    shard.write_text("\n".join(lines) + "\n")
    _one_line_error(kat_in("data", "stats", data), f"{shard}:3")


def test_tasks_show_prints_items():
    r = kat_in("tasks", "show", "arith", "--split", "test", "-n", "2")
    items = [json.loads(line) for line in r.stdout.splitlines()]
    assert len(items) == 2 and {"id", "prompt", "answer", "difficulty"} <= set(items[0])


@pytest.mark.parametrize("args", [["data", "validate", "/nonexistent/dir"], ["data", "stats", "/nonexistent"]])
def test_missing_dataset_dir(args):
    _one_line_error(kat_in(*args), "/nonexistent")


def test_not_a_dataset(tmp_path):
    _one_line_error(kat_in("data", "validate", tmp_path), "no train-*.jsonl")


# --- what --out may replace: an earlier output, never the user's files --------------------------------------

FEW = ["--set", "synth.families={arith: 20}"]


@pytest.mark.parametrize("kind", ["a folder of the user's", "a file"])
def test_an_out_that_no_stage_wrote_is_refused_and_left_as_it_was(tmp_path, kind):
    out = tmp_path / "out"
    if kind == "a file":
        out.write_text("precious")
    else:
        (out / "sub").mkdir(parents=True)
        (out / "sub" / "thesis.txt").write_text("precious")
    _one_line_error(kat_in("data", "synth", "--out", out, "-q", *FEW), str(out), "refusing to replace it")
    assert (out if kind == "a file" else out / "sub" / "thesis.txt").read_text() == "precious"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temp dir, no moved-aside copy


def test_out_dot_in_a_users_folder_is_refused(tmp_path, monkeypatch):
    (tmp_path / "keep.txt").write_text("mine")
    monkeypatch.chdir(tmp_path)
    _one_line_error(kat_in("data", "synth", "--out", ".", "-q", *FEW), str(tmp_path), "refusing to replace it")
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


def test_an_earlier_output_and_an_empty_folder_are_replaced(tmp_path):
    out = tmp_path / "d"
    out.mkdir()
    assert kat_in("data", "synth", "--out", out, "-q", *FEW, "--set", "seed=1").returncode == 0
    first = json.loads((out / "manifest.json").read_text())["files"]
    assert kat_in("data", "synth", "--out", out, "-q", *FEW, "--set", "seed=2").returncode == 0
    assert json.loads((out / "manifest.json").read_text())["files"] != first
    assert [p.name for p in tmp_path.iterdir()] == ["d"]


def test_an_out_that_cannot_be_written_is_one_line(tmp_path):
    (tmp_path / "file").write_text("x")
    _one_line_error(kat_in("data", "synth", "--out", tmp_path / "file" / "d", "-q", *FEW), "cannot write",
                    str(tmp_path / "file"))


@pytest.mark.parametrize("args", [
    ["train", "pretrain", "--data", "/nonexistent"],
    ["train", "coldstart", "--model", "/nonexistent", "--data", "/nonexistent"],
    ["eval", "{model}"],
])
def test_stages_refuse_an_out_they_may_not_replace_before_any_work(tmp_path, args):
    (tmp_path / "model").mkdir()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    args = [a.format(model=tmp_path / "model") for a in args]
    r = kat_in(*args, "--out", tmp_path / "mine", env={"KAT_HOME": str(tmp_path / "home")})
    _one_line_error(r, str(tmp_path / "mine"), "refusing to replace it")  # not the missing data: nothing ran
    assert (tmp_path / "mine" / "notes.txt").read_text() == "mine"


# --- user-typed values the code cannot use: one line (or typer's usage error), never a traceback -------------

@pytest.mark.parametrize("text, fragment", [
    (b"seed: [1, 2\n", "not valid YAML: expected ',' or ']'"),
    (b"- a\n- b\n", "must be a mapping of config keys, not a list"),
    (b"\xff\xfe seed: 1\n", "not valid YAML"),
    (b'!!python/object/apply:os.system ["true"]\n', "not valid YAML"),
])
def test_a_malformed_profile_file_is_one_line(tmp_path, text, fragment):
    profile = tmp_path / "mine.yaml"
    profile.write_bytes(text)
    _one_line_error(kat_in("data", "synth", "--out", tmp_path / "d", "-p", profile), str(profile), fragment)
    assert not (tmp_path / "d").exists()


@pytest.mark.parametrize("args, fragment", [
    (["generate", "{model}", "Compute 2+3.", "--top-p", "0"], "--top-p"),
    (["generate", "{model}", "Compute 2+3.", "--top-p", "nan"], "--top-p"),
    (["generate", "{model}", "Compute 2+3.", "--device", "nonsense"], "--device 'nonsense'"),
    (["eval", "{model}", "--device", "no_such_device:7"], "--device 'no_such_device:7'"),
    (["eval", "{model}", "--token-cost", "nan"], "--token-cost"),
    (["eval", "{model}", "--oracle-delta", "2"], "--oracle-delta"),
])
def test_decoding_values_a_model_cannot_use_are_one_line_before_it_loads(tmp_path, args, fragment):
    (tmp_path / "model").mkdir()  # never loaded: the values are refused first
    args = [a.format(model=tmp_path / "model") for a in args]
    _one_line_error(kat_in(*args, env={"KAT_HOME": str(tmp_path / "home")}), fragment)


@pytest.mark.parametrize("args", [
    ["generate", "{model}", "Compute 2+3.", "--temperature", "nan"],
    ["generate", "{model}", "Compute 2+3.", "--max-new-tokens", "0"],
    ["generate", "{model}", "Compute 2+3.", "--seed", str(2**64)],
    ["eval", "{model}", "--max-new-tokens", "0"],
    ["eval", "{model}", "--temperature", "-1"],
    ["serve-model", "{model}", "--port", "70000"],
    ["serve-model", "{model}", "--max-batch", "0"],
    ["serve-model", "{model}", "--max-tokens", "0"],
])
def test_numbers_out_of_range_are_usage_errors(tmp_path, args):
    (tmp_path / "model").mkdir()
    args = [a.format(model=tmp_path / "model") for a in args]
    r = kat_in(*args, env={"KAT_HOME": str(tmp_path / "home")})
    assert r.returncode == 2 and "Invalid value" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_version():
    r = kat_in("version")
    assert r.returncode == 0 and r.stdout.strip()


def test_readme_commands_exist():
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    assert "make run" in readme and "make test" in readme
