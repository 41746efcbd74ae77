"""The training engine: one explicit loop over two back ends, plain torch or DeepSpeed, chosen by config.

Read `train` top to bottom: set up the process group and the back end, resume from the newest valid
checkpoint, then for each global step run `grad_accum` micro-batches, step the optimizer, append a metrics
line, and every `checkpoint_every` steps write a checkpoint. There is no trainer class; the helpers below
are small functions.

**Data.** `batches` is a function of a global micro-batch index, or an iterable. Index `i` is the i-th
micro-batch of the whole run across all data-parallel ranks:

    i = ((step - 1) * grad_accum + micro) * world_size + rank        (step counts from 1)

so the data order depends on the index alone: a resumed run sees exactly the batches an uninterrupted one
would, no two ranks see the same batch, and N processes with accumulation a consume the same batches per
optimizer step as one process with accumulation a*N. An iterable is read as the same global stream (each
rank keeps its own indices; a resumed run fast-forwards past the consumed ones), so it must restart
deterministically. A batch is a dict; its tensors are moved to the device, and an optional `num_tokens`
entry (int or tensor) gives tokens/s.

**Loss.** `loss_fn(model, batch) -> (loss, parts)`: `loss` is the micro-batch's mean loss, `parts` the
floats to log (ce, mtp, kd, ...). `model` is the module as wrapped for the back end (DDP, a DeepSpeed engine
or the plain module): run the forward pass through `model(...)` so gradient synchronisation and ZeRO-3
parameter gathering happen, and use `unwrap(model)` to reach attributes. Everything that trains lives in
that one module (for example a wrapper holding the base LM and its MTP heads).

**Processes.** One process, or one per rank under `torchrun` / the `deepspeed` launcher (RANK, LOCAL_RANK,
WORLD_SIZE in the environment); gloo on CPU, nccl on GPU. The process group is left initialised when
`train` returns so the caller can coordinate ranks (for example, only rank 0 exports the model).

**Output** (rank 0 writes; all ranks take part in checkpoints):

    out_dir/metrics.jsonl               one JSON line per step: step, loss and its parts, lr, grad_norm,
                                        tokens_per_s, step_time_s, elapsed_s
    out_dir/checkpoints/step-000050/    torch: model.pt, optimizer.pt, scheduler.pt; deepspeed: its own
                                        save_checkpoint layout under deepspeed/; both: rng-rankNN.pt,
                                        trainer_state.json and manifest.json with every file's sha256
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import pickle
import random
import re
import shutil
import socket
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from kat_core.config import TrainConfig
from kat_core.errors import KatError, first_line
from kat_core.manifest import read_manifest, verify_manifest, write_manifest
from kat_core.util import atomic_write, patched_env

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
METRICS = "metrics.jsonl"
CHECKPOINT_KIND = "kat-train-checkpoint"
DS_TAG = "deepspeed"  # the tag (sub-folder) DeepSpeed's save_checkpoint writes into
BETAS = (0.9, 0.95)  # the usual choice for language models; the same in both back ends
EPS = 1e-8

LossFn = Callable[[nn.Module, dict[str, Any]], tuple[Tensor, dict[str, float]]]
Batches = Callable[[int], dict[str, Any]] | Iterable[dict[str, Any]]


@dataclass
class TrainResult:
    step: int  # the last step trained; equals cfg.steps when the run is complete
    metrics: dict[str, float]  # the last metrics line ({} when nothing was left to train)
    out_dir: Path
    metrics_path: Path
    checkpoint: Path | None  # the newest checkpoint
    resumed_from: int | None  # the step of the checkpoint this run resumed from; None for a fresh start
    model: nn.Module = field(repr=False)  # the trained module, unwrapped, with full weights (ZeRO-3 included)
    rank: int = 0
    world_size: int = 1


# ------------------------------------------------------------------------------------- building blocks


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside a DDP wrapper or a DeepSpeed engine."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return model


def lr_factor(step: int, *, steps: int, warmup_steps: int, min_lr_ratio: float) -> float:
    """Learning-rate multiplier for optimizer step `step` (0-based): linear warm-up, then cosine decay to
    `min_lr_ratio` at the last step."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, steps - 1 - warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def epoch_sampler(n_items: int, batch_size: int, seed: int = 0) -> Callable[[int], np.ndarray]:
    """Item indices for micro-batch `i`: a fresh seeded permutation each epoch, the last partial batch
    dropped. Deterministic in `i`, so it fits the engine's `batches(i)` contract."""
    per_epoch = n_items // batch_size
    if per_epoch < 1:
        raise KatError(f"{n_items} items cannot fill one micro-batch of {batch_size}")
    cache: dict[int, np.ndarray] = {}

    def indices(i: int) -> np.ndarray:
        epoch, pos = divmod(i, per_epoch)
        if epoch not in cache:
            cache.clear()  # one epoch's permutation at a time
            cache[epoch] = np.random.default_rng([seed, epoch]).permutation(n_items)
        return cache[epoch][pos * batch_size : (pos + 1) * batch_size]

    return indices


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    # Decay matrices only: decaying biases and norm gains toward zero hurts and buys nothing.
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def _use_bf16(setting: Any, device_type: str, backend: str) -> bool:
    """bf16 autocast: as set, or with "auto" where the hardware has it: a CUDA GPU that supports it, or (plain
    torch only; DeepSpeed's CPU path stays fp32) a CPU with native bf16 matmuls, where the demo model's step
    measured 0.50 s against 0.69 s in fp32 on 2 cores."""
    if setting != "auto":
        return bool(setting)
    if device_type == "cuda":
        return torch.cuda.is_bf16_supported()
    return backend == "torch" and device_type == "cpu" and _cpu_has_native_bf16()


