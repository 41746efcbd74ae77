"""Pretraining on the smoke profile, as the CLI runs it: MTP, distillation, resume and bad input.

The training commands run in this process (`kat_here`: the CLI's own entry point, without starting a Python
each time); the resume test kills a real `kat` subprocess."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from kat_core.config import load_config
from kat_core.data.synth import synthesize
from tests.helpers import KAT, kat_here

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
pytestmark = pytest.mark.usefixtures("one_thread")


def metrics(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("pt") / "data"
    synthesize(load_config("smoke"), out, progress=False)
    return out


@pytest.fixture(scope="module")
def teacher(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher") / "ckpt"
    r = kat_here("train", "pretrain", "--data", data, "--out", out, "-q", "--set", "train.steps=40",
            "--set", "model.hidden_size=96", "--set", "model.num_heads=3")
    assert r.returncode == 0, r.stderr
    return out


def test_smoke_pretrain_loads_with_plain_transformers(teacher):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(teacher)
    tok = AutoTokenizer.from_pretrained(teacher)
    ids = tok("Compute 3+4.\n<judge>", return_tensors="pt", add_special_tokens=False)
    out = model.generate(**ids, max_new_tokens=8, do_sample=False)
    assert out.shape[1] > ids["input_ids"].shape[1]
    assert torch.isfinite(model(**ids).logits).all()
    assert (teacher / "mtp.safetensors").is_file() and (teacher / "manifest.json").is_file()


def test_losses_fall(teacher):
    curve = metrics(teacher / "metrics.jsonl")
    assert [m["step"] for m in curve] == list(range(1, 41))
    first, last = curve[0], curve[-1]
    assert last["ce"] < 0.6 * first["ce"]
    assert last["mtp_1"] < 0.6 * first["mtp_1"]  # the MTP head learns to predict t+2
    assert {"lr", "tokens_per_s", "grad_norm"} <= set(last)


def test_distillation_from_checkpoint_and_cache(data, teacher, tmp_path):
    r = kat_here("train", "pretrain", "--data", data, "--out", tmp_path / "student", "--teacher", teacher, "-q",
            "--set", "train.steps=25")
    assert r.returncode == 0, r.stderr
    kd = [m["kd"] for m in metrics(tmp_path / "student" / "metrics.jsonl")]
    assert kd[-1] < 0.7 * kd[0]  # the student moves toward its teacher

    r = kat_here("train", "cache-teacher", "--teacher", teacher, "--data", data, "--out", tmp_path / "cache", "-q")
    assert r.returncode == 0, r.stderr
    r = kat_here("train", "pretrain", "--data", data, "--out", tmp_path / "student2", "--teacher", tmp_path / "cache",
            "-q", "--set", "train.steps=25")
    assert r.returncode == 0, r.stderr
    kd2 = [m["kd"] for m in metrics(tmp_path / "student2" / "metrics.jsonl")]
    # a teacher checkpoint is run once over the rows by default: the same top-k as the cache file, same curve
    assert kd2 == pytest.approx(kd, rel=1e-4)

    r = kat_here("train", "pretrain", "--data", data, "--out", tmp_path / "student3", "--teacher", teacher, "-q",
            "--set", "train.steps=25", "--set", "pretrain.teacher_once=false")  # full teacher logits every step
    assert r.returncode == 0, r.stderr
    kd3 = [m["kd"] for m in metrics(tmp_path / "student3" / "metrics.jsonl")]
    assert kd3[-1] < 0.7 * kd3[0] and kd3 != pytest.approx(kd, rel=1e-4)


def test_killed_run_resumes_from_its_checkpoint(data, tmp_path):
    out = tmp_path / "ckpt"
    work = tmp_path / ".ckpt.work"
    args = [*KAT, "train", "pretrain", "--data", str(data), "--out", str(out), "-q",
            "--set", "train.steps=60", "--set", "train.checkpoint_every=10"]
    proc = subprocess.Popen(args, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not list((work / "checkpoints").glob("step-*")):
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not out.exists()  # nothing final was written by the killed run
    done = sorted(int(p.name.split("-")[1]) for p in (work / "checkpoints").glob("step-*"))
    assert done, "no checkpoint before the kill"
    r = subprocess.run(args, env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "resumed from" in r.stderr
    curve = metrics(out / "metrics.jsonl")
    assert [m["step"] for m in curve] == list(range(1, 61))  # continuous: no gap, no repeat
    assert not work.exists()


def test_bad_inputs_are_one_line(data, tmp_path):
    def one_line(r, fragment):
        assert r.returncode == 1, r.stderr
        lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error: ")]
        assert len(lines) == 1 and fragment in lines[0], r.stderr
        assert "Traceback" not in r.stderr

    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "weights.bin").write_text("not a model")
    one_line(kat_here("train", "pretrain", "--data", data, "--out", tmp_path / "o", "--teacher", tmp_path / "foreign"),
             "not a KAT checkpoint")
    # a dataset whose validation failed
    report = data.parent / f"{data.name}.validation"
    report.mkdir(exist_ok=True)
    (report / "validation.json").write_text(json.dumps(
        {"success": False, "checks": [{"name": "grammar.well_formed", "success": False}]}))
    try:
        one_line(kat_here("train", "pretrain", "--data", data, "--out", tmp_path / "o"), "failed validation")
    finally:
        (report / "validation.json").unlink()
    assert not (tmp_path / "o").exists()


def test_kd_loss_is_zero_on_itself_and_the_cache_lower_bounds_it():
    import torch

    from kat_core.train.pretrain import kd_loss

    g = torch.Generator().manual_seed(0)
    teacher, student = torch.randn(2, 6, 50, generator=g), torch.randn(2, 6, 50, generator=g)
    w = torch.ones(2, 6)
    T = 2.0
    top = teacher.topk(8, dim=-1)
    cache = (top.values, top.indices, torch.logsumexp(teacher / T, dim=-1))
    assert kd_loss(teacher, teacher, w, T).item() == pytest.approx(0, abs=1e-6)
    assert kd_loss(teacher, cache, w, T).item() == pytest.approx(0, abs=1e-5)
    full, lumped = kd_loss(student, teacher, w, T).item(), kd_loss(student, cache, w, T).item()
    assert 0 < lumped <= full + 1e-6  # lumping the tail can only lose information
    # by hand for one position: T^2 * sum p log p/q
    p = torch.softmax(teacher[0, 0] / T, -1)
    q = torch.softmax(student[0, 0] / T, -1)
    one = kd_loss(student[:1, :2], teacher[:1, :2], torch.ones(1, 2), T).item()
    assert one == pytest.approx(T**2 * (p * (p / q).log()).sum().item(), rel=1e-5)


def test_rows_longer_than_the_base_context_are_refused(data, teacher, tmp_path):
    # the teacher checkpoint's context is the smoke profile's max_seq_len; a base's positions past it were never
    # trained, so asking for longer rows is one readable error before any training
    context = json.loads((teacher / "config.json").read_text())["max_position_embeddings"]
    r = kat_here("train", "pretrain", "--data", data, "--out", tmp_path / "o", "--set", f"model.base={teacher}",
                 "--set", f"model.max_seq_len={context + 64}")
    assert r.returncode == 1 and r.stderr.strip().splitlines()[-1] == (
        f"error: model.max_seq_len {context + 64} is longer than the context of {teacher} ({context} tokens); "
        f"set model.max_seq_len <= {context}")
    assert not (tmp_path / "o").exists()



def test_rows_pack_to_pack_len_within_the_context(tiny_tokenizer):
    from kat_core.config import load_config
    from kat_core.train.pretrain import pack_len, packed_rows

    records = [{"prompt": f"Compute {a}+{a}.", "completion": f"sum, 1 step: direct {2 * a}"} for a in range(40)]
    config = load_config("smoke", ["pretrain.pack_len=64"])
    assert pack_len(config, config.model) == 64
    rows = packed_rows(records, tiny_tokenizer, pack_len(config, config.model), 3.0, 0)
    assert rows["input_ids"].shape[1] == 64 and int(rows["weights"].gt(0).sum()) > 0
    # never longer than the model's context, and the model's context when unset
    wide = load_config("smoke", [f"pretrain.pack_len={config.model.max_seq_len + 100}"])
    assert pack_len(wide, wide.model) == pack_len(load_config("smoke"), config.model) == config.model.max_seq_len


def test_student_sweep_variants_load_and_one_recipe_runs_end_to_end(tmp_path):
    """benchmarks/student_sweep.py: every built-in recipe is a valid demo config, and one (shrunk: 3 steps,
    300 items, a 2-step teacher) goes through synthesis, teacher, distilled student and evaluation to a row
    with all five levels."""
    import importlib.util

    import yaml

    spec = importlib.util.spec_from_file_location("student_sweep", "benchmarks/student_sweep.py")
    sweep = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sweep)
    for variant in sweep.VARIANTS:
        load_config("demo", [*variant["set"], *sweep.FP32])
    shrink = ["train.steps=3", "pretrain.teacher_train.steps=2", "synth.families={arith: 300}", "synth.pool=0"]
    variants = tmp_path / "v.yaml"
    variants.write_text(yaml.safe_dump([{"name": "tiny", "set": [*sweep.DISTILLED, *shrink]}]))
    out = tmp_path / "out"
    subprocess.run([sys.executable, "benchmarks/student_sweep.py", "--variants", variants, "--out", out,
                    "--limit", "10"], check=True, env=ENV, capture_output=True, timeout=300)
    row = json.loads((out / "tiny-s0.json").read_text())
    assert sorted(row["levels"]) == ["1", "2", "3", "4", "5"]
    assert row["work"] > 0 and set(row["tokens"]) == {"on", "off", "auto"}
