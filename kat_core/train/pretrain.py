"""The `pretrain` stage: causal LM + MTP modules, optionally distilled from a teacher.

    loss = α·CE + (1−α)·T²·KL(teacher_T ‖ student_T) + λ·mean_k CE_mtp_k        (α = 1 without a teacher)

CE carries an extra weight on the mode token (`mode_token_weight`) so the model learns to choose
`<think_on>`/`<think_off>` early. A teacher is a checkpoint with the same tokenizer, or a cache of its
top-k logits over the same packed rows (`kat train cache-teacher`). Read `pretrain` top to bottom.

Output: `out_dir` is a standard HF checkpoint (plus MTP weights, `metrics.jsonl` and a manifest). The
engine's resumable state lives in a sibling work dir `.<name>.work/` until the final checkpoint is in
place, so a killed run resumes when started again with the same arguments.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

from kat_core.config import KatConfig, ModelConfig, TrainConfig
from kat_core.data.dataset import write_jsonl
from kat_core.data.replay import REPLAY_FILE
from kat_core.errors import KatError

log = logging.getLogger(__name__)

TEACHER_CACHE = "teacher_topk.safetensors"


# ---------------------------------------------------------------------------------------------- data


def check_dataset(data_dir: Path, require_report: bool = True, report_dir: Path | None = None) -> list[dict[str, Any]]:
    """The dataset's records; refuses a dataset whose validation report (in `report_dir`, default beside the
    dataset) says it failed."""
    import json

    from kat_core.data.dataset import read_records
    from kat_core.data.validate import REPORT, default_report_dir

    report = Path(report_dir or default_report_dir(data_dir)) / REPORT
    if report.is_file():
        summary = json.loads(report.read_text())
        if not summary.get("success", False):
            failed = [c["name"] for c in summary.get("checks", []) if not c.get("success", True)]
            raise KatError(f"dataset {data_dir} failed validation ({', '.join(failed) or 'see report'}); "
                           f"report: {report}")
    elif require_report:
        log.warning("dataset %s has no validation report; run `kat data validate` first", data_dir)
    return read_records(data_dir)


def packed_rows(records: list[dict[str, Any]], tokenizer, seq_len: int, mode_token_weight: float, seed: int,
                anchors: dict[str, dict[str, Any]] | None = None):
    """Records -> packed tensors: input_ids, position_ids, weights (B, T); with `anchors` (the base's
    distributions over replayed answers, kat_core.data.replay.base_distributions) also anchor_values,
    anchor_indices, anchor_lse (at the positions predicting an answer token) and anchor_weights (1 on those
    tokens), the form `kd_loss` takes."""
    import torch

    from kat_core.train.data import encode_example, pack

    examples = [encode_example(r, tokenizer, mode_token_weight) for r in records]
    rows = pack(examples, seq_len, tokenizer.pad_token_id, seed=seed)
    if rows.dropped:
        log.warning("%d examples longer than %d tokens were left out", rows.dropped, seq_len)
    if not rows.input_ids:
        raise KatError(f"no example fits in a packed row of {seq_len} tokens (pretrain.pack_len, model.max_seq_len)")
    out = {
        "input_ids": torch.tensor(rows.input_ids, dtype=torch.long),
        "position_ids": torch.tensor(rows.position_ids, dtype=torch.long),
        "weights": torch.tensor(rows.weights, dtype=torch.float32),
    }
    if anchors:
        out.update(_anchor_rows(records, examples, rows.members, anchors, out["input_ids"].shape))
    return out


def _anchor_rows(records, examples, members, anchors, shape) -> dict[str, Any]:
    import torch

    k = next(iter(anchors.values()))["values"].shape[-1]
    values, indices = torch.zeros(*shape, k), torch.zeros(*shape, k, dtype=torch.int32)
    lse, weights = torch.zeros(shape), torch.zeros(shape)
    misaligned = 0
    for b, row in enumerate(members):
        offset = 0
        for m in row:
            ids, dist = examples[m].ids, anchors.get(records[m].get("id", ""))
            if dist is not None:
                n = len(dist["answer"])
                start = len(ids) - 2 - n  # the answer's tokens, then </answer> and EOS
                if ids[start:start + n] != dist["answer"]:
                    misaligned += 1  # the grammar tokenised the answer otherwise: no anchor rather than a wrong one
                else:
                    at = offset + start  # the token at `at + j` is predicted from position `at + j - 1`
                    values[b, at - 1:at - 1 + n], indices[b, at - 1:at - 1 + n] = dist["values"], dist["indices"]
                    lse[b, at - 1:at - 1 + n] = dist["lse"]
                    weights[b, at:at + n] = 1.0
            offset += len(ids)
    if misaligned:
        log.warning("%d replayed answers tokenise differently inside the grammar: not anchored", misaligned)
    return {"anchor_values": values, "anchor_indices": indices, "anchor_lse": lse, "anchor_weights": weights}


def pack_len(config: KatConfig, model_cfg: ModelConfig) -> int:
    """Tokens per packed row: `pretrain.pack_len`, never more than the model's context."""
    return min(config.pretrain.pack_len or model_cfg.max_seq_len, model_cfg.max_seq_len)


