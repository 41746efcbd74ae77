"""Models, MTP modules and checkpoints, on a tiny Llama (hidden 32, 2 layers) and a tiny BPE."""

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from kat_core.config import ModelConfig  # noqa: E402
from kat_core.errors import KatError  # noqa: E402
from kat_core.format import SPECIAL_TOKENS, THINK_ON  # noqa: E402
from kat_core.manifest import verify_manifest  # noqa: E402
from kat_core.model import (  # noqa: E402
    LMWithMTP,
    build_model,
    build_mtp,
    checkpoint_meta,
    is_checkpoint,
    load_checkpoint,
    load_model,
    mtp_forward,
    mtp_loss,
    save_checkpoint,
)

TINY = ModelConfig(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64, max_seq_len=64, mtp_depth=2)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(tiny_tokenizer):
    model = build_model(TINY, tiny_tokenizer, seed=0)
    return model, build_mtp(model, depth=2, seed=0)


def _ids(tokenizer, batch=2, length=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, len(tokenizer), (batch, length), generator=g)


def test_build_model_shapes_ties_and_seed(tiny_tokenizer, tiny):
    model, _ = tiny
    assert model.config.vocab_size == len(tiny_tokenizer)
    assert model.config.pad_token_id == tiny_tokenizer.pad_token_id
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight  # tied
    ids = _ids(tiny_tokenizer)
    assert model(ids).logits.shape == (2, 12, len(tiny_tokenizer))
    again = build_model(TINY, tiny_tokenizer, seed=0)
    other = build_model(TINY, tiny_tokenizer, seed=1)
    w = model.model.layers[0].self_attn.q_proj.weight
    assert torch.equal(w, again.model.layers[0].self_attn.q_proj.weight)
    assert not torch.equal(w, other.model.layers[0].self_attn.q_proj.weight)


def test_build_model_rejects_indivisible_heads(tiny_tokenizer):
    with pytest.raises(KatError, match="divisible"):
        build_model(TINY.model_copy(update={"hidden_size": 30}), tiny_tokenizer)


def test_mtp_shapes_and_depth_zero(tiny_tokenizer, tiny):
    model, heads = tiny
    ids = _ids(tiny_tokenizer)
    logits, mtp_logits = LMWithMTP(model, heads)(ids)
    assert logits.shape == (2, 12, len(tiny_tokenizer))
    assert [tuple(x.shape) for x in mtp_logits] == [(2, 12, len(tiny_tokenizer))] * 2
    # MTP owns only its own weights: embedding and head are the base model's
    names = [n for n, _ in heads.named_parameters()]
    assert not any("embed" in n or "lm_head" in n for n in names)
    assert LMWithMTP(model)(ids)[1] == []
    loss, per_depth = mtp_loss([], ids)
    assert per_depth == [] and loss.item() == 0.0


def test_mtp_is_causal_and_never_sees_its_target(tiny_tokenizer, tiny):
    """Depth k at position i may read tokens <= i+k, never its target i+k+1."""
    model, heads = tiny
    ids = _ids(tiny_tokenizer, batch=1, length=12)
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
        base = mtp_forward(model, heads, ids, out.hidden_states[-1])
        j = 8
        changed = ids.clone()
        changed[0, j] = (changed[0, j] + 1) % len(tiny_tokenizer)
        out2 = model(changed, output_hidden_states=True)
        pert = mtp_forward(model, heads, changed, out2.hidden_states[-1])
    for k in (1, 2):
        i_target = j - k - 1  # the position whose target is token j
        assert torch.allclose(base[k - 1][0, : i_target + 1], pert[k - 1][0, : i_target + 1], atol=1e-6)
        assert not torch.allclose(base[k - 1][0, j - k], pert[k - 1][0, j - k])  # reads token j itself


def test_mtp_loss_matches_explicit_indices():
    torch.manual_seed(0)
    B, T, V = 2, 7, 11
    ids = torch.randint(0, V, (B, T))
    logits = [torch.randn(B, T, V), torch.randn(B, T, V)]
    mask = torch.ones(B, T)
    mask[0, 5] = 0  # a masked target
    mask[1, 2:4] = 0
    total, per_depth = mtp_loss(logits, ids, loss_mask=mask)
    for k in (1, 2):
        terms = [
            torch.nn.functional.cross_entropy(logits[k - 1][b, i][None], ids[b, i + k + 1][None])
            for b in range(B)
            for i in range(T - k - 1)
            if mask[b, i + k + 1] > 0
        ]
        assert torch.allclose(per_depth[k - 1], torch.stack(terms).mean(), atol=1e-6)
    assert torch.allclose(total, torch.stack(per_depth).mean())
    # a "perfect" predictor for the right offset scores ~0; shifted by one it scores badly
    for k in (1, 2):
        right = torch.full((B, T, V), -30.0)
        wrong = torch.full((B, T, V), -30.0)
        for i in range(T - k - 1):
            right[torch.arange(B), i, ids[:, i + k + 1]] = 30.0
            wrong[torch.arange(B), i, ids[:, i + k]] = 30.0
        assert mtp_loss([right] * k, ids)[1][k - 1].item() < 1e-6
        assert mtp_loss([wrong] * k, ids)[1][k - 1].item() > 1.0
    # ignore_id drops pad targets; no target in range gives a zero (graph-connected) loss
    pad = int(ids[0, 3])
    manual = mtp_loss(logits[:1], ids, loss_mask=(ids != pad).float())[0]
    assert torch.allclose(mtp_loss(logits[:1], ids, ignore_id=pad)[0], manual)
    short = torch.randn(1, 2, V, requires_grad=True)
    zero, _ = mtp_loss([short], ids[:1, :2])
    assert zero.item() == 0.0 and zero.requires_grad