@functools.cache
def _cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX in the CPU flags (Linux); elsewhere bf16 would be emulated, slower than fp32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return bool(re.search(r"\b(avx512_bf16|amx_bf16)\b", flags))


def deepspeed_config(cfg: TrainConfig, *, bf16: bool, cpu: bool) -> dict[str, Any]:
    """The DeepSpeed config for a TrainConfig; optimizer and clipping match the torch back end."""
    return {
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": cfg.grad_accum,
        "gradient_clipping": cfg.grad_clip,
        "zero_optimization": {"stage": cfg.zero_stage},
        "bf16": {"enabled": bf16},
        "optimizer": {
            "type": "AdamW",
            # torch_adam: torch.optim.AdamW instead of DeepSpeed's compiled CPU/fused Adam, which would be
            # JIT-built on first use; on a GPU, FusedAdam is kept.
            "params": {"lr": cfg.lr, "betas": list(BETAS), "eps": EPS, "weight_decay": cfg.weight_decay,
                       "torch_adam": cpu},
        },
        "steps_per_print": 10**9,  # we log ourselves
        "wall_clock_breakdown": False,
    }


def _rng_state() -> dict[str, Any]:
    """Every RNG's state as tensors, tuples and numbers only, so resuming can read it with `weights_only=True`
    (numpy's key array as a tensor): unpickling a file from a shared checkpoint volume would run any code in it."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if isinstance(v, Tensor) else v for k, v in batch.items()}


class _BatchSource:
    """`get(i)` is global micro-batch i, from a function or by reading an iterable forward."""

    def __init__(self, batches: Batches):
        self.fn = batches if callable(batches) else None
        self.it: Iterator[dict[str, Any]] | None = None if self.fn else iter(batches)
        self.pos = 0

    def get(self, index: int) -> dict[str, Any]:
        if self.fn is not None:
            return self.fn(index)
        assert self.it is not None
        try:
            while self.pos < index:  # other ranks' micro-batches, or ones consumed before a resume
                next(self.it)
                self.pos += 1
            self.pos += 1
            return next(self.it)
        except StopIteration:
            raise KatError(f"the batch iterable ran out after {self.pos - 1} micro-batches") from None


# ------------------------------------------------------------------------------------------- processes


@dataclass
class _Proc:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0


def _env_ranks() -> tuple[int, int, int]:
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)),
            int(os.environ.get("WORLD_SIZE", 1)))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _setup_torch_dist() -> _Proc:
    import torch.distributed as dist

    rank, local_rank, world = _env_ranks()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return _Proc(rank, local_rank, world, device)


@contextlib.contextmanager
def _one_process_env() -> Iterator[None]:
    """DeepSpeed always wants a process group and reads RANK, LOCAL_RANK, WORLD_SIZE and MASTER_ADDR/PORT
    while it sets up (without them it tries MPI discovery). Without a launcher, supply a one-process group's
    values for the set-up only: left in the environment, they would be inherited by child processes started
    later, which would then try to join this process's group."""
    if "RANK" in os.environ:  # a launcher set them
        yield
        return
    with patched_env({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                      "MASTER_PORT": str(_free_port())}):
        yield


