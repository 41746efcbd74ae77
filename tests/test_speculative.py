"""Self-speculative decoding (kat_core.speculative) on the rollout tests' tiny Llama, with an MTP module fitted to
it for a few seconds so that its drafts are often, not always, right: greedy output identical to plain greedy
decoding on 500+ prompts in both forced modes, sampled distributions unchanged (the acceptance rule exactly,
and the whole loop against plain sampling), and the draft statistics."""

import pytest

torch = pytest.importorskip("torch")

from scipy.stats import chi2_contingency, chisquare  # noqa: E402

from kat_core.data.judge import judge_text  # noqa: E402
from kat_core.format import forced_prefix, prompt_text, render  # noqa: E402
from kat_core.model.mtp import build_mtp, mtp_forward, mtp_loss  # noqa: E402
from kat_core.rollout import generate  # noqa: E402
from kat_core.speculative import _accept  # noqa: E402
from tests.test_rollout import STEPS, TASK, TINY  # noqa: E402
from tests.tiny_autothink import train_tiny  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def drafting_lm(tiny_tokenizer):
    """(model, tokenizer, MTP heads): the tiny Llama, and a depth-1 MTP module fitted 40 steps to its hidden
    states on rendered arith responses (the base frozen)."""
    tok = tiny_tokenizer
    model = train_tiny(tok, TINY, TASK, steps=STEPS)
    heads = build_mtp(model, 1, seed=0)
    rows = []
    for it in TASK.examples("train", n=40):
        for mode in ("off", "on"):
            think = "\n".join(it.steps) if mode == "on" else None
            text = render(judge_text(TASK.intent_features(it), mode), mode, TASK.answer_text(it), think=think)
            rows.append(tok(prompt_text(it.prompt) + text, add_special_tokens=False)["input_ids"])
    x = torch.full((len(rows), max(map(len, rows))), tok.pad_token_id)
    for r, ids in enumerate(rows):
        x[r, : len(ids)] = torch.tensor(ids)
    with torch.no_grad():
        hidden = model(input_ids=x, attention_mask=x != tok.pad_token_id, output_hidden_states=True).hidden_states[-1]
    opt = torch.optim.Adam(heads.parameters(), lr=1e-2)
    for _ in range(40):
        loss, _ = mtp_loss(mtp_forward(model, heads, x, hidden), x, ignore_id=tok.pad_token_id)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model, tok, heads.eval()


def _prompts(n: int):
    items = TASK.examples("test", n=n, seed=3)
    prompts = [it.prompt for it in items for _ in ("on", "off")]
    forced = [forced_prefix(judge_text(TASK.intent_features(it), m), m) for it in items for m in ("on", "off")]
    return prompts, forced


@pytest.mark.parametrize("draft_tokens", [1, 3])
def test_greedy_output_is_plain_greedy_on_500_prompts(drafting_lm, draft_tokens):
    model, tok, heads = drafting_lm
    prompts, forced = _prompts(260)  # 520 rows, both forced modes; batches of 64 with prompts of every level
    plain = generate(model, tok, prompts, forced=forced, temperature=0, max_new_tokens=48, batch_size=64)
    spec = generate(model, tok, prompts, forced=forced, temperature=0, max_new_tokens=48, batch_size=64,
                    draft=heads, draft_tokens=draft_tokens)
    differ = [i for i, (a, b) in enumerate(zip(plain, spec, strict=True)) if a.token_ids != b.token_ids]
    assert not differ, f"{len(differ)} of {len(plain)} rows differ, first {prompts[differ[0]]!r}"
    assert [s.finish_reason for s in spec] == [s.finish_reason for s in plain]
    for a, b in zip(plain, spec, strict=True):  # the main model's log-probabilities, as plain decoding has them
        assert b.logprobs == pytest.approx(a.logprobs, abs=1e-4)
        assert b.segment_counts == a.segment_counts
    # both paths ran: drafts that stood and drafts that did not, per segment of the grammar
    proposed = sum(c[0] for s in spec for c in s.draft_counts.values())
    accepted = sum(c[1] for s in spec for c in s.draft_counts.values())
    assert 0.2 * proposed < accepted < proposed
    assert {"think", "answer"} <= {k for s in spec for k in s.draft_counts}
    # a step drafts D tokens and emits those that stood plus one of its own (no draft for that one): with D = 1,
    # a token without a draft follows every accepted one (but the last, when the row stopped at a draft)
    for s in spec:
        counts = s.draft_counts.values()
        if draft_tokens == 1:
            assert sum(c[0] + c[1] for c in counts) - len(s.token_ids) in (-1, 0)


