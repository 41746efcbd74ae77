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
