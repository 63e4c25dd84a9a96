"""``minigpt serve``: serve one model (:mod:`minigpt.serving.settings` loads it) over HTTP on this machine.

The one idea: the port is taken before anything is announced, and the server binds 127.0.0.1
unless told otherwise, so nothing outside this machine can reach it by
accident; it answers only requests that name it in their ``Host`` header (a web page
cannot reach it through DNS rebinding), and with ``api_key`` only those that carry the
key, which any other address requires. SIGTERM or Ctrl-C stop it within a few seconds,
even mid-generation: the generation stops at its next token.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from typing import Any

import uvicorn

from minigpt.serving.app import create_app
from minigpt.serving.engine import Engine
from minigpt.serving.settings import LOOPBACK_HOSTS, ServeConfig, load_engine

logger = logging.getLogger(__name__)


def bind(settings: ServeConfig) -> socket.socket:
    """A socket bound to ``host:port``, so that a busy port fails here, before anything says
    "serving", with what to do; :func:`serve` then listens on it."""
    host = settings.host.strip("[]")
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a port left in TIME_WAIT is free; one in use is not
    try:
        sock.bind((host, settings.port))
    except OSError as err:
        sock.close()
        raise ValueError(f"cannot listen on {host} port {settings.port}: {err.strerror}; choose another port, "
                         "or stop the program that uses it") from err
    return sock


def serve(settings: ServeConfig, engine: Engine | None = None, sock: socket.socket | None = None) -> None:
    """Serve ``engine`` (default: the one the settings name) on ``sock`` (default: :func:`bind`)
    until interrupted."""
    engine = engine or load_engine(settings)
    sock = sock or bind(settings)
    if settings.host not in LOOPBACK_HOSTS and not settings.api_key:
        logger.warning("listening on %s without an API key: anyone who can reach this machine can use the model",
                       settings.host)
    app = create_app(engine, api_key=settings.api_key, limits=settings.limits(), allowed_hosts=settings.hosts(),
                     cors_origin=settings.cors_origin)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level="info",
                            timeout_graceful_shutdown=STOP_SECONDS)
    with sock:
        _StoppingServer(config, engine).run(sockets=[sock])


STOP_SECONDS = 3  # how long open connections get to finish once the server is told to stop


class _StoppingServer(uvicorn.Server):
    """uvicorn's server, whose SIGTERM or Ctrl-C also stops the engine: uvicorn alone
    waits for every open response to end, and a generation may run for minutes."""

    def __init__(self, config: uvicorn.Config, engine: Engine) -> None:
        super().__init__(config)
        self.engine = engine

    def handle_exit(self, sig: int, frame: Any) -> None:
        self.engine.close()  # each generation stops at its next token
        super().handle_exit(sig, frame)


class BackgroundServer:
    """``app`` served by uvicorn in a thread on a free port of 127.0.0.1, for tests,
    benchmarks and notebooks: ``with BackgroundServer(app) as server: server.base_url``."""

    def __init__(self, app: Any, *, timeout: float = 30.0) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))  # the OS picks a free port; uvicorn serves this very socket
        self.base_url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                self.stop()
                raise RuntimeError(f"the server did not start within {timeout:g} s")
            time.sleep(0.01)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()

    def __enter__(self) -> BackgroundServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
