"""Fast batched sampling for any HF causal LM, with mode forcing and per-segment token accounting.

    samples = generate(model, tokenizer, prompts, forced=[forced_prefix(judge, "on"), None], n=4)

Each request (a string, or a conversation: a list of chat messages) is laid out as
`kat_core.chat.request_text` says (the model's chat template when its tokenizer has one), then its forced
prefix if any (pre-filled, so the mode is chosen for the model and never sampled). Rows are LEFT-padded so
that every row's next token sits in the same column; the attention mask hides the padding and position ids
count real tokens only, so a padded row computes what it would alone (up to float rounding).

Why it is faster than `model.generate` on the same model:
- finished rows leave the batch at once: their rows are dropped from the KV cache and the inputs, so a
  step costs what the still-running rows cost. HF keeps computing finished rows until the last one stops,
  which is most of the work when think-off answers (a few tokens) share a batch with think-on traces.
- the KV cache is one preallocated slab per layer, written in place; HF's DynamicCache concatenates, which
  copies the whole cache (and on CPU, page-faults fresh memory) on every step. When the longest prompt's
  row leaves, the left columns that only padding used are cut from the window at no cost (a view).
- for Llama-architecture models (ours), a decode step runs straight from the weights (`_LlamaStep`), not
  through HF's module stack, whose Python overhead dominates a small model's step; other models take
  their own forward, with logits for the last position only.
- the n samples of a prompt share one prefill: its cache rows are copied, not recomputed.
Models whose cache layers are not plain full attention (sliding windows, linear attention) keep their own
DynamicCache and still drop finished rows.

Log-probabilities are those of the raw model distribution (temperature 1, no top-p), `log pi_theta(token)`,
whatever temperature and top-p the token was drawn with: that is the quantity the RL stage's importance
ratios and KL terms need. Forced-prefix tokens are not sampled and have no log-probabilities.

Sampling is deterministic for a seed and the same arguments (one `torch.Generator` drives all draws; the
batch composition is part of "the same arguments", so changing `batch_size` changes the draws).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

from kat_core.chat import request_text
from kat_core.format import ANSWER_CLOSE, SEGMENTS, SPECIAL_TOKENS, THINK_OFF, THINK_ON, token_segments

FinishReason = Literal["stop", "eos", "length"]


@dataclass
class Sample:
    """One sampled response.

    `text` is the response after the prompt, forced prefix included, decoded with the grammar tags kept (so
    `format.parse(text)` works) and without a trailing EOS token. `token_ids` are the generated ids only
    (the stop token included, the forced prefix not: that is in `forced_ids`); `logprobs[i]` is
    log pi(token_ids[i]) under the raw model distribution (temperature 1). `segment_counts` counts the whole
    response (forced prefix + generated ids) per grammar segment, as `format.count_tokens` does."""

    prompt_index: int
    sample_index: int  # 0..n-1 among the samples of the same prompt
    text: str
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: FinishReason  # "stop": </answer>; "eos": the EOS token; "length": the token budget
    forced_ids: list[int] = field(default_factory=list)
    forced_mode: Literal["on", "off"] | None = None  # the mode token the forced prefix ends with, if any
    segment_counts: dict[str, int] = field(default_factory=dict)

    @property
    def num_generated(self) -> int:
        return len(self.token_ids)


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
        rows = max(b, self.max_rows)  # room for rows copied in after the prefill (shared prompts)
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
        # plain tensors per layer: nn.Module attribute lookups are a measurable share of a tiny model's step
        self.weights = [
            ((layer.input_layernorm.weight, layer.input_layernorm.variance_epsilon),
             layer.self_attn.q_proj.weight, layer.self_attn.k_proj.weight, layer.self_attn.v_proj.weight,
             layer.self_attn.o_proj.weight,
             (layer.post_attention_layernorm.weight, layer.post_attention_layernorm.variance_epsilon),
             layer.mlp.gate_proj.weight, layer.mlp.up_proj.weight, layer.mlp.down_proj.weight)
            for layer in base.layers
        ]
        # RoPE for every position this batch can reach, computed as HF's LlamaRotaryEmbedding does
        rotary = base.rotary_emb
        freqs = torch.arange(max_positions, device=self.embed.device).float()[:, None] * rotary.inv_freq.float()
        emb = torch.cat((freqs, freqs), dim=-1)
        self.cos = (emb.cos() * rotary.attention_scaling).to(self.embed.dtype)
        self.sin = (emb.sin() * rotary.attention_scaling).to(self.embed.dtype)

    @staticmethod
    def _rms(x: torch.Tensor, norm: tuple[torch.Tensor, float]) -> torch.Tensor:
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
        n, hd = tok.shape[0], self.head_dim
        x = F.embedding(tok, self.embed)[:, None]  # (n, 1, H), the shape HF's layers see
        cos, sin = self.cos[pos][:, None, None], self.sin[pos][:, None, None]  # (n, 1, 1, hd): all heads
        mask = key_mask[:, None, None, :] if key_mask is not None else None
        for (norm1, wq, wk, wv, wo, norm2, wg, wu, wd), kv in zip(self.weights, cache.layers, strict=True):
            h = self._rms(x, norm1)
            q = self._rope(F.linear(h, wq).view(n, 1, -1, hd).transpose(1, 2), cos, sin)
            k = self._rope(F.linear(h, wk).view(n, 1, -1, hd).transpose(1, 2), cos, sin)
            v = F.linear(h, wv).view(n, 1, -1, hd).transpose(1, 2)
            keys, values = kv.update(k, v)
            if self.groups == 1:
                a = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=self.scaling)
            elif mask is None:
                a = F.scaled_dot_product_attention(q, keys, values, scale=self.scaling, enable_gqa=True)
            else:  # (n, heads, 1, hd) -> (n, kv heads, groups, hd): each key/value head's queries in one call
                folded = q.reshape(n, -1, self.groups, hd)
                a = F.scaled_dot_product_attention(folded, keys, values, attn_mask=mask, scale=self.scaling)
                a = a.reshape(n, -1, 1, hd)
            x = x + F.linear(a.transpose(1, 2).reshape(n, 1, -1), wo)
            h = self._rms(x, norm2)
            x = x + F.linear(F.silu(F.linear(h, wg)) * F.linear(h, wu), wd)
        return F.linear(self._rms(x, self.norm), self.head)[:, 0]


# --- sampling -----------------------------------------------------------------------------------------------

def _pick(logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator) -> torch.Tensor:
    """Next token per row: argmax at temperature 0, else a draw from softmax(logits / T) cut to the top-p
    nucleus (the smallest set of most likely tokens whose mass reaches top_p; the top token always stays)."""
    if temperature == 0:
        return logits.argmax(-1)
    probs, order = torch.softmax(logits / temperature, dim=-1), None
    if top_p < 1.0:
        probs, order = probs.sort(dim=-1, descending=True)
        probs = probs.masked_fill(probs.cumsum(-1) - probs >= top_p, 0.0)  # mass before it already reaches top_p
    # inverse-CDF draw, one uniform per row (torch.multinomial costs several times more on CPU): u in (0, total]
    # and the first index whose cdf reaches u, which is never a zero-probability token
    cdf = probs.cumsum(-1)
    u = (1.0 - torch.rand(cdf.shape[0], 1, generator=gen, device=cdf.device)) * cdf[:, -1:]
    tok = torch.searchsorted(cdf, u)[:, 0]
    return tok if order is None else order.gather(-1, tok[:, None])[:, 0]


def _stop_ids(model, tokenizer, stop_at_answer: bool) -> list[int]:
    ids = set()
    for source in (tokenizer.eos_token_id, getattr(model.generation_config, "eos_token_id", None)):
        if source is not None:
            ids.update([source] if isinstance(source, int) else source)
    eos = sorted(ids)
    if stop_at_answer:
        eos.append(tokenizer.convert_tokens_to_ids(ANSWER_CLOSE))
    return eos


# on_token(row, token_id, finish): called for every drawn token, in order, as soon as it is drawn (`row` is the
# row's index in generate's output); `finish` is None while the row goes on, else its finish reason. Returning
# False ends the row there, as if its budget had run out ("length"): a client that left, or a shorter budget.
OnToken = Callable[[int, int, "FinishReason | None"], "bool | None"]


def _tell(on_token: OnToken, active: torch.Tensor, tok: torch.Tensor, done: torch.Tensor, last: bool, first: int,
          answer_close: int) -> torch.Tensor:
    """Hand each live row's new token to `on_token`; -> the rows it stopped."""
    stopped = []
    for i, t, d in zip(active.tolist(), tok.tolist(), done.tolist(), strict=True):
        finish = ("stop" if t == answer_close else "eos") if d else "length" if last else None
        stopped.append(on_token(first + i, t, finish) is False and finish is None)
    return torch.tensor(stopped, dtype=torch.bool, device=tok.device)


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


