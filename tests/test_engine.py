"""The training engine: learning with both back ends, gradient accumulation, checkpoints and resume (a real
SIGKILL), corrupted checkpoints, and 2-process data parallel on CPU through torchrun and the deepspeed
launcher. The model is tiny (tests/engine_script.py), so the time goes into process start-up."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from kat_core.config import TrainConfig
from kat_core.errors import KatError
from kat_core.manifest import verify_manifest
from tests.engine_script import loss_fn, make_batches, make_model, weights_digest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "engine_script.py"
BIN = Path(sys.executable).parent
DIST_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def cfg(**kw) -> TrainConfig:
    # fp32: these tests compare loss curves across back ends and restarts to 1e-4 or closer
    base = dict(steps=30, lr=1e-2, warmup_steps=3, micro_batch_size=8, checkpoint_every=10,
                keep_checkpoints=2, log_every=5, bf16=False)
    return TrainConfig(**{**base, **kw})


def run(c: TrainConfig, out: Path, *, dropout: float = 0.1, batches=None, seed: int = 0):
    from kat_core.train import train

    batches = batches or make_batches(c.micro_batch_size, seed)
    return train(make_model(seed, dropout), loss_fn, batches, c, out, progress=False, seed=seed)


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def losses(out: Path) -> list[float]:
    return [m["loss"] for m in metrics(out)]


def child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    env["PYTHONPATH"] = str(ROOT)
    env["OMP_NUM_THREADS"] = "1"
    return env


def script(out: Path, *args: str) -> list[str]:
    return [str(SCRIPT), "--out", str(out), *args]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The models are tiny: a second intra-op thread only adds spin-waiting, badly so on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def ds_env(monkeypatch):
    """DeepSpeed in this process, as without a launcher; it must leave no process-group variables behind
    (children started later would try to join this process's group)."""
    for k in DIST_VARS:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    yield
    assert not [k for k in DIST_VARS if k in os.environ]


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    from kat_core.train import lr_factor

    f = [lr_factor(s, steps=100, warmup_steps=10, min_lr_ratio=0.1) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[9:], f[10:], strict=False))
    assert f[-1] == pytest.approx(0.1)


def test_torch_backend_learns_logs_and_keeps_checkpoints(tmp_path):
    from kat_core.train import train

    c = cfg(steps=40)
    seen = []
    result = train(make_model(), loss_fn, make_batches(8), c, tmp_path, progress=False,
                   on_checkpoint=lambda path, step: seen.append((path.name, step, path.is_dir())))
    assert seen == [(f"step-{s:06d}", s, True) for s in (10, 20, 30, 40)]
    rows = metrics(tmp_path)
    assert [r["step"] for r in rows] == list(range(1, 41))
    assert {"loss", "acc", "lr", "grad_norm", "tokens_per_s", "elapsed_s"} <= rows[0].keys()
    first, last = sum(losses(tmp_path)[:3]) / 3, sum(losses(tmp_path)[-3:]) / 3
    assert last < first / 3, (first, last)
    assert rows[-1]["acc"] > 0.9
    # lr follows warm-up then cosine down to the floor
    assert rows[0]["lr"] == pytest.approx(c.lr / 3) and rows[2]["lr"] == pytest.approx(c.lr)
    assert rows[-1]["lr"] == pytest.approx(c.lr * c.min_lr_ratio)
    ckpts = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert ckpts == ["step-000030", "step-000040"]  # keep_checkpoints=2, no temp folders left
    assert all(verify_manifest(tmp_path / "checkpoints" / n) == [] for n in ckpts)
    assert result.step == 40 and result.checkpoint == tmp_path / "checkpoints" / "step-000040"
    # a finished run is not repeated
    again = run(c, tmp_path)
    assert again.resumed_from == 40 and again.step == 40 and len(metrics(tmp_path)) == 40
    assert weights_digest(again.model) == weights_digest(result.model)


