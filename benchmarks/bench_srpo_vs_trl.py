"""Our Step-SRPO step against TRL's `GRPOTrainer` step: same tiny model, prompts, group size, token budget and
sampling, in one process.

One step = sample a group of G responses for each of P prompts, verify them, compute advantages and take one
optimizer step with the KL to a frozen reference (beta = 0.02 in both; TRL's default is 0, which would skip its
reference forward pass and make the comparison unequal). TRL generates with `model.generate` (HF's
DynamicCache, finished rows computed until the batch ends); ours samples with kat_core.rollout (rows leave
the batch when they finish, preallocated KV cache) and trains through the kat training engine. Both train
on micro-batches of `srpo.train.micro_batch_size` (32) with accumulation up to the P x G samples of the
step; ours groups rows of similar length into a micro-batch, TRL keeps the sampled order. Both stop a
row at `</answer>` or EOS and sample at temperature 1, top-p 1, no top-k. The reward TRL optimises is the
answer reward of our verifier (1 correct, 0 wrong, -1 malformed); ours is Step-SRPO's (mode + answer
rewards): the work per step is the same, the objective is each trainer's own.

Without `--model` the model is demo-sized and trained here for a few hundred steps on rendered grammar
examples (as in bench_rollout.py) so it writes real responses of realistic lengths.

    .venv/bin/pip install -e '.[bench]'     # TRL: a benchmark-only dependency
    .venv/bin/python benchmarks/bench_srpo_vs_trl.py [--steps 4] [--repeats 3] [--prompts 8] [--group 8]

After a warm-up of each, repeats alternate (ours, TRL, ours, TRL, ...); the table shows the median step time
of each. The last line is `ratio ours/trl step_time: X` (target <= 0.5).
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

BETA = 0.02


def make_inputs(root: Path, model_dir: str | None, prompts: int):
    """A checkpoint and a dataset whose prompts both trainers use."""
    from bench_rollout import build_trained_model

    from kat_core.config import load_config
    from kat_core.data.synth import synthesize
    from kat_core.model.checkpoint import save_checkpoint

    config = load_config("demo", ["synth.families={arith: 400}"])
    synthesize(config, root / "data", progress=False)
    if model_dir is None:
        model, tok, _ = build_trained_model(steps=400)
        model_dir = str(save_checkpoint(root / "model", model.eval(), tok))
    return config, Path(model_dir), root / "data"


def ours_step_times(config, model_dir: Path, data: Path, steps: int, out: Path) -> list[float]:
    import json

    from kat_core.train.srpo import srpo

    srpo(config, model_dir, data, out, progress=False)
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == steps
    print(f"  ours: mean tokens {statistics.mean(x['mean_tokens'] for x in lines):.1f}, "
          f"answer reward {statistics.mean(x['reward_answer'] for x in lines):.2f}", flush=True)
    return [x["step_time_s"] for x in lines]


def trl_step_times(config, model_dir: Path, data: Path, steps: int, out: Path) -> list[float]:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from kat_core.format import ANSWER_CLOSE, parse, prompt_text
    from kat_core.train.srpo import load_prompts

    s = config.srpo
    pairs = load_prompts(config, data)
    by_prompt = {prompt_text(item.prompt): (task, item) for task, item in pairs}
    dataset = Dataset.from_list([{"prompt": p} for p in by_prompt])

    def answer_reward(prompts, completions, completion_ids, **_):
        rewards = []
        for p, ids in zip(prompts, completion_ids, strict=True):
            task, item = by_prompt[p]
            # TRL's `completions` are decoded without special tokens, which are our grammar's tags
            parsed = parse(tok.decode(ids, skip_special_tokens=False).replace(tok.eos_token, ""))
            rewards.append(-1.0 if not parsed.well_formed else float(task.verify(item, parsed.answer or "")))
        return rewards

    times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter() - self.t0)

    micro = min(s.train.micro_batch_size, s.prompts_per_step * s.group_size)
    if (s.prompts_per_step * s.group_size) % micro:
        raise SystemExit(f"P x G must be a multiple of srpo.train.micro_batch_size ({micro}) for TRL")
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    stops = [tok.eos_token_id, tok.convert_tokens_to_ids(ANSWER_CLOSE)]
    model.generation_config.eos_token_id = stops  # TRL ends each completion's mask at these
    args = GRPOConfig(
        output_dir=str(out), max_steps=steps, per_device_train_batch_size=micro,
        gradient_accumulation_steps=s.prompts_per_step * s.group_size // micro,
        num_generations=s.group_size, max_completion_length=s.max_new_tokens, temperature=s.temperature,
        top_p=1.0, top_k=0, beta=BETA, epsilon=s.clip_eps, learning_rate=s.train.lr, num_iterations=1,
        use_cpu=True, bf16=False, report_to="none", save_strategy="no", logging_steps=1, seed=config.seed,
        disable_tqdm=True, generation_kwargs={"eos_token_id": stops},
    )
    trainer = GRPOTrainer(model=model, reward_funcs=[answer_reward], args=args, train_dataset=dataset,
                          processing_class=tok, callbacks=[Timer()])
    trainer.train()
    logs = [x for x in trainer.state.log_history if "completions/mean_length" in x]
    print(f"  TRL: mean tokens {statistics.mean(x['completions/mean_length'] for x in logs):.1f}, "
          f"answer reward {statistics.mean(x['reward'] for x in logs):.2f}", flush=True)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="a KAT checkpoint (default: build and briefly train a demo-sized model)")
    ap.add_argument("--steps", type=int, default=4, help="steps per timed block")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--prompts", type=int, default=8, help="P: prompts per step")
    ap.add_argument("--group", type=int, default=8, help="G: samples per prompt")
    ap.add_argument("--max-new", type=int, default=160)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.disable(logging.WARNING)
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        config, model_dir, data = make_inputs(root, args.model, args.prompts)
        from kat_core.config import load_config

        # the same work in both: no exploration samples (TRL has none), one update per rollout, same KL weight
        config = load_config("demo", [
            "synth.families={arith: 400}", f"srpo.prompts_per_step={args.prompts}", f"srpo.group_size={args.group}",
            f"srpo.max_new_tokens={args.max_new}", "srpo.explore_floor=0", "srpo.updates_per_rollout=1",
            f"srpo.kl_beta={BETA}", f"srpo.train.steps={args.steps}", f"srpo.train.checkpoint_every={args.steps}"])
        ours, trl = [], []
        runs = [("warm-up", 1)] + [("timed", r) for r in range(args.repeats)]
        for kind, r in runs:
            t_ours = ours_step_times(config, model_dir, data, args.steps, root / f"ours-{kind}-{r}")
            t_trl = trl_step_times(config, model_dir, data, args.steps, root / f"trl-{kind}-{r}")
            if kind == "timed":
                ours += t_ours[1:]  # each block's first step pays its set-up (reference copy, first batch)
                trl += t_trl[1:]
            print(f"{kind} {r}: ours {statistics.median(t_ours):.3f} s/step, TRL {statistics.median(t_trl):.3f} s/step",
                  flush=True)

    ours_med, trl_med = statistics.median(ours), statistics.median(trl)
    print(f"\nP={args.prompts} prompts x G={args.group}, micro-batches of {config.srpo.train.micro_batch_size}, "
          f"<= {args.max_new} new tokens, beta {BETA}, "
          f"{torch.get_num_threads()} threads, {len(ours)} timed steps each")
    print(f"{'trainer':<28}{'median step s':>14}")
    print(f"{'ours (step_srpo, kat engine)':<28}{ours_med:>14.3f}")
    print(f"{'TRL GRPOTrainer':<28}{trl_med:>14.3f}")
    print(f"ratio ours/trl step_time: {ours_med / trl_med:.3f}")


if __name__ == "__main__":
    main()