def _run_batch(model, rows: list[_Row], *, pad_id: int, stop: torch.Tensor, answer_close: int, max_new: int,
               temperature: float, top_p: float, gen: torch.Generator, cache_kw: str, fast: bool, on_finish=None,
               on_token: OnToken | None = None, first: int = 0):
    """Decode one batch; returns per row (generated ids, log-probs, finish reason). `on_token` hears every
    token as it is drawn, with `first` + the row's index in this batch."""
    device = next(model.parameters()).device
    b, width = len(rows), max(len(r.context) for r in rows)
    capacity = width + max_new
    # left padding: every row's next token lands in the same column
    ids = torch.full((b, width), pad_id, dtype=torch.long)
    mask = torch.zeros((b, capacity), dtype=torch.bool)  # one buffer for all steps; column j = slab column j
    for i, r in enumerate(rows):
        ids[i, width - len(r.context):] = torch.tensor(r.context)
        mask[i, width - len(r.context):width] = True
    ids, mask = ids.to(device), mask.to(device)
    pos = (mask[:, :width].long().cumsum(-1) - 1).clamp_min(0)

    cache = _new_cache(model, capacity, b)
    slab = all(isinstance(layer, _SlabLayer) for layer in cache.layers)
    step_fn = _LlamaStep(model, width + max_new) if fast and _LlamaStep.supports(model, cache) else None
    out_ids = torch.full((b, max_new), pad_id, dtype=torch.long, device=device)
    out_lp = torch.zeros((b, max_new), dtype=torch.float32, device=device)
    lengths = [max_new] * b
    reasons: list[FinishReason] = ["length"] * b

    active = torch.arange(b, device=device)  # original row of each live row
    start, end = 0, width  # the live column window (shared by the mask and the slab cache)
    padded = not bool(mask[:, :width].all())
    # the n samples of a prompt share its context: prefill each distinct context once, then copy its rows
    slot: dict[tuple[int, ...], int] = {}  # distinct context -> its row in the prefill
    src = [slot.setdefault(tuple(r.context), len(slot)) for r in rows]
    uniq = torch.tensor([src.index(k) for k in range(len(slot))], device=device)  # first row of each context
    logits = model(input_ids=ids[uniq], attention_mask=mask[uniq, :width], position_ids=pos[uniq], use_cache=True,
                   logits_to_keep=1, **{cache_kw: cache}).logits[:, -1]
    if len(slot) < b:
        expand = torch.tensor(src, device=device)
        cache.batch_select_indices(expand)
        logits = logits[expand]
    pos = pos[:, -1]
    for step in range(max_new):
        logits = logits.float()
        tok = _pick(logits, temperature, top_p, gen)
        out_ids[active, step] = tok
        out_lp[active, step] = torch.log_softmax(logits, dim=-1).gather(1, tok[:, None])[:, 0]
        done = torch.isin(tok, stop)
        if on_token is not None:
            done |= _tell(on_token, active, tok, done, step == max_new - 1, first, answer_close)
        if step == max_new - 1:
            stopped = torch.isin(tok, stop)
            for i, t in zip(active[stopped].tolist(), tok[stopped].tolist(), strict=True):
                reasons[i] = "stop" if t == answer_close else "eos"
            if on_finish:
                on_finish(len(active))
            break
        if bool(done.any()):
            for i, t, stop_token in zip(active[done].tolist(), tok[done].tolist(),
                                        torch.isin(tok[done], stop).tolist(), strict=True):
                lengths[i] = step + 1
                reasons[i] = ("stop" if t == answer_close else "eos") if stop_token else "length"  # on_token's
            if on_finish:
                on_finish(int(done.sum()))
            keep = _survivors(done)
            if keep.numel() == 0:
                break
            # finished rows leave: the cache, the mask, positions and inputs keep only the live rows
            active, tok, pos = active[keep], tok[keep], pos[keep]
            cache.batch_select_indices(keep)
            n = len(keep)
            mask[:n, start:end] = mask[keep, start:end]
            if slab and padded:
                # columns that are padding in every remaining row are dead: cut them from the window
                lead = int(mask[:n, start:end].any(0).int().argmax())  # first column some row uses
                if lead:
                    start += lead
                    for layer in cache.layers:
                        layer.drop_left(lead)
                padded = not bool(mask[:n, start:end].all())
        n = len(active)
        mask[:n, end] = True
        end += 1
        pos = pos + 1
        # without padding no mask is needed, and SDPA takes its faster unmasked path
        attn = mask[:n, start:end] if padded else None
        if step_fn is not None:
            logits = step_fn(tok, pos, cache, attn)
        else:
            logits = model(input_ids=tok[:, None], attention_mask=attn, position_ids=pos[:, None], use_cache=True,
                           **{cache_kw: cache}).logits[:, -1]
    out_ids, out_lp = out_ids.cpu(), out_lp.cpu()
    return [(out_ids[i, : lengths[i]].tolist(), out_lp[i, : lengths[i]].tolist(), reasons[i]) for i in range(b)]


