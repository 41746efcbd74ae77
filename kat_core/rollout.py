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

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch

from kat_core.chat import request_text
from kat_core.decoding import (  # noqa: F401  (_LlamaStep, _pick, _SlabLayer: the tests reach them here too)
    FinishReason,
    OnToken,
    _cache_kwarg,
    _is_slab,
    _LlamaStep,
    _new_cache,
    _pick,
    _prefill,
    _Row,
    _SlabLayer,
    _survivors,
)
from kat_core.format import ANSWER_CLOSE, SEGMENTS, SPECIAL_TOKENS, THINK_OFF, THINK_ON, token_segments
from kat_core.speculative import run_speculative
from kat_core.verdict import VerdictGuard

log = logging.getLogger(__name__)

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
    # speculative decoding only: per grammar segment, [drafts proposed, drafts accepted] for its tokens
    draft_counts: dict[str, list[int]] = field(default_factory=dict)

    @property
    def num_generated(self) -> int:
        return len(self.token_ids)


def _stop_ids(model, tokenizer, stop_at_answer: bool) -> list[int]:
    ids = set()
    for source in (tokenizer.eos_token_id, getattr(model.generation_config, "eos_token_id", None)):
        if source is not None:
            ids.update([source] if isinstance(source, int) else source)
    eos = sorted(ids)
    if stop_at_answer:
        eos.append(tokenizer.convert_tokens_to_ids(ANSWER_CLOSE))
    return eos


def _tell(on_token: OnToken, rows: list[int], tok: torch.Tensor, stopped: torch.Tensor, last: torch.Tensor,
          answer_close: int) -> torch.Tensor:
    """Hand each live row's new token to `on_token` (`rows`: the index each reports by); -> the rows it ended."""
    ended = []
    for row, t, s, at_budget in zip(rows, tok.tolist(), stopped.tolist(), last.tolist(), strict=True):
        finish = ("stop" if t == answer_close else "eos") if s else "length" if at_budget else None
        ended.append(on_token(row, t, finish) is False and finish is None)
    return torch.tensor(ended, dtype=torch.bool, device=tok.device)


# admit(free_rows, span) -> requests to join a running batch now: at most free_rows of them, each with a context
# (prompt and forced prefix) and token budget that fit in span positions, as (the index its on_token and
# on_sample calls go by, the request, its forced prefix or None); called between decode steps
Admit = Callable[[int, int], list[tuple[int, "str | list[dict]", "str | None"]]]
# on_sample(index, sample): a row's Sample the moment the row finishes
OnSample = Callable[[int, "Sample"], None]


