"""The rollout engine on a tiny Llama (hidden 64, 2 layers) briefly trained on rendered responses, so that it
writes grammar-shaped text of varied length: greedy equals HF `generate`, forced modes, stop rules,
log-probabilities against a teacher-forced pass, seeds, segment counts, and rows leaving the batch."""

import pytest

torch = pytest.importorskip("torch")

from kat_core.config import ModelConfig  # noqa: E402
from kat_core.data.judge import judge_text  # noqa: E402
from kat_core.format import ANSWER_CLOSE, count_tokens, forced_prefix, parse, prompt_text  # noqa: E402
from kat_core.rollout import generate  # noqa: E402
from kat_core.tasks.arith import ArithTask  # noqa: E402
from tests.tiny_autothink import train_tiny  # noqa: E402

TINY = ModelConfig(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128, max_seq_len=256)
TASK = ArithTask()
STEPS = 150


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def lm(tiny_tokenizer):
    """A tiny Llama trained 150 Adam steps on both regimes of arith items: enough for tags, stops and lengths
    that vary, far from correct arithmetic (which these tests do not need)."""
    return train_tiny(tiny_tokenizer, TINY, TASK, steps=STEPS), tiny_tokenizer


def _workload(n_items: int = 9):
    """Prompts over all levels (so prompt lengths differ), cycling forced off / forced on / unforced."""
    items = TASK.examples("test", n=n_items, seed=1)
    modes = ["off", "on", None] * n_items
    forced = [forced_prefix(judge_text(TASK.intent_features(it), m), m) if m else None
              for it, m in zip(items, modes, strict=False)]
    return [it.prompt for it in items], forced, modes[:n_items]


def _context(tok, prompt: str, forced: str | None) -> list[int]:
    ids = tok(prompt_text(prompt), add_special_tokens=False)["input_ids"]
    return ids + (tok(forced, add_special_tokens=False)["input_ids"] if forced else [])


@pytest.mark.parametrize("fast", [True, False], ids=["fast-step", "hf-forward"])
def test_greedy_equals_hf_generate(lm, fast):
    model, tok = lm
    prompts, forced, _ = _workload()
    # batches of 5 rows: prompt lengths differ within a batch, and a prompt's two samples may straddle two
    ours = generate(model, tok, prompts, forced=forced, n=2, temperature=0, max_new_tokens=20, batch_size=5, fast=fast)
    stops = [tok.eos_token_id, tok.convert_tokens_to_ids(ANSWER_CLOSE)]
    reasons = set()
    for i, (p, f) in enumerate(zip(prompts, forced, strict=True)):
        ctx = torch.tensor([_context(tok, p, f)])
        with torch.no_grad():  # one prompt at a time: no padding on HF's side
            out = model.generate(ctx, attention_mask=torch.ones_like(ctx), do_sample=False, max_new_tokens=20,
                                 eos_token_id=stops, pad_token_id=tok.pad_token_id)
        for s in ours[2 * i : 2 * i + 2]:
            assert s.token_ids == out[0, ctx.shape[1]:].tolist()
            reasons.add(s.finish_reason)
    assert "length" in reasons and len({s.num_generated for s in ours}) > 1  # rows left at different steps


