"""The FastAPI app: OpenAI-compatible `/v1/models`, `/v1/chat/completions`, `/v1/completions` (and `/health`).

Handlers parse and check a request on the event loop, hand it to the batching engine (`engine.py`), and await
its future, so many requests wait at once while the model runs in one worker thread. The wire format, the
thinking control and the reasoning/content split are in `protocol.py`.

Streaming sends server-sent events (`data: {...}\\n\\n`, then `data: [DONE]`) in OpenAI's chunk format as the
tokens are drawn: the engine hands each token to the request's listener the moment the rollout samples it,
and the handler sends what it adds to the reasoning or the content (text that a later token may still change,
trailing whitespace before an `<answer>` or half a UTF-8 character, waits for that token). A client that
disconnects frees its row at the next decode step.
"""

from __future__ import annotations

import asyncio
import copy
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from kat_core.chat import completion_budget, control_tokens, has_template, request_text
from kat_core.serve.engine import BatchEngine, GenRequest
from kat_core.serve.protocol import (
    APIError,
    ChatRequest,
    CompletionRequest,
    Split,
    chat_messages,
    chat_prompt,
    check_supported,
    forced_for_request,
    split_response,
    thinking_mode,
)


def _sse(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj)}\n\n"


def generated_ids(sample) -> list[int]:
    """What the model generated, as its text shows it: without a final EOS token."""
    return list(sample.token_ids[:-1] if sample.finish_reason == "eos" else sample.token_ids)


def split_sample(sample, tokenizer) -> Split:
    """A sample's reasoning/content split; its forced prefix gives the context, not pieces or counts."""
    return split_response(list(sample.forced_ids) + generated_ids(sample), tokenizer,
                          prefilled=len(sample.forced_ids))


def finish_reason(sample) -> str:
    return "length" if sample.finish_reason == "length" else "stop"


def _settled(text: str, *, final: bool) -> str:
    """What of a growing text no later token can change: not half a UTF-8 character."""
    return text if final else text.rstrip("\ufffd")


class _Listener:
    """One streaming request's tokens, from the engine's thread to the event loop, as they are drawn."""

    def __init__(self, gen: GenRequest):
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.gone = threading.Event()  # the client left: the engine drops the rows at their next step
        self.n = gen.n
        gen.on_token = self.on_token

    def on_token(self, k: int, token: int, finish: str | None) -> bool:  # in the engine's thread
        self.loop.call_soon_threadsafe(self.queue.put_nowait, (k, token, finish))
        return not self.gone.is_set()

    async def tokens(self, future) -> AsyncIterator[tuple[int, int, str | None]]:
        """(sample index, token, finish) until every sample has finished; raises what the generation raised."""
        future.add_done_callback(lambda _: self.loop.call_soon_threadsafe(self.queue.put_nowait, None))
        left = self.n
        while left:
            item = await self.queue.get()
            if item is None:  # the call ended (its tokens were queued before this): an error, or nothing left
                future.result()
                return
            yield item
            left -= item[2] is not None


def longest_prompt_chars(tokenizer, model) -> int | None:
    """The most characters a prompt that fits the model's context can have (None: no context limit): each token
    spells at most its vocabulary entry's length in characters (a byte-level entry: one per byte, and a
    character is at least one byte), doubled for a normalizer that drops characters. Checked before the prompt
    is tokenized."""
    max_len = getattr(model.config, "max_position_embeddings", None)
    if not max_len:
        return None
    longest = max((len(t) for t in tokenizer.get_vocab()), default=1)
    return 2 * max_len * max(longest, 1)


