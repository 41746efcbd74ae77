"""Self-speculative decoding: the checkpoint's own MTP module drafts, the main model verifies.

Pretraining keeps a DeepSeek-V3-style MTP module (`kat_core.model.mtp`): from the main model's last hidden
state at position i and the embedding of token i+1 it predicts token i+2. Decoding uses it as a draft model
that costs one transformer block:

    step:  inputs [t, d1 .. dD] at positions p+1 .. p+1+D  ->  one forward of the main model (L = 1 + D tokens)
           accept the longest prefix of drafts the main model agrees with (a of them), then draw one more
           token from the main model's distribution after them: 1 + a tokens for one forward
           the MTP module reads the accepted positions' hidden states and drafts the next D tokens

Draft j > 1 feeds the module its own output as if it were the main model's hidden state at the next position
(the chain the MTP loss trained at depth 1 only; a checkpoint with several modules still drafts through the
first, whose inputs are always committed tokens).

- Greedy: a draft is accepted when it is the main model's argmax, so the output is plain greedy decoding's
  (up to float rounding: a forward over L tokens sums in another order than L forwards of one).
- Sampling: lossless speculative sampling (Leviathan et al. 2023; Chen et al. 2023): draft d ~ q is accepted
  with probability min(1, p(d) / q(d)); at the first rejection the token is drawn from max(0, p - q)
  renormalised. Each emitted token is then distributed as p, the main model's distribution at the sampling
  temperature and top-p, exactly as plain sampling draws it. Log-probabilities are the main model's raw ones
  (temperature 1), as `rollout.generate` returns them.

Rows do not move in lockstep: a row that accepts fewer drafts leaves "holes", columns of the KV slab its mask
hides from then on (its positions count real tokens only), so no cache is rolled back and every row keeps
its own place. The MTP module's cache has the same columns and the same mask. Needs the fast Llama step
(`rollout._LlamaStep`) and its slab cache; `generate(draft=...)` falls back to plain decoding otherwise.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers.cache_utils import Cache

from kat_core.decoding import (
    FinishReason,
    OnToken,
    _LlamaStep,
    _new_cache,
    _prefill,
    _Row,
    _SlabLayer,
    _survivors,
    draw,
    nucleus_probs,
)

log = logging.getLogger(__name__)


def load_drafter(model_dir: str | Path, model, draft_tokens: int):
    """The MTP heads to draft with for the model loaded from `model_dir`, or None for plain decoding: when
    `draft_tokens` is 0, or (with one log line) when the directory holds no MTP weights, e.g. a foreign HF model."""
    if draft_tokens <= 0:
        return None
    from kat_core.model.checkpoint import load_mtp_heads

    return drafter(load_mtp_heads(model_dir, model), draft_tokens, model_dir)


def drafter(heads, draft_tokens: int, source: str | Path):
    """`heads` (already loaded from `source`, or None) to draft with, or None for plain decoding: when
    `draft_tokens` is 0, or (with one log line) when there are no MTP modules."""
    if draft_tokens <= 0:
        return None
    if heads is None or len(heads) == 0:
        log.warning("speculative decoding: %s has no MTP weights to draft with; decoding plainly", source)
        return None
    return heads.eval()


def acceptance(samples: Iterable) -> dict[str, dict[str, float]]:
    """Drafts proposed and accepted per grammar segment over `samples` (rollout Samples), with the rate:
    {segment: {"proposed": n, "accepted": k, "rate": k / n}}; {} when nothing was drafted."""
    tally: dict[str, list[int]] = {}
    for sample in samples:
        for segment, (proposed, accepted) in sample.draft_counts.items():
            t = tally.setdefault(segment, [0, 0])
            t[0], t[1] = t[0] + proposed, t[1] + accepted
    return {k: {"proposed": n, "accepted": a, "rate": round(a / n, 4)} for k, (n, a) in sorted(tally.items()) if n}


@dataclass
class DraftStats:
    """Per generated token of one row: whether a draft was proposed for it, and whether it was accepted."""

    proposed: list[bool]
    accepted: list[bool]


class MTPDrafter:
    """The first MTP module as plain tensors, run by the fast step's block code, with its own slab cache."""

    def __init__(self, step: _LlamaStep, heads, capacity: int, max_rows: int):
        module = heads[0]
        self.step = step
        self.hnorm = (module.hnorm.weight, module.hnorm.variance_epsilon)
        self.enorm = (module.enorm.weight, module.enorm.variance_epsilon)
        self.norm = (module.norm.weight, module.norm.variance_epsilon)
        self.proj = module.proj.weight
        self.block = [step.layer_weights(module.block)]
        # the block's own RoPE (plain, with the base model's theta), for the positions the step reaches
        self.cos, self.sin = step.rope_tables(heads.rotary, step.cos.shape[0], self.proj)
        self.cache = Cache(layers=[_SlabLayer(capacity, max_rows)])

    def __call__(self, hidden: torch.Tensor, next_tok: torch.Tensor, pos: torch.Tensor,
                 mask: torch.Tensor | None) -> torch.Tensor:
        """hidden (rows, L, H): the main model's last hidden states at positions `pos` (rows, L); next_tok: the
        token after each -> the block's output (rows, L, H), written to the module's cache: `logits` of it
        predict the token two ahead, and it is a chained draft's `hidden`."""
        rms = self.step.rms
        x = F.linear(torch.cat([rms(hidden, self.hnorm), rms(F.embedding(next_tok, self.step.embed), self.enorm)],
                               dim=-1), self.proj)
        return self.step.blocks(x, self.cos[pos][:, None], self.sin[pos][:, None], self.cache, mask, self.block)

    def logits(self, out: torch.Tensor) -> torch.Tensor:
        return F.linear(self.step.rms(out, self.norm), self.step.head)