@pytest.mark.parametrize("arch", ["gpt2", "mistral-sliding-window", "llama-gqa"])
def test_greedy_equals_hf_generate_on_other_architectures(tiny_tokenizer, arch, monkeypatch):
    """Any causal LM: GPT-2 (absolute positions) runs on the slab cache; a sliding-window model keeps its own
    DynamicCache; a grouped-query Llama (SmolLM2, Llama 3, Qwen) runs the fused decode step. Random weights are
    enough to compare token for token."""
    from transformers import (
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
    )

    from kat_core import rollout

    fused = []
    step = rollout._LlamaStep.__call__
    monkeypatch.setattr(rollout._LlamaStep, "__call__", lambda self, *a: fused.append(1) or step(self, *a))
    tok = tiny_tokenizer
    torch.manual_seed(0)
    if arch == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=2, n_positions=128))
    elif arch == "llama-gqa":
        model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=48, intermediate_size=96,
                                             num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2,
                                             max_position_embeddings=128, attn_implementation="sdpa"))
    else:
        model = MistralForCausalLM(MistralConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                                 sliding_window=8, max_position_embeddings=128))
    model.eval()
    prompts, forced, _ = _workload(5)
    ours = generate(model, tok, prompts, forced=forced, temperature=0, max_new_tokens=12)
    for p, f, s in zip(prompts, forced, ours, strict=True):
        ctx = torch.tensor([_context(tok, p, f)])
        with torch.no_grad():
            out = model.generate(ctx, attention_mask=torch.ones_like(ctx), do_sample=False, max_new_tokens=12,
                                 eos_token_id=[tok.eos_token_id, tok.convert_tokens_to_ids(ANSWER_CLOSE)],
                                 pad_token_id=tok.pad_token_id)
        assert s.token_ids == out[0, ctx.shape[1]:].tolist()
    assert bool(fused) == (arch == "llama-gqa")  # the other two decode through their own forward
    if arch == "llama-gqa":  # one row alone: no padding, so no mask (SDPA's enable_gqa path)
        (alone,) = generate(model, tok, prompts[:1], forced=forced[:1], temperature=0, max_new_tokens=12)
        assert alone.token_ids == ours[0].token_ids


def test_forced_modes_are_honoured(lm):
    model, tok = lm
    prompts, forced, modes = _workload()
    samples = generate(model, tok, prompts, forced=forced, n=2, max_new_tokens=64, seed=1)
    well_formed = 0
    for s in samples:
        mode, prefix = modes[s.prompt_index], forced[s.prompt_index]
        assert s.forced_mode == mode
        if prefix is None:
            assert s.forced_ids == []
            continue
        assert s.forced_ids == tok(prefix, add_special_tokens=False)["input_ids"]
        assert s.text.startswith(prefix)  # pre-filled, not sampled: no log-probs for it
        assert len(s.logprobs) == len(s.token_ids)
        parsed = parse(s.text)
        if parsed.well_formed:
            well_formed += 1
            assert parsed.mode == mode
        else:  # a forced prefix is itself well-formed: whatever went wrong came after the mode token
            assert parsed.mode == mode
    assert well_formed >= 2  # the check above is not vacuous: the trained model completes some


def test_stop_rules(lm):
    model, tok = lm
    answer_close = tok.convert_tokens_to_ids(ANSWER_CLOSE)
    prompts, forced, _ = _workload()
    samples = generate(model, tok, prompts, forced=forced, n=3, max_new_tokens=24, seed=2)
    assert {s.finish_reason for s in samples} >= {"stop", "length"}
    for s in samples:
        assert 1 <= len(s.token_ids) <= 24
        assert answer_close not in s.token_ids[:-1] and tok.eos_token_id not in s.token_ids[:-1]
        if s.finish_reason == "stop":  # nothing after </answer>
            assert s.token_ids[-1] == answer_close
            assert s.text.endswith(ANSWER_CLOSE) and s.text.count(ANSWER_CLOSE) == 1
        elif s.finish_reason == "eos":  # generated (it has a log-prob) but not part of the text
            assert s.token_ids[-1] == tok.eos_token_id and len(s.logprobs) == len(s.token_ids)
            assert s.text == tok.decode(s.forced_ids + s.token_ids[:-1], skip_special_tokens=False)
            continue
        else:
            assert s.finish_reason == "length" and len(s.token_ids) == 24
            assert s.token_ids[-1] not in (answer_close, tok.eos_token_id)
        assert s.text == tok.decode(s.forced_ids + s.token_ids, skip_special_tokens=False)

    # without stop_at_answer only EOS and the budget end a row
    free = generate(model, tok, prompts, forced=forced, n=3, max_new_tokens=24, seed=2, stop_at_answer=False)
    assert "stop" not in {s.finish_reason for s in free}
    assert any(answer_close in s.token_ids[:-1] for s in free)  # it went on past </answer>


