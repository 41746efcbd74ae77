"""Self-replay (kat_core.data.replay): the everyday requests a pretrained base answers before fine-tuning."""

from kat_core.data.overlap import EvalIndex, load_eval_prompts, normalize_prompt
from kat_core.data.replay import PROMPTS, whole_sentences
from kat_core.tasks.retention import QUESTIONS


def test_replay_prompts_share_no_question_with_the_retention_suite():
    """Retention must measure what was kept, so no replayed request is a retention question, exactly, by a
    shared 4-word run, or as a near-duplicate (the validate stage's overlap checks)."""
    assert len({normalize_prompt(p) for p in PROMPTS}) == len(PROMPTS) >= 100
    index = EvalIndex.build(load_eval_prompts(["retention"], None), n=4, near_threshold=0.5)
    copies = {p: index.exact_match(p) or index.ngram_match(p) or index.near_match(p) for p in PROMPTS}
    assert not {p: ref for p, ref in copies.items() if ref}
    # and the check sees a retention question when one is there
    assert index.exact_match(QUESTIONS[0][0]) and index.ngram_match("Tell me: what is the capital of Peru?")


def test_a_cut_answer_keeps_its_whole_sentences():
    assert whole_sentences("Paris is the capital. It lies on the Sei") == "Paris is the capital."
    assert whole_sentences("Yes! Bees make honey? They do. and") == "Yes! Bees make honey? They do."
    assert whole_sentences("It is 3.5 metres long. The") == "It is 3.5 metres long."  # a decimal point is no end
    assert whole_sentences("no sentence ends here") == ""


def test_a_cut_answer_teaches_its_words_but_not_its_end(tiny_tokenizer):
    """The base had more to say where the budget cut it: its words are trained, the closing tag and EOS that
    the cut put there are not (else the model learns to stop early)."""
    import pytest

    from kat_core.format import render
    from kat_core.train.data import encode_example

    record = {"id": "replay-1", "prompt": "Tell me about bees.",
              "completion": render("chat: direct", "off", "Bees make honey.")}
    whole = encode_example(record, tiny_tokenizer)
    cut = encode_example({**record, "cut": True}, tiny_tokenizer)
    assert cut.ids == whole.ids and whole.weights[-2:] == [1.0, 1.0]
    assert cut.weights[-2:] == [0.0, 0.0] and cut.weights[:-2] == whole.weights[:-2]
    with pytest.raises(ValueError, match="marked cut"):
        encode_example({**record, "completion": "Bees", "cut": True}, tiny_tokenizer)


def test_the_base_distribution_lines_up_with_the_answer_tokens_of_each_packed_copy(tiny_tokenizer):
    """pretrain.replay_kl: the base's top-k at answer token j sits at the position that predicts that token in
    every packed row holding the record, weighted 1 there and nowhere else (not the grammar, not arithmetic)."""
    import torch

    from kat_core.format import render
    from kat_core.train.pretrain import packed_rows

    answer_text = "Bees make honey."
    replay = {"id": "replay-7", "family": "chat", "prompt": "What do bees make?",
              "completion": render("chat: direct", "off", answer_text)}
    arith = {"id": "a1", "family": "arith", "prompt": "Compute 2+3.", "completion": render("sum", "off", "5")}
    answer = tiny_tokenizer(answer_text, add_special_tokens=False)["input_ids"]
    n, k = len(answer), 3
    values = torch.arange(n * k, dtype=torch.float32).view(n, k) + 1
    anchors = {"replay-7": {"values": values, "indices": torch.zeros(n, k, dtype=torch.int32),
                            "lse": torch.full((n,), 9.0), "answer": answer}}
    rows = packed_rows([arith, replay, arith, replay], tiny_tokenizer, 128, 1.0, seed=0, anchors=anchors)
    ids, w = rows["input_ids"], rows["anchor_weights"]
    assert int(w.sum()) == 2 * n  # both copies, answer tokens only
    starts = [(b, t) for b, t in (w > 0).nonzero().tolist() if w[b, t - 1] == 0]
    assert len(starts) == 2
    for b, t in starts:
        for i in range(n):  # token t+i is answer token i, predicted from position t+i-1
            assert int(ids[b, t + i]) == answer[i] and torch.equal(rows["anchor_values"][b, t + i - 1], values[i])
            assert rows["anchor_lse"][b, t + i - 1] == 9.0
    assert rows["anchor_lse"].count_nonzero() == 2 * n