def test_acceptance_rule_emits_the_target_distribution():
    """Leviathan et al.'s rule, exactly: whatever the draft distribution q, the first emitted token is
    distributed as p at the first position, and the second (when the first draft stood) as p at the second."""
    gen = torch.Generator().manual_seed(0)
    V, D, N = 6, 2, 200_000
    p_logits = torch.randn(1, D + 1, V, generator=gen) * 1.5
    q = torch.softmax(torch.randn(1, D, V, generator=gen) * 1.5, -1)
    drafts = torch.stack([torch.multinomial(q[0, j], N, replacement=True, generator=gen) for j in range(D)], 1)
    a, nxt = _accept(p_logits.expand(N, -1, -1), drafts, q.expand(N, -1, -1), 1.0, 1.0, gen)
    p = torch.softmax(p_logits[0], -1)
    first = torch.where(a >= 1, drafts[:, 0], nxt)
    second = torch.where(a >= 2, drafts[:, 1], nxt)[a >= 1]
    for sample, target in ((first, p[0]), (second, p[1])):
        counts = torch.bincount(sample, minlength=V).double()
        expected = target.double() / target.double().sum() * counts.sum()
        assert chisquare(counts.numpy(), expected.numpy()).pvalue > 1e-3
    assert 0 < float((a == 0).float().mean()) < 1 and 0 < float((a == D).float().mean()) < 1


@pytest.mark.parametrize("top_p", [1.0, 0.9])
def test_sampled_sequences_match_plain_sampling(drafting_lm, top_p):
    """The whole loop: 3000 samples of one prompt's first three tokens, plain and speculative (D = 2), at the
    RL stage's temperature; a two-sample chi-square test over the sequences (rare ones pooled)."""
    model, tok, heads = drafting_lm
    prompt, forced = _prompts(1)
    kwargs = dict(forced=forced[:1], n=3000, temperature=1.0, top_p=top_p, max_new_tokens=3, batch_size=1000,
                  stop_at_answer=False)
    plain = generate(model, tok, prompt[:1], seed=1, **kwargs)
    spec = generate(model, tok, prompt[:1], seed=2, draft=heads, draft_tokens=2, **kwargs)
    seqs = sorted({tuple(s.token_ids) for s in plain + spec})
    table = torch.tensor([[sum(tuple(s.token_ids) == q for s in run) for q in seqs] for run in (plain, spec)])
    common = table.sum(0) >= 20
    pooled = torch.cat([table[:, common], table[:, ~common].sum(1, keepdim=True)], dim=1)
    assert pooled.shape[1] >= 5  # a distribution with some spread, not one sequence
    assert chi2_contingency(pooled.numpy()).pvalue > 1e-3
    assert sum(c[1] for s in spec for c in s.draft_counts.values()) > 0  # drafts stood


# --- where it is used: evaluation, `kat generate`, the server, the RL stage's rollouts ---------------------------


@pytest.fixture(scope="module")
def drafting_ckpt(drafting_lm, tmp_path_factory):
    """The tiny model and its fitted MTP module as a KAT checkpoint, and the same model without MTP weights."""
    from kat_core.model.checkpoint import save_checkpoint

    model, tok, heads = drafting_lm
    base = tmp_path_factory.mktemp("drafting")
    return save_checkpoint(base / "mtp", model, tok, heads), save_checkpoint(base / "plain", model, tok)


