"""Dynamic batching in the inference server: 32 concurrent clients against the same requests sent one at a time.

The server (`kat serve-model`, its own process, so the clients do not share its interpreter) serves a
demo-sized model. The workload is 64 chat requests over arith prompts of every difficulty level, cycling
thinking auto / on / off, greedy, at most `--max-tokens` completion tokens. "sequential": one client sends
them one after another. "batched": 32 clients (asyncio, one keep-alive connection each) each send their share
one after another, all at once, so the server's batching loop finds up to 32 requests waiting
and runs them in one rollout call. Greedy decoding makes both runs produce the same tokens (up to float
rounding between batch shapes), so requests/s and tokens/s compare like for like.

Without `--model` the model is demo-profile sized and trained here briefly on rendered grammar examples
(`bench_rollout.build_trained_model`, about a minute), so that responses have realistic, varied lengths.

    .venv/bin/python benchmarks/bench_serve.py [--model DIR] [--repeats 5] [--threads 1]

After a warm-up, repeats alternate (sequential, batched, ...); the table shows medians, then
`ratio batched/sequential requests_per_s: X` (target >= 4). Then `--stream-clients` (16) clients send the
workload's prompts as think-on streaming requests: median time to first token, full response time and gap
between tokens, and `ratio ttft/full_response ...: X` (issue 21's target: <= 0.2).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

CLIENTS = 32


def trained_checkpoint(steps: int, out: Path) -> tuple[Path, str]:
    sys.path.insert(0, str(Path(__file__).parent))
    from bench_rollout import build_trained_model  # the same demo-sized model the rollout benchmark uses

    from kat_core.model.checkpoint import save_checkpoint

    t0 = time.perf_counter()
    model, tokenizer, loss = build_trained_model(steps)
    save_checkpoint(out, model, tokenizer)
    return out, f"demo-sized, trained {steps} steps here ({time.perf_counter() - t0:.0f}s, loss {loss:.3f})"


def workload(n: int) -> list[tuple[str, str]]:
    from kat_core.tasks.arith import ArithTask

    items = ArithTask().examples("test", n=n, seed=0)
    return [(it.prompt, ("auto", "on", "off")[i % 3]) for i, it in enumerate(items)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: Path, port: int, threads: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "kat_app.cli", "serve-model", str(model), "--port", str(port), "--name", "bench",
           "--threads", str(threads)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited: {proc.stderr.read()}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return proc
        except OSError:
            time.sleep(0.2)
    proc.terminate()
    raise SystemExit("server did not start in 180 s")


def engine_stats(port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10) as r:
        return json.loads(r.read())["engine"]


class Client:
    """One keep-alive HTTP/1.1 connection speaking just enough of the protocol for JSON POSTs. A client this
    thin keeps the measurement on the server: the `openai` client (tested in tests/test_serve.py) spends
    milliseconds of CPU per request, which on a shared 2-core machine the server would pay for."""

    def __init__(self, port: int):
        self.port = port
        self.reader = self.writer = None

    async def post(self, path: str, body: dict) -> dict:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        data = json.dumps(body).encode()
        self.writer.write(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                          f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
        head = (await self.reader.readuntil(b"\r\n\r\n")).decode()
        length = int(next(ln.split(":", 1)[1] for ln in head.split("\r\n") if ln.lower().startswith("content-length")))
        payload = json.loads(await self.reader.readexactly(length))
        if not head.startswith("HTTP/1.1 200"):
            raise RuntimeError(f"server answered {head.splitlines()[0]}: {payload}")
        return payload

    async def stream(self, path: str, body: dict) -> list[tuple[float, dict]]:
        """POST a streaming request -> (seconds since sent, event) for every server-sent event as it arrives
        (HTTP/1.1 chunked transfer, as uvicorn sends a streaming response)."""
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        data = json.dumps(body).encode()
        sent = time.perf_counter()
        self.writer.write(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                          f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
        head = (await self.reader.readuntil(b"\r\n\r\n")).decode()
        if not head.startswith("HTTP/1.1 200") or "chunked" not in head.lower():
            raise RuntimeError(f"server answered {head.splitlines()[0]}")
        events, pending = [], b""
        while True:
            size = int((await self.reader.readuntil(b"\r\n")).strip(), 16)
            chunk = (await self.reader.readexactly(size + 2))[:-2]
            if size == 0:
                return events
            pending += chunk
            *complete, pending = pending.split(b"\n\n")
            for event in complete:
                if event.startswith(b"data: {"):
                    events.append((time.perf_counter() - sent, json.loads(event[6:])))

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            await self.writer.wait_closed()


async def one(client: Client, prompt: str, mode: str, max_tokens: int) -> int:
    r = await client.post("/v1/chat/completions", {
        "model": "bench", "messages": [{"role": "user", "content": prompt}], "temperature": 0,
        "max_tokens": max_tokens, "thinking": mode})
    return r["usage"]["completion_tokens"]


async def run_sequential(port: int, requests, max_tokens: int) -> tuple[float, int]:
    client = Client(port)
    t0 = time.perf_counter()
    tokens = 0
    for prompt, mode in requests:
        tokens += await one(client, prompt, mode, max_tokens)
    elapsed = time.perf_counter() - t0
    await client.close()
    return elapsed, tokens


async def run_batched(port: int, requests, max_tokens: int, clients: int) -> tuple[float, int]:
    pool = [Client(port) for _ in range(clients)]
    for c in pool:  # connect first: connection set-up is not what is measured, as in the sequential run
        c.reader, c.writer = await asyncio.open_connection("127.0.0.1", port)

    async def worker(client, share):
        done = 0
        for prompt, mode in share:
            done += await one(client, prompt, mode, max_tokens)
        return done

    t0 = time.perf_counter()
    counts = await asyncio.gather(*(worker(pool[k], requests[k::clients]) for k in range(clients)))
    elapsed = time.perf_counter() - t0
    for c in pool:
        await c.close()
    return elapsed, sum(counts)


async def run_streaming(port: int, requests, max_tokens: int, clients: int) -> list[tuple[float, float, float]]:
    """`clients` clients, each sending its share of think-on streaming requests one after another ->
    per request (time to first token, full response time, mean gap between tokens), seconds."""
    pool = [Client(port) for _ in range(clients)]
    for c in pool:
        c.reader, c.writer = await asyncio.open_connection("127.0.0.1", port)

    async def worker(client, share):
        timings = []
        for prompt, _ in share:
            events = await client.stream("/v1/chat/completions", {
                "model": "bench", "messages": [{"role": "user", "content": prompt}], "temperature": 0,
                "max_tokens": max_tokens, "thinking": "on", "stream": True})
            texts = [t for t, e in events if e["choices"] and (e["choices"][0]["delta"].get("content")
                                                                or e["choices"][0]["delta"].get("reasoning_content"))]
            if texts:
                gaps = [b - a for a, b in zip(texts, texts[1:], strict=False)]
                timings.append((texts[0], events[-1][0], statistics.mean(gaps) if gaps else 0.0))
        return timings

    results = await asyncio.gather(*(worker(pool[k], requests[k::clients]) for k in range(clients)))
    for c in pool:
        await c.close()
    return [t for share in results for t in share]


async def bench(port: int, requests, args) -> dict[str, list[tuple[float, int, float]]]:
    await run_batched(port, requests[:CLIENTS], args.max_tokens, CLIENTS)  # warm-up
    await run_sequential(port, requests[:3], args.max_tokens)
    results: dict[str, list[tuple[float, int, float]]] = {"sequential": [], f"batched ({CLIENTS} clients)": []}
    for _ in range(args.repeats):
        for name in results:
            before = engine_stats(port)
            if name == "sequential":
                secs, tokens = await run_sequential(port, requests, args.max_tokens)
            else:
                secs, tokens = await run_batched(port, requests, args.max_tokens, CLIENTS)
            after = engine_stats(port)
            batches = after["batches"] - before["batches"]
            results[name].append((secs, tokens, (after["rows"] - before["rows"]) / max(batches, 1)))
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, help="a KAT checkpoint dir (default: train a demo-sized model here)")
    ap.add_argument("--train-steps", type=int, default=400)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=160)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="the server's torch threads (the machine is shared)")
    ap.add_argument("--stream-clients", type=int, default=16, help="concurrent clients of the streaming run")
    args = ap.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        if args.model:
            model, source = args.model, str(args.model)
        else:
            model, source = trained_checkpoint(args.train_steps, Path(tmp) / "model")
        requests = workload(args.requests)
        port = free_port()
        server = start_server(model, port, args.threads)
        try:
            print(f"model: {source}; server torch threads: {args.threads}")
            print(f"workload: {len(requests)} chat requests, arith levels 1-5, thinking auto/on/off in turn, greedy, "
                  f"max_tokens {args.max_tokens}")
            results = asyncio.run(bench(port, requests, args))
            streamed = asyncio.run(run_streaming(port, requests, args.max_tokens, args.stream_clients))
        finally:
            server.terminate()
            server.wait(30)

    print(f"\n{'run':<22} {'seconds':>8} {'requests/s':>11} {'tokens/s':>9} {'rows/batch':>11}  "
          f"(medians of {args.repeats})")
    rps = {}
    for name, runs in results.items():
        secs = statistics.median(s for s, _, _ in runs)
        rps[name] = statistics.median(len(requests) / s for s, _, _ in runs)
        tps = statistics.median(t / s for s, t, _ in runs)
        rows = statistics.median(r for _, _, r in runs)
        print(f"{name:<22} {secs:>8.2f} {rps[name]:>11.1f} {tps:>9.0f} {rows:>11.1f}")
    seq, batched = rps["sequential"], rps[f"batched ({CLIENTS} clients)"]
    print(f"ratio batched/sequential requests_per_s: {batched / seq:.2f}")

    ttft, full, gap = (statistics.median(t[i] for t in streamed) for i in range(3))
    print(f"\nstreaming, {args.stream_clients} clients, {len(streamed)} think-on requests (medians): time to first "
          f"token {ttft * 1000:.0f} ms, full response {full * 1000:.0f} ms, between tokens {gap * 1000:.1f} ms")
    print(f"ratio ttft/full_response (think-on, {args.stream_clients} streaming clients): {ttft / full:.2f}")


if __name__ == "__main__":
    main()
