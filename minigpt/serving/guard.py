"""What a request must be before the routes see it, and the answer when something fails.

The one idea: a server on 127.0.0.1 is reachable by every web page its user opens. A
page may send a "simple" cross-site request (a ``text/plain`` POST needs no permission)
and, through DNS rebinding (``evil.example`` made to resolve to 127.0.0.1), even read the
answer. So :class:`Guard` answers only requests that name this server in their ``Host``
header, carry JSON as ``Content-Type: application/json`` (which a page cannot send
cross-site without the browser asking the server first, and no CORS header says yes),
fit the body limit, and carry the key when there is one. Every refusal and every
failure is an ordinary OpenAI-shaped response, so a kept-alive connection stays usable.
"""

from __future__ import annotations

import hmac
import json
import logging
from collections.abc import Awaitable, Callable, Collection
from typing import Any

from minigpt.serving.protocol import APIError

logger = logging.getLogger(__name__)

Scope = dict[str, Any]
Message = dict[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[Message]], Callable[[Message], Awaitable[None]]], Awaitable[None]]


def host_name(header: str) -> str:
    """The name in a ``Host`` header, without its port: ``[::1]:8000`` -> ``::1``."""
    if header.startswith("["):
        return header[1:header.find("]")].lower()
    return header.rsplit(":", 1)[0].lower() if header.count(":") == 1 else header.lower()


class Guard:
    """ASGI middleware around the app: refuses requests before they reach it (a wrong
    ``Host`` 400, a missing key 401, a body that is not JSON 415, a body over
    ``max_body_bytes`` 413), and turns an unexpected failure into a 500 it logs.
    ``allowed_hosts`` containing ``"*"`` accepts any ``Host``; paths in ``public`` need no key."""

    def __init__(self, app: ASGIApp, *, allowed_hosts: Collection[str], api_key: str | None, max_body_bytes: int,
                 public: Callable[[str], bool]) -> None:
        self.app = app
        self.api_key = api_key
        self.max_body_bytes = max_body_bytes
        self.public = public
        self.allowed_hosts = {h.lower().strip("[]") for h in allowed_hosts}

    async def __call__(self, scope: Scope, receive: Callable[[], Awaitable[Message]],
                       send: Callable[[Message], Awaitable[None]]) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        refusal = self.refusal(scope)
        if refusal is not None:
            await _send_error(send, refusal)
            return
        started = False
        received = 0

        async def counted_receive() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_body_bytes:  # a body without Content-Length, or one longer than it said
                raise _too_large(self.max_body_bytes)
            return message

        async def tracked_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted_receive, tracked_send)
        except Exception:
            logger.exception("%s %s failed", scope["method"], scope["path"])
            if not started:  # else the answer is half sent: nothing sensible can follow it
                await _send_error(send, APIError("The server failed to answer this request; its log says why.",
                                                 status=500, kind="server_error"))

    def refusal(self, scope: Scope) -> APIError | None:
        """Why the request is refused before it is read, or None."""
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        host = host_name(headers.get("host", ""))
        if "*" not in self.allowed_hosts and host not in self.allowed_hosts:
            return APIError(f"This server does not answer for the host '{host}'; start it with --allowed-hosts "
                            f"{host} if that name is meant to reach it.", code="invalid_host")
        if self.api_key and not self.public(scope["path"]) and not hmac.compare_digest(
                headers.get("authorization", "").encode(), f"Bearer {self.api_key}".encode()):
            return APIError("Incorrect or missing API key: send the header 'Authorization: Bearer <key>' with the "
                            "key the server was started with.", status=401, code="invalid_api_key")
        if scope["method"] == "POST":
            kind = headers.get("content-type", "").split(";")[0].strip().lower()
            if kind != "application/json":
                return APIError(f"The body must be JSON sent with 'Content-Type: application/json', got "
                                f"'{kind or 'none'}'.", status=415, code="unsupported_media_type")
            length = headers.get("content-length", "0")
            if not length.isdigit() or int(length) > self.max_body_bytes:
                return _too_large(self.max_body_bytes)
        return None


def _too_large(limit: int) -> APIError:
    return APIError(f"The request body is larger than this server's limit of {limit:,} bytes (minigpt serve "
                    "--max-body-bytes).", status=413, code="limit_exceeded")


async def _send_error(send: Callable[[Message], Awaitable[None]], err: APIError) -> None:
    body = json.dumps(err.body()).encode()
    await send({"type": "http.response.start", "status": err.status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
