"""Tokenizers that know the response grammar.

`train_tokenizer` builds a byte-level BPE from a corpus with two properties the AutoThink recipe needs:
digits are split one per token (so arithmetic traces tokenise the same way everywhere) and the eight
grammar tags are single special tokens. `extend_tokenizer` adds the tags to an existing HF tokenizer
(cluster base models); the model's embeddings must then be resized.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from kat_core.errors import KatError, first_line
from kat_core.format import SPECIAL_TOKENS

EOS, PAD = "<|endoftext|>", "<|pad|>"


def train_tokenizer(corpus: Iterable[str], vocab_size: int = 512, min_frequency: int = 2):
    """Train a byte-level BPE on `corpus`; returns a `PreTrainedTokenizerFast`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOS, PAD, *SPECIAL_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # any byte stays encodable
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, pad_token=PAD)
    fast.add_special_tokens({"additional_special_tokens": list(SPECIAL_TOKENS)})
    return fast


def extend_tokenizer(tokenizer) -> int:
    """Add the grammar tags as special tokens (and a pad token if missing). Returns how many were new;
    resize the model's embeddings to `len(tokenizer)` afterwards."""
    vocab = tokenizer.get_vocab()
    new = [t for t in SPECIAL_TOKENS if t not in vocab]
    extra = list(dict.fromkeys([*getattr(tokenizer, "additional_special_tokens", []), *SPECIAL_TOKENS]))
    added = tokenizer.add_special_tokens({"additional_special_tokens": extra})
    if tokenizer.pad_token is None:
        added += tokenizer.add_special_tokens({"pad_token": PAD})
    check_grammar_tokens(tokenizer)
    return max(added, len(new))


def check_grammar_tokens(tokenizer) -> None:
    """Every tag must encode to exactly one token; a KatError names the first that does not."""
    for tag in SPECIAL_TOKENS:
        ids = tokenizer(tag, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise KatError(f"tokenizer splits the grammar tag {tag} into {len(ids)} tokens")


def save_tokenizer(tokenizer, out_dir: str | Path) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(out)
    return out


def read_tokenizer(source: str | Path, named: str | Path | None = None):
    """AutoTokenizer for `source`; a malformed tokenizer.json is one KatError. transformers and the Rust
    `tokenizers` raise what the file's shape leads them to (TypeError for `[1]`, KeyError for `{}`, a bare
    Exception for a wrong model section), so every failure of this parse is the file's."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(source))
    except Exception as e:  # noqa: BLE001
        raise KatError(f"cannot load the tokenizer of {named or source}: {first_line(e)}") from e


def load_tokenizer(path: str | Path):
    """Load a tokenizer directory (ours or any HF one) and check it carries the grammar tags."""
    path = Path(path)
    if not (path / "tokenizer.json").is_file() and not (path / "tokenizer_config.json").is_file():
        raise KatError(f"no tokenizer in {path} (expected tokenizer.json)")
    tokenizer = read_tokenizer(path)
    check_grammar_tokens(tokenizer)
    return tokenizer
