"""A real HTTP server on loopback that speaks OpenAI chat completions, playing solver, thinker and critic
for arithmetic prompts. It is deliberately wrong on some prompts so the critic has work to do."""

from __future__ import annotations

import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from kat_core.tasks.arith import solve


def wrong_on(expression: str) -> bool:
    """The server's solver gets these expressions wrong (deterministic, about a third of them)."""
    return sum(map(ord, expression)) % 3 == 0


def _reply(system: str, user: str) -> str:
    if system.startswith("Solve"):
        expr = re.search(r"Compute ([\d+\-*]+)\.", user)[1]
        value, steps = solve(expr)
        return "\n".join(steps) + f"\nAnswer: {value + 1 if wrong_on(expr) else value}"
    if system.startswith("Rewrite"):
        return user.split("Solution:\n", 1)[1]
    if system.startswith("You check"):
        return "VALID"
    return "unexpected request"


class _Handler(BaseHTTPRequestHandler):
    requests_seen: list[dict] = []

    def log_message(self, *args):  # keep test output clean
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if not self.path.endswith("/chat/completions"):
            self.send_error(404)
            return
        _Handler.requests_seen.append(body)
        msgs = {m["role"]: m["content"] for m in body["messages"]}
        content = _reply(msgs.get("system", ""), msgs.get("user", ""))
        payload = json.dumps({
            "id": "chatcmpl-test", "object": "chat.completion", "created": int(time.time()),
            "model": body["model"],
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": content}}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        }).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)


class ChatServer:
    def __enter__(self):
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