def corpus(records: list[dict[str, Any]]) -> list[str]:
    from kat_core.format import prompt_text

    return [prompt_text(r["prompt"]) + r["completion"] for r in records]


# ---------------------------------------------------------------------------------------------- loss


def kd_loss(student_logits, teacher, weights, temperature: float):
    """T²·KL(teacher_T ‖ student_T) per predicted token, weighted like CE.

    `teacher` is either full logits (B, T, V) or a top-k cache (values, indices, lse) with the teacher's
    logsumexp at this temperature. With the cache, KL is taken over k+1 buckets: the k kept tokens and
    "everything else" — exact teacher probabilities for the kept ones, the rest lumped — so it is zero
    when the student equals the teacher and never needs the full teacher distribution."""
    import torch
    import torch.nn.functional as F

    w = weights[:, 1:]
    keep = w > 0  # only weighted positions: a full-vocabulary softmax anywhere else is wasted work
    log_q = F.log_softmax(student_logits[:, :-1][keep].float() / temperature, dim=-1)  # (N, V)
    if isinstance(teacher, tuple):
        values, indices, lse = teacher
        log_p = values[:, :-1][keep].float() / temperature - lse[:, :-1][keep][:, None]
        log_q = torch.gather(log_q, -1, indices[:, :-1][keep].long())
        p_tail = (1 - log_p.exp().sum(-1)).clamp_min(1e-6)
        q_tail = (1 - log_q.exp().sum(-1)).clamp_min(1e-6)
        kl = (log_p.exp() * (log_p - log_q)).sum(-1) + p_tail * (p_tail.log() - q_tail.log())
    else:
        log_p = F.log_softmax(teacher[:, :-1][keep].float() / temperature, dim=-1)
        kl = (log_p.exp() * (log_p - log_q)).sum(-1)  # (N,)
    return temperature**2 * (kl * w[keep]).sum() / w.sum().clamp_min(1e-8)


def make_loss_fn(cfg: KatConfig, teacher_model=None):
    """loss_fn(model, batch) -> (loss, parts) for the engine; `model` is an LMWithMTP (maybe wrapped)."""
    import torch
    import torch.nn.functional as F

    from kat_core.model.mtp import mtp_loss

    p = cfg.pretrain
    has_teacher_model = teacher_model is not None

    def loss_fn(model, batch):
        ids, pos, w = batch["input_ids"], batch["position_ids"], batch["weights"]
        logits, mtp_logits = model(ids, position_ids=pos)
        ce_tok = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1),
                                 reduction="none").view_as(w[:, 1:])
        ce = (ce_tok * w[:, 1:]).sum() / w[:, 1:].sum().clamp_min(1e-8)
        parts = {"ce": ce.detach()}
        loss = ce
        teacher = None
        if has_teacher_model:
            with torch.no_grad():
                teacher = teacher_model(input_ids=ids, position_ids=pos, use_cache=False).logits
        elif "teacher_values" in batch:
            teacher = (batch["teacher_values"], batch["teacher_indices"], batch["teacher_lse"])
        if teacher is not None:
            kd = kd_loss(logits, teacher, (w > 0).float(), p.kd_temperature)
            loss = p.alpha * ce + (1 - p.alpha) * kd
            parts["kd"] = kd.detach()
        if "anchor_weights" in batch:  # replay: stay close to the base's own distribution over its answers
            anchor = kd_loss(logits, (batch["anchor_values"], batch["anchor_indices"], batch["anchor_lse"]),
                             batch["anchor_weights"], 1.0)
            loss = loss + p.replay_kl * anchor
            parts["replay_kl"] = anchor.detach()
        if mtp_logits:
            mtp, per_depth = mtp_loss(mtp_logits, ids, loss_mask=(w > 0).float())
            loss = loss + p.mtp_lambda * mtp
            parts["mtp"] = mtp.detach()
            for k, v in enumerate(per_depth, start=1):
                parts[f"mtp_{k}"] = v.detach()
        return loss, parts

    return loss_fn