def test_evaluation_reports_acceptance_and_the_same_results(drafting_ckpt, tmp_path, caplog):
    import json

    from kat_core.eval.evaluate import evaluate

    ckpt, without_mtp = drafting_ckpt
    options = dict(limit=12, n_samples=1, max_new_tokens=48, progress=False)
    plain = evaluate(ckpt, ["arith"], out_dir=tmp_path / "plain", **options)
    spec = evaluate(ckpt, ["arith"], out_dir=tmp_path / "spec", draft_tokens=2, **options)
    assert spec["overall"]["on"] == plain["overall"]["on"] and spec["overall"]["off"] == plain["overall"]["off"]
    greedy = lambda d: [json.loads(x)["greedy"] for x in (d / "items.jsonl").read_text().splitlines()]  # noqa: E731
    assert greedy(tmp_path / "spec") == greedy(tmp_path / "plain")
    assert spec["settings"]["draft_tokens"] == 2 and "speculative" not in plain
    think = spec["speculative"]["arith"]["think"]
    assert 0 < think["accepted"] <= think["proposed"]
    assert think["rate"] == round(think["accepted"] / think["proposed"], 4)
    markdown = (tmp_path / "spec" / "report.md").read_text()
    assert "Speculative decoding (2 draft tokens a step), drafts accepted: " in markdown
    # a checkpoint without MTP weights decodes plainly, saying so once
    with caplog.at_level("WARNING", logger="kat_core.speculative"):
        fallback = evaluate(without_mtp, ["arith"], out_dir=tmp_path / "fallback", draft_tokens=2, **options)
    assert [r.message for r in caplog.records].count(
        f"speculative decoding: {without_mtp} has no MTP weights to draft with; decoding plainly") == 1
    assert fallback["settings"]["draft_tokens"] == 0 and fallback["overall"]["on"] == plain["overall"]["on"]


def test_kat_generate_drafts_and_says_how_many_stood(drafting_ckpt):
    import json

    from tests.helpers import kat_here

    ckpt, _ = drafting_ckpt
    args = ["generate", ckpt, "Compute 12+7.", "--mode", "on", "--max-new-tokens", "48", "--json"]
    plain, spec = kat_here(*args), kat_here(*args, "--draft-tokens", "2")
    assert plain.returncode == spec.returncode == 0, spec.stderr
    plain, spec = json.loads(plain.stdout), json.loads(spec.stdout)
    assert spec.pop("drafts") and spec == plain
    bad = kat_here(*args, "--draft-tokens", "9")
    assert bad.returncode == 2 and "--draft-tokens" in bad.stderr


def test_server_decodes_speculatively_with_the_same_answers(drafting_ckpt):
    import openai

    from kat_core.serve import ServerThread, load_for_serving
    from kat_core.serve.app import create_app
    from kat_core.speculative import load_drafter

    ckpt, _ = drafting_ckpt
    model, tokenizer = load_for_serving(ckpt)
    answers = {}
    for draft_tokens in (0, 2):
        app = create_app(model, tokenizer, model_name="tiny", max_wait_ms=20, default_max_tokens=48,
                         draft=load_drafter(ckpt, model, draft_tokens), draft_tokens=draft_tokens)
        with ServerThread(app) as s:
            client = openai.OpenAI(base_url=s.base_url, api_key="-", max_retries=0, timeout=60)
            answers[draft_tokens] = [
                client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": p}], temperature=0,
                                               max_tokens=48, extra_body={"thinking": "on"}).choices[0].message
                for p in ("Compute 12+7.", "Compute 31*4.")]
            drafts = app.state.engine.stats["drafts"]
        assert bool(drafts) == (draft_tokens > 0)
    assert [(m.content, m.reasoning_content) for m in answers[2]] == \
        [(m.content, m.reasoning_content) for m in answers[0]]


def test_rl_rollouts_report_acceptance_per_segment(drafting_lm):
    from kat_core.config import AutoThinkConfig, SrpoConfig
    from kat_core.train.srpo import ALGORITHMS, rollout

    model, tok, heads = drafting_lm
    pairs = [(TASK, it) for it in TASK.examples("train", n=4, seed=5)]
    cfg = SrpoConfig(group_size=4, max_new_tokens=32)
    _, _, _, stats = rollout(model, tok, pairs, ALGORITHMS["grpo"], cfg, AutoThinkConfig(), seed=0, draft=heads,
                             draft_tokens=2)
    assert {"draft_accept_judge", "draft_accept_think", "draft_accept_answer"} <= set(stats)
    assert 0 < stats["draft_accept_judge"] <= 1