def test_mtp_modules_learn_t_plus_2_and_t_plus_3(tiny_tokenizer):
    """On a repeating cycle of 16 tokens, module 1 must come to predict token t+2 and module 2 token t+3
    (chance: 1/16)."""
    torch.manual_seed(0)
    model = build_model(TINY, tiny_tokenizer, seed=0)
    wrapped = LMWithMTP(model, build_mtp(model, depth=2, seed=0))
    cycle = torch.randperm(len(tiny_tokenizer))[:16]

    def batch(n=8, T=20):
        starts = torch.randint(0, 16, (n, 1))
        return cycle[(starts + torch.arange(T)) % 16]

    def accuracy(k):  # depth k at position i against token i+k+1
        with torch.no_grad():
            ids = batch(n=32)
            mtp_k = wrapped(ids)[1][k - 1]
            return (mtp_k[:, : -k - 1].argmax(-1) == ids[:, k + 1 :]).float().mean().item()

    assert accuracy(1) < 0.3 and accuracy(2) < 0.3
    opt = torch.optim.Adam(wrapped.parameters(), lr=1e-2)
    losses = []
    for _ in range(100):
        ids = batch()
        logits, mtp_logits = wrapped(ids)
        ce = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        loss_mtp, _ = mtp_loss(mtp_logits, ids)
        losses.append(loss_mtp.item())
        opt.zero_grad()
        (ce + loss_mtp).backward()
        opt.step()
    assert losses[-1] < losses[0] / 10
    assert accuracy(1) > 0.9 and accuracy(2) > 0.9


def test_mtp_with_right_padding_matches_unpadded(tiny_tokenizer, tiny):
    model, heads = tiny
    wrapped = LMWithMTP(model, heads)
    long, short = _ids(tiny_tokenizer, batch=1, length=10, seed=1), _ids(tiny_tokenizer, batch=1, length=6, seed=2)
    pad = tiny_tokenizer.pad_token_id
    batch = torch.cat([long, torch.nn.functional.pad(short, (0, 4), value=pad)])
    mask = torch.ones_like(batch)
    mask[1, 6:] = 0
    with torch.no_grad():
        _, padded = wrapped(batch, attention_mask=mask)
        _, alone = wrapped(short)
    for k in (0, 1):
        assert torch.allclose(padded[k][1, :6], alone[k][0], atol=1e-5)
        assert torch.isfinite(padded[k]).all()