# ---------------------------------------------------------------------------------------------- the stage


def _load_teacher(teacher_dir: Path):
    """(model or None, top-k cache tensors or None, tokenizer) from a checkpoint or a teacher cache dir."""
    from safetensors.torch import load_file

    from kat_core.model.checkpoint import check_checkpoint, load_checkpoint
    from kat_core.tokenizer import load_tokenizer

    if (teacher_dir / TEACHER_CACHE).is_file():
        return None, load_file(str(teacher_dir / TEACHER_CACHE)), load_tokenizer(teacher_dir)
    check_checkpoint(teacher_dir)
    model, tokenizer, _ = load_checkpoint(teacher_dir)
    model.eval().requires_grad_(False)
    return model, None, tokenizer


def same_tokenizer(a, b) -> bool:
    return a.get_vocab() == b.get_vocab()


def build_student(model_cfg: ModelConfig, records, teacher_tokenizer, seed: int):
    """(model, tokenizer, mtp heads or None): continue from `model.base` (a KAT checkpoint keeps its MTP
    heads; any other HF model gets fresh ones) or build a fresh model. A fresh model takes the teacher's
    tokenizer when there is a teacher, else a BPE trained on the dataset."""
    from kat_core.model.checkpoint import is_checkpoint, load_checkpoint
    from kat_core.model.lm import build_model, load_model
    from kat_core.tokenizer import train_tokenizer

    if model_cfg.base:
        if is_checkpoint(model_cfg.base):
            model, tokenizer, heads = load_checkpoint(model_cfg.base)
        else:
            (model, tokenizer), heads = load_model(model_cfg.base), None
        if teacher_tokenizer is not None and not same_tokenizer(tokenizer, teacher_tokenizer):
            raise KatError(f"the teacher's tokenizer differs from the student's ({model_cfg.base}); "
                           "distillation needs one shared tokenizer")
        return model, tokenizer, heads
    tokenizer = teacher_tokenizer or train_tokenizer(corpus(records), vocab_size=model_cfg.vocab_size)
    return build_model(model_cfg, tokenizer, seed=seed), tokenizer, None