def test_eos_ends_a_row_and_stays_out_of_the_text(lm):
    """Any id in the model's generation_config.eos_token_id stops a row too (here: the newline, frequent in
    traces, so rows stop early)."""
    model, tok = lm
    newline = tok("\n", add_special_tokens=False)["input_ids"]
    assert len(newline) == 1
    before = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = [tok.eos_token_id, newline[0]]
    try:
        prompts, forced, _ = _workload()
        samples = generate(model, tok, prompts, forced=forced, n=2, max_new_tokens=40, seed=0)
    finally:
        model.generation_config.eos_token_id = before
    at_newline = [s for s in samples if s.token_ids[-1] == newline[0]]
    assert at_newline
    for s in at_newline:
        assert s.finish_reason == "eos" and newline[0] not in s.token_ids[:-1]
        assert s.text == tok.decode(s.forced_ids + s.token_ids[:-1], skip_special_tokens=False)


@pytest.mark.parametrize("fast", [True, False], ids=["fast-step", "hf-forward"])
def test_logprobs_match_a_teacher_forced_pass(lm, fast):
    """Drawn at temperature 0.7 with top-p 0.9, the returned log-probs are still the raw model's (T = 1)."""
    model, tok = lm
    prompts, forced, _ = _workload()
    samples = generate(model, tok, prompts, forced=forced, n=2, max_new_tokens=32, temperature=0.7, top_p=0.9,
                       seed=3, batch_size=5, fast=fast)
    for s in samples:
        ctx = _context(tok, prompts[s.prompt_index], forced[s.prompt_index])
        full = torch.tensor([ctx + s.token_ids])
        with torch.no_grad():
            logp = torch.log_softmax(model(full).logits[0].float(), dim=-1)
        # the token at position t is predicted from position t-1
        expected = logp[len(ctx) - 1 : full.shape[1] - 1].gather(1, torch.tensor(s.token_ids)[:, None])[:, 0]
        assert torch.allclose(torch.tensor(s.logprobs), expected, atol=1e-4), (s.prompt_index, s.sample_index)


def test_same_seed_same_samples(lm):
    model, tok = lm
    prompts, forced, _ = _workload(6)

    def run(seed):
        return [(s.token_ids, s.logprobs) for s in generate(model, tok, prompts, forced=forced, n=2,
                                                             max_new_tokens=24, seed=seed)]

    first = run(5)
    assert run(5) == first
    assert run(6) != first


def test_segment_counts_follow_format(lm):
    model, tok = lm
    prompts, forced, _ = _workload()
    samples = generate(model, tok, prompts, forced=forced, n=2, max_new_tokens=48, seed=4)
    for s in samples:
        assert s.segment_counts == count_tokens(s.forced_ids + s.token_ids, tok)
        assert s.segment_counts["total"] == len(s.forced_ids) + len(s.token_ids)
        if s.forced_ids:  # the forced prefix is all judge segment (tags and mode token included)
            assert s.segment_counts["judge"] >= len(s.forced_ids)
        if s.finish_reason == "stop":  # the closing </answer> counts in the answer segment
            assert s.segment_counts["answer"] >= 1


def test_finished_rows_leave_the_batch(lm):
    """Each decode forward runs only the live rows: a row that generated L tokens was fed L-1 of them. The
    prefill runs each prompt once, however many samples it has."""
    model, tok = lm
    prompts, forced, _ = _workload()
    sizes = []
    hook = model.model.register_forward_pre_hook(lambda _m, _a, kw: sizes.append(kw["input_ids"].shape),
                                                 with_kwargs=True)
    try:
        samples = generate(model, tok, prompts, forced=forced, n=3, max_new_tokens=40, seed=0, fast=False)
    finally:
        hook.remove()
    prefill, steps = sizes[0], [rows for rows, width in sizes[1:]]
    assert prefill[0] == len(prompts) and all(width == 1 for _, width in sizes[1:])
    assert steps == sorted(steps, reverse=True) and steps[-1] < steps[0]
    assert sum(steps) == sum(len(s.token_ids) - 1 for s in samples)


