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
