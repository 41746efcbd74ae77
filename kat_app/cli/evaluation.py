"""`kat eval`, `kat serve-model`, `kat generate`: evaluation reports and the inference server."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from kat_app.cli.base import (
    _say,
    _setup_logging,
    app,
)
from kat_core.errors import KatError

# ---- kat eval / serve-model / generate: evaluation reports and the inference server ------------------------
# Kept as one block (kat_core/eval, kat_core/serve). `kat eval MODEL ...` is short for `kat eval run MODEL ...`.


class _EvalGroup(typer.core.TyperGroup):
    """Routes `kat eval MODEL ...` to `kat eval run MODEL ...`; subcommands (compare) and options pass through."""

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and not args[0].startswith("-"):
            args = ["run", *args]
        return super().parse_args(ctx, args)


eval_app = typer.Typer(
    cls=_EvalGroup, no_args_is_help=True,
    help="Evaluate a model (accuracy, tokens, think-on rate; auto vs forced modes): `kat eval MODEL`; "
         "compare two: `kat eval compare A B`.",
)
app.add_typer(eval_app, name="eval")

SuitesOpt = Annotated[str, typer.Option(
    "--suites", help="comma-separated: arith, gsm8k, math500, aime24, humaneval, mbpp")]
ModesOpt = Annotated[str, typer.Option(
    "--modes", help="comma-separated evaluation modes: auto, on, off, plain (own chat template, no grammar)")]
# at most 100000: a count a generated suite (arith) cannot reach kept it generating for hours
LimitOpt = Annotated[int | None, typer.Option("--limit", "-n", min=1, max=100_000,
                                              help="items per suite (seeded sample); default all")]
SamplesOpt = Annotated[int, typer.Option("--samples", help="sampled responses per item and mode for pass@1 (0: none)")]
# bounds on what a user types: a value the decoding cannot use (a negative or NaN temperature, no tokens, a seed
# torch cannot take) is refused before a model loads, not met as a traceback from the decode loop, or not at all
# (every comparison with NaN is false: a NaN temperature decoded garbage into a report)
TemperatureOpt = Annotated[float, typer.Option(min=0, help="sampling temperature of the pass@1 samples")]
MaxNewOpt = Annotated[int, typer.Option("--max-new-tokens", min=1, help="token budget per response")]
SeedOpt = Annotated[int, typer.Option(min=-(2**63), max=2**64 - 1, help="random seed")]  # torch's seed range


def _usable_device(device: str | None) -> str | None:
    """--device: a torch device this machine has, else one line (not torch's traceback from moving the model)."""
    if device is None:
        return None
    import torch

    try:
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError, ValueError) as e:  # a bad name; no CUDA build; no such GPU
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise KatError(f"--device {device!r} cannot be used here: {first}") from None
    return device


def _top_p(value: float) -> float:
    if not 0 < value <= 1:  # NaN fails too
        raise KatError(f"--top-p must be in (0, 1], not {value}")
    return value


ThreadsOpt = Annotated[int, typer.Option(
    "--threads", help="torch CPU threads (small models decode fastest on one; 0 keeps torch's default)")]
DeviceOpt = Annotated[str | None, typer.Option("--device", callback=_usable_device,
                                               help="torch device (default: cuda when present, else cpu)")]
DraftTokensOpt = Annotated[int, typer.Option(
    "--draft-tokens", min=0, max=8, help="speculative decoding: tokens the checkpoint's MTP module drafts per step, "
    "verified by the model (same greedy output, same sampling distribution); 0: plain decoding")]


def _torch_threads(threads: int) -> None:
    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the weight-loading bar is noise for a command line
    if threads > 0:
        torch.set_num_threads(threads)


