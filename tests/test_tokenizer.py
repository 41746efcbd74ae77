import pytest

from kat_core.errors import KatError
from kat_core.format import SPECIAL_TOKENS, render
from kat_core.tokenizer import check_grammar_tokens, extend_tokenizer, load_tokenizer, save_tokenizer


def test_tags_are_single_tokens_and_digits_split(tiny_tokenizer):
    for tag in SPECIAL_TOKENS:
        assert len(tiny_tokenizer(tag, add_special_tokens=False)["input_ids"]) == 1
    ids = tiny_tokenizer("Compute 12345.", add_special_tokens=False)["input_ids"]
    tokens = tiny_tokenizer.convert_ids_to_tokens(ids)
    for d in "12345":
        assert d in tokens


def test_save_load_roundtrip(tiny_tokenizer, tmp_path):
    from transformers import PreTrainedTokenizerFast

    text = render("easy", "on", "85", think="7+8=15 w5 c1")
    save_tokenizer(tiny_tokenizer, tmp_path / "tok")
    loaded = load_tokenizer(tmp_path / "tok")
    assert isinstance(loaded, PreTrainedTokenizerFast)
    ids = loaded(text, add_special_tokens=False)["input_ids"]
    assert ids == tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert loaded.decode(ids) == text
    assert loaded.eos_token and loaded.pad_token


def test_extend_a_tokenizer_without_the_tags(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE(unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    raw.train_from_iterator(["a plain base tokenizer with no tags"] * 10, trainers.BpeTrainer(special_tokens=["[UNK]"]))
    base = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]")
    with pytest.raises(KatError):
        check_grammar_tokens(base)
    before = len(base)
    added = extend_tokenizer(base)
    assert added >= len(SPECIAL_TOKENS) and len(base) >= before + len(SPECIAL_TOKENS)
    check_grammar_tokens(base)
    save_tokenizer(base, tmp_path / "ext")
    load_tokenizer(tmp_path / "ext")  # raises if the tags were lost on save


def test_load_rejects_a_dir_without_tokenizer(tmp_path):
    with pytest.raises(KatError, match="no tokenizer"):
        load_tokenizer(tmp_path)


CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_requests_are_laid_out_through_the_chat_template_when_there_is_one(tiny_tokenizer):
    import copy

    from kat_core.chat import request_text
    from kat_core.format import prompt_text
    from kat_core.train.data import encode_example

    # a tokenizer trained here has no template: the request and a newline, as the models were trained
    assert request_text(tiny_tokenizer, " Compute 2+3. ") == prompt_text("Compute 2+3.") == "Compute 2+3.\n"
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Compute 1+1."},
                    {"role": "assistant", "content": "2"}, {"role": "user", "content": "Compute 2+3."}]
    assert request_text(tiny_tokenizer, conversation) == "Compute 2+3.\n"  # it only ever saw single requests

    chat = copy.deepcopy(tiny_tokenizer)
    chat.chat_template = CHATML
    text = request_text(chat, conversation)
    assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nCompute 1+1.<|im_end|>\n"
                    "<|im_start|>assistant\n2<|im_end|>\n<|im_start|>user\nCompute 2+3.<|im_end|>\n"
                    "<|im_start|>assistant\n")
    assert request_text(chat, "Compute 2+3.") == "<|im_start|>user\nCompute 2+3.<|im_end|>\n<|im_start|>assistant\n"
    # training examples use the same layout: the template's tokens are the unweighted prompt
    example = encode_example({"prompt": "Compute 2+3.", "completion": render("easy", "off", "5")}, chat)
    prompt_ids = chat(request_text(chat, "Compute 2+3."), add_special_tokens=False)["input_ids"]
    assert example.ids[: len(prompt_ids)] == prompt_ids and example.weights[: len(prompt_ids)] == [0.0] * len(
        prompt_ids)


def test_a_tokenizer_that_adds_a_bos_gets_it_in_the_layout(tiny_tokenizer):
    import copy

    from tokenizers.processors import TemplateProcessing

    from kat_core.chat import bos_text, request_text

    assert bos_text(tiny_tokenizer) == ""  # ours adds none
    llama_like = copy.deepcopy(tiny_tokenizer)
    bos = llama_like.bos_token
    llama_like.backend_tokenizer.post_processor = TemplateProcessing(
        single=f"{bos} $A", special_tokens=[(bos, llama_like.bos_token_id)])
    assert llama_like("a")["input_ids"][0] == llama_like.bos_token_id
    assert request_text(llama_like, "Compute 2+3.") == f"{bos}Compute 2+3.\n"
    ids = llama_like(request_text(llama_like, "Compute 2+3."), add_special_tokens=False)["input_ids"]
    assert ids[0] == llama_like.bos_token_id and ids.count(llama_like.bos_token_id) == 1


def test_the_decision_weight_lands_on_the_verdict_word_and_the_mode_token(tiny_tokenizer):
    """The choice is made at the judge's verdict word ("think" / "direct"); `</judge>` and the mode token only
    follow from it. Both get `mode_token_weight`, nothing else of the completion does."""
    from kat_core.format import render
    from kat_core.train.data import decision_span, encode_example

    for mode, answer, verdict in (("on", "57", "think"), ("off", "57", "direct")):
        completion = render(f"product, 4 steps, carries: {verdict}", mode, answer,
                            think="9*3=27 w7 c2" if mode == "on" else None)
        example = encode_example({"prompt": "Compute 19*3.", "completion": completion}, tiny_tokenizer, 3.0)
        heavy = [tiny_tokenizer.decode([t]) for t, w in zip(example.ids, example.weights, strict=True) if w == 3.0]
        assert "".join(heavy).replace(" ", "") == f"{verdict}</judge><think_{mode}>", heavy
        lo, hi = decision_span(completion)
        assert completion[lo:hi] == f"{verdict}</judge><think_{mode}>"
    # a record without a judge (e.g. a plain answer) keeps the weight on its mode token alone, if it has one
    assert decision_span("<think_off><answer>5</answer>") is None
    plain = encode_example({"prompt": "Compute 2+3.", "completion": "<think_off><answer>5</answer>"}, tiny_tokenizer,
                           3.0)
    assert [tiny_tokenizer.decode([t]) for t, w in zip(plain.ids, plain.weights, strict=True) if w == 3.0] == [
        "<think_off>"]