def create_app(model, tokenizer, *, model_name: str, max_rows: int = 64, max_wait_ms: float = 2.0,
               max_delay_ms: float = 200.0, default_max_tokens: int = 256, seed: int = 0,
               source: str | None = None, draft=None, draft_tokens: int = 1) -> FastAPI:
    """An app serving `model` under the id `model_name`. The batching engine starts and stops with the app (its
    lifespan). `app.state.swap(model, tokenizer, source)` serves another model under the same id from the next
    batch on (a registry alias that moved); `source` (e.g. "kat v3") is what /health says is served. `draft`:
    the model's MTP heads, to decode speculatively with `draft_tokens` drafts a step (kat_core.speculative)."""
    # the worker thread gets its own tokenizer: an HF fast tokenizer mutates its state inside calls, and two
    # threads sharing one fail with "Already borrowed"
    loops: list[asyncio.AbstractEventLoop] = []

    async def ticks() -> None:
        for _ in range(4):  # read what sockets hold, run the new handlers, flush what they submitted
            await asyncio.sleep(0)

    def settle(timeout: float) -> None:
        """Called from the engine's thread: wait until the event loop has gone round a few times, so requests
        it is still parsing reach the engine before a batch closes."""
        if loops:
            try:
                asyncio.run_coroutine_threadsafe(ticks(), loops[0]).result(timeout)
            except Exception:  # a timeout or a closing loop: close the batch as it is
                pass

    engine = BatchEngine(model, copy.deepcopy(tokenizer), max_rows=max_rows, max_wait_ms=max_wait_ms,
                         max_delay_ms=max_delay_ms, seed=seed, settle=settle, draft=draft, draft_tokens=draft_tokens)
    current = {"tokenizer": tokenizer, "max_len": getattr(model.config, "max_position_embeddings", None),
               "source": source, "max_chars": longest_prompt_chars(tokenizer, model)}
    created = int(time.time())

    def swap(new_model, new_tokenizer, new_source: str | None = None, new_draft=None) -> None:
        engine.swap(new_model, copy.deepcopy(new_tokenizer), new_draft)
        current.update(tokenizer=new_tokenizer, source=new_source,
                       max_len=getattr(new_model.config, "max_position_embeddings", None),
                       max_chars=longest_prompt_chars(new_tokenizer, new_model))

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        loops.append(asyncio.get_running_loop())
        engine.start()
        try:
            yield
        finally:
            engine.stop()

    app = FastAPI(title="KAT AutoThink inference server", lifespan=lifespan)
    app.state.engine = engine
    app.state.swap = swap

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return JSONResponse(APIError(e.status_code, str(e.detail), type=kind).body(), status_code=e.status_code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {"loc": (), "msg": "invalid request"}
        param = ".".join(str(p) for p in first["loc"])
        return JSONResponse(APIError(400, f"{param}: {first['msg']}", param=param).body(), status_code=400)

    @app.exception_handler(Exception)
    async def server_error(request: Request, e: Exception):
        return JSONResponse(APIError(500, f"internal error: {type(e).__name__}: {e}", type="server_error").body(),
                            status_code=500)

    async def parse(request: Request, schema):
        try:
            body = await request.json()
        except (ValueError, RecursionError):  # bad JSON or bytes; nesting deeper than Python's stack
            raise APIError(400, "the request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object")
        try:  # JSON's \ud800 escapes decode to lone surrogates, which no tokenizer can encode
            json.dumps(body, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise APIError(400, "the request body holds text that is not valid Unicode (an unpaired surrogate)"
                           ) from None
        try:
            req = schema.model_validate(body)
        except ValidationError as e:
            first = e.errors()[0]
            param = ".".join(str(p) for p in first["loc"]) or None
            raise APIError(400, f"{param}: {first['msg']}" if param else first["msg"], param=param) from None
        if req.model != model_name:
            raise APIError(404, f"the model '{req.model}' does not exist; this server serves '{model_name}'",
                           param="model", code="model_not_found")
        check_supported(req)
        return req

    def encode(text: str) -> list[int]:
        return current["tokenizer"](text, add_special_tokens=False)["input_ids"]

    def check_rows(rows: int) -> None:
        """The engine never splits a request between batches, so one asking for more rows (prompts x n) than a
        batch holds would run them all at once, whatever max_rows says: memory grows with rows, and a client
        could take the server down with one request."""
        if rows > max_rows:
            raise APIError(400, f"this request asks for {rows} completions (prompts x n); this server runs at most "
                           f"{max_rows} at once", param="n")

    def check_text(texts: list[tuple[str, str]]) -> None:
        """What a client sends reaches the model as text, never as control tokens (`chat.control_tokens`): a
        request that spells one is refused rather than changed."""
        for param, text in texts:
            found = control_tokens(current["tokenizer"], text)
            if found:
                raise APIError(400, f"{param} contains {', '.join(map(repr, found))}, the spelling of this model's "
                               "control tokens (response grammar tags, end of text, chat markers); they cannot be "
                               "sent as text", param=param, code="control_token")

    def plan(prompt: str, req, max_tokens: int | None, conversation: list[dict] | None = None
             ) -> tuple[GenRequest, int]:
        """The engine request for one prompt (or a conversation ending with it, for a model with a chat
        template), and its prompt tokens (a forced judge included: the server wrote it); refuses what does not
        fit the context."""
        mode = thinking_mode(req)
        forced = forced_for_request(prompt, mode)
        tokenizer = current["tokenizer"]
        request = conversation if conversation and has_template(tokenizer) else prompt
        text = request_text(tokenizer, request)
        max_len = current["max_len"]
        if current["max_chars"] is not None and len(text) > current["max_chars"]:
            # too long for the context whatever it encodes to; tokenizing megabytes would hold the event loop
            raise APIError(400, f"this model's maximum context length is {max_len} tokens; the prompt is "
                           f"{len(text)} characters, more than so many tokens can spell",
                           param="messages" if conversation else "prompt", code="context_length_exceeded")
        n_prompt = len(encode(text)) + (len(encode(forced)) if forced else 0)
        room = max_len - n_prompt if max_len else None  # completion tokens the context has room for
        budget = completion_budget(max_tokens, default_max_tokens, room)
        if room is not None and (budget > room or budget < 1):
            raise APIError(400, f"this model's maximum context length is {max_len} tokens; the request needs "
                           f"{n_prompt + max(budget, 1)} ({n_prompt} in the prompt"
                           f"{', forced judge included' if forced else ''}, {max(budget, 1)} for the completion)",
                           param="max_tokens" if max_tokens is not None else "messages",
                           code="context_length_exceeded")
        gen = GenRequest(prompt=request, forced=forced, n=req.n, max_new_tokens=budget,
                         temperature=req.temperature, top_p=req.top_p, seed=req.seed, context_tokens=n_prompt)
        return gen, n_prompt

    pending: list[GenRequest] = []

    def flush() -> None:
        gens = pending[:]
        pending.clear()
        try:
            engine.submit(*gens)
        except RuntimeError as e:  # the engine is gone (shutting down): fail the requests, do not hang them
            for g in gens:
                g.future.set_exception(APIError(503, str(e), type="server_error"))

    def submit(gen: GenRequest):
        # requests the event loop handles in the same tick (a burst of clients) reach the engine together:
        # `flush` runs after every task that is ready now has had its turn
        if not pending:
            asyncio.get_running_loop().call_soon(flush)
        pending.append(gen)
        return gen.future

    async def run(gens: list[GenRequest]) -> list[list]:
        futures = [asyncio.wrap_future(submit(g)) for g in gens]
        try:
            return await asyncio.gather(*futures)
        except APIError:
            raise
        except Exception as e:
            raise APIError(500, f"generation failed: {e}", type="server_error") from e

    def usage(prompt_tokens: int, splits: list[Split]) -> dict[str, Any]:
        completion = sum(s.completion_tokens for s in splits)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                "total_tokens": prompt_tokens + completion,
                "completion_tokens_details": {"reasoning_tokens": sum(s.reasoning_tokens for s in splits)}}

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name, "source": current["source"], "engine": engine.stats}

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "kat", "max_model_len": current["max_len"]}]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str):
        if model_id != model_name:
            raise APIError(404, f"the model '{model_id}' does not exist", param="model", code="model_not_found")
        return {"id": model_name, "object": "model", "created": created, "owned_by": "kat",
                "max_model_len": current["max_len"]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req = await parse(request, ChatRequest)
        check_rows(req.n)
        conversation = chat_messages(req.messages)
        gen, prompt_tokens = plan(chat_prompt(req.messages), req, req.max_completion_tokens or req.max_tokens,
                                  conversation)
        check_text([(f"messages.{i}.content", m["content"]) for i, m in enumerate(conversation)])
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": model_name}
        if req.stream:
            return StreamingResponse(chat_events(gen, head, prompt_tokens, req.include_usage()),
                                     media_type="text/event-stream")
        (samples,) = await run([gen])
        tokenizer = current["tokenizer"]
        splits = [split_sample(s, tokenizer) for s in samples]
        return {**head, "object": "chat.completion", "usage": usage(prompt_tokens, splits), "choices": [
            {"index": i, "finish_reason": finish_reason(s), "logprobs": None, "thinking_mode": sp.mode,
             "message": {"role": "assistant", "content": sp.text("content"),
                         "reasoning_content": sp.text("reasoning") or None}}
            for i, (s, sp) in enumerate(zip(samples, splits, strict=True))]}

    async def chat_events(gen: GenRequest, head: dict, prompt_tokens: int, include_usage: bool):
        """A chat stream: per sample its role, then reasoning and content deltas as tokens come, then its
        finish; the usage, if asked; [DONE]."""
        tokenizer = current["tokenizer"]
        listener = _Listener(gen)
        future = submit(gen)
        forced = encode(gen.forced) if gen.forced else []
        ids = [list(forced) for _ in range(gen.n)]
        sent = [{"reasoning": "", "content": ""} for _ in range(gen.n)]
        splits: list[Split | None] = [None] * gen.n

        def chunk(choice: dict[str, Any]) -> str:
            return _sse({**head, "object": "chat.completion.chunk", "choices": [choice]})

        try:
            async for k, token, finish in listener.tokens(future):
                if len(ids[k]) == len(forced):
                    yield chunk({"index": k, "delta": {"role": "assistant", "content": ""}, "finish_reason": None,
                                 "logprobs": None})
                if finish != "eos":  # an EOS token ends the text without being part of it
                    ids[k].append(token)
                split = split_response(ids[k], tokenizer, prefilled=len(forced))
                for channel, key in (("reasoning", "reasoning_content"), ("content", "content")):
                    text = _settled(split.text(channel), final=finish is not None)
                    if len(text) > len(sent[k][channel]) and text.startswith(sent[k][channel]):
                        yield chunk({"index": k, "delta": {key: text[len(sent[k][channel]):]},
                                     "finish_reason": None, "logprobs": None})
                        sent[k][channel] = text
                if finish is not None:
                    splits[k] = split
                    yield chunk({"index": k, "delta": {}, "finish_reason": "length" if finish == "length" else "stop",
                                 "logprobs": None, "thinking_mode": split.mode})
        except Exception as e:  # the status line is gone: the error is the stream's last event
            yield _sse({"error": APIError(500, f"generation failed: {e}", type="server_error").body()["error"]})
            return
        finally:
            listener.gone.set()
        if include_usage:
            yield _sse({**head, "object": "chat.completion.chunk", "choices": [],
                        "usage": usage(prompt_tokens, [sp for sp in splits if sp is not None])})
        yield "data: [DONE]\n\n"

    @app.post("/v1/completions")
    async def completions(request: Request):
        req = await parse(request, CompletionRequest)
        prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        if not prompts or any(not p.strip() for p in prompts):
            raise APIError(400, "prompt must be a non-empty string or list of non-empty strings", param="prompt")
        check_rows(len(prompts) * req.n)
        planned = [plan(p, req, req.max_tokens) for p in prompts]
        check_text([("prompt" if isinstance(req.prompt, str) else f"prompt.{i}", p) for i, p in enumerate(prompts)])
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": model_name}
        if req.stream:
            return StreamingResponse(completion_events(planned, head, req.include_usage()),
                                     media_type="text/event-stream")
        results = await run([g for g, _ in planned])
        samples = [s for group in results for s in group]  # choice index = prompt index * n + sample index
        tokenizer = current["tokenizer"]
        splits = [split_sample(s, tokenizer) for s in samples]  # for the counts and the mode
        return {**head, "object": "text_completion", "usage": usage(sum(n for _, n in planned), splits), "choices": [
            # the text continues the prompt and any forced judge
            {"index": i, "text": tokenizer.decode(generated_ids(s), skip_special_tokens=False),
             "finish_reason": finish_reason(s), "logprobs": None, "thinking_mode": sp.mode}
            for i, (s, sp) in enumerate(zip(samples, splits, strict=True))]}

    async def completion_events(planned: list[tuple[GenRequest, int]], head: dict, include_usage: bool):
        """A completions stream: the raw text of every choice (prompt index * n + sample index) as it grows,
        each choice's finish; the usage, if asked; [DONE]."""
        tokenizer = current["tokenizer"]
        listeners = [_Listener(gen) for gen, _ in planned]
        futures = [submit(gen) for gen, _ in planned]
        merged: asyncio.Queue = asyncio.Queue()  # (choice, token, finish), or the end of one prompt's tokens

        async def pump(p: int) -> None:
            try:
                async for k, token, finish in listeners[p].tokens(futures[p]):
                    merged.put_nowait((p * listeners[p].n + k, token, finish))
            except Exception as e:
                merged.put_nowait(e)
            merged.put_nowait(None)

        pumps = [asyncio.ensure_future(pump(p)) for p in range(len(planned))]
        n = planned[0][0].n  # every prompt of a request has its n samples
        forced = [encode(gen.forced) if gen.forced else [] for gen, _ in planned]
        ids: dict[int, list[int]] = {}
        sent: dict[int, str] = {}
        splits: list[Split] = []
        try:
            for _ in range(len(planned)):
                while (item := await merged.get()) is not None:
                    if isinstance(item, Exception):
                        error = APIError(500, f"generation failed: {item}", type="server_error")
                        yield _sse({"error": error.body()["error"]})
                        return
                    i, token, finish = item
                    got = ids.setdefault(i, [])
                    if finish != "eos":
                        got.append(token)
                    text = _settled(tokenizer.decode(got, skip_special_tokens=False), final=finish is not None)
                    if len(text) > len(sent.setdefault(i, "")):
                        yield _sse({**head, "object": "text_completion", "choices": [
                            {"index": i, "text": text[len(sent[i]):], "finish_reason": None, "logprobs": None}]})
                        sent[i] = text
                    if finish is not None:
                        prefix = forced[i // n]
                        split = split_response(prefix + got, tokenizer, prefilled=len(prefix))
                        splits.append(split)
                        yield _sse({**head, "object": "text_completion", "choices": [
                            {"index": i, "text": "", "finish_reason": "length" if finish == "length" else "stop",
                             "logprobs": None, "thinking_mode": split.mode}]})
        finally:
            for listener in listeners:
                listener.gone.set()
            for task in pumps:
                task.cancel()
        if include_usage:
            yield _sse({**head, "object": "text_completion", "choices": [],
                        "usage": usage(sum(n for _, n in planned), splits)})
        yield "data: [DONE]\n\n"

    return app