def _attention_mask(old: torch.Tensor, fresh: torch.Tensor) -> torch.Tensor:
    """(rows, 1, new, kv) for `new` queries written after the columns `old` (rows, kv - new: which of them each
    row keeps): they see those, and `fresh` (rows, 1, new, new) of the new ones (causal, less any holes)."""
    rows, new = fresh.shape[0], fresh.shape[-1]
    return torch.cat([old[:, None, None, :].expand(rows, 1, new, old.shape[1]), fresh], dim=-1)


def _draft_stats(steps: list[tuple[int, int]], length: int, D: int) -> DraftStats:
    """Which of a row's `length` generated tokens had a draft and which drafts stood, from its verifying steps:
    (index of the first token the step drafted, drafts accepted); a step drafts D tokens from there."""
    stats = DraftStats([False] * length, [False] * length)
    for first, accepted in steps:
        for j in range(D):
            if first + j < length:
                stats.proposed[first + j] = True
                stats.accepted[first + j] = j < accepted
    return stats


def _accept(logits: torch.Tensor, drafts: torch.Tensor, q: torch.Tensor | None, temperature: float,
            top_p: float, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """logits (rows, L, V) of the main model at the inputs [t, d1 .. dD]; drafts (rows, D) drawn from q (rows,
    D, V), or greedy (q None) -> (a: drafts accepted per row, the token drawn after them)."""
    rows, D = drafts.shape
    at = torch.arange(rows, device=drafts.device)
    if q is None:  # greedy: a draft stands when it is the main model's argmax
        target = logits.argmax(-1)
        a = (target[:, :D] == drafts).long().cumprod(1).sum(1)
        return a, target[at, a]
    p = nucleus_probs(logits.float(), temperature, top_p)
    p = p / p.sum(-1, keepdim=True)
    q = q / q.sum(-1, keepdim=True)
    pd, qd = p[:, :D].gather(-1, drafts[..., None])[..., 0], q.gather(-1, drafts[..., None])[..., 0]
    u = torch.rand(rows, D, generator=gen, device=drafts.device)
    a = (u * qd < pd).long().cumprod(1).sum(1)  # accepted with probability min(1, p(d) / q(d))
    # after a rejection at j: max(0, p_j - q_j); when every draft stood: p after the last one
    residual = torch.cat([(p[:, :D] - q).clamp_min(0), p[:, D:]], dim=1)[at, a]
    empty = residual.sum(-1, keepdim=True) <= 0  # p == q up to rounding: the residual is p itself
    residual = torch.where(empty, p[at, a], residual)
    return a, draw(residual, gen)


def run_speculative(model, heads, rows: list[_Row], *, draft_tokens: int, pad_id: int, stop: torch.Tensor,
                    answer_close: int, max_new: int, temperature: float, top_p: float, gen: torch.Generator,
                    cache_kw: str, on_finish=None, on_token: OnToken | None = None, first: int = 0,
                    on_done=None, guard=None) -> list[tuple[list[int], list[float], FinishReason, DraftStats]]:
    """Decode one batch speculatively (see the module docstring) -> per row (ids, log-probs, finish reason,
    draft stats). `on_token`, `first`, `on_done(index, row, ids, logprobs, finish)` and `on_finish(count)` as
    in `rollout._run_batch`. `guard` (`kat_core.verdict.VerdictGuard`) constrains the main model's picks, so
    the drafts of a verdict are verified against the guarded distribution."""
    device = next(model.parameters()).device
    D, L = draft_tokens, draft_tokens + 1
    width, b = max(len(r.context) for r in rows), len(rows)
    # each step writes L columns per row and makes >= 1 token; a chain of drafts writes D - 1 more, tentatively
    capacity = width + max_new * L + D
    cache = _new_cache(model, capacity, b)
    logits, mask, _, hidden = _prefill(model, rows, cache, pad_id=pad_id, cache_kw=cache_kw, end=width,
                                       capacity=capacity, hidden=True)
    step = _LlamaStep(model, width + max_new + L + D)
    drafter = MTPDrafter(step, heads, capacity, b)
    greedy = temperature == 0
    arange = torch.arange(b, device=device)  # row indices, cut to the live rows

    def pick(lg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if greedy:
            return lg.argmax(-1), None
        probs = nucleus_probs(lg, temperature, top_p)
        return draw(probs, gen), probs

    def draft(new_hidden, new_next, new_pos, new_mask, last, live_mask) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The MTP module reads the new columns, then drafts D tokens from column `last` of each row."""
        n = len(last)
        at = arange[:n]
        h = drafter(new_hidden, new_next, new_pos, new_mask)[at, last]  # logits only where the drafts start
        lg, p = drafter.logits(h), new_pos[at, last]
        layer = drafter.cache.layers[0]
        committed = layer.end
        toks, dists = [], []
        for j in range(D):
            t, q = pick(lg.float())
            toks.append(t)
            dists.append(q)
            if j + 1 < D:  # a tentative column: the module's own output stands in for the main model's state
                p = p + 1
                seen = torch.cat([live_mask, live_mask.new_ones(n, j + 1)], dim=1)
                h = drafter(h[:, None], t[:, None], p[:, None], seen[:, None, None, :])[:, 0]
                lg = drafter.logits(h)
        layer.end = committed  # the next step writes over the tentative columns
        layer._refresh()
        return torch.stack(toks, 1), None if greedy else torch.stack(dists, 1)

    # the first token, from the prefill; then the MTP module over the context: column i reads the main state at
    # i and token i+1 (the next context token, or the first drawn one at the last column)
    if guard is not None:  # per row: whether its judge is open after the tokens emitted so far
        last_ctx, judge_open = guard.start([r.context for r in rows], device)
        tok, _ = pick(guard.mask(logits.float(), last_ctx, judge_open))
        judge_open = guard.advance(judge_open, tok)
    else:
        tok, _ = pick(logits.float())
    first_lp = torch.log_softmax(logits.float(), -1).gather(1, tok[:, None])[:, 0]
    ctx = torch.full((b, width), pad_id, dtype=torch.long, device=device)
    for i, r in enumerate(rows):
        ctx[i, width - len(r.context):] = torch.tensor(r.context, device=device)
    ctx_pos = (mask[:, :width].long().cumsum(-1) - 1).clamp_min(0)
    # every column sees itself too: a padding column then attends to something (no NaN), and no real one sees it
    causal_ctx = torch.ones(width, width, dtype=torch.bool, device=device).tril()
    ctx_mask = (mask[:, None, None, :width] & causal_ctx) | torch.eye(width, dtype=torch.bool, device=device)
    drafts, q = draft(hidden, torch.cat([ctx[:, 1:], tok[:, None]], dim=1), ctx_pos, ctx_mask,
                      torch.full((b,), width - 1, device=device), mask[:, :width])
    pos = ctx_pos[:, -1]

    out_ids = torch.full((b, max_new + L), pad_id, dtype=torch.long, device=device)
    out_lp = torch.zeros((b, max_new + L), dtype=torch.float32, device=device)
    steps: list[list[tuple[int, int]]] = [[] for _ in rows]  # per row: (first drafted token, accepted) a step
    drawn = torch.zeros(b, dtype=torch.long, device=device)
    lengths, reasons = [max_new] * b, ["length"] * b
    ids_of = list(range(first, first + b))
    active = torch.arange(b, device=device)
    span = torch.arange(L, device=device)
    causal = torch.ones(L, L, dtype=torch.bool, device=device).tril()[None, None]
    longest = 1  # at least as many tokens as any row has drawn: rows far from their budget need no check
    # what the last step emitted per live row: tokens (rows, L), how many, and (for the next step) their number
    # of accepted drafts; the prefill emitted one token
    emitted, lps = F.pad(tok[:, None], (0, D), value=pad_id), F.pad(first_lp[:, None], (0, D))
    count, a = torch.ones(b, dtype=torch.long, device=device), torch.zeros(b, dtype=torch.long, device=device)
    start, end = 0, width
    while True:
        # --- the emitted tokens end a row at a stop token, at its budget, or where its listener says so; most
        # steps have none of these (a quick look: no stop token among the L, every row far from its budget)
        drawn_before = drawn[active]
        stop_hit = torch.isin(emitted, stop)
        check = on_token is not None or longest >= max_new or bool(stop_hit.any())
        if check:
            room = max_new - drawn_before
            hit = stop_hit & (span[None] < count[:, None])
            stop_at = torch.where(hit.any(1), hit.int().argmax(1) + 1, L + 1)
            count = torch.minimum(torch.minimum(count, stop_at), room)
            stopped = stop_at <= count
            at_budget = count == room
            ended = torch.zeros_like(stopped)
        if on_token is not None:
            for k, (i, c, s, full) in enumerate(zip(active.tolist(), count.tolist(), stopped.tolist(),
                                                    at_budget.tolist(), strict=True)):
                for j in range(c):
                    t = int(emitted[k, j])
                    last = j == c - 1
                    finish = (("stop" if t == answer_close else "eos") if s else "length" if full else None) \
                        if last else None
                    if on_token(ids_of[i], t, finish) is False and finish is None:  # ended here: "length"
                        count[k], ended[k], stopped[k], at_budget[k] = j + 1, True, False, False
                        break
        # all L columns are written: those past `count` are overwritten by the next step or cut by the length
        cols = drawn_before[:, None] + span[None]
        out_ids[active[:, None], cols] = emitted
        out_lp[active[:, None], cols] = lps
        drawn_after = drawn_before + count
        drawn[active] = drawn_after
        done = (stopped | at_budget | ended) if check else None
        if check and bool(done.any()):
            finished = active[done]
            for i, t_last, by_stop in zip(finished.tolist(), out_ids[finished, drawn[finished] - 1].tolist(),
                                          stopped[done].tolist(), strict=True):
                lengths[i] = int(drawn[i])
                reasons[i] = ("stop" if t_last == answer_close else "eos") if by_stop else "length"
                if on_done is not None:
                    on_done(ids_of[i], rows[i], out_ids[i, : lengths[i]].tolist(), out_lp[i, : lengths[i]].tolist(),
                            reasons[i], _draft_stats(steps[i], lengths[i], D))
            if on_finish:
                on_finish(int(done.sum()))
            keep = _survivors(done)
            active, tok, pos, drafts = active[keep], emitted[keep], pos[keep], drafts[keep]
            tok, drawn_after = tok[arange[: len(keep)], count[keep] - 1], drawn_after[keep]
            q = q[keep] if q is not None else None
            if not len(keep):
                break
            cache.batch_select_indices(keep)
            drafter.cache.batch_select_indices(keep)
            mask[: len(keep)] = mask[keep]
        else:
            tok = emitted[arange[: len(active)], count - 1]
        n = len(active)
        # --- one forward of the main model over [t, d1 .. dD]; the MTP module then drafts from what stood
        inputs = torch.cat([tok[:, None], drafts], dim=1)
        positions = pos[:, None] + 1 + span[None]
        seen = mask[:n, start:end]
        logits, hidden = step.run(inputs, positions, cache, _attention_mask(seen, causal.expand(n, 1, L, L)))
        if guard is None:
            a, nxt = _accept(logits, drafts, q, temperature, top_p, gen)
        else:  # the judge's state at each input: after t, then after each draft
            opens = [judge_open[active]]
            for j in range(D):
                opens.append(guard.advance(opens[-1], drafts[:, j]))
            opens = torch.stack(opens, 1)
            a, nxt = _accept(guard.mask(logits.float(), inputs, opens), drafts, q, temperature, top_p, gen)
            judge_open[active] = guard.advance(opens[arange[:n], a], nxt)
        for i, first_drafted, accepted in zip(active.tolist(), drawn_after.tolist(), a.tolist(), strict=True):
            steps[i].append((first_drafted, accepted))
        emitted = torch.cat([drafts, nxt[:, None]], dim=1).scatter_(1, a[:, None], nxt[:, None])
        lps = torch.log_softmax(logits.float(), -1).gather(2, emitted[..., None])[..., 0]
        count = a + 1
        longest += L
        valid = span[None] <= a[:, None]  # the rejected drafts' columns become holes
        mask[:n, end : end + L] = valid
        end += L
        pos = pos + 1 + a
        drafts, q = draft(hidden, emitted, positions, _attention_mask(seen, valid[:, None, None, :] & causal), a,
                          mask[:n, start:end])

    out_ids, out_lp = out_ids.cpu(), out_lp.cpu()
    return [(out_ids[i, : lengths[i]].tolist(), out_lp[i, : lengths[i]].tolist(), reasons[i],
             _draft_stats(steps[i], lengths[i], D)) for i in range(b)]