def generate(
    model,
    tokenizer,
    prompts: list[str | list[dict]],
    *,
    forced: list[str | None] | None = None,
    n: int = 1,
    max_new_tokens: int = 160,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    batch_size: int = 64,
    stop_at_answer: bool = True,
    progress: bool = False,
    fast: bool = True,
    on_token: OnToken | None = None,
) -> list[Sample]:
    """Sample `n` responses per prompt -> `len(prompts) * n` Samples, ordered by (prompt, sample).

    `forced[i]` is prompt i's forced prefix text (e.g. `forced_prefix(judge, "on")`) or None; all n samples
    of a prompt share it (to sample both modes, list the prompt twice). `temperature=0` is greedy decoding.
    A row stops at `</answer>` (when `stop_at_answer`), at an EOS token, or after `max_new_tokens`.
    `fast=False` runs every decode step through the model's own forward even for a Llama-architecture model
    (the fast step is checked against it in the tests). `on_token(row, token_id, finish)` hears each token the
    moment it is drawn (streaming) and may end a row by returning False (see `OnToken`)."""
    if forced is not None and len(forced) != len(prompts):
        raise ValueError(f"forced has {len(forced)} entries for {len(prompts)} prompts")
    if n < 1 or max_new_tokens < 1 or batch_size < 1:
        raise ValueError("n, max_new_tokens and batch_size must be >= 1")
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError("temperature must be >= 0 and top_p in (0, 1]")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise ValueError("the tokenizer has neither a pad nor an EOS token")
    device = next(model.parameters()).device
    answer_close = tokenizer.convert_tokens_to_ids(ANSWER_CLOSE)
    stop_list = _stop_ids(model, tokenizer, stop_at_answer)
    stop = torch.tensor(stop_list, dtype=torch.long, device=device)
    tag_ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    mode_of = {tag_ids[THINK_ON]: "on", tag_ids[THINK_OFF]: "off"}

    def encode(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    rows = []
    for i, p in enumerate(prompts):
        pre = encode(forced[i]) if forced is not None and forced[i] else []
        ctx = encode(request_text(tokenizer, p)) + pre
        rows += [_Row(i, k, ctx, pre) for k in range(n)]

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(rows), desc="rollout", unit="sample")
    gen = torch.Generator(device=device).manual_seed(seed)
    cache_kw = _cache_kwarg(model)
    results = []
    was_training = model.training
    model.eval()  # no dropout while sampling
    try:
        with torch.inference_mode():
            for lo in range(0, len(rows), batch_size):
                results += _run_batch(model, rows[lo : lo + batch_size], pad_id=pad_id, stop=stop,
                                      answer_close=answer_close, max_new=max_new_tokens, temperature=temperature,
                                      top_p=top_p, gen=gen, cache_kw=cache_kw, fast=fast,
                                      on_finish=bar.update if bar is not None else None, on_token=on_token,
                                      first=lo)
    finally:
        model.train(was_training)
        if bar is not None:
            bar.close()

    samples = []
    for r, (ids, lps, reason) in zip(rows, results, strict=True):
        shown = ids[:-1] if reason == "eos" else ids  # the EOS token is not part of the response text
        full = r.forced + ids
        counts = dict.fromkeys(SEGMENTS, 0)
        for label in token_segments(full, tag_ids):
            counts[label] += 1
        counts["total"] = len(full)
        samples.append(Sample(
            prompt_index=r.prompt_index,
            sample_index=r.sample_index,
            text=tokenizer.decode(r.forced + shown, skip_special_tokens=False),
            token_ids=ids,
            logprobs=lps,
            finish_reason=reason,
            forced_ids=r.forced,
            forced_mode=mode_of.get(r.forced[-1]) if r.forced else None,
            segment_counts=counts,
        ))
    return samples
