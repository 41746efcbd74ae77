"""The verdict guard (kat_core.verdict): inside an open judge the token after a colon is one of the grammar's two
verdict words, in plain and speculative decoding alike, greedy and sampled; nothing else is constrained."""

import pytest

torch = pytest.importorskip("torch")

from kat_core.format import JUDGE_CLOSE, JUDGE_OPEN  # noqa: E402
from kat_core.model import build_model  # noqa: E402
from kat_core.model.mtp import build_mtp  # noqa: E402
from kat_core.rollout import generate  # noqa: E402
from kat_core.verdict import VerdictGuard  # noqa: E402
from tests.test_rollout import TASK, TINY  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def untrained(judge_tokenizer):
    """An untrained Llama and MTP module: after a colon they put their mass anywhere, rarely on a verdict word."""
    model = build_model(TINY.model_copy(update={"mtp_depth": 1}), judge_tokenizer, seed=0).eval()
    return model, judge_tokenizer, build_mtp(model, 1, seed=0).eval()


def test_the_guard_reads_the_verdict_words_from_the_tokenizer(judge_tokenizer, tiny_tokenizer):
    guard = VerdictGuard.of(judge_tokenizer)
    assert judge_tokenizer.decode([guard.colon]) == ":"
    assert [judge_tokenizer.decode([t]) for t in guard.verdicts] == [" think", " direct"]
    assert judge_tokenizer.convert_ids_to_tokens([guard.judge_open, guard.judge_close]) == [JUDGE_OPEN, JUDGE_CLOSE]
    # a tokenizer that never saw a judge spells the words in pieces: no guard (it would need a trie of them)
    assert len(tiny_tokenizer(" direct", add_special_tokens=False)["input_ids"]) > 1
    assert VerdictGuard.of(tiny_tokenizer) is None


def test_a_tokenizer_without_the_grammar_gets_no_guard():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    inner = Tokenizer(models.WordLevel({"[UNK]": 0, "sum": 1, ":": 2, "think": 3}, unk_token="[UNK]"))
    inner.pre_tokenizer = pre_tokenizers.Whitespace()
    assert VerdictGuard.of(PreTrainedTokenizerFast(tokenizer_object=inner, unk_token="[UNK]")) is None


def test_the_mask_leaves_every_other_position_alone(judge_tokenizer):
    guard = VerdictGuard.of(judge_tokenizer)
    logits = torch.randn(4, len(judge_tokenizer))
    last = torch.tensor([guard.colon, guard.colon, 5, guard.colon])
    opened = torch.tensor([True, False, True, True])
    out = guard.mask(logits, last, opened)
    for row in (1, 2):  # a colon outside a judge, a judge without a colon: untouched
        assert torch.equal(out[row], logits[row])
    for row in (0, 3):
        assert set(torch.isfinite(out[row]).nonzero().flatten().tolist()) == set(guard.verdicts)
        assert torch.equal(out[row, list(guard.verdicts)], logits[row, list(guard.verdicts)])
    # the judge's state follows its tags token by token
    assert guard.advance(torch.tensor([False, True, True]), torch.tensor([guard.judge_open, 7,
                                                                          guard.judge_close])).tolist() == [
        True, True, False]


def _after_colons(guard, tokens: list[int]) -> list[int]:
    """The tokens that followed a colon while the judge was open (`tokens` from the opening tag on)."""
    out, opened = [], False
    for prev, nxt in zip(tokens, tokens[1:], strict=False):
        if prev == guard.colon and opened:
            out.append(nxt)
        opened = guard.advance_one(opened, [prev])
    return out


@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize("drafting", [False, True])
def test_every_colon_of_an_open_judge_is_followed_by_a_verdict(untrained, temperature, drafting):
    model, tok, heads = untrained
    guard = VerdictGuard.of(tok)
    items = TASK.examples("test", n=40, seed=5)
    prompts = [it.prompt for it in items]
    # a judge opened and its description written up to the colon: the next token is the decision
    at_colon = [f"{JUDGE_OPEN}sum, 2 steps:"] * len(prompts)
    kw = dict(temperature=temperature, max_new_tokens=24, seed=3, **({"draft": heads, "draft_tokens": 2}
                                                                     if drafting else {}))
    unguarded = generate(model, tok, prompts, forced=at_colon, verdict_guard=False, **kw)
    assert sum(s.token_ids[0] not in guard.verdicts for s in unguarded) > len(prompts) // 2  # what it guards
    guarded = generate(model, tok, prompts, forced=at_colon, **kw)
    assert all(s.token_ids[0] in guard.verdicts for s in guarded)
    if temperature:  # a judge the model writes itself (opened by the prefix), however many colons it writes
        free = generate(model, tok, prompts * 3, forced=[JUDGE_OPEN] * len(prompts) * 3,
                        **{**kw, "max_new_tokens": 64})
        inside = [t for s in free for t in _after_colons(guard, [guard.judge_open, *s.token_ids])]
        assert len(inside) >= 5 and set(inside) <= set(guard.verdicts)
    elif drafting:  # speculative greedy output is still plain greedy output, guarded tokens included
        plain = generate(model, tok, prompts, forced=at_colon, **{**kw, "draft": None})
        assert [s.token_ids for s in guarded] == [s.token_ids for s in plain]


def test_rows_that_join_a_running_batch_are_guarded_too(untrained):
    """Continuous batching (a server's requests joining between decode steps): a joining row's judge state is
    read from its own context."""
    model, tok, _ = untrained
    guard = VerdictGuard.of(tok)
    prompts = [it.prompt for it in TASK.examples("test", n=12, seed=6)]
    at_colon = f"{JUDGE_OPEN}sum, 2 steps:"
    waiting, reported = list(range(3, 12)), {}

    def admit(free, span):  # one request joins at each step while there is room
        return [(waiting.pop(0), prompts[i], at_colon) for i in waiting[:1]] if free else []

    first = generate(model, tok, prompts[:3], forced=[at_colon] * 3, temperature=0, max_new_tokens=12,
                     admit=admit, max_rows=4, on_sample=lambda i, s: reported.setdefault(i, s))
    samples = first + [reported[i] for i in range(3, 12)]
    assert not waiting and all(s.token_ids[0] in guard.verdicts for s in samples)


def test_the_verdict_index_is_the_token_after_the_judges_colon(judge_tokenizer):
    guard = VerdictGuard.of(judge_tokenizer)
    ids = judge_tokenizer("<judge>sum, 2 steps: think</judge><think_on><think>a: b</think>",
                          add_special_tokens=False)["input_ids"]
    assert ids[guard.verdict_index(ids)] == guard.verdicts[0]
    after = ids.index(guard.judge_close) + 1
    assert guard.verdict_index(ids[after:]) is None  # a colon after the judge decides nothing
    assert guard.verdict_index(ids[1:]) is None  # nor one before any judge opened
    assert guard.verdict_index(ids[1:], opened=True) == guard.verdict_index(ids) - 1  # a context that opened it
