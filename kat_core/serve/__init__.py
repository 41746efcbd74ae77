"""OpenAI-compatible inference server with per-request thinking control and dynamic batching.

    kat serve-model CKPT --port 8000
    curl localhost:8000/v1/chat/completions -d '{"model": "CKPT", "thinking": "off",
                                                "messages": [{"role": "user", "content": "Compute 7*8."}]}'

Modules: `protocol` (wire format, thinking control, reasoning split), `engine` (dynamic batching over the
rollout engine), `app` (the FastAPI routes). `serve` runs it with uvicorn; `ServerThread` runs it on a
loopback port in the background (tests, benchmarks)."""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def load_for_serving(model_dir: str | Path, device: str | None = None):
    """(model, tokenizer) in eval mode on `device` (default CUDA when there is one, else the CPU); a dir that
    does not load is a one-line KatError."""
    from kat_core.eval.evaluate import default_device
    from kat_core.model.lm import load_model

    model, tokenizer = load_model(model_dir)
    return model.to(device or default_device()).eval(), tokenizer


def serve(model_dir: str | Path, *, host: str = "127.0.0.1", port: int = 8000, name: str | None = None,
          device: str | None = None, log_level: str = "info", follow: Follow | None = None, poll_s: float = 30.0,
          draft_tokens: int = 0, **app_options: Any) -> None:
    """Load the model (failing fast with one line), then serve it until interrupted. With `follow`, every
    `poll_s` seconds `follow()` says whether another model should be served now (a registry alias moved):
    a (checkpoint dir, label) to load and switch to under the same model id, or None. `draft_tokens` > 0
    decodes speculatively with the checkpoint's MTP module (plainly, with one log line, when it has none)."""
    import uvicorn

    from kat_core.serve.app import create_app
    from kat_core.speculative import load_drafter

    model, tokenizer = load_for_serving(model_dir, device)
    name = name or Path(model_dir).name
    app = create_app(model, tokenizer, model_name=name, draft=load_drafter(model_dir, model, draft_tokens),
                     draft_tokens=draft_tokens, **app_options)
    if follow is not None:
        threading.Thread(target=_follow, args=(app, follow, poll_s, device, draft_tokens), name="kat-follow",
                         daemon=True).start()
    log.info("serving %s as %r on http://%s:%d/v1", model_dir, name, host, port)
    uvicorn.run(app, host=host, port=port, log_level=log_level)


Follow = Callable[[], "tuple[Path, str] | None"]


def _follow(app, follow: Follow, poll_s: float, device: str | None, draft_tokens: int = 0) -> None:
    """The poll loop of `serve(follow=...)`: a failed look or load keeps the model being served."""
    from kat_core.errors import KatError
    from kat_core.speculative import load_drafter

    while True:
        time.sleep(poll_s)
        try:
            found = follow()
            if found is None:
                continue
            path, label = found
            model, tokenizer = load_for_serving(path, device)
            draft = load_drafter(path, model, draft_tokens)
        except (KatError, OSError) as e:
            log.warning("still serving the previous model: %s", e)
            continue
        app.state.swap(model, tokenizer, label, draft)
        log.info("now serving %s (%s)", label, path)


class ServerThread:
    """An app served by uvicorn on a loopback port (0 = a free one) in a daemon thread.

        with ServerThread(app) as server:
            OpenAI(base_url=server.base_url, api_key="-")
    """

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        self.app, self.host, self.port, self.log_level = app, host, port, log_level

    def __enter__(self) -> ServerThread:
        import uvicorn

        # bind first: the port is known (and taken) before the server thread starts
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        self.port = sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(self.app, log_level=self.log_level, lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.01)
        self.url = f"http://{self.host}:{self.port}"
        self.base_url = f"{self.url}/v1"
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)