def _setup_deepspeed_dist() -> tuple[_Proc, Any]:
    cuda = torch.cuda.is_available()
    if not cuda:
        # Must be set before deepspeed picks its accelerator (at import or first use).
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        import deepspeed
        from deepspeed.accelerator import get_accelerator
    except ImportError as e:
        raise KatError(f"train.backend=deepspeed needs the deepspeed package ({e})") from None
    on_cpu = get_accelerator().device_name() == "cpu"
    if on_cpu and os.environ.get("KAT_DS_SHM_COMM") != "1":
        # On CPU, DeepSpeed's comm backend JIT-compiles a shared-memory all-reduce op on first use (about
        # three minutes on two cores). gloo does the job for our sizes; KAT_DS_SHM_COMM=1 opts back in.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    # quiet DeepSpeed's per-call INFO lines; its warnings still show
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    # its CPU accelerator defaults to oneCCL, which is not installed: gloo is
    deepspeed.init_distributed(dist_backend="gloo" if on_cpu else "nccl")
    rank, local_rank, world = _env_ranks()
    device = torch.device(get_accelerator().device_name(local_rank))
    return _Proc(rank, local_rank, world, device), deepspeed


def _barrier(proc: _Proc) -> None:
    if proc.world_size > 1:
        import torch.distributed as dist

        dist.barrier()


def _broadcast(obj: Any, proc: _Proc) -> Any:
    """Rank 0's `obj` on every rank."""
    if proc.world_size == 1:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# ----------------------------------------------------------------------------------------- checkpoints


def _step_of(path: Path) -> int:
    return int(path.name.removeprefix("step-"))


def _checkpoint_dirs(root: Path) -> list[Path]:
    """Finished checkpoint folders, oldest first."""
    if not root.is_dir():
        return []
    dirs = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-") and p.name[5:].isdigit()]
    return sorted(dirs, key=_step_of)


def find_resume_checkpoint(root: Path, backend: str) -> Path | None:
    """The newest checkpoint under `root` whose files match its manifest; broken ones are skipped with a
    warning. A checkpoint from the other back end is an error: its state cannot be loaded here."""
    for path in reversed(_checkpoint_dirs(root)):
        problems = verify_manifest(path)
        if problems:
            log.warning("skipping checkpoint %s: %s", path, "; ".join(problems[:3]))
            continue
        manifest = read_manifest(path) or {}
        if manifest.get("kind") != CHECKPOINT_KIND:
            log.warning("skipping %s: not a training checkpoint of this engine", path)
            continue
        if manifest.get("backend") != backend:
            raise KatError(
                f"checkpoint {path} was written by the {manifest.get('backend')} back end, but "
                f"train.backend={backend}; use a fresh output directory or the same back end"
            )
        return path
    return None