def test_order_arguments_and_train_mode(lm):
    model, tok = lm
    samples = generate(model, tok, ["Compute 2+3.", "Compute 47*6+38."], n=3, max_new_tokens=8, batch_size=4)
    assert [(s.prompt_index, s.sample_index) for s in samples] == [(p, k) for p in range(2) for k in range(3)]
    assert all(s.forced_mode is None and s.forced_ids == [] for s in samples)
    with pytest.raises(ValueError, match="forced"):
        generate(model, tok, ["a", "b"], forced=[None])
    with pytest.raises(ValueError, match="top_p"):
        generate(model, tok, ["a"], top_p=0.0)
    model.train()
    try:
        generate(model, tok, ["Compute 2+3."], max_new_tokens=2)
        assert model.training  # sampled in eval mode, handed back as it came
    finally:
        model.eval()


def test_draws_follow_temperature_and_top_p():
    from kat_core.rollout import _pick

    p = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = p.log().expand(40_000, 4)
    g = torch.Generator().manual_seed(0)

    def freq(temperature, top_p):
        return torch.bincount(_pick(logits, temperature, top_p, g), minlength=4).float() / len(logits)

    assert torch.allclose(freq(1.0, 1.0), p, atol=0.01)
    assert torch.allclose(freq(2.0, 1.0), p.sqrt() / p.sqrt().sum(), atol=0.01)  # T = 2 flattens
    # top-p 0.75: 0.5 alone falls short, 0.5 + 0.3 reaches it, so the nucleus is the first two tokens
    assert torch.allclose(freq(1.0, 0.75), torch.tensor([0.625, 0.375, 0.0, 0.0]), atol=0.01)
    assert freq(1.0, 0.75)[2:].sum() == 0
    assert torch.equal(_pick(logits[:3], 0.0, 1.0, g), torch.zeros(3, dtype=torch.long))  # greedy


@pytest.mark.parametrize("every", [1, 7, 0], ids=["joining-each-step", "window-moves", "joining-an-empty-batch"])
def test_rows_that_join_a_running_batch_decode_as_they_would_alone(lm, every, monkeypatch):
    """Continuous batching: rows admitted between decode steps (one per `every` steps, often longer than every
    row still running, while others finish) produce the same greedy tokens as a batch of their own, and each
    is reported the moment it ends. With a row joining every 7th step the live window nears the slab's end and
    moves back left. `every` 0: a row joins only when every other row has just finished (a server's next
    request arriving as the last answer leaves)."""
    from kat_core.rollout import _SlabLayer

    moves = []
    move_window = _SlabLayer.move_window
    monkeypatch.setattr(_SlabLayer, "move_window", lambda layer, to: moves.append(to) or move_window(layer, to))
    model, tok = lm
    prompts, forced, _ = _workload(30)
    longest = max(range(30), key=lambda i: len(_context(tok, prompts[i], forced[i])))
    order = [longest] + [i for i in range(30) if i != longest]  # the first rows' span fits every prompt
    prompts, forced = [prompts[i] for i in order], [forced[i] for i in order]
    alone = generate(model, tok, prompts, forced=forced, temperature=0, max_new_tokens=60, stop_at_answer=False)
    waiting, reported, steps = list(range(3, 30)), {}, [0]

    def admit(free, span):
        steps[0] += 1
        if (steps[0] % every if every else free < 6) or not waiting or not free:
            return []
        i = waiting[0]
        if len(_context(tok, prompts[i], forced[i])) + 60 > span:  # what a server checks before it admits
            pytest.fail(f"the workload's prompt {i} should fit the first rows' span {span}")
        return [(waiting.pop(0), prompts[i], forced[i])]

    first = generate(model, tok, prompts[:3], forced=forced[:3], temperature=0, max_new_tokens=60,
                     stop_at_answer=False, admit=admit, max_rows=6,
                     on_sample=lambda i, s: reported.setdefault(i, s))
    assert not waiting and sorted(reported) == list(range(30))
    for i in range(30):
        got = first[i] if i < 3 else reported[i]
        assert (got.token_ids, got.finish_reason, got.text) == (alone[i].token_ids, alone[i].finish_reason,
                                                                 alone[i].text), i
    assert bool(moves) == (every != 1)  # a long enough run moves the window; 27 rows joining at once do not