def _csv(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _eval_kwargs(limit, samples, temperature, max_new_tokens, seed, oracle_delta, token_cost, oracle_items,
                 benchmarks_dir, device, draft_tokens) -> dict:
    from pydantic import ValidationError

    from kat_core.config import AutoThinkConfig

    try:
        criterion = AutoThinkConfig(delta=oracle_delta, token_cost=token_cost, token_budget=max_new_tokens)
    except ValidationError as e:  # the criterion's own bounds, named by the option that set the value
        first = e.errors()[0]
        option = {"delta": "--oracle-delta", "token_cost": "--token-cost"}.get(first["loc"][0], "--max-new-tokens")
        raise KatError(f"{option} {first['input']}: {first['msg']}") from None
    return {"limit": limit, "n_samples": samples, "temperature": temperature, "max_new_tokens": max_new_tokens,
            "seed": seed, "criterion": criterion, "oracle_items": oracle_items, "benchmarks_dir": benchmarks_dir,
            "device": device, "draft_tokens": draft_tokens}


OracleDeltaOpt = Annotated[float, typer.Option(
    help="the decision criterion's delta: think-off is right when V_off >= V_on - delta")]
TokenCostOpt = Annotated[float, typer.Option(
    help="the decision criterion's token cost: V = accuracy - token_cost * tokens / max_new_tokens")]
OracleItemsOpt = Annotated[int, typer.Option(
    "--oracle-items", min=0, max=100_000, help="other test items per suite answered in both forced modes, on which the "
    "feature-cell oracle decides its cells (0: on the evaluated items themselves)")]


def _eval_name(path: Path, served) -> str:
    """The folder an evaluation of a model goes to, named after the model: NAME-vN for a registered one; for a
    checkpoint, its stage and a digest of its manifest (every stage's folder is called `model`); else the
    directory's name."""
    import hashlib
    import re

    from kat_core.manifest import read_manifest

    if served is not None:
        return f"{served.name}-v{served.version}"
    manifest = read_manifest(path)  # None for a broken one too (`[1]` was a traceback): named after the dir
    if manifest is not None:
        stage = manifest.get("stage")  # a folder name under $KAT_HOME/eval: a plain word, never a path
        stage = stage if isinstance(stage, str) and re.fullmatch(r"\w[\w.-]*", stage) else path.resolve().name
        return f"{stage}-{hashlib.sha256((path / 'manifest.json').read_bytes()).hexdigest()[:10]}"
    return path.resolve().name


@eval_app.command("run")
def eval_run(
    model: Annotated[str, typer.Argument(
        metavar="MODEL", help="checkpoint (or any HF causal LM) directory, or a registered NAME@ALIAS / NAME/VERSION")],
    out: Annotated[Path | None, typer.Option("--out", "-o", help="report dir (default $KAT_HOME/eval/<model>: "
                                             "NAME-vN, or the checkpoint's stage and manifest digest)")] = None,
    suites: SuitesOpt = "arith",
    modes: ModesOpt = "auto,on,off",
    limit: LimitOpt = None,
    samples: SamplesOpt = 4,
    temperature: TemperatureOpt = 0.7,
    max_new_tokens: MaxNewOpt = 160,
    seed: SeedOpt = 0,
    oracle_delta: OracleDeltaOpt = 0.02,
    token_cost: TokenCostOpt = 0.2,
    oracle_items: OracleItemsOpt = 0,
    benchmarks_dir: Annotated[str | None, typer.Option(help="folder of the public benchmark files")] = None,
    threads: ThreadsOpt = 1,
    device: DeviceOpt = None,
    draft_tokens: DraftTokensOpt = 0,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress bars")] = False,
) -> None:
    """Evaluate MODEL on suites in auto and forced modes: writes report.json, report.md and PNG plots."""
    from kat_core.data.dataset import check_replaceable
    from kat_core.eval.evaluate import evaluate
    from kat_core.platform import kat_home
    from kat_core.platform.served import model_path

    _setup_logging()
    _torch_threads(threads)
    path, served = model_path(model, kat_home() / "models")
    # before evaluating; a model dir as --out would be replaced by its own report
    out = check_replaceable(out or kat_home() / "eval" / _eval_name(path, served), inputs=[path])
    report = evaluate(path, _csv(suites), _csv(modes), out_dir=out, progress=not quiet,
                      **_eval_kwargs(limit, samples, temperature, max_new_tokens, seed, oracle_delta, token_cost,
                                    oracle_items, benchmarks_dir, device, draft_tokens))
    typer.echo(f"{'mode':6s} {'n':>5s} {'accuracy':>8s} {'pass@1':>7s} {'tokens':>7s} {'think-on':>8s}")
    for mode, b in report["overall"].items():
        p1 = b["accuracy"]["pass@1"]
        typer.echo(f"{mode:6s} {b['n']:>5d} {b['accuracy']['greedy'] or 0:>8.3f} "
                   f"{'-' if p1 is None else format(p1, '.3f'):>7s} {b['mean_tokens']['total'] or 0:>7.1f} "
                   f"{b['think_on_rate'] or 0:>8.3f}")
    sel = report["mode_selection"]
    if sel:
        cell = sel["feature_cell"]
        on = cell.get("decided_on", {})
        where = f" (cells decided on {on['items']} other items)" if on.get("source") == "calibration" else ""
        typer.echo(f"mode selection: feature-cell oracle{where} {cell['oracle']['accuracy']:.3f} at "
                   f"{cell['oracle']['mean_tokens']:.1f} tokens, auto's regret {cell['regret']['accuracy']:+.3f} "
                   f"accuracy, {cell['regret']['tokens']:+.1f} tokens; hindsight oracle "
                   f"{sel['oracle']['accuracy']:.3f} at {sel['oracle']['mean_tokens']:.1f} tokens")
    skipped = {s: v["skipped_too_long"] for s, v in report["suites"].items() if v["skipped_too_long"]}
    if skipped:
        _say(f"skipped (do not fit the model's context): {skipped}")
    _say(f"report {out}/report.json, {out}/report.md, plots {out}/frontier.png, {out}/think_on_by_level.png")


@eval_app.command("compare")
def eval_compare(
    a: Annotated[Path, typer.Argument(help="A, the baseline: an evaluation dir, a report.json, or a model dir")],
    b: Annotated[Path, typer.Argument(help="B, the challenger: the same kinds")],
    out: Annotated[Path | None, typer.Option("--out", "-o", help="where compare.md/.json/.png (and new "
                                             "evaluations) go (default $KAT_HOME/eval/compare)")] = None,
    suites: SuitesOpt = "arith",
    modes: ModesOpt = "auto,on,off",
    limit: LimitOpt = None,
    samples: SamplesOpt = 4,
    temperature: TemperatureOpt = 0.7,
    max_new_tokens: MaxNewOpt = 160,
    seed: SeedOpt = 0,
    oracle_delta: OracleDeltaOpt = 0.02,
    token_cost: TokenCostOpt = 0.2,
    oracle_items: OracleItemsOpt = 0,
    benchmarks_dir: Annotated[str | None, typer.Option(help="folder of the public benchmark files")] = None,
    threads: ThreadsOpt = 1,
    device: DeviceOpt = None,
    draft_tokens: DraftTokensOpt = 0,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress bars")] = False,
) -> None:
    """Put A and B side by side on the same items (model dirs are evaluated first, with the options given)."""
    from kat_core.eval.evaluate import compare
    from kat_core.eval.report import render_comparison
    from kat_core.platform import kat_home

    _setup_logging()
    _torch_threads(threads)
    out = out or kat_home() / "eval" / "compare"
    result = compare(a, b, out_dir=out, suites=_csv(suites), modes=_csv(modes), progress=not quiet,
                     **_eval_kwargs(limit, samples, temperature, max_new_tokens, seed, oracle_delta, token_cost,
                                    oracle_items, benchmarks_dir, device, draft_tokens))
    typer.echo(render_comparison(result).split("\n![")[0].rstrip())
    _say(f"comparison {out}/compare.md, {out}/compare.json, plot {out}/compare.png")


@app.command("serve-model")
def serve_model(
    model: Annotated[str, typer.Argument(
        metavar="MODEL", help="a registered model, NAME@ALIAS (kat@champion: follows the alias) or NAME/VERSION "
        "(kat/3); or a checkpoint (or any HF causal LM) directory")],
    port: Annotated[int, typer.Option("--port", "-P", min=0, max=65535, help="TCP port")] = 8000,
    host: Annotated[str, typer.Option(help="interface to listen on (0.0.0.0 for all)")] = "127.0.0.1",
    name: Annotated[str | None, typer.Option(
        help="model id clients ask for (default: NAME@ALIAS, NAME-vN, or the directory's name)")] = None,
    poll_s: Annotated[float, typer.Option(
        "--poll-s", help="NAME@ALIAS: seconds between looks at the registry; when the alias has moved (promote, "
        "rollback) the new version is served under the same id, without a restart")] = 30.0,
    tracking_uri: Annotated[str | None, typer.Option(
        help="MLflow tracking URI of the registry (default: MLFLOW_TRACKING_URI, else KAT_HOME's SQLite)")] = None,
    max_batch: Annotated[int, typer.Option(min=1, help="most rows (requests x n) one batch runs")] = 64,
    max_wait_ms: Annotated[float, typer.Option(
        min=0, help="idle gap that closes a batch once it is as big as the last")] = 2.0,
    max_delay_ms: Annotated[float, typer.Option(min=0, help="longest a request waits for its batch to fill")] = 200.0,
    max_tokens: Annotated[int, typer.Option(min=1, help="completion budget when a request sets none")] = 256,
    threads: ThreadsOpt = 1,
    device: DeviceOpt = None,
    seed: SeedOpt = 0,
    draft_tokens: DraftTokensOpt = 0,
) -> None:
    """Serve MODEL with an OpenAI-compatible API (/v1/chat/completions, /v1/completions, /v1/models), thinking
    control per request (`thinking: auto|on|off`) and dynamic batching."""
    from kat_core.platform import kat_home
    from kat_core.platform.served import follower, model_path
    from kat_core.serve import serve

    if poll_s <= 0:
        raise KatError(f"--poll-s must be > 0, got {poll_s}")
    _setup_logging()
    _torch_threads(threads)
    path, served = model_path(model, kat_home() / "models", tracking_uri=tracking_uri)
    follow = None
    if served is not None:
        _say(f"{model}: {served.label} ({path})")
        if not served.ref.isdigit():  # an alias: follow it
            follow = follower(served, kat_home() / "models", tracking_uri=tracking_uri)

    serve(path, host=host, port=port, name=name or (served.model_id if served else path.resolve().name),
          max_rows=max_batch, max_wait_ms=max_wait_ms, max_delay_ms=max_delay_ms, default_max_tokens=max_tokens,
          seed=seed, device=device, follow=follow, poll_s=poll_s, source=served.label if served else None,
          draft_tokens=draft_tokens)


def _generation_budget(lm, tokenizer, prompt: str, forced: str | None, asked: int | None) -> int:
    """--max-new-tokens as the model's context allows (as the server's `max_tokens`): the default shrinks to the
    room left after the request; a budget asked for past it is one line. Unchecked, decoding ran past the
    context (garbage after position max_position_embeddings) or tried to allocate a terabyte for 10**12."""
    from kat_core.chat import completion_budget, request_text

    max_len = getattr(lm.config, "max_position_embeddings", None)
    if not max_len:
        return completion_budget(asked, 256, None)
    used = sum(len(tokenizer(text, add_special_tokens=False)["input_ids"])
               for text in (request_text(tokenizer, prompt), forced or ""))
    room = max_len - used
    budget = completion_budget(asked, 256, room)
    if not 1 <= budget <= room:
        raise KatError(f"this model's context is {max_len} tokens and the request takes {used}"
                       + (f"; --max-new-tokens {asked} does not fit, at most {room} does" if room >= 1
                          else ", leaving no room for a response"))
    return budget


@app.command("generate")
def generate_cmd(
    model: Annotated[Path, typer.Argument(help="checkpoint (or any HF causal LM) directory")],
    prompt: Annotated[str, typer.Argument(help='the request, e.g. "Compute 47*6+38."')],
    mode: Annotated[str, typer.Option("--mode", "-m", help="auto (the model chooses) | on | off (forced)")] = "auto",
    max_new_tokens: Annotated[int | None, typer.Option(
        "--max-new-tokens", min=1, help="token budget of the response (default: 256, or what the model's context "
        "has room for after the request)")] = None,
    temperature: Annotated[float, typer.Option(min=0, help="0 is greedy")] = 0.0,
    top_p: Annotated[float, typer.Option(callback=_top_p, help="nucleus sampling mass, in (0, 1]")] = 1.0,
    seed: SeedOpt = 0,
    threads: ThreadsOpt = 1,
    device: DeviceOpt = None,
    draft_tokens: DraftTokensOpt = 0,
    as_json: Annotated[bool, typer.Option("--json", help="print the parsed response as JSON")] = False,
) -> None:
    """Answer one request and print its parsed judge, mode, reasoning and answer."""
    from kat_core.chat import control_tokens
    from kat_core.format import parse
    from kat_core.rollout import generate
    from kat_core.serve import load_for_serving
    from kat_core.serve.protocol import forced_for_request
    from kat_core.speculative import load_drafter

    if mode not in ("auto", "on", "off"):
        raise KatError(f"--mode must be auto, on or off, not {mode!r}")
    _setup_logging()
    _torch_threads(threads)
    lm, tokenizer = load_for_serving(model, device)
    found = control_tokens(tokenizer, prompt)  # typed, they would reach the model as tokens: a forged judge or mode
    if found:
        raise KatError(f"the request contains {', '.join(map(repr, found))}, the spelling of this model's control "
                       "tokens (response grammar tags, end of text, chat markers); they cannot be sent as text")
    draft = load_drafter(model, lm, draft_tokens)
    forced = forced_for_request(prompt, mode)
    max_new_tokens = _generation_budget(lm, tokenizer, prompt, forced, max_new_tokens)
    (sample,) = generate(lm, tokenizer, [prompt], forced=[forced], max_new_tokens=max_new_tokens,
                         temperature=temperature, top_p=top_p, seed=seed, draft=draft, draft_tokens=draft_tokens)
    parsed = parse(sample.text)
    counts = sample.segment_counts
    record = {"judge": parsed.judge, "mode": parsed.mode, "forced": mode != "auto", "reasoning": parsed.think,
              "answer": parsed.answer, "well_formed": parsed.well_formed, "error": parsed.error,
              "finish_reason": sample.finish_reason, "tokens": counts, "text": sample.text}
    if draft is not None:  # [proposed, accepted] drafts per segment
        record["drafts"] = sample.draft_counts
    if as_json:
        typer.echo(json.dumps(record, ensure_ascii=False))
        return
    indent = "\n" + " " * 11
    lines = [
        f"judge:     {parsed.judge if parsed.judge is not None else '-'}",
        f"mode:      {parsed.mode or '-'} ({'forced' if mode != 'auto' else 'chosen by the model'})",
        f"reasoning: {indent.join((parsed.think or '-').splitlines()) or '-'}",
        f"answer:    {parsed.answer if parsed.answer is not None else '-'}",
        f"tokens:    {counts.get('total', 0)} (judge {counts.get('judge', 0)}, think {counts.get('think', 0)}, "
        f"answer {counts.get('answer', 0)}); finish: {sample.finish_reason}",
    ]
    if draft is not None:
        lines.append("drafts:    " + ", ".join(f"{seg} {a}/{n} accepted"
                                               for seg, (n, a) in sample.draft_counts.items()))
    if not parsed.well_formed:
        lines += [f"malformed: {parsed.error}", f"raw:       {sample.text!r}"]
    typer.echo("\n".join(lines))