def test_grad_accumulation_matches_a_bigger_micro_batch(tmp_path):
    small = make_batches(4)

    def doubled(i: int) -> dict:  # micro-batch i of the b=8 run is micro-batches 2i and 2i+1 of b=4
        a, b = small(2 * i), small(2 * i + 1)
        return {"x": torch.cat([a["x"], b["x"]]), "y": torch.cat([a["y"], b["y"]])}

    accum = run(cfg(micro_batch_size=4, grad_accum=2, steps=15), tmp_path / "a", dropout=0.0, batches=small)
    big = run(cfg(micro_batch_size=8, steps=15), tmp_path / "b", dropout=0.0, batches=doubled)
    assert losses(tmp_path / "a") == pytest.approx(losses(tmp_path / "b"), rel=1e-5)
    for p, q in zip(accum.model.parameters(), big.model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("stage", [0, 2])
def test_deepspeed_backend_learns_like_the_torch_one(tmp_path, ds_env, stage):
    c = cfg(steps=20, grad_accum=2)
    ref = run(c, tmp_path / "torch")
    ds = run(c.model_copy(update={"backend": "deepspeed", "zero_stage": stage}), tmp_path / "ds")
    assert losses(tmp_path / "ds")[-1] < losses(tmp_path / "ds")[0] / 2
    # same optimizer, schedule, clipping and data: the same curve
    assert losses(tmp_path / "ds") == pytest.approx(losses(tmp_path / "torch"), rel=1e-4)
    lrs = [r["lr"] for r in metrics(tmp_path / "torch")]
    assert [r["lr"] for r in metrics(tmp_path / "ds")] == pytest.approx(lrs)
    for p, q in zip(ds.model.parameters(), ref.model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)
    assert verify_manifest(ds.checkpoint) == [] and (ds.checkpoint / "deepspeed").is_dir()


def test_deepspeed_resumes_after_a_crash(tmp_path, ds_env):
    c = cfg(steps=24, backend="deepspeed", zero_stage=1, checkpoint_every=8)
    ref_dir = tmp_path / "ref"
    run(c.model_copy(update={"backend": "torch", "zero_stage": 0}), ref_dir)
    batches = make_batches(8)

    def crashing(i: int) -> dict:
        if i == 13:  # step 14, after the step-8 checkpoint
            raise RuntimeError("simulated crash")
        return batches(i)

    with pytest.raises(RuntimeError, match="simulated"):
        run(c, tmp_path / "ds", batches=crashing)
    result = run(c, tmp_path / "ds")
    assert result.resumed_from == 8 and result.step == 24
    assert [r["step"] for r in metrics(tmp_path / "ds")] == list(range(1, 25))
    assert losses(tmp_path / "ds") == pytest.approx(losses(ref_dir), rel=1e-4)


def test_corrupted_or_partial_checkpoints_are_skipped(tmp_path, caplog, ds_env):
    c = cfg(steps=20, checkpoint_every=5, keep_checkpoints=3)
    first = run(c, tmp_path)
    ref = losses(tmp_path)
    ckpts = tmp_path / "checkpoints"
    model_pt = ckpts / "step-000020" / "model.pt"
    model_pt.write_bytes(model_pt.read_bytes()[: model_pt.stat().st_size // 2])  # truncated
    (ckpts / "step-000015" / "manifest.json").unlink()  # never finished
    (ckpts / ".tmp-step-000025").mkdir()  # a write cut short by a kill
    with caplog.at_level(logging.WARNING, logger="kat_core.train.engine"):
        result = run(c, tmp_path)
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert "step-000020" in warned and "digest mismatch for model.pt" in warned
    assert "step-000015" in warned and "manifest" in warned
    assert result.resumed_from == 10 and result.step == 20
    assert losses(tmp_path) == pytest.approx(ref, rel=1e-6)  # retrained 11..20 to the same curve
    assert weights_digest(result.model) == weights_digest(first.model)
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-000010", "step-000015", "step-000020"]
    assert verify_manifest(ckpts / "step-000020") == []
    # a checkpoint of the other back end is an error, not silently ignored
    with pytest.raises(KatError, match="back end"):
        run(c.model_copy(update={"backend": "deepspeed", "steps": 25}), tmp_path)


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_continues_the_curve(tmp_path):
    c = cfg(steps=40, checkpoint_every=10)
    run(c, tmp_path / "ref")
    out = tmp_path / "run"
    args = script(out, "--steps", "40", "--checkpoint-every", "10")
    proc = subprocess.Popen([sys.executable, *args, "--sleep", "0.05"], env=child_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 60
    try:  # kill it once step 25 is logged: the step-20 checkpoint is in place, step 30's not yet
        while time.time() < deadline and proc.poll() is None:
            if (out / "metrics.jsonl").exists() and (out / "metrics.jsonl").read_text().count("\n") >= 25:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the run finished before it could be killed:\n" + proc.communicate()[0]
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(30)
    assert proc.returncode == -signal.SIGKILL
    assert (out / "checkpoints" / "step-000020").is_dir()
    killed_at = len(metrics(out))
    assert 25 <= killed_at < 40

    done = subprocess.run([sys.executable, *args], env=child_env(), capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["step"] == 40 and report["resumed_from"] in (20, 30)
    assert [r["step"] for r in metrics(out)] == list(range(1, 41))  # no gap, no repeat
    # the same curve as an uninterrupted run (separate processes: allow float noise from threading)
    assert losses(out) == pytest.approx(losses(tmp_path / "ref"), rel=1e-5)


def _launch(cmd: list[str], out: Path) -> list[dict]:
    done = subprocess.run(cmd, env=child_env(), capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return [json.loads((out / f"result-rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.slow
def test_two_process_data_parallel_with_torchrun(tmp_path):
    out = tmp_path / "ddp"
    reports = _launch([str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2",
                       *script(out, "--steps", "20", "--dropout", "0")], out)
    assert [r["world_size"] for r in reports] == [2, 2] and [r["step"] for r in reports] == [20, 20]
    assert reports[0]["digest"] == reports[1]["digest"]  # both ranks hold identical weights
    assert [r["step"] for r in metrics(out)] == list(range(1, 21))  # only rank 0 writes
    # 2 ranks x micro-batch 8 consume the same batches as 1 process accumulating 2 micro-batches
    run(cfg(steps=20, grad_accum=2), tmp_path / "one", dropout=0.0)
    assert losses(out) == pytest.approx(losses(tmp_path / "one"), rel=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("launcher,stage", [("torchrun", 2), ("deepspeed", 3)])
def test_two_process_deepspeed(tmp_path, launcher, stage):
    out = tmp_path / "ds"
    args = script(out, "--steps", "20", "--backend", "deepspeed", "--zero-stage", str(stage),
                  "--dropout", "0")
    if launcher == "torchrun":
        cmd = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", *args]
    else:
        if shutil.which("deepspeed", path=str(BIN)) is None:
            pytest.skip("no deepspeed launcher")
        cmd = [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(_free_port()), *args]
    reports = _launch(cmd, out)
    assert [r["world_size"] for r in reports] == [2, 2]
    assert reports[0]["digest"] == reports[1]["digest"]
    run(cfg(steps=20, grad_accum=2), tmp_path / "one", dropout=0.0)
    assert losses(out) == pytest.approx(losses(tmp_path / "one"), rel=1e-4)
    assert (out / "checkpoints" / "step-000020" / "deepspeed").is_dir()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_bf16_auto_follows_the_hardware():
    from kat_core.train.engine import _cpu_has_native_bf16, _use_bf16

    assert _use_bf16("auto", "cpu", "torch") == _cpu_has_native_bf16()
    assert not _use_bf16("auto", "cpu", "deepspeed")  # DeepSpeed's CPU path stays fp32
    assert _use_bf16(True, "cpu", "deepspeed") and not _use_bf16(False, "cuda", "torch")



class _Payload:
    """A pickle that, when unpickled, writes a marker file: what a tampered checkpoint could run."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "ran"))


def test_resume_never_unpickles_code_from_a_checkpoint(tmp_path, caplog):
    import torch

    from kat_core.manifest import read_manifest, write_manifest

    c = cfg(steps=20, checkpoint_every=10, keep_checkpoints=3)
    first = run(c, tmp_path / "run")
    ckpt = tmp_path / "run" / "checkpoints" / "step-000020"
    marker = tmp_path / "marker"
    torch.save({"python": _Payload(marker)}, ckpt / "rng-rank00.pt")
    # whoever can write the checkpoint volume can rewrite its manifest too
    m = read_manifest(ckpt)
    write_manifest(ckpt, stage=m["stage"], config=c, extra={k: m[k] for k in ("kind", "backend", "step", "world_size",
                                                                     "zero_stage")})
    with caplog.at_level(logging.WARNING, logger="kat_core.train.engine"):
        result = run(c.model_copy(update={"steps": 25}), tmp_path / "run")
    assert not marker.exists()
    assert result.resumed_from == 20 and "keeping the seeded RNG state" in caplog.text
    assert first.step == 20


@pytest.mark.parametrize("backend", ["torch", "deepspeed"])
def test_a_checkpoint_whose_state_files_hold_code_is_refused_not_run(tmp_path, ds_env, backend):
    from kat_core.manifest import read_manifest, write_manifest

    stage = 1 if backend == "deepspeed" else 0  # ZeRO 1: DeepSpeed's optimizer file holds its own classes
    c = cfg(steps=10, checkpoint_every=10, backend=backend, zero_stage=stage)
    run(c, tmp_path / "run")
    ckpt = tmp_path / "run" / "checkpoints" / "step-000010"
    state_file = next(p for p in ckpt.rglob("*.pt") if "model" in p.name)
    state = torch.load(state_file, weights_only=False)  # our own file, as it was written
    marker = tmp_path / "marker"
    state["extra"] = _Payload(marker)
    torch.save(state, state_file)
    m = read_manifest(ckpt)
    write_manifest(ckpt, stage=m["stage"], config=c, extra={k: m[k] for k in ("kind", "backend", "step", "world_size",
                                                                     "zero_stage")})
    with pytest.raises(KatError, match="pickled objects other than tensors"):
        run(c.model_copy(update={"steps": 15}), tmp_path / "run")
    assert not marker.exists()