def test_checkpoint_roundtrip_identical_logits(tiny_tokenizer, tiny, tmp_path):
    model, heads = tiny
    ids = _ids(tiny_tokenizer)
    written = []
    out = save_checkpoint(
        tmp_path / "ckpt", model, tiny_tokenizer, heads, extra={"step": 7},
        write_more=lambda d: (d / "optimizer.pt").write_bytes(b"state") and written.append(d),
    )
    assert is_checkpoint(out) and written
    assert checkpoint_meta(out)["extra"] == {"step": 7} and checkpoint_meta(out)["mtp_depth"] == 2
    assert verify_manifest(out) == []  # every file, optimizer.pt included, is digested
    assert json.loads((out / "mtp_config.json").read_text())["depth"] == 2
    model2, tok2, heads2 = load_checkpoint(out)
    with torch.no_grad():
        a, a_mtp = LMWithMTP(model, heads)(ids)
        b, b_mtp = LMWithMTP(model2, heads2)(ids)
    assert torch.equal(a, b)
    assert len(b_mtp) == 2 and all(torch.equal(x, y) for x, y in zip(a_mtp, b_mtp, strict=True))
    assert tok2(THINK_ON, add_special_tokens=False)["input_ids"] == tiny_tokenizer(THINK_ON, add_special_tokens=False)[
        "input_ids"
    ]
    # saving again replaces the checkpoint atomically and leaves no temp dirs behind
    save_checkpoint(out, model, tiny_tokenizer)  # now without MTP
    assert load_checkpoint(out)[2] is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_plain_transformers_loads_and_generates(tiny_tokenizer, tiny, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, heads = tiny
    out = save_checkpoint(tmp_path / "ckpt", model, tiny_tokenizer, heads)
    plain = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok("Compute 7*8.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(plain(ids).logits, model(ids).logits)
        gen = plain.generate(ids, max_new_tokens=5, do_sample=False)
    assert gen.shape[1] > ids.shape[1]
    assert isinstance(tok.decode(gen[0]), str)


def test_load_model_extends_tokenizer_and_resizes(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE(unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    raw.train_from_iterator(["a plain base model with no tags"] * 10, trainers.BpeTrainer(special_tokens=["[UNK]"]))
    base_tok = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]")
    before = len(base_tok)
    cfg = LlamaConfig(vocab_size=before, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, max_position_embeddings=32)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "base")
    base_tok.save_pretrained(tmp_path / "base")

    model, tok = load_model(tmp_path / "base")
    assert len(tok) >= before + len(SPECIAL_TOKENS) and tok.pad_token is not None
    assert model.get_input_embeddings().num_embeddings == len(tok)
    assert model.config.pad_token_id == tok.pad_token_id
    ids = tok(f"a plain {THINK_ON} model", return_tensors="pt")["input_ids"]
    assert model(ids).logits.shape[-1] == len(tok)


def test_bad_dirs_give_kat_errors(tiny_tokenizer, tiny, tmp_path):
    with pytest.raises(KatError, match=r"not a KAT checkpoint: .* \(no config.json\)"):
        load_checkpoint(tmp_path)
    with pytest.raises(KatError, match="not a KAT checkpoint"):
        load_checkpoint(tmp_path / "missing")
    with pytest.raises(KatError, match="model not found"):
        load_model(tmp_path / "missing")
    with pytest.raises(KatError, match="model not found"):
        load_model(str(tmp_path / "missing"))
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "config.json").write_text("{not json")
    with pytest.raises(KatError):
        load_model(tmp_path / "junk")
    assert not is_checkpoint(tmp_path / "junk")  # no weights either

    model, heads = tiny
    out = save_checkpoint(tmp_path / "ckpt", model, tiny_tokenizer, heads)
    data = (out / "mtp.safetensors").read_bytes()
    (out / "mtp.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(KatError, match="bad MTP weights"):
        load_checkpoint(out)
    assert verify_manifest(out) == ["digest mismatch for mtp.safetensors"]
    data = (out / "model.safetensors").read_bytes()
    (out / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(KatError):
        load_checkpoint(out)


def test_tags_on_a_padded_vocabulary_start_from_their_spelling():
    """A base whose embedding table is longer than its tokenizer (a padded vocabulary) gives the new tags rows
    no token ever trained: they start from their spelling all the same, not from those leftovers."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from kat_core.format import SPECIAL_TOKENS
    from kat_core.model.lm import prepare_tokenizer

    raw = Tokenizer(models.BPE(unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    raw.train_from_iterator([" ".join(SPECIAL_TOKENS) + " think judge answer on off"] * 10,
                            trainers.BpeTrainer(special_tokens=["[UNK]", "<eos>"], vocab_size=60))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]", eos_token="<eos>")
    before = len(tokenizer)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=before + 32, hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=32))
    padded = model.get_input_embeddings().weight.detach().clone()
    assert prepare_tokenizer(model, tokenizer) >= len(SPECIAL_TOKENS)
    table = model.get_input_embeddings().weight.detach()
    assert table.shape[0] == before + 32  # the padding had room: no resize
    rows = []
    for tag in SPECIAL_TOKENS:
        row = tokenizer.convert_tokens_to_ids(tag)
        pieces = tokenizer(tag, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        assert row >= before and pieces and max(pieces) < before
        assert torch.allclose(table[row], padded[pieces].mean(dim=0))
        rows.append(table[row])
    normed = torch.nn.functional.normalize(torch.stack(rows), dim=-1)
    cosine = normed @ normed.T
    assert (cosine - torch.eye(len(rows))).max() < 0.999  # eight distinct rows
    assert torch.equal(table[:before], padded[:before])  # the old tokens' rows untouched


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "ran"))


def test_pickled_weights_that_would_run_code_are_one_readable_error(tiny_tokenizer, tiny, tmp_path):
    from kat_core.errors import KatError
    from kat_core.model.lm import load_model

    model, heads = tiny
    out = save_checkpoint(tmp_path / "ckpt", model, tiny_tokenizer, heads)
    (out / "model.safetensors").unlink()
    marker = tmp_path / "marker"
    torch.save({"weights": _Payload(marker)}, out / "pytorch_model.bin")  # what a tampered checkpoint could hold
    with pytest.raises(KatError, match="cannot load model from"):
        load_model(out)
    assert not marker.exists()