def _prune(root: Path, keep: int) -> None:
    for old in _checkpoint_dirs(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def _truncate_metrics(path: Path, last_step: int) -> None:
    """Keep the metrics lines of steps up to `last_step`, so a resumed run continues the curve instead of
    repeating it (a killed run may have logged steps after its last checkpoint, and half a line)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= last_step:
                kept.append(line + "\n")
        except json.JSONDecodeError:
            continue
    atomic_write(path, "".join(kept))


@dataclass
class _Backend:
    """What the loop and the checkpoints need to know about the back end."""

    kind: str
    model: nn.Module  # what loss_fn gets: DDP, DeepSpeed engine or the plain module
    optimizer: Any = None  # torch back end only
    scheduler: Any = None  # torch back end only
    bf16: bool = False


def _save_checkpoint(root: Path, step: int, be: _Backend, proc: _Proc, cfg: TrainConfig,
                     elapsed: float, keep: int) -> Path:
    """Write step-NNNNNN atomically: everything goes into a temp folder, which is renamed once its manifest
    is written. A kill at any point leaves either the old set of checkpoints or the new one complete."""
    final = root / f"step-{step:06d}"
    tmp = root / f".tmp-step-{step:06d}"
    if proc.main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier(proc)
    state = {"step": step, "elapsed_s": elapsed, "world_size": proc.world_size, "backend": be.kind}
    if be.kind == "deepspeed":
        # every rank writes its own ZeRO partition
        be.model.save_checkpoint(str(tmp), tag=DS_TAG, client_state=state, save_latest=False)
    elif proc.main:
        torch.save(unwrap(be.model).state_dict(), tmp / "model.pt")
        torch.save(be.optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(be.scheduler.state_dict(), tmp / "scheduler.pt")
    torch.save(_rng_state(), tmp / f"rng-rank{proc.rank:02d}.pt")
    _barrier(proc)
    if proc.main:
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2) + "\n")
        write_manifest(tmp, stage="train-checkpoint", config=cfg, extra={
            "kind": CHECKPOINT_KIND, "backend": be.kind, "step": step, "world_size": proc.world_size,
            "zero_stage": cfg.zero_stage if be.kind == "deepspeed" else None,
        })
        if final.exists():  # a broken leftover: a valid one would have been resumed from
            shutil.rmtree(final)
        os.replace(tmp, final)
        _prune(root, keep)
    _barrier(proc)
    return final


@contextlib.contextmanager
def _deepspeed_reads_plain_data(engine: Any):
    """DeepSpeed's checkpoint engine reads its files with `torch.load(weights_only=False)`: whoever can write
    the checkpoint volume (and so the manifest beside it) could run code in every training pod on resume.
    Its files hold tensors, numbers and three plain-data classes of DeepSpeed's own, so read them with
    `weights_only=True` and allow just those."""
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    reader = engine.checkpoint_engine
    if not isinstance(reader, TorchCheckpointEngine):  # another format (e.g. Nebula): not ours to reread
        yield
        return

    def load(path: str, map_location: Any = None) -> Any:
        with torch.serialization.safe_globals([LossScaler, ZeroStageEnum, fragment_address]):
            return torch.load(path, map_location=map_location, weights_only=True)

    reader.load = load
    try:
        yield
    finally:
        del reader.load  # the class's own method again


def _refuse_pickle(path: Path, e: Exception) -> KatError:
    return KatError(f"checkpoint {path} holds pickled objects other than tensors ({first_line(e)}); refusing to run "
                    "them: delete the checkpoint or resume into a fresh output directory")


def _load_checkpoint(path: Path, be: _Backend, proc: _Proc, cfg: TrainConfig) -> dict[str, Any]:
    state = json.loads((path / "trainer_state.json").read_text())
    if be.kind == "deepspeed":
        stage = (read_manifest(path) or {}).get("zero_stage")
        if state["world_size"] != proc.world_size or stage != cfg.zero_stage:
            # ZeRO partitions optimizer state by rank and stage; DeepSpeed cannot load another layout as is
            raise KatError(
                f"checkpoint {path} holds DeepSpeed ZeRO state for world size {state['world_size']}, stage "
                f"{stage}; this run has {proc.world_size}, stage "
                f"{cfg.zero_stage}: use the same layout or a fresh output directory"
            )
        try:
            with _deepspeed_reads_plain_data(be.model):
                loaded, _ = be.model.load_checkpoint(str(path), tag=DS_TAG)
        except pickle.UnpicklingError as e:
            raise _refuse_pickle(path, e) from None
        if loaded is None:
            raise KatError(f"DeepSpeed could not load checkpoint {path}")
    else:
        try:
            unwrap(be.model).load_state_dict(torch.load(path / "model.pt", map_location="cpu", weights_only=True))
            be.optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True))
            be.scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
        except pickle.UnpicklingError as e:
            raise _refuse_pickle(path, e) from None
    rng = path / f"rng-rank{proc.rank:02d}.pt"
    if rng.is_file():
        try:
            _set_rng_state(torch.load(rng, weights_only=True))
        except Exception as e:  # e.g. an older checkpoint's numpy array, which only full unpickling reads
            log.warning("%s cannot be read as plain tensors (%s); keeping the seeded RNG state", rng,
                        str(e).splitlines()[0])
    else:
        log.warning("%s has no RNG state for rank %d (world size changed?); keeping the seeded one", path,
                    proc.rank)
    return state


# ------------------------------------------------------------------------------------------- back ends


def _build_torch(model: nn.Module, cfg: TrainConfig, proc: _Proc) -> _Backend:
    model.to(proc.device)
    # torch's default implementation, not fused=True: the fused kernel is faster on a CPU (a 135M model's step
    # 0.33 s -> 0.08 s on one core) but not the same arithmetic; the demo student's training took another path
    # (loss at step 100 0.884 vs 0.929, final CE 0.0230 vs 0.0203) and its think-on accuracy at level 5 fell to
    # 0.825 (0.95-1.0 in the four runs before). The profiles' settings were measured with this one
    optimizer = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=BETAS, eps=EPS)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(cfg))
    wrapped: nn.Module = model
    if proc.world_size > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        wrapped = DDP(model, device_ids=[proc.device.index] if proc.device.type == "cuda" else None)
    bf16 = _use_bf16(cfg.bf16, proc.device.type, "torch")
    return _Backend("torch", wrapped, optimizer, scheduler, bf16)


def _build_deepspeed(model: nn.Module, cfg: TrainConfig, proc: _Proc, deepspeed: Any) -> _Backend:
    cpu = proc.device.type == "cpu"
    bf16 = _use_bf16(cfg.bf16, proc.device.type, "deepspeed")
    schedule = _schedule(cfg)
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=_param_groups(model, cfg.weight_decay),
        config=deepspeed_config(cfg, bf16=bf16, cpu=cpu),
        # our LambdaLR rather than DeepSpeed's WarmupCosineLR, so both back ends follow one schedule;
        # the engine steps it at each accumulation boundary and saves it in its checkpoints
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule),
    )
    return _Backend("deepspeed", engine, bf16=bf16)


def _schedule(cfg: TrainConfig) -> Callable[[int], float]:
    def factor(step: int) -> float:
        return lr_factor(step, steps=cfg.steps, warmup_steps=cfg.warmup_steps, min_lr_ratio=cfg.min_lr_ratio)

    return factor


def _full_weights(be: _Backend, cfg: TrainConfig) -> nn.Module:
    """The user's module with full weights. Under ZeRO-3 its parameters are partitioned across ranks, so
    gather each one (a collective: every rank calls this) and put the full tensor back in place."""
    module = unwrap(be.model)
    if be.kind == "deepspeed" and cfg.zero_stage == 3:
        import deepspeed

        params = list(module.parameters())
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            full = [p.data.detach().clone() for p in params]
        be.model.destroy()  # drops ZeRO's hooks, which would re-partition on the next forward
        for p, data in zip(params, full, strict=True):
            p.data = data
    return module


# -------------------------------------------------------------------------------------------- the loop


def _check_config(cfg: TrainConfig) -> None:
    for name in ("steps", "micro_batch_size", "grad_accum", "keep_checkpoints", "log_every"):
        if getattr(cfg, name) < 1:
            raise KatError(f"train.{name} must be at least 1, got {getattr(cfg, name)}")
    if cfg.warmup_steps < 0 or not 0 <= cfg.min_lr_ratio <= 1 or cfg.lr <= 0:
        raise KatError("train: need lr > 0, warmup_steps >= 0 and 0 <= min_lr_ratio <= 1")


def train(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Batches,
    cfg: TrainConfig,
    out_dir: Path,
    *,
    on_checkpoint: Callable[[Path, int], None] | None = None,
    progress: bool = True,
    seed: int = 0,
) -> TrainResult:
    """Train `model` for `cfg.steps` optimizer steps, resuming from the newest valid checkpoint in
    `out_dir/checkpoints`. `on_checkpoint(path, step)` runs on rank 0 after each checkpoint is in place (it
    must not write into it: the manifest covers its files). See the module docstring for the contracts."""
    from tqdm import tqdm

    _check_config(cfg)
    out_dir = Path(out_dir)
    ckpt_root = out_dir / CHECKPOINTS
    metrics_path = out_dir / METRICS
    # checkpoint_every <= 0: only at the end
    checkpoint_every = cfg.checkpoint_every if cfg.checkpoint_every > 0 else cfg.steps

    # 1. processes and the back end; ranks differ in dropout, their weights stay equal (DDP/ZeRO broadcast)
    if cfg.backend == "deepspeed":
        with _one_process_env():
            proc, deepspeed = _setup_deepspeed_dist()
            _seed_all(seed + proc.rank)
            be = _build_deepspeed(model, cfg, proc, deepspeed)
    else:
        proc = _setup_torch_dist()
        _seed_all(seed + proc.rank)
        be = _build_torch(model, cfg, proc)

    # 2. resume: rank 0 picks the checkpoint (verifying digests once), every rank loads it
    if proc.main:
        out_dir.mkdir(parents=True, exist_ok=True)
        for stale in ckpt_root.glob(".tmp-step-*"):  # a checkpoint cut short by a kill
            shutil.rmtree(stale, ignore_errors=True)
        try:
            found: Path | str | None = find_resume_checkpoint(ckpt_root, cfg.backend)
        except KatError as e:
            found = str(e)  # raised on every rank below, so none is left waiting
    else:
        found = None
    found = _broadcast(found, proc)
    if isinstance(found, str):
        raise KatError(found)
    start, elapsed0, resumed_from = 0, 0.0, None
    if found is not None:
        state = _load_checkpoint(found, be, proc, cfg)
        start, elapsed0, resumed_from = state["step"], state["elapsed_s"], state["step"]
        if proc.main:
            log.info("resumed from %s (step %d)", found, start)
    if proc.main:
        _truncate_metrics(metrics_path, start)  # a fresh start drops any earlier curve
    checkpoint = found

    # 3. the loop
    source = _BatchSource(batches)
    model_fn = be.model
    model_fn.train()
    ddp = be.kind == "torch" and proc.world_size > 1
    autocast = (
        (lambda: torch.autocast(proc.device.type, dtype=torch.bfloat16))
        if be.bf16 and be.kind == "torch" else contextlib.nullcontext
    )
    metrics: dict[str, float] = {}
    bar = tqdm(total=cfg.steps, initial=start, desc=f"train ({be.kind})", unit="step",
               disable=not (progress and proc.main), dynamic_ncols=True)
    run_t0 = time.perf_counter()
    metrics_file = open(metrics_path, "a") if proc.main else None  # closed in `finally`
    try:
        for step in range(start + 1, cfg.steps + 1):
            t0 = time.perf_counter()
            sums: dict[str, float] = {}
            tokens = 0
            for micro in range(cfg.grad_accum):
                index = ((step - 1) * cfg.grad_accum + micro) * proc.world_size + proc.rank
                batch = _to_device(source.get(index), proc.device)
                last = micro == cfg.grad_accum - 1
                # DDP all-reduces on every backward; skip it until the last micro-batch of the step
                sync = model_fn.no_sync() if ddp and not last else contextlib.nullcontext()
                with sync:
                    with autocast():
                        loss, parts = loss_fn(model_fn, batch)
                    if be.kind == "deepspeed":
                        model_fn.backward(loss)  # scales by 1/grad_accum itself
                        model_fn.step()  # steps optimizer and scheduler only at the accumulation boundary
                    else:
                        (loss / cfg.grad_accum).backward()
                for name, value in {"loss": loss.detach(), **parts}.items():
                    sums[name] = sums.get(name, 0.0) + float(value)
                if "num_tokens" in batch:
                    tokens += int(batch["num_tokens"])
            lr = cfg.lr * _schedule(cfg)(step - 1)
            if be.kind == "torch":
                norm = (torch.nn.utils.clip_grad_norm_(unwrap(model_fn).parameters(), cfg.grad_clip)
                        if cfg.grad_clip > 0 else None)
                be.optimizer.step()
                be.scheduler.step()
                be.optimizer.zero_grad(set_to_none=True)
            else:
                norm = model_fn.get_global_grad_norm()
            step_time = time.perf_counter() - t0

            # every rank's mean: one small all-reduce per step
            names = sorted(sums, key=lambda k: (k != "loss", k))
            totals = torch.tensor([sums[k] for k in names] + [tokens], dtype=torch.float64,
                                  device=proc.device)
            if proc.world_size > 1:
                import torch.distributed as dist

                dist.all_reduce(totals)
            values = (totals[:-1] / (cfg.grad_accum * proc.world_size)).tolist()
            if not math.isfinite(values[0]):
                raise KatError(f"the loss became {values[0]} at step {step}; try a lower train.lr")
            metrics = {"step": step, **dict(zip(names, values, strict=True)), "lr": lr}
            if norm is not None:
                metrics["grad_norm"] = float(norm)
            if tokens:
                metrics["tokens_per_s"] = float(totals[-1]) / step_time
            metrics["step_time_s"] = step_time
            metrics["elapsed_s"] = elapsed0 + time.perf_counter() - run_t0
            if metrics_file is not None:
                metrics_file.write(json.dumps(metrics) + "\n")
                metrics_file.flush()
            bar.update(1)
            if step % cfg.log_every == 0 or step == cfg.steps:
                bar.set_postfix(loss=f"{values[0]:.4f}", lr=f"{lr:.2e}")
                if proc.main and bar.disable:  # no bar: say it in the log instead
                    log.info("step %d/%d loss %.4f lr %.2e", step, cfg.steps, values[0], lr)

            if step % checkpoint_every == 0 or step == cfg.steps:
                checkpoint = _save_checkpoint(ckpt_root, step, be, proc, cfg, metrics["elapsed_s"],
                                              cfg.keep_checkpoints)
                if proc.main and on_checkpoint is not None:
                    on_checkpoint(checkpoint, step)
    finally:
        bar.close()
        if metrics_file is not None:
            metrics_file.close()

    if proc.main:
        log.info("trained to step %d; metrics in %s, checkpoints in %s", cfg.steps, metrics_path, ckpt_root)
    return TrainResult(
        step=max(start, cfg.steps),
        metrics=metrics,
        out_dir=out_dir,
        metrics_path=metrics_path,
        checkpoint=checkpoint,
        resumed_from=resumed_from,
        model=_full_weights(be, cfg),
        rank=proc.rank,
        world_size=proc.world_size,
    )