def pretrain(
    config: KatConfig,
    data_dir: str | Path,
    out_dir: str | Path,
    teacher: str | Path | None = None,
    *,
    model_cfg: ModelConfig | None = None,
    train_cfg: TrainConfig | None = None,
    progress: bool = True,
    stage: str = "pretrain",
    extra_files: dict[str, Path] | None = None,
    extra_meta: dict[str, Any] | None = None,
    validation: str | Path | None = None,
) -> dict[str, Any]:
    """Pretrain (and distil, with `teacher`) into `out_dir`; returns the final metrics.

    `model_cfg`/`train_cfg` override the profile's (the pipeline uses them to train the larger teacher; the
    cold start uses them to fine-tune a checkpoint). `extra_files` are copied into the checkpoint."""
    import torch

    from kat_core.model.checkpoint import save_checkpoint
    from kat_core.model.mtp import LMWithMTP, build_mtp
    from kat_core.train.engine import epoch_sampler, train
    from kat_core.util import cpu_threads

    data_dir, out_dir = Path(data_dir), Path(out_dir)
    model_cfg, train_cfg = model_cfg or config.model, train_cfg or config.train
    records = check_dataset(data_dir, require_report=stage == "pretrain",
                            report_dir=Path(validation) if validation else None)
    cpu_threads()  # the one thread policy (kat_core.util)

    teacher_model, teacher_cache, tokenizer = None, None, None
    if teacher is not None:
        teacher_model, teacher_cache, tokenizer = _load_teacher(Path(teacher))
    model, tokenizer, heads = build_student(model_cfg, records, tokenizer, config.seed)
    context = getattr(model.config, "max_position_embeddings", None)
    if context and model_cfg.max_seq_len > context:  # a base's positions past its context were never trained
        raise KatError(f"model.max_seq_len {model_cfg.max_seq_len} is longer than the context of "
                       f"{model_cfg.base or 'the model'} ({context} tokens); set model.max_seq_len <= {context}")

    replay = base_replay(config, model_cfg, model, tokenizer, make=stage == "pretrain", progress=progress)
    anchors = replay_anchors(config, model_cfg, model, tokenizer, replay, records)
    records = records + replay * config.pretrain.replay_repeats
    rows = packed_rows(records, tokenizer, pack_len(config, model_cfg), config.pretrain.mode_token_weight, config.seed,
                       anchors)
    if teacher_cache is not None:
        if not torch.equal(teacher_cache["input_ids"], rows["input_ids"]):
            raise KatError(f"teacher cache {teacher} was made for other data or packing; rebuild it with "
                           "`kat train cache-teacher` for this dataset and profile")
        if float(teacher_cache["temperature"]) != config.pretrain.kd_temperature:
            raise KatError(f"teacher cache {teacher} was made at kd_temperature {float(teacher_cache['temperature'])}, "
                           f"not {config.pretrain.kd_temperature}; rebuild it")
    elif teacher_model is not None and config.pretrain.teacher_once:
        log.info("teacher pass over the %d packed rows (top-%d logits)", rows["input_ids"].shape[0],
                 config.pretrain.teacher_top_k)
        teacher_cache = teacher_topk(teacher_model, rows, config.pretrain.teacher_top_k,
                                     config.pretrain.kd_temperature, progress=progress)
        teacher_model = None  # distil from the top-k from here on; the teacher's memory can go
    if teacher_cache is not None:
        rows["teacher_values"] = teacher_cache["values"]
        rows["teacher_indices"] = teacher_cache["indices"]
        rows["teacher_lse"] = teacher_cache["lse"]
    n_rows = rows["input_ids"].shape[0]
    batch_size = min(train_cfg.micro_batch_size, n_rows)
    sample = epoch_sampler(n_rows, batch_size, seed=config.seed)

    def batches(i: int) -> dict[str, Any]:
        idx = torch.from_numpy(sample(i))
        batch = {k: v[idx] for k, v in rows.items()}
        batch["num_tokens"] = int((batch["weights"] > 0).sum())
        return batch

    if heads is None or len(heads) != model_cfg.mtp_depth:
        heads = build_mtp(model, model_cfg.mtp_depth, seed=config.seed)
    wrapped = LMWithMTP(model, heads)
    work = out_dir.parent / f".{out_dir.name}.work"
    log.info("pretraining %.2fM parameters on %d packed rows of %d tokens -> %s",
             sum(p.numel() for p in wrapped.parameters()) / 1e6, n_rows, rows["input_ids"].shape[1], out_dir)
    result = train(wrapped, make_loss_fn(config, teacher_model), batches, train_cfg, work,
                   progress=progress, seed=config.seed)
    if result.rank != 0:
        return result.metrics
    trained = result.model

    def write_more(tmp: Path) -> None:
        shutil.copy(result.metrics_path, tmp / "metrics.jsonl")
        for name, path in (extra_files or {}).items():
            shutil.copy(path, tmp / name)
        if replay:  # later stages fine-tuning this checkpoint replay the same answers (kat_core.data.replay)
            write_jsonl(tmp / REPLAY_FILE, replay)

    save_checkpoint(
        out_dir, trained.lm, tokenizer, trained.mtp,
        extra={"stage": stage, "teacher": str(teacher) if teacher else None, "final": result.metrics,
               "parameters": sum(p.numel() for p in trained.lm.parameters()), **(extra_meta or {})},
        write_more=write_more,
        manifest={"stage": stage, "config": config, "inputs": _inputs(data_dir, teacher, model_cfg.base)},
    )
    shutil.rmtree(work, ignore_errors=True)
    log.info("checkpoint written to %s", out_dir)
    return result.metrics


def base_replay(config: KatConfig, model_cfg: ModelConfig, model, tokenizer, *, make: bool,
                progress: bool) -> list[dict[str, Any]]:
    """The base's own answers to replay beside the dataset (kat_core.data.replay) when the profile asks for
    them: those the base checkpoint was fine-tuned with, else (`make`: the first stage on a pretrained base)
    the base's answers now, before any step."""
    from kat_core.data.replay import PROMPTS, base_answers, inherited_replay

    if not config.pretrain.replay_repeats or not model_cfg.base:
        return []
    records = inherited_replay(model_cfg.base)
    if not records and make:
        records = base_answers(model, tokenizer, PROMPTS, max_new_tokens=config.pretrain.replay_max_new_tokens,
                               seed=config.seed, progress=progress)
    return records


