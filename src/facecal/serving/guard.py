"""What keeps one client from taking the service down: connection limits and deadlines.

Two layers, because uvicorn's own knobs cannot express these bounds:

* `guarded_protocol` (connection level): uvicorn's ``limit_concurrency`` counts *connections*
  and answers every request 503 once it is reached, so a few hundred sockets that send nothing
  lock everyone out, and it never closes them (its keep-alive timer only starts after a first
  response). Our subclass of its h11 protocol refuses a new connection beyond
  ``max_connections_per_client`` from one address or ``max_connections`` in all (503, closed at
  once, so the sockets already open keep working), and gives each request ``header_timeout_s``
  from its first byte — or from the connection's opening — to the end of its headers (408,
  closed). Idle keep-alive connections are closed after ``keepalive_timeout_s`` (uvicorn's).
* `Guard` (ASGI middleware, per request): Host allow-list (DNS rebinding against a loopback
  service), a cap on requests being handled at once (``/healthz`` exempt, so the liveness probe
  answers under load), bodies over ``max_body_bytes`` (413) and a deadline over the *whole*
  body, ``body_timeout_s`` from the end of the headers (408) — a client that trickles a byte
  now and then is cut off like one that stops.

Behind a reverse proxy every client has the proxy's address: set per-client limits there.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from dataclasses import dataclass
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

HEALTH_PATH = "/healthz"


def json_response(status: int, kind: str, detail: str) -> bytes:
    """A complete HTTP/1.1 response with our JSON error body, closing the connection."""
    body = json.dumps({"error": kind, "detail": detail}).encode()
    reason = {400: b"Bad Request", 408: b"Request Timeout", 503: b"Service Unavailable"}
    return (
        b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
        b"connection: close\r\n\r\n" % (status, reason.get(status, b""), len(body))
    ) + body


@dataclass(frozen=True)
class ConnectionLimits:
    header_timeout_s: float = 10.0
    max_connections: int = 512
    max_connections_per_client: int = 32


def guarded_protocol(limits: ConnectionLimits) -> type[H11Protocol]:
    """uvicorn's h11 protocol with per-address and total connection caps and a header deadline
    (a class per server: the per-address counts are shared by that server's connections)."""
    per_client: Counter[str] = Counter()

    class GuardedProtocol(H11Protocol):
        _address: str | None = None
        _header_timer: asyncio.TimerHandle | None = None
        _armed_for: object = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            host = self.client[0] if self.client else None
            if host is not None and per_client[host] >= limits.max_connections_per_client:
                return self._refuse(f"more than {limits.max_connections_per_client} connections")
            if len(self.connections) > limits.max_connections:
                return self._refuse(f"more than {limits.max_connections} connections in all")
            if host is not None:
                self._address = host
                per_client[host] += 1
            self._arm()

        def _refuse(self, why: str) -> None:
            self.transport.write(json_response(503, "too_many_connections", why))
            self.transport.close()

        def connection_lost(self, exc: Exception | None) -> None:
            if self._address is not None:
                per_client[self._address] -= 1
                if per_client[self._address] <= 0:
                    del per_client[self._address]
                self._address = None
            self._disarm()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            # The first byte of a new request on a kept-alive connection starts its clock.
            if self._header_timer is None and (self.cycle is None or self.cycle.response_complete):
                self._arm()
            super().data_received(data)

        def handle_events(self) -> None:
            super().handle_events()
            if self._header_timer is not None and self.cycle is not self._armed_for:
                self._disarm()  # a request's headers are complete

        def _arm(self) -> None:
            self._disarm()
            self._armed_for = self.cycle
            self._header_timer = self.loop.call_later(limits.header_timeout_s, self._too_slow)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _too_slow(self) -> None:
            self._header_timer = None
            if self.transport.is_closing() or self.cycle is not self._armed_for:
                return
            if self.conn.our_state is h11.IDLE:  # nothing sent on this request yet: say why
                self.transport.write(
                    json_response(
                        408,
                        "header_timeout",
                        f"request headers not complete within {limits.header_timeout_s:g} s",
                    )
                )
            self.transport.close()

    return GuardedProtocol


def host_allowed(host_header: bytes | None, allowed: Iterable[str]) -> bool:
    """`Host` (name or address, with or without port) against the allow-list: exact names,
    ``*.example.com`` for subdomains, ``*`` for any."""
    if host_header is None:
        return False
    host = host_header.decode("latin-1").strip().lower()
    if host.startswith("["):  # [::1]:8000
        host = host[1 : host.find("]")] if "]" in host else host
    elif host.count(":") == 1:
        host = host.rsplit(":", 1)[0]
    host = host.rstrip(".")
    for pattern in allowed:
        p = pattern.lower().strip("[]")
        if p == "*" or p == host or (p.startswith("*.") and host.endswith(p[1:])):
            return True
    return False


class Guard:
    """ASGI middleware: Host allow-list, in-flight request cap, body size and body deadline.

    Bodies over `max_bytes` are refused by Content-Length up front and by counting while they
    stream in (chunked uploads cannot bypass it): 413. A body not complete `timeout_s` after the
    request started gets 408, however it trickles in.
    """

    def __init__(
        self,
        app: ASGIApp,
        max_bytes: int,
        timeout_s: float = 30.0,
        allowed_hosts: Iterable[str] = ("*",),
        max_inflight: int | None = None,
    ):
        self.app = app
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s
        self.allowed_hosts = tuple(allowed_hosts)
        self.max_inflight = max_inflight
        self.inflight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        if not host_allowed(headers.get(b"host"), self.allowed_hosts):
            shown = headers.get(b"host", b"")[:100].decode("latin-1")
            return await _answer(
                send, 400, "bad_host", f"Host {shown!r} is not served here (serve.allowed_hosts)"
            )
        health = scope.get("path") == HEALTH_PATH
        if not health and self.max_inflight is not None and self.inflight >= self.max_inflight:
            return await _answer(
                send, 503, "overloaded", f"{self.inflight} requests in progress; retry later"
            )
        length = headers.get(b"content-length")
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                declared = -1
            if declared < 0:
                return await _answer(send, 400, "bad_request", "invalid Content-Length")
            if declared > self.max_bytes:
                return await self._too_large(send, declared)
        if not health:
            self.inflight += 1
        try:
            await self._run(scope, receive, send)
        finally:
            if not health:
                self.inflight -= 1

    async def _run(self, scope: Scope, receive: Receive, send: Send) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        state = {"received": 0, "started": False, "refused": False, "body_done": False}

        async def limited_receive() -> Message:
            if state["body_done"]:
                return await receive()  # e.g. Starlette listening for a disconnect
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except TimeoutError:
                if not state["started"]:
                    await _answer(
                        send,
                        408,
                        "body_timeout",
                        f"request body not complete within {self.timeout_s:g} s",
                    )
                    state["refused"] = True
                return {"type": "http.disconnect"}
            if message["type"] == "http.request":
                state["received"] += len(message.get("body", b""))
                state["body_done"] = not message.get("more_body", False)
                if state["received"] > self.max_bytes:
                    if not state["started"]:
                        await self._too_large(send, state["received"])
                        state["refused"] = True
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Message) -> None:
            if state["refused"]:
                return  # we already answered; drop what the app says after the disconnect
            if message["type"] == "http.response.start":
                state["started"] = True
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except Exception:
            if not state["refused"]:
                raise

    async def _too_large(self, send: Send, size: int) -> None:
        await _answer(
            send,
            413,
            "body_too_large",
            f"request body of {size} bytes exceeds the limit of {self.max_bytes}",
        )


async def _answer(send: Send, status: int, kind: str, detail: str) -> None:
    body = json.dumps({"error": kind, "detail": detail}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
