"""Running the app: on a background thread (tests, benchmarks), or as ``cllm-rt serve``."""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time

import uvicorn
from fastapi import FastAPI

from .app import create_app

log = logging.getLogger("cllm_rt.serve")

GRACEFUL_SHUTDOWN_SECONDS = 5


@contextlib.contextmanager
def background(app: FastAPI, host: str = "127.0.0.1", port: int = 0):
    """Serve ``app`` on a uvicorn thread (tests, benchmarks, notebooks); yields the base URL, stops on exit."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="cllm_rt-uvicorn", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while not server.started:  # uvicorn offers no event for "listening"
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.01)
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


def serve(spec: str, *, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          dtype="auto", device=None, weights=None, model_name: str | None = None, **options) -> None:
    """``cllm-rt serve``: load ``spec`` (a directory or a short name) and serve it until interrupted."""
    from ..models import load_model

    model, tokenizer = load_model(spec, dtype=dtype, device=device, weights=weights)
    app = create_app(model, tokenizer, model_name=model_name or str(spec), api_key=api_key, **options)
    if api_key is None and host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("serving on %s without --api-key: anyone who reaches this address can use the model", host)
    # on Ctrl-C, streams still open get this long to finish before they are cut, instead of holding the exit
    uvicorn.run(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS)