def _run_batch(model, rows: list[_Row], *, pad_id: int, stop: torch.Tensor, answer_close: int, max_new: int,
               temperature: float, top_p: float, gen: torch.Generator, cache_kw: str, fast: bool, on_finish=None,
               on_token: OnToken | None = None, first: int = 0,
               admit: Callable[[int, int], list[tuple[int, _Row]]] | None = None, max_rows: int = 0,
               on_done: Callable[[int, _Row, list[int], list[float], FinishReason], None] | None = None,
               guard: VerdictGuard | None = None):
    """Decode one batch; returns per row (generated ids, log-probs, finish reason). `on_token` hears every
    token as it is drawn, with `first` + the row's index in this batch.

    With `admit` (a slab cache only), rows join while the batch runs (continuous batching, up to `max_rows`
    live rows): each is prefilled alone, its keys and values placed so that it ends at the same slab column as
    the live rows (keys carry their rotary positions, so a row's columns are storage, not position), and it
    draws its first token with the others at the next step. Admitted rows are reported by `on_token` and
    `on_done` only (the return value has the first rows), and run to `max_new` tokens unless `on_token` ends
    them. `on_done(index, row, ids, logprobs, finish)` hears every row the moment it finishes. `guard` keeps an
    open judge's verdict to the grammar's two words (`kat_core.verdict`)."""
    device = next(model.parameters()).device
    width = max(len(r.context) for r in rows)
    # span: the positions a row may reach (a joining row too: `admit` is told). With admission the window moves
    # right for as long as rows keep coming: the slab holds three spans of columns, the live rows end at column
    # >= span (a joining row's context fits left of that end), and the window moves back left when it is a span
    # from the slab's end
    span = width + max_new
    capacity = 3 * span if admit is not None else span
    end = span if admit is not None else width
    cache = _new_cache(model, capacity, max(len(rows), max_rows))
    logits, mask, pos = _prefill(model, rows, cache, pad_id=pad_id, cache_kw=cache_kw, end=end, capacity=capacity)
    slab = _is_slab(cache)
    step_fn = _LlamaStep(model, span) if fast and _LlamaStep.supports(model, cache) else None
    if step_fn is None:
        admit = None  # admission needs the fast step (and the slab it requires): their columns are set here
    if admit is not None:  # room for the rows that join
        mask = torch.cat([mask, mask.new_zeros(max(max_rows - len(rows), 0), capacity)])
    all_rows = list(rows)

    b = len(rows)
    out_ids = torch.full((b, max_new), pad_id, dtype=torch.long, device=device)
    out_lp = torch.zeros((b, max_new), dtype=torch.float32, device=device)
    drawn = torch.zeros(b, dtype=torch.long, device=device)  # tokens drawn per row
    budget = torch.tensor([min(max_new, span - len(r.context)) for r in rows], device=device)
    lengths = [max_new] * b
    reasons: list[FinishReason] = ["length"] * b
    ids_of = list(range(first, first + b))  # the index each row reports to on_token by
    if guard is not None:  # per row: the last token and whether its judge is open
        last_tok, judge_open = guard.start([r.context for r in rows], device)

    active = torch.arange(b, device=device)  # row of each live row
    start = end - width  # the live column window (shared by the mask and the slab cache)
    padded = not bool(mask[:, start:end].all())
    while True:
        logits = logits.float()
        allowed = logits if guard is None else guard.mask(logits, last_tok[active], judge_open[active])
        tok = _pick(allowed, temperature, top_p, gen)
        if guard is not None:
            last_tok[active], judge_open[active] = tok, guard.advance(judge_open[active], tok)
        column = drawn[active]
        out_ids[active, column] = tok
        out_lp[active, column] = torch.log_softmax(logits, dim=-1).gather(1, tok[:, None])[:, 0]
        drawn[active] += 1
        stopped = torch.isin(tok, stop)
        last = drawn[active] == budget[active]
        done = stopped | last
        if on_token is not None:
            done |= _tell(on_token, [ids_of[i] for i in active.tolist()], tok, stopped, last, answer_close)
        if bool(done.any()):
            for i, t, by_stop in zip(active[done].tolist(), tok[done].tolist(), stopped[done].tolist(), strict=True):
                lengths[i] = int(drawn[i])
                reasons[i] = ("stop" if t == answer_close else "eos") if by_stop else "length"  # or on_token's
                if on_done is not None:
                    on_done(ids_of[i], all_rows[i], out_ids[i, : lengths[i]].tolist(),
                            out_lp[i, : lengths[i]].tolist(), reasons[i])
            if on_finish:
                on_finish(int(done.sum()))
            keep = _survivors(done)
            # finished rows leave: the cache, the mask, positions and inputs keep only the live rows
            active, tok, pos = active[keep], tok[keep], pos[keep]
            n = len(keep)
            if n or admit is not None:  # (a row may join a batch that just emptied: the cache must be empty too)
                cache.batch_select_indices(keep)
                mask[:n, start:end] = mask[keep, start:end]
            if n and slab and padded:
                # columns that are padding in every remaining row are dead: cut them from the window
                lead = int(mask[:n, start:end].any(0).int().argmax())  # first column some row uses
                if lead:
                    start += lead
                    for layer in cache.layers:
                        layer.drop_left(lead)
                padded = not bool(mask[:n, start:end].all())
            elif not n and admit is not None:  # an empty batch has an empty window: a joining row starts it anew
                for layer in cache.layers:
                    layer.drop_left(end - start)
                start = end
        n = len(active)
        if n:
            mask[:n, end] = True
            end += 1
            pos = pos + 1
            # without padding no mask is needed, and SDPA takes its faster unmasked path
            attn = mask[:n, start:end] if padded else None
            if step_fn is not None:
                logits = step_fn(tok, pos, cache, attn)
            else:
                logits = model(input_ids=tok[:, None], attention_mask=attn, position_ids=pos[:, None],
                               use_cache=True, **{cache_kw: cache}).logits[:, -1]
        joining = admit(max(len(rows), max_rows) - n, span) if admit is not None else []
        if not joining:
            if not n:
                break
            continue
        # --- rows join: prefilled alone, then placed to end at column `end` like the live rows
        if end + span > capacity:  # no room for another span of steps: move the live window back left
            for layer in cache.layers:
                layer.move_window(span - (end - start))
            mask[:n, span - (end - start):span] = mask[:n, start:end].clone()
            start, end = span - (end - start), span
        new_rows = [r for _, r in joining]
        k, new_width = len(new_rows), max(len(r.context) for r in new_rows)
        new_cache = _new_cache(model, new_width, k)
        new_logits, new_mask, new_pos = _prefill(model, new_rows, new_cache, pad_id=pad_id, cache_kw=cache_kw,
                                                 end=new_width, capacity=new_width)
        new_start = min(start, end - new_width)
        mask[:n, new_start:start] = False  # columns the live rows never used now enter the window
        mask[n:n + k] = False
        mask[n:n + k, end - new_width:end] = new_mask
        for layer, new_layer in zip(cache.layers, new_cache.layers, strict=True):
            layer.add_rows(new_layer, new_start)
        start = new_start
        padded = padded or not bool(mask[:n + k, start:end].all())
        index = torch.arange(len(ids_of), len(ids_of) + k, device=device)
        ids_of += [i for i, _ in joining]
        all_rows += new_rows
        lengths += [max_new] * k
        reasons += ["length"] * k
        out_ids = torch.cat([out_ids, torch.full((k, max_new), pad_id, dtype=torch.long, device=device)])
        out_lp = torch.cat([out_lp, torch.zeros((k, max_new), dtype=torch.float32, device=device)])
        drawn = torch.cat([drawn, torch.zeros(k, dtype=torch.long, device=device)])
        budget = torch.cat([budget, torch.tensor([min(max_new, span - len(r.context)) for r in new_rows],
                                                 device=device)])
        if guard is not None:
            new_last, new_open = guard.start([r.context for r in new_rows], device)
            last_tok, judge_open = torch.cat([last_tok, new_last]), torch.cat([judge_open, new_open])
        active, pos = torch.cat([active, index]), torch.cat([pos, new_pos])
        logits = torch.cat([logits, new_logits]) if n else new_logits
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
    on_sample: OnSample | None = None,
    admit: Admit | None = None,
    max_rows: int = 64,
    draft=None,
    draft_tokens: int = 1,
    verdict_guard: bool = True,
) -> list[Sample]:
    """Sample `n` responses per prompt -> `len(prompts) * n` Samples, ordered by (prompt, sample).

    `forced[i]` is prompt i's forced prefix text (e.g. `forced_prefix(judge, "on")`) or None; all n samples
    of a prompt share it (to sample both modes, list the prompt twice). `temperature=0` is greedy decoding.
    A row stops at `</answer>` (when `stop_at_answer`), at an EOS token, or after `max_new_tokens`.
    `fast=False` runs every decode step through the model's own forward even for a Llama-architecture model
    (the fast step is checked against it in the tests). `on_token(row, token_id, finish)` hears each token the
    moment it is drawn (streaming) and may end a row by returning False (see `OnToken`); `on_sample(row,
    sample)` gets each Sample the moment its row finishes.

    `admit` (a server's continuous batching): between decode steps, requests join the running batch (up to
    `max_rows` live rows, one sample each, under this call's sampling settings), answered through `on_token`
    and `on_sample` only; the call returns when no row is left and none joins. Greedy rows decode as they
    would in a batch of their own (up to float rounding). Needs a Llama-architecture model (the fast step);
    other models decode the first rows only.

    `draft` (the checkpoint's MTPHeads) decodes speculatively, `draft_tokens` drafts a step
    (`kat_core.speculative`): the same outputs for greedy decoding, the same distribution for sampling, fewer
    forwards of the model. Without admission and for Llama-architecture models only; otherwise plain.

    `verdict_guard`: while a response's judge is open, the word after its colon is one of the grammar's two
    verdicts (`kat_core.verdict`; a tokenizer without the grammar has no guard)."""
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
    def sample_of(r: _Row, ids: list[int], lps: list[float], reason: FinishReason, stats=None) -> Sample:
        shown = ids[:-1] if reason == "eos" else ids  # the EOS token is not part of the response text
        full = r.forced + ids
        labels = token_segments(full, tag_ids)
        counts = dict.fromkeys(SEGMENTS, 0)
        for label in labels:
            counts[label] += 1
        counts["total"] = len(full)
        drafts: dict[str, list[int]] = {}
        if stats is not None:
            for label, was_proposed, was_accepted in zip(labels[len(r.forced):], stats.proposed, stats.accepted,
                                                         strict=True):
                if was_proposed:
                    tally = drafts.setdefault(label, [0, 0])
                    tally[0] += 1
                    tally[1] += was_accepted
        return Sample(prompt_index=r.prompt_index, sample_index=r.sample_index,
                      text=tokenizer.decode(r.forced + shown, skip_special_tokens=False), token_ids=ids,
                      logprobs=lps, finish_reason=reason, forced_ids=r.forced,
                      forced_mode=mode_of.get(r.forced[-1]) if r.forced else None, segment_counts=counts,
                      draft_counts=drafts)

    def joining(free: int, span: int) -> list[tuple[int, _Row]]:
        out = []
        for index, request, prefix in admit(free, span):
            pre = encode(prefix) if prefix else []
            out.append((index, _Row(index, 0, encode(request_text(tokenizer, request)) + pre, pre)))
        return out

    def done(index: int, r: _Row, ids: list[int], lps: list[float], reason: FinishReason, stats=None) -> None:
        on_sample(index, sample_of(r, ids, lps, reason, stats))

    gen = torch.Generator(device=device).manual_seed(seed)
    cache_kw = _cache_kwarg(model)
    guard = VerdictGuard.of(tokenizer) if verdict_guard else None
    speculative = draft is not None and len(draft) > 0 and admit is None and fast \
        and _LlamaStep.supports(model, _new_cache(model, 1, 1))
    if draft is not None and not speculative:
        log.warning("speculative decoding needs a Llama-architecture model, the fast step and no admission of "
                    "joining requests; decoding plainly")
    results = []
    was_training = model.training
    model.eval()  # no dropout while sampling
    try:
        with torch.inference_mode():
            for lo in range(0, len(rows), batch_size):
                if speculative:
                    results += run_speculative(
                        model, draft, rows[lo : lo + batch_size], draft_tokens=draft_tokens, pad_id=pad_id,
                        stop=stop, answer_close=answer_close, max_new=max_new_tokens, temperature=temperature,
                        top_p=top_p, gen=gen, cache_kw=cache_kw, on_finish=bar.update if bar is not None else None,
                        on_token=on_token, first=lo, on_done=done if on_sample is not None else None, guard=guard)
                    continue
                results += _run_batch(model, rows[lo : lo + batch_size], pad_id=pad_id, stop=stop,
                                      answer_close=answer_close, max_new=max_new_tokens, temperature=temperature,
                                      top_p=top_p, gen=gen, cache_kw=cache_kw, fast=fast,
                                      on_finish=bar.update if bar is not None else None, on_token=on_token,
                                      first=lo, admit=joining if admit is not None else None, max_rows=max_rows,
                                      on_done=done if on_sample is not None else None, guard=guard)
    finally:
        model.train(was_training)
        if bar is not None:
            bar.close()

    return [sample_of(r, *result) for r, result in zip(rows, results, strict=True)]
