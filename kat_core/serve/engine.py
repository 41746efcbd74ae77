"""Dynamic batching: concurrent requests share one rollout `generate` call.

One worker thread owns the model (torch runs there and nowhere else). It waits for a request, then keeps
collecting, and runs what it holds as one batch when
- it holds `max_rows` rows (a request asks for n rows), or
- `max_delay_ms` have passed since the first request, or
- it holds at least as many rows as the previous batch had, no request has come for `max_wait_ms`, and the
  front end (the server's event loop) has no request in hand that it has not passed on yet (`settle`).
The previous batch is the estimate of how many clients are active: clients that send their next request
when the last one returns come back as a wave, spread out by the time the server takes to write the
responses and the clients take to send again; waiting for the wave to arrive (bounded by `max_delay_ms`)
keeps their requests in one batch instead of cutting it at the first pause. A lone client pays one idle gap.
While a batch runs, new requests queue up and the next batch takes them all at once.

Requests in one `generate` call must share temperature and top-p, so a batch is split into groups by
(temperature, top_p, seed): a request with a seed and temperature > 0 runs in its own seeded call, which
makes its sample reproducible; unseeded sampling draws from a seed that advances with every call. Token
budgets may differ within a group: each row leaves the call at its own budget, which gives exactly the tokens
that budget alone would have produced (tokens are drawn left to right).

Every token reaches its request's `on_token` the moment it is drawn (the server streams it); a listener that
returns False (its client left) frees the row at once. A request is answered the moment its last sample ends.

Continuous batching: while a call runs, requests that arrive join it between decode steps (`rollout.generate`'s
`admit`) when they can share it: same temperature and top-p, unseeded, rows free, context and budget within
the call's positions. The first that cannot waits, with everything behind it, for the next call. So a request
does not wait for a running batch to finish before its first token.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

log = logging.getLogger(__name__)


@dataclass
class GenRequest:
    prompt: str | list[dict]  # a request, or a conversation for a model with a chat template
    forced: str | None
    n: int = 1
    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    future: Future = field(default_factory=Future)  # -> list of n rollout Samples
    # on_token(sample_index, token_id, finish): each token as it is drawn, in the engine's thread (`finish` None
    # until the sample's last token); returning False ends that sample there
    on_token: Callable[[int, int, str | None], bool | None] | None = None
    context_tokens: int = 0  # prompt and forced-prefix tokens (the server counts them): does it fit a running call


class BatchEngine:
    def __init__(self, model, tokenizer, *, max_rows: int = 64, max_wait_ms: float = 2.0, max_delay_ms: float = 200.0,
                 seed: int = 0, settle: Callable[[float], None] | None = None, draft=None, draft_tokens: int = 1):
        # `draft`: the model's MTP heads, to decode speculatively (kat_core.speculative); calls then admit no
        # requests while they run (speculation does not support joining rows yet), batches still form
        self.model, self.tokenizer, self.draft, self.draft_tokens = model, tokenizer, draft, draft_tokens
        self._next: tuple | None = None  # a model (tokenizer, draft) to switch to before the next batch
        self._swap_lock = threading.Lock()
        self.settle = settle  # settle(timeout): returns once the front end has handed over what it holds
        self.max_rows, self.max_wait, self.max_delay = max_rows, max_wait_ms / 1000, max_delay_ms / 1000
        self._seed = seed
        self._last_rows = 1  # rows of the previous batch: how many clients to expect back
        self._queue: queue.Queue[list[GenRequest] | None] = queue.Queue()
        self._held: list[list[GenRequest] | None] = []  # taken off the queue by `admit`, not admitted: next call
        self._thread: threading.Thread | None = None
        self.stats = {"batches": 0, "calls": 0, "requests": 0, "rows": 0, "max_rows": 0, "cancelled_rows": 0,
                      "admitted_rows": 0, "drafts": {}}  # drafts: {segment: [proposed, accepted]} (speculative)

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="kat-batch-engine", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout)
            self._thread = None

    def swap(self, model, tokenizer, draft=None) -> None:
        """Serve `model` (drafting with `draft` when speculative) from the next batch on (the batch running now
        finishes on the current one)."""
        with self._swap_lock:
            self._next = (model, tokenizer, draft)

    def submit(self, *requests: GenRequest) -> list[Future]:
        """Queue requests; requests submitted together are never split between batches."""
        if self._thread is None or not self._thread.is_alive():
            raise RuntimeError("the batch engine is not running")
        self._queue.put(list(requests))
        return [r.future for r in requests]

    # --- the worker thread ---------------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            batch, stopping = self._collect()
            if batch:
                self._run(batch)
            if stopping:
                return

    def _take(self, timeout: float | None = None) -> list[GenRequest] | None:
        """The next submission: one held back by `admit` first, else from the queue (queue.Empty after `timeout`;
        0: do not wait)."""
        if self._held:
            return self._held.pop(0)
        return self._queue.get_nowait() if timeout is not None and timeout <= 0 else self._queue.get(timeout=timeout)

    def _collect(self) -> tuple[list[GenRequest], bool]:
        first = self._take()
        if first is None:
            return [], True
        batch = list(first)
        rows = sum(r.n for r in batch)
        deadline = time.monotonic() + self.max_delay
        while rows < self.max_rows:
            left = deadline - time.monotonic()
            wait = left if rows < self._last_rows else min(self.max_wait, left)
            try:
                more = self._take(wait)
            except queue.Empty:
                more = self._settled(deadline)
                if more is None:
                    break
            if more is None:
                return batch, True
            batch += more
            rows += sum(r.n for r in more)
        self._last_rows = rows
        return batch, False

    def _settled(self, deadline: float) -> list[GenRequest] | None:
        """After an idle gap: let the front end finish handing over requests it is still parsing (a busy
        event loop makes gaps that are not idleness), then take what came; None if nothing did."""
        if self.settle is None or deadline <= time.monotonic():
            return None
        self.settle(deadline - time.monotonic())
        try:
            more = self._take(0)
        except queue.Empty:
            return None
        if more is None:  # a stop request: put it back for the loop to see
            self._held.insert(0, None)
            return None
        return more

    def _run(self, batch: list[GenRequest]) -> None:
        with self._swap_lock:
            if self._next is not None:
                (self.model, self.tokenizer, self.draft), self._next = self._next, None
        groups: dict[tuple, list[GenRequest]] = defaultdict(list)
        for r in batch:
            if r.future.set_running_or_notify_cancel():  # a cancelled request costs nothing
                seeded = r.temperature > 0 and r.seed is not None
                # a seeded sampling request gets a call of its own (keyed by its identity)
                groups[(r.temperature, r.top_p, id(r) if seeded else None)].append(r)
        self.stats["batches"] += 1
        self.stats["requests"] += len(batch)
        rows = sum(r.n for r in batch)
        self.stats["rows"] += rows
        self.stats["max_rows"] = max(self.stats["max_rows"], rows)
        for (temperature, top_p, alone), group in groups.items():
            try:
                self._generate(group, temperature, top_p, group[0].seed if alone else None)
            except Exception as e:  # a failed call fails its requests, never the worker
                log.exception("generation failed")
                for r in group:
                    if not r.future.done():
                        r.future.set_exception(e)

    def _generate(self, group: list[GenRequest], temperature: float, top_p: float, seed: int | None) -> None:
        from kat_core.rollout import generate

        # one row per sample; identical contexts (a request's n samples) still share one prefill in rollout
        prompts = [r.prompt for r in group for _ in range(r.n)]
        forced = [r.forced for r in group for _ in range(r.n)]
        owners = [(r, k) for r in group for k in range(r.n)]  # row index -> (its request, its sample index)
        answers: dict[int, list] = {id(r): [None] * r.n for r in group}
        drawn: dict[int, int] = {}
        seeded = seed is not None
        if seed is None:
            seed, self._seed = self._seed, self._seed + 1

        def on_token(row: int, token: int, finish: str | None) -> bool:
            request, k = owners[row]
            drawn[row] = drawn.get(row, 0) + 1
            if finish is None and drawn[row] == request.max_new_tokens:
                finish = "length"  # its own budget, within a call that runs to the group's largest
            listening = request.on_token is None or request.on_token(k, token, finish) is not False
            if not listening:
                self.stats["cancelled_rows"] += 1
            return finish is None and listening

        def on_sample(row: int, sample) -> None:
            for segment, (proposed, accepted) in sample.draft_counts.items():
                tally = self.stats["drafts"].setdefault(segment, [0, 0])
                tally[0], tally[1] = tally[0] + proposed, tally[1] + accepted
            request, k = owners[row]
            mine = answers[id(request)]
            mine[k] = sample
            if all(s is not None for s in mine) and not request.future.done():
                request.future.set_result(mine)  # answered now, while the call goes on for others

        def admit(free: int, span: int) -> list[tuple[int, str | list[dict], str | None]]:
            joining: list[tuple[int, str | list[dict], str | None]] = []
            while not self._held:  # something already waits for the next call: later ones queue behind it
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                fits = item is not None and sum(r.n for r in item) <= free - len(joining) and all(
                    r.temperature == temperature and r.top_p == top_p and not (r.temperature > 0 and r.seed is not None)
                    and r.context_tokens + r.max_new_tokens <= span for r in item)
                if not fits:
                    self._held.append(item)
                    break
                for r in item:
                    if not r.future.set_running_or_notify_cancel():
                        continue
                    answers[id(r)] = [None] * r.n
                    for k in range(r.n):
                        joining.append((len(owners), r.prompt, r.forced))
                        owners.append((r, k))
                self.stats["requests"] += len(item)
            self.stats["rows"] += len(joining)
            self.stats["admitted_rows"] += len(joining)
            return joining

        try:
            generate(self.model, self.tokenizer, prompts, forced=forced, n=1,
                     max_new_tokens=max(r.max_new_tokens for r in group), temperature=temperature, top_p=top_p,
                     seed=seed, batch_size=max(len(prompts), 1), on_token=on_token, on_sample=on_sample,
                     admit=None if seeded or self.draft is not None else admit, max_rows=self.max_rows,
                     draft=self.draft, draft_tokens=self.draft_tokens)
        except Exception as e:  # the rows that joined fail with the group
            for r, _ in owners:
                if not r.future.done():
                    r.future.set_exception(e)
            raise
        finally:
            self.stats["calls"] += 1
