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


def test_version():
    r = kat_in("version")
    assert r.returncode == 0 and r.stdout.strip()


def test_readme_commands_exist():
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    assert "make run" in readme and "make test" in readme
