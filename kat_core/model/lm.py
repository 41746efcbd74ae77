"""Causal LMs: a fresh small Llama-style model from a profile's sizes, or any HF `AutoModelForCausalLM`.

Either way the model comes back with a tokenizer that carries the grammar tags as single tokens, and
embeddings at least as large as the tokenizer.
"""

from __future__ import annotations

import re
from pathlib import Path

from kat_core.config import ModelConfig
from kat_core.errors import KatError, first_line
from kat_core.tokenizer import check_grammar_tokens, extend_tokenizer

# "org/name" or "name": what a hub id looks like (a cluster option; the embedded default is offline).
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def build_model(cfg: ModelConfig, tokenizer, seed: int = 0):
    """A fresh Llama-style `LlamaForCausalLM` sized by `cfg`, vocab = len(tokenizer), tied embeddings.

    A tokenizer without the grammar tags gets them first. The init is seeded without disturbing the
    caller's global RNG, so the same config and seed give the same weights."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if cfg.hidden_size % cfg.num_heads:
        raise KatError(f"model.hidden_size {cfg.hidden_size} is not divisible by model.num_heads {cfg.num_heads}")
    _ensure_tags(tokenizer)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        max_position_embeddings=cfg.max_seq_len,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=True,  # a tiny model spends most of its parameters on the vocab otherwise
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model


def load_model(path_or_id: str | Path, tokenizer=None, dtype=None):
    """Load any causal LM (a local HF dir; a hub id on a cluster) -> (model, tokenizer).

    Weights come back in fp32 whatever the checkpoint's dtype (transformers' own default, "auto", would keep
    a bf16 checkpoint in bf16, and training would then update bf16 weights directly: small steps round away).
    Training takes bf16 only through autocast over these fp32 weights; pass `dtype` to choose otherwise.
    The tokenizer comes from the same place unless given. When it lacks the grammar tags they are added
    and the embeddings grown to fit (never shrunk: many models pad their vocab past the tokenizer)."""
    import pickle

    import torch
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    source = _resolve(path_or_id)
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype or torch.float32)
    # a foreign dir, bad weights, or pickled weights that torch.load refuses to run (weights_only)
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError, pickle.UnpicklingError) as e:
        first = first_line(e)
        if not Path(source).is_dir():
            raise KatError(f"model not found: {path_or_id} (no such local dir; hub: {first})") from e
        raise KatError(f"cannot load model from {path_or_id}: {first}") from e
    if tokenizer is None:
        from kat_core.tokenizer import read_tokenizer

        tokenizer = read_tokenizer(source, path_or_id)
    prepare_tokenizer(model, tokenizer)
    return model, tokenizer


def prepare_tokenizer(model, tokenizer) -> int:
    """Give `tokenizer` the grammar tags (and a pad token) and `model` rows for every token; returns how
    many tokens were added. New tag rows start from their spelling (`init_tag_rows`), whether the embeddings
    grew for them or they took rows a padded vocabulary had left unused (Qwen, Llama 3: rows past the
    tokenizer's length that no token ever trained)."""
    before = len(tokenizer)
    added = _ensure_tags(tokenizer)
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))
    if added:
        init_tag_rows(model, tokenizer, first_new=before)
    if model.config.pad_token_id is None and tokenizer.pad_token_id is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
        if model.generation_config is not None:
            model.generation_config.pad_token_id = tokenizer.pad_token_id
    return added


def init_tag_rows(model, tokenizer, first_new: int) -> list[str]:
    """Start each new grammar tag's embedding row (input, and output when untied) at the mean of the rows of
    the sub-tokens its spelling splits into ("<think_on>" -> "<", "think", "_", "on", ">"); returns the tags
    so set. HF's resize gives every new row the same vector (mean of the old rows plus ~1e-9 noise): eight tags
    the model cannot tell apart, `<think_on>` and `<think_off>` included, which a few steps do not separate.
    The spelling makes them distinct and puts each near what it means. Only rows at or past `first_new`
    (the tokenizer's length before the tags: rows no old token uses) change, and only from rows below it; a
    spelling without old sub-tokens keeps its row."""
    import torch

    from kat_core.format import SPECIAL_TOKENS

    tables = [model.get_input_embeddings().weight]
    out = model.get_output_embeddings()
    if out is not None and out.weight is not tables[0]:
        tables.append(out.weight)
    done = []
    for tag in SPECIAL_TOKENS:
        row = tokenizer.convert_tokens_to_ids(tag)
        pieces = [i for i in tokenizer(tag, add_special_tokens=False, split_special_tokens=True)["input_ids"]
                  if i < first_new]
        if row < first_new or not pieces:
            continue
        with torch.no_grad():
            for table in tables:
                table[row] = table[pieces].mean(dim=0)
        done.append(tag)
    return done


def _ensure_tags(tokenizer) -> int:
    try:
        check_grammar_tokens(tokenizer)
        return 0
    except KatError:
        return extend_tokenizer(tokenizer)


def _resolve(path_or_id: str | Path) -> str:
    """A local model dir as a string, or a hub id; anything else is a readable KatError."""
    path = Path(path_or_id)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise KatError(f"not a model dir: {path} (no config.json)")
        return str(path)
    text = str(path_or_id)
    if path.exists():
        raise KatError(f"model not found: {text} (not a directory)")
    looks_local = path.is_absolute() or text.startswith(".") or (path.parent != Path(".") and path.parent.is_dir())
    if isinstance(path_or_id, str) and _HUB_ID.match(text) and not looks_local:
        return text  # a hub id: from_pretrained fetches it (or fails with a readable error)
    raise KatError(f"model not found: {text}")
