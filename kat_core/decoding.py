"""The pieces a decode loop is made of, shared by plain (`kat_core.rollout`) and speculative
(`kat_core.speculative`) decoding: the slab KV cache, the fast decode step for Llama-architecture models, token
draws, the prefill of a batch of contexts, and the compaction of finished rows. Why each exists is in
`kat_core.rollout`'s docstring.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

FinishReason = Literal["stop", "eos", "length"]

# --- the KV cache -------------------------------------------------------------------------------------------

class _SlabLayer(DynamicLayer):
    """One layer's keys and values in a preallocated slab (rows, heads, capacity, head_dim).

    The live window is columns [start, end) of the first `rows` rows; attention reads views of it, so a new
    token is one in-place write rather than a concatenation of the whole cache."""

    def __init__(self, capacity: int, max_rows: int = 0):
        super().__init__()
        self.capacity, self.max_rows, self.rows, self.start, self.end = capacity, max_rows, 0, 0, 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        b, h, _, d = key_states.shape
        rows = max(b, self.max_rows)  # room for rows copied in after the prefill (shared prompts, joining rows)
        self.k_slab = key_states.new_empty(rows, h, self.capacity, d)
        self.v_slab = value_states.new_empty(rows, value_states.shape[1], self.capacity, value_states.shape[-1])
        self.rows, self.device, self.is_initialized = b, key_states.device, True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        t = key_states.shape[-2]
        if self.end + t > self.capacity:
            raise RuntimeError(f"KV slab full ({self.capacity} columns)")
        self.k_slab[: self.rows, :, self.end : self.end + t] = key_states
        self.v_slab[: self.rows, :, self.end : self.end + t] = value_states
        self.end += t
        self._refresh()
        return self.keys, self.values

    def _refresh(self) -> None:
        self.keys = self.k_slab[: self.rows, :, self.start : self.end]
        self.values = self.v_slab[: self.rows, :, self.start : self.end]

    def get_seq_length(self) -> int:
        return self.end - self.start if self.is_initialized else 0

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return self.capacity

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """New row i = old row indices[i] (rows to keep, or to repeat up to max_rows). In place, over the live
        window only, and only the rows that move: no new slab, and the copy follows what changed."""
        moved = (indices != torch.arange(len(indices), device=indices.device)).nonzero()[:, 0]
        if len(moved):
            window = slice(self.start, self.end)
            self.k_slab[moved, :, window] = self.k_slab[indices[moved], :, window]
            self.v_slab[moved, :, window] = self.v_slab[indices[moved], :, window]
        self.rows = len(indices)
        self._refresh()

    def drop_left(self, cols: int) -> None:
        self.start += cols
        self._refresh()

    def move_window(self, to: int) -> None:
        """Copy the live window to start at column `to` (left of where it is)."""
        width = self.end - self.start
        for slab in (self.k_slab, self.v_slab):
            slab[: self.rows, :, to : to + width] = slab[: self.rows, :, self.start : self.end].clone()
        self.start, self.end = to, to + width
        self._refresh()

    def add_rows(self, other: _SlabLayer, start: int) -> None:
        """Append `other`'s rows, their columns ending where this window ends; the window then starts at
        `start` (at or left of where it did, so that the new rows' columns are inside)."""
        k, width = other.rows, other.end - other.start
        for slab, new in ((self.k_slab, other.keys), (self.v_slab, other.values)):
            # columns of the window no row wrote are masked, and zeros keep masked attention finite
            slab[: self.rows, :, start : self.start] = 0
            slab[self.rows : self.rows + k, :, start : self.end - width] = 0
            slab[self.rows : self.rows + k, :, self.end - width : self.end] = new
        self.rows, self.start = self.rows + k, start
        self._refresh()


def _new_cache(model, capacity: int, max_rows: int) -> Cache:
    """A slab cache when every layer is a plain full-attention layer (what DynamicCache builds for Llama,
    Qwen, Mistral without sliding windows...); otherwise the model's own DynamicCache (sliding windows,
    linear attention keep their special layers), which still supports dropping rows."""
    reference = DynamicCache(config=model.config)
    if reference.layers and all(type(layer) is DynamicLayer for layer in reference.layers):
        return Cache(layers=[_SlabLayer(capacity, max_rows) for _ in reference.layers])
    return reference


def _cache_kwarg(model) -> str:
    # transformers 5 renamed `past_key_values` to `cache` (the old name still works, with a warning)
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


# --- a fast decode step for Llama-architecture models ---------------------------------------------------------

class _LlamaStep:
    """One decode step (one new token per row) of a Llama-architecture model, straight from its weights.

    HF's forward spends most of a small model's decode step in Python: module calls, decorators, mask and
    rotary set-up. This is the same arithmetic in a dozen tensor ops per layer, written to mirror HF's
    modules op for op (same dtype casts, same kernels) so that it computes the same logits. The prefill
    still runs HF's forward; both write the same slab cache. Grouped-query attention (fewer key/value heads
    than query heads: SmolLM2, Llama 3, Qwen, Mistral) runs as HF's SDPA path runs it for one query token:
    `enable_gqa` without a mask, else the query heads folded onto their key/value head."""

    @staticmethod
    def supports(model, cache: Cache) -> bool:
        cfg = model.config
        rope = getattr(cfg, "rope_parameters", None) or {}
        return (
            cfg.model_type == "llama"
            and type(model).__name__ == "LlamaForCausalLM"
            and rope.get("rope_type", "default") == "default"
            and cfg.num_attention_heads % cfg.num_key_value_heads == 0
            and not getattr(cfg, "attention_bias", False)
            and not getattr(cfg, "mlp_bias", False)
            and cfg.hidden_act == "silu"
            and cfg._attn_implementation == "sdpa"
            and all(isinstance(layer, _SlabLayer) for layer in cache.layers)
        )

    def __init__(self, model, max_positions: int):
        base = model.model
        self.embed, self.head = base.embed_tokens.weight, model.lm_head.weight
        self.norm = (base.norm.weight, base.norm.variance_epsilon)
        self.head_dim, self.scaling = base.layers[0].self_attn.head_dim, base.layers[0].self_attn.scaling
        self.groups = model.config.num_attention_heads // model.config.num_key_value_heads
        self.weights = [self.layer_weights(layer) for layer in base.layers]
        self.cos, self.sin = self.rope_tables(base.rotary_emb, max_positions, self.embed)

    @staticmethod
    def rope_tables(rotary, positions: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) for positions 0..positions-1 as HF's LlamaRotaryEmbedding `rotary` computes them, on
        `like`'s device and dtype."""
        freqs = torch.arange(positions, device=like.device).float()[:, None] * rotary.inv_freq.float()
        emb = torch.cat((freqs, freqs), dim=-1)
        scale = rotary.attention_scaling
        return (emb.cos() * scale).to(like.dtype), (emb.sin() * scale).to(like.dtype)

    @staticmethod
    def layer_weights(layer) -> tuple:
        """A LlamaDecoderLayer's weights as plain tensors: nn.Module attribute lookups are a measurable share of
        a tiny model's step."""
        return ((layer.input_layernorm.weight, layer.input_layernorm.variance_epsilon),
                layer.self_attn.q_proj.weight, layer.self_attn.k_proj.weight, layer.self_attn.v_proj.weight,
                layer.self_attn.o_proj.weight,
                (layer.post_attention_layernorm.weight, layer.post_attention_layernorm.variance_epsilon),
                layer.mlp.gate_proj.weight, layer.mlp.up_proj.weight, layer.mlp.down_proj.weight)

    @staticmethod
    def rms(x: torch.Tensor, norm: tuple[torch.Tensor, float]) -> torch.Tensor:
        weight, eps = norm
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        return weight * x.to(dtype)

    @staticmethod
    def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin

    def __call__(self, tok: torch.Tensor, pos: torch.Tensor, cache: Cache, key_mask: torch.Tensor | None):
        """Logits (rows, vocab) for one new token per row at positions `pos`; `key_mask` (rows, kv) bool or None."""
        mask = key_mask[:, None, None, :] if key_mask is not None else None
        return self.run(tok[:, None], pos[:, None], cache, mask)[0][:, 0]

    def run(self, tok: torch.Tensor, pos: torch.Tensor, cache: Cache,
            mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """L new tokens per row: tok, pos (rows, L); mask (rows, 1, L, kv) bool or None -> (logits (rows, L,
        vocab), the last hidden state after the final norm (rows, L, H): what an MTP module drafts from)."""
        x = self.blocks(F.embedding(tok, self.embed), self.cos[pos][:, None], self.sin[pos][:, None], cache, mask,
                        self.weights)
        hidden = self.rms(x, self.norm)
        return F.linear(hidden, self.head), hidden

    def blocks(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: Cache, mask: torch.Tensor | None,
               weights: list[tuple]) -> torch.Tensor:
        """Run `x` (rows, L, H) through decoder layers given as `layer_weights` tuples, one cache layer each;
        cos, sin (rows, 1, L, head_dim) are the rotary tables at the tokens' positions."""
        n, t, hd = x.shape[0], x.shape[1], self.head_dim
        for (norm1, wq, wk, wv, wo, norm2, wg, wu, wd), kv in zip(weights, cache.layers, strict=True):
            h = self.rms(x, norm1)
            q = self._rope(F.linear(h, wq).view(n, t, -1, hd).transpose(1, 2), cos, sin)
            k = self._rope(F.linear(h, wk).view(n, t, -1, hd).transpose(1, 2), cos, sin)
            v = F.linear(h, wv).view(n, t, -1, hd).transpose(1, 2)
            keys, values = kv.update(k, v)
            if self.groups == 1:
                a = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=self.scaling)
            elif mask is None:
                a = F.scaled_dot_product_attention(q, keys, values, scale=self.scaling, enable_gqa=True)
            else:  # (n, heads, L, hd) -> (n, kv heads, groups * L, hd): each key/value head's queries in one call
                folded = q.reshape(n, -1, self.groups * t, hd)
                a = F.scaled_dot_product_attention(folded, keys, values, attn_mask=mask.repeat(1, 1, self.groups, 1),
                                                   scale=self.scaling)
                a = a.reshape(n, -1, t, hd)
            x = x + F.linear(a.transpose(1, 2).reshape(n, t, -1), wo)
            h = self.rms(x, norm2)
            x = x + F.linear(F.silu(F.linear(h, wg)) * F.linear(h, wu), wd)
        return x


# --- sampling -----------------------------------------------------------------------------------------------

def nucleus_probs(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """softmax(logits / T) cut to the top-p nucleus (the smallest set of most likely tokens whose mass reaches
    top_p; the top token always stays), unnormalised: what a token is drawn from at temperature T > 0."""
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        cut = sorted_probs.cumsum(-1) - sorted_probs >= top_p  # mass before it already reaches top_p
        probs = probs.scatter(-1, order, sorted_probs.masked_fill(cut, 0.0))
    return probs


def draw(probs: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """One token per row from unnormalised probabilities (rows, V): an inverse-CDF draw, one uniform per row
    (torch.multinomial costs several times more on CPU): u in (0, total] and the first index whose cdf reaches
    u, which is never a zero-probability token."""
    cdf = probs.cumsum(-1)
    u = (1.0 - torch.rand(cdf.shape[0], 1, generator=gen, device=cdf.device)) * cdf[:, -1:]
    return torch.searchsorted(cdf, u)[:, 0].clamp_max(probs.shape[-1] - 1)


def _pick(logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator) -> torch.Tensor:
    """Next token per row: argmax at temperature 0, else a draw from the top-p nucleus of softmax(logits / T)."""
    if temperature == 0:
        return logits.argmax(-1)
    return draw(nucleus_probs(logits, temperature, top_p), gen)


# on_token(row, token_id, finish): called for every drawn token, in order, as soon as it is drawn (`row` is the
# row's index in generate's output); `finish` is None while the row goes on, else its finish reason. Returning
# False ends the row there, as if its budget had run out ("length"): a client that left, or a shorter budget.
OnToken = Callable[[int, int, "FinishReason | None"], "bool | None"]


def _survivors(done: torch.Tensor) -> torch.Tensor:
    """The live rows as a permutation for `batch_select_indices`: a live row that would land past the new end
    moves into a finished row's slot, all others stay where they are, so compaction copies as many rows as
    just finished rather than every survivor."""
    live = ~done
    n_keep = int(live.sum())
    keep = torch.arange(n_keep, device=done.device)
    holes = done[:n_keep].nonzero()[:, 0]
    keep[holes] = live[n_keep:].nonzero()[:, 0] + n_keep
    return keep


@dataclass
class _Row:
    prompt_index: int
    sample_index: int
    context: list[int]  # prompt ids + forced prefix ids
    forced: list[int]


def _prefill(model, rows: list[_Row], cache: Cache, *, pad_id: int, cache_kw: str, end: int, capacity: int,
             hidden: bool = False):
    """Run `rows`' contexts, left-padded to one width, into `cache` so that they end at slab column `end` ->
    (logits of each row's last position, the rows' attention mask over columns [0, capacity), positions),
    and with `hidden` the last hidden state at every position (rows, width, H)."""
    device = next(model.parameters()).device
    b, width = len(rows), max(len(r.context) for r in rows)
    ids = torch.full((b, width), pad_id, dtype=torch.long)
    mask = torch.zeros((b, capacity), dtype=torch.bool)  # column j = slab column j
    for i, r in enumerate(rows):
        ids[i, width - len(r.context):] = torch.tensor(r.context)
        mask[i, end - len(r.context):end] = True
    ids, mask = ids.to(device), mask.to(device)
    window = mask[:, end - width:end]
    pos = (window.long().cumsum(-1) - 1).clamp_min(0)
    for layer in cache.layers if _is_slab(cache) else ():
        layer.start = layer.end = end - width  # the prefill writes columns [end - width, end)
    # the n samples of a prompt share its context: prefill each distinct context once, then copy its rows
    slot: dict[tuple[int, ...], int] = {}  # distinct context -> its row in the prefill
    src = [slot.setdefault(tuple(r.context), len(slot)) for r in rows]
    uniq = torch.tensor([src.index(k) for k in range(len(slot))], device=device)  # first row of each context
    out = model(input_ids=ids[uniq], attention_mask=window[uniq], position_ids=pos[uniq], use_cache=True,
                logits_to_keep=1, output_hidden_states=hidden, **{cache_kw: cache})
    logits, states = out.logits[:, -1], out.hidden_states[-1] if hidden else None
    if len(slot) < b:
        expand = torch.tensor(src, device=device)
        cache.batch_select_indices(expand)
        logits, states = logits[expand], states[expand] if hidden else None
    return (logits, mask, pos[:, -1]) + ((states,) if hidden else ())


def _is_slab(cache: Cache) -> bool:
    return all(isinstance(layer, _SlabLayer) for layer in cache.layers)