def replay_anchors(config: KatConfig, model_cfg: ModelConfig, model, tokenizer, replay, records):
    """The base's distributions over the replayed answers (`pretrain.replay_kl`), or None. The base is
    `config.model.base`, the model that wrote them: the model about to be trained when this stage starts from
    it, else (the cold start, from a fine-tuned checkpoint) loaded again."""
    from kat_core.data.replay import base_distributions

    if not (replay and config.pretrain.replay_kl and config.pretrain.replay_repeats):
        return None
    base = model if model_cfg.base == config.model.base else build_student(config.model, records, None,
                                                                         config.seed)[0]
    log.info("replay anchor: the base's top-%d next-token logits over %d replayed answers",
             config.pretrain.teacher_top_k, len(replay))
    was_training = base.training
    base.eval()
    anchors = base_distributions(base, tokenizer, replay, config.pretrain.teacher_top_k)
    base.train(was_training)
    return anchors


def _inputs(data_dir: Path, teacher, base: str | None) -> dict[str, Path]:
    """What this checkpoint was made from, for its manifest (digested there)."""
    inputs = {"data": data_dir}
    if teacher:
        inputs["teacher"] = Path(teacher)
    if base and Path(base).is_dir():
        inputs["base"] = Path(base)
    return inputs


def teacher_topk(model, rows: dict[str, Any], k: int, temperature: float, *, batch_size: int = 16,
                 progress: bool = True) -> dict[str, Any]:
    """One teacher pass over the packed rows: its top-k logits and its logsumexp at `temperature` per
    position, the form `kd_loss` takes. Over several epochs this is far cheaper than a teacher forward
    pass every step, and top-32 of a small vocabulary keeps nearly all of the teacher's probability."""
    import torch
    from tqdm import tqdm

    values, indices, lse = [], [], []
    with torch.no_grad():
        for i in tqdm(range(0, rows["input_ids"].shape[0], batch_size), desc="teacher top-k", disable=not progress):
            logits = model(input_ids=rows["input_ids"][i:i + batch_size],
                           position_ids=rows["position_ids"][i:i + batch_size], use_cache=False).logits
            top = logits.float().topk(k, dim=-1)
            values.append(top.values)
            indices.append(top.indices.int())
            lse.append(torch.logsumexp(logits.float() / temperature, dim=-1))
    return {"values": torch.cat(values), "indices": torch.cat(indices), "lse": torch.cat(lse)}


def cache_teacher(config: KatConfig, teacher_dir: str | Path, data_dir: str | Path, out_dir: str | Path,
                  *, batch_size: int = 16, progress: bool = True) -> Path:
    """Run the teacher once over the packed rows and keep its top-k logits in a file, so distillation need
    not hold the teacher in memory at all. The student must pack the same way (same dataset, profile and
    seed); `pretrain` checks that the rows match."""
    import torch
    from safetensors.torch import save_file

    from kat_core.data.dataset import atomic_output_dir
    from kat_core.manifest import write_manifest

    teacher_dir, data_dir = Path(teacher_dir), Path(data_dir)
    model, cache, tokenizer = _load_teacher(teacher_dir)
    if model is None:
        raise KatError(f"{teacher_dir} is already a teacher cache; give the teacher checkpoint")
    rows = packed_rows(check_dataset(data_dir), tokenizer, pack_len(config, config.model),
                       config.pretrain.mode_token_weight, config.seed)
    k, temperature = config.pretrain.teacher_top_k, config.pretrain.kd_temperature
    top = teacher_topk(model, rows, k, temperature, batch_size=batch_size, progress=progress)
    with atomic_output_dir(Path(out_dir)) as tmp:
        save_file({"input_ids": rows["input_ids"], **top, "temperature": torch.tensor(temperature)},
                  str(tmp / TEACHER_CACHE))
        tokenizer.save_pretrained(tmp)
        write_manifest(tmp, stage="cache-teacher", config=config,
                       inputs={"teacher": teacher_dir, "data": data_dir},
                       extra={"top_k": k, "temperature": temperature})
    return Path(out_dir)
