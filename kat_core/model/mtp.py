"""Multi-token prediction (MTP), DeepSeek-V3 style: D sequential modules on top of a causal LM.

The base LM reads tokens up to position i and predicts token i+1. MTP module k (k = 1..D) predicts token
i+k+1. It takes the previous depth's hidden state at i (the base model's for k = 1) and the embedding of
token i+k, which is known during training, RMSNorms both (they live on different scales), concatenates
them, projects 2H -> H and runs one transformer block. Its own RMSNorm then feeds the base model's output
head. Embedding and head are shared with the base model, so a module costs one block plus a 2H x H matrix,
and its gradient flows back into the base model's representations: that extra signal is the point of MTP
in pretraining. The chain is sequential rather than D parallel heads so that depth k builds on what depth
k-1 concluded, which is also what self-speculative decoding wants: module k drafts token i+k+1.

Which hidden state feeds depth 1: the base model's *last* hidden state, after its final norm (what the
output head sees). Every HF causal LM returns it as `hidden_states[-1]` with `output_hidden_states=True`,
so MTP works on any base model; `hnorm` renormalises it anyway. Deeper depths get the previous block's
output before that module's own final norm (as DeepSeek-V3 does).

Shapes: every depth keeps the full length T. At position i, depth k needs token i+k, which does not exist
for the last k positions: those read the pad embedding, and their logits are junk that `mtp_loss` skips.
Attention is causal, so the junk never reaches an earlier, valid position.

The modules hold no reference to the base model (it is passed to `mtp_forward`), so their state_dict is
only their own weights, saved beside a standard HF checkpoint rather than inside it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaConfig
from transformers.masking_utils import create_causal_mask
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRMSNorm, LlamaRotaryEmbedding


def block_config(base_config) -> LlamaConfig:
    """A Llama-block config sized like `base_config` (any HF causal-LM config answers these names).

    The block gets plain RoPE with the base's theta rather than the base's own positional scheme: it is a
    new block with its own attention, so it only needs *a* consistent position encoding, and this one works
    whatever the base model is."""
    hidden, heads = base_config.hidden_size, base_config.num_attention_heads
    rope = getattr(base_config, "rope_parameters", None) or {}
    cfg = LlamaConfig(
        vocab_size=base_config.vocab_size,
        hidden_size=hidden,
        intermediate_size=getattr(base_config, "intermediate_size", None) or 4 * hidden,
        num_hidden_layers=1,
        num_attention_heads=heads,
        num_key_value_heads=getattr(base_config, "num_key_value_heads", None) or heads,
        head_dim=getattr(base_config, "head_dim", None) or hidden // heads,
        rms_norm_eps=getattr(base_config, "rms_norm_eps", None) or 1e-6,
        max_position_embeddings=getattr(base_config, "max_position_embeddings", None) or 2048,
        rope_parameters={"rope_type": "default", "rope_theta": float(rope.get("rope_theta", 10000.0))},
        initializer_range=getattr(base_config, "initializer_range", None) or 0.02,
    )
    cfg._attn_implementation = getattr(base_config, "_attn_implementation", None) or "sdpa"
    return cfg


class MTPModule(nn.Module):
    """One depth: [RMSNorm(h_prev); RMSNorm(emb(token i+k))] -> Linear(2H, H) -> transformer block."""

    def __init__(self, config: LlamaConfig, layer_idx: int):
        super().__init__()
        hidden, eps = config.hidden_size, config.rms_norm_eps
        self.hnorm = LlamaRMSNorm(hidden, eps=eps)  # previous depth's hidden state
        self.enorm = LlamaRMSNorm(hidden, eps=eps)  # embedding of the next known token
        self.proj = nn.Linear(2 * hidden, hidden, bias=False)
        self.block = LlamaDecoderLayer(config, layer_idx)
        self.norm = LlamaRMSNorm(hidden, eps=eps)  # own final norm before the shared output head

    def forward(self, h_prev, next_embeds, position_embeddings, attention_mask=None) -> torch.Tensor:
        """The block's output (pre-`norm`): the next depth's input. Logits are `head(self.norm(out))`."""
        x = self.proj(torch.cat([self.hnorm(h_prev), self.enorm(next_embeds)], dim=-1))
        return self.block(x, attention_mask=attention_mask, position_embeddings=position_embeddings)


class MTPHeads(nn.Module):
    """D sequential MTP modules for a base model with config `base_config` (D = 0: none, MTP disabled).

    Indexable and iterable like a ModuleList; it is a Module only so it can also own the rotary table."""

    def __init__(self, base_config, depth: int):
        super().__init__()
        self.config = block_config(base_config)
        self.depth = depth
        self.layers = nn.ModuleList(MTPModule(self.config, k) for k in range(depth))
        self.rotary = LlamaRotaryEmbedding(self.config)  # buffers only, nothing saved
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        # the base model's recipe (normal, std = initializer_range), not torch's fan-in uniform
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=self.config.initializer_range)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    def __len__(self) -> int:
        return len(self.layers)

    def __iter__(self):
        return iter(self.layers)

    def __getitem__(self, k: int) -> MTPModule:
        return self.layers[k]


def build_mtp(model, depth: int, seed: int = 0) -> MTPHeads:
    """MTP heads for `model`, on its device and dtype, seeded without touching the global RNG."""
    param = next(model.parameters())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        heads = MTPHeads(model.config, depth)
    return heads.to(device=param.device, dtype=param.dtype)


def mtp_forward(base_model, mtp_heads: MTPHeads, input_ids, hidden_states, attention_mask=None,
                position_ids=None) -> list[torch.Tensor]:
    """Logits (B, T, V) for each depth k = 1..D; depth k at position i predicts input_ids[:, i+k+1].

    `hidden_states` is the base model's last hidden state after its final norm (`hidden_states[-1]` of a
    forward with `output_hidden_states=True`)."""
    if len(mtp_heads) == 0:
        return []
    embed, head = base_model.get_input_embeddings(), base_model.get_output_embeddings()
    T = input_ids.shape[1]
    if position_ids is None:
        position_ids = torch.arange(T, device=input_ids.device).unsqueeze(0)
    rope = mtp_heads.rotary(hidden_states, position_ids)
    mask = create_causal_mask(config=mtp_heads.config, inputs_embeds=hidden_states,
                              attention_mask=attention_mask, cache=None, position_ids=position_ids)
    pad_id = base_model.config.pad_token_id
    pad_id = 0 if pad_id is None else pad_id
    h, logits = hidden_states, []
    for k, module in enumerate(mtp_heads, start=1):
        ahead = F.pad(input_ids[:, k:], (0, k), value=pad_id)  # token i+k at position i; pad past the end
        h = module(h, embed(ahead), rope, mask)
        logits.append(head(module.norm(h)))
    return logits


def mtp_loss(logits_list: list[torch.Tensor], input_ids, loss_mask=None,
             ignore_id: int | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(mean over depths of CE_k, [CE_1..CE_D]). Depth k: logits[:, i] are scored against input_ids[:, i+k+1].

    `loss_mask` (B, T), bool or float weights, is indexed by *target* position (the same mask as the main
    CE's labels: 0 on prompt and pad tokens); `ignore_id` also skips targets equal to it (a pad id).
    Positions whose target lies past the end are skipped. No depths: (0, [])."""
    if not logits_list:
        return torch.zeros((), device=input_ids.device), []
    T = input_ids.shape[1]
    weights = torch.ones_like(input_ids, dtype=torch.float32) if loss_mask is None else loss_mask.float()
    if ignore_id is not None:
        weights = weights * (input_ids != ignore_id)
    losses = []
    for k, logits in enumerate(logits_list, start=1):
        shift = k + 1
        if T <= shift:  # no position has a target this far ahead; keep the graph connected
            losses.append(logits.sum() * 0.0)
            continue
        pred, target, w = logits[:, : T - shift], input_ids[:, shift:], weights[:, shift:]
        ce = F.cross_entropy(pred.reshape(-1, pred.shape[-1]).float(), target.reshape(-1), reduction="none")
        losses.append((ce.view_as(w) * w).sum() / w.sum().clamp_min(1e-8))
    return torch.stack(losses).mean(), losses


class LMWithMTP(nn.Module):
    """The base LM and its MTP heads as one module, because DDP and DeepSpeed wrap exactly one module and
    must see every trained parameter used inside its forward."""

    def __init__(self, lm, mtp: MTPHeads | None = None):
        super().__init__()
        self.lm = lm
        self.mtp = mtp if mtp is not None else MTPHeads(lm.config, 0)

    def forward(self, input_ids, attention_mask=None, position_ids=None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(main logits (B, T, V), [MTP logits per depth]). Packed rows: pass `position_ids` that restart
        at each example and no attention mask; transformers then masks block-diagonally."""
        out = self.lm(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                      use_cache=False, output_hidden_states=len(self.mtp) > 0)
        if len(self.mtp) == 0:
            return out.logits, []
        return out.logits, mtp_forward(self.lm, self.mtp, input_ids, out.hidden_states[-1], attention_mask,
                                       position_ids)
