"""`kat data`, `kat train`, `kat tasks`: the stages and task families, run directly (no pipeline)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from kat_app.cli.base import (
    ProfileOpt,
    SetOpt,
    _say,
    _setup_logging,
    app,
)

data_app = typer.Typer(help="Synthesize, validate and inspect dual-regime datasets.", no_args_is_help=True)
tasks_app = typer.Typer(help="Task families: synthetic arithmetic, math and code benchmarks.", no_args_is_help=True)
train_app = typer.Typer(
    help="Training stages: pretrain (MTP + distillation), cold start, Step-SRPO, teacher caches.", no_args_is_help=True
)
app.add_typer(data_app, name="data")
app.add_typer(tasks_app, name="tasks")
app.add_typer(train_app, name="train")


@train_app.callback()
def _train_setup() -> None:
    from kat_core.util import cpu_threads

    cpu_threads()  # the stages' one CPU thread policy, for `kat train srpo` too
model_app = typer.Typer(help="Base models: import a GGUF file or HF directory as a clean HF directory.",
                        no_args_is_help=True)
app.add_typer(model_app, name="model")


@model_app.command("import")
def model_import(
    source: Annotated[Path, typer.Argument(help="a .gguf file or a Hugging Face model directory")],
    out: Annotated[Path, typer.Option("--out", "-o", help="HF directory to write")],
    dtype: Annotated[str, typer.Option(help="weights dtype: fp32 or bf16")] = "fp32",
) -> None:
    """Write SOURCE as an HF directory (weights, tokenizer, chat template, digested manifest) every stage loads."""
    from kat_core.data.dataset import check_replaceable
    from kat_core.model.importer import import_model

    out = check_replaceable(out, inputs=[source])  # before the import's work, not after it
    _setup_logging()
    m = import_model(source, out, dtype)
    _say(f"imported {source} -> {out}: {m['architecture']}, {m['parameters'] / 1e6:.1f}M parameters, {m['dtype']}, "
         f"chat template {'yes' if m['chat_template'] else 'no'}; content digest {m['content_digest'][:16]}")

@data_app.command("synth")
def data_synth(
    out: Annotated[Path, typer.Option("--out", "-o", help="dataset directory to write")],
    profile: ProfileOpt = "smoke",
    overrides: SetOpt = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress bar")] = False,
) -> None:
    """Synthesize a dual-regime dataset (think-off via tagging, think-on via solver/thinker/critic)."""
    from kat_core.config import load_config
    from kat_core.data.dataset import check_replaceable
    from kat_core.data.synth import synthesize

    out = check_replaceable(out)  # before synthesis (an agent backend takes long), not after it
    config = load_config(profile, overrides)
    m = synthesize(config, out, progress=not quiet)
    critic = m["critic"]
    _say(
        f"wrote {m['records']} records ({m['counts']['mode']}) from {m['items']} items to {out} "
        f"in {m['seconds']:.2f}s ({m['items_per_s']} items/s); rejects {m['rejects'] or 0}, "
        f"critic catch rate {critic['catch_rate']}"
    )


@data_app.command("validate")
def data_validate(
    dataset: Annotated[Path, typer.Argument(help="dataset directory (from `kat data synth`)")],
    report: Annotated[Path | None, typer.Option(help="report directory (default: DATASET.validation)")] = None,
    profile: ProfileOpt = "smoke",
    overrides: SetOpt = None,
) -> None:
    """Validate a dataset with Great Expectations; exit 1 naming the failed expectations."""
    from kat_core.config import load_config
    from kat_core.data.validate import validate_dataset

    config = load_config(profile, overrides)
    summary = validate_dataset(dataset, report, config.validate_, config.tasks)
    _say(
        f"validation passed: {summary['passed']}/{summary['total']} expectations; "
        f"report {summary['report_json']}, data docs {summary.get('data_docs')}"
    )


@data_app.command("stats")
def data_stats(dataset: Annotated[Path, typer.Argument(help="dataset directory")]) -> None:
    """Counts per level and mode, regimes, rejects and lengths of a dataset."""
    from kat_core.data.stats import dataset_stats, render_stats

    render_stats(dataset_stats(dataset))


@train_app.command("pretrain")
def train_pretrain(
    data: Annotated[Path, typer.Option("--data", "-d", help="validated dataset directory")],
    out: Annotated[Path, typer.Option("--out", "-o", help="checkpoint directory to write")],
    teacher: Annotated[Path | None, typer.Option(help="teacher checkpoint or teacher top-k cache")] = None,
    profile: ProfileOpt = "smoke",
    overrides: SetOpt = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress bar")] = False,
) -> None:
    """Pretrain a causal LM with MTP modules (and distil from --teacher) into an HF checkpoint.

    Started again with the same arguments after a crash, it resumes from its last checkpoint."""
    from kat_core.config import load_config
    from kat_core.data.dataset import check_replaceable
    from kat_core.train.pretrain import pretrain

    out = check_replaceable(out, inputs=[data, teacher])  # before training, not after it
    _setup_logging()
    config = load_config(profile, overrides)
    metrics = pretrain(config, data, out, teacher, progress=not quiet)
    parts = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k in ("loss", "ce", "kd", "mtp"))
    _say(f"pretrained to step {metrics.get('step')} ({parts}); checkpoint {out}")


@train_app.command("coldstart")
def train_coldstart(
    model: Annotated[Path, typer.Option("--model", "-m", help="pretrained checkpoint")],
    data: Annotated[Path, typer.Option("--data", "-d", help="dataset directory (its pool.jsonl holds the prompts)")],
    out: Annotated[Path, typer.Option("--out", "-o", help="checkpoint directory to write")],
    profile: ProfileOpt = "smoke",
    overrides: SetOpt = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress bar")] = False,
) -> None:
    """Cold start: label each held-out prompt's mode from the model's own forced answers (the `autothink`
    decision criterion, per feature cell), then SFT.

    Writes the checkpoint with labels.jsonl (accuracy and tokens per mode, cell, label, reason) and
    coldstart.json."""
    from kat_core.config import load_config
    from kat_core.data.dataset import check_replaceable
    from kat_core.train.coldstart import coldstart

    out = check_replaceable(out, inputs=[model, data])  # before training, not after it
    _setup_logging()
    config = load_config(profile, overrides)
    result = coldstart(config, model, out, data_dir=data, progress=not quiet)
    levels = ", ".join(f"L{lvl} off {v['label_off']}/on {v['label_on']}" for lvl, v in result["per_level"].items())
    relabels = "".join(f"; round {r['round']} relabelled {r['labels_changed']}" for r in result["rounds"][1:])
    copies = result.get("misread_copies")
    decisions = result.get("decisions")
    aligned = ""
    if decisions:
        moved = ", ".join(f"{c}: {v}" for c, v in decisions["disagreed"].items())
        steps = decisions["trained_steps"]
        aligned = f"; decisions checked on {decisions['checked_on']} RL prompts, " + (
            f"aligned in {steps} steps ({moved})" if moved else "all agree")
    _say(f"cold start labelled {result['prompts']} prompts ({levels}){relabels}; {result['in_sft']} in SFT"
         f"{f' (+{copies} under other judges)' if copies else ''}{aligned}; checkpoint {out}")


@train_app.command("srpo")
def train_srpo(
    model: Annotated[Path, typer.Option("--model", "-m", help="cold-start checkpoint (its labels.jsonl is the prior)")],
    data: Annotated[Path, typer.Option("--data", "-d", help="dataset directory whose prompts are used")],
    out: Annotated[Path, typer.Option("--out", "-o", help="checkpoint directory to write")],
    algo: Annotated[str | None, typer.Option(help="step_srpo | grpo | decoupled | adaptthink (default: srpo.algo)")
                    ] = None,
    profile: ProfileOpt = "smoke",
    overrides: SetOpt = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress bar")] = False,
) -> None:
    """Reinforcement learning after the cold start: paired-mode Step-SRPO, or the grpo, decoupled and
    adaptthink baselines. Settings under `srpo.` (samples per mode, clip, KL, srpo.train.steps/lr) and the
    decision criterion under `autothink.`; per-step rewards, the greedy decision and its regret per level on
    a probe set, clip fraction and KL go to metrics.jsonl in the checkpoint. Started again after a crash, it
    resumes."""
    from kat_core.config import load_config
    from kat_core.data.dataset import check_replaceable
    from kat_core.train.srpo import srpo

    out = check_replaceable(out, inputs=[model, data])  # before training, not after it
    _setup_logging()
    config = load_config(profile, overrides)
    summary = srpo(config, model, data, out, algo=algo, progress=not quiet)
    moved = ", ".join(f"{k} {v['first']:.3f} -> {v['last']:.3f}" for k, v in summary["curve"].items())
    _say(f"{summary['algo']}: {summary['steps']} steps ({moved}); checkpoint {out}")


@train_app.command("cache-teacher")
def train_cache_teacher(
    teacher: Annotated[Path, typer.Option(help="teacher checkpoint directory")],
    data: Annotated[Path, typer.Option("--data", "-d", help="the dataset the student will train on")],
    out: Annotated[Path, typer.Option("--out", "-o", help="cache directory to write")],
    profile: ProfileOpt = "smoke",
    overrides: SetOpt = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress bar")] = False,
) -> None:
    """Cache the teacher's top-k logits over the student's packed rows (use it as --teacher)."""
    from kat_core.config import load_config
    from kat_core.data.dataset import check_replaceable
    from kat_core.train.pretrain import cache_teacher

    out = check_replaceable(out, inputs=[teacher, data])  # before the teacher runs, not after it
    _setup_logging()
    config = load_config(profile, overrides)
    path = cache_teacher(config, teacher, data, out, progress=not quiet)
    _say(f"teacher top-{config.pretrain.teacher_top_k} cache written to {path}")


@tasks_app.command("list")
def tasks_list() -> None:
    """The task families and their splits."""
    from kat_core.tasks import get_task, known_tasks

    for name in known_tasks():
        typer.echo(f"{name:10s} splits: {', '.join(get_task(name).splits)}")


@tasks_app.command("show")
def tasks_show(
    name: str,
    split: str = "test",
    n: Annotated[int, typer.Option("-n", min=1, max=10_000,
                                   help="how many items (a few to look at; `kat data synth` makes datasets)")] = 3,
    seed: int = 0,
) -> None:
    """Print a few items of a task family as JSON lines."""
    from kat_core.tasks import get_task

    for item in get_task(name).examples(split, n=n, seed=seed):
        typer.echo(json.dumps(item.to_dict(), ensure_ascii=False))


