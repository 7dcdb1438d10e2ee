"""The server's safety limits: settings, the API key, admission (429), the weights gate and
the request-body cap.

    request --BodyLimit (413)--> route --check_key (401)--> Limiter.try_acquire (429 +
    Retry-After) --> WeightsGate.acquire_read (waits while a swap runs) --> the engine

A ``Lease`` holds what a request acquired and gives it back exactly once, also for a streamed
response (released when the stream ends, is cut by the client, or fails).
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
from dataclasses import dataclass, field
from typing import Any, Callable

from thaw_agents.server.schemas import ApiError

LOOPBACK_NAMES = ("localhost", "localhost.localdomain", "ip6-localhost")


@dataclass(slots=True)
class ServerSettings:
    """Limits and options of one server (the CLI's flags)."""

    api_key: str | None = None
    max_concurrency: int = 8
    """Requests generating at once; more are refused with 429 and Retry-After."""
    max_body_bytes: int = 4 << 20
    max_prompt_tokens: int | None = None
    """Longest prompt accepted (None: the engine's context length decides)."""
    max_branches: int = 64
    """Most choices (``n``) or fork branches (suffixes x n) one request may ask for."""
    retry_after_s: int = 1


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and localhost names (nothing else can connect)."""
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind(host: str, api_key: str | None) -> None:
    """Refuse to serve beyond loopback without an API key."""
    if not is_loopback(host) and not api_key:
        raise SystemExit(
            f"refusing to bind {host!r} without an API key: anything but loopback can be reached "
            "by other machines. Pass --api-key KEY (or set THAW_AGENTS_API_KEY), or bind "
            "--host 127.0.0.1."
        )


def check_key(authorization: str | None, api_key: str | None, *, admin: bool) -> None:
    """Bearer-token check: every route when a key is set; admin routes always need one."""
    if api_key is None:
        if admin:
            raise ApiError(
                401,
                "admin endpoints need an API key: start the server with "
                "--api-key KEY (or THAW_AGENTS_API_KEY) and send "
                "'Authorization: Bearer KEY'",
                type="authentication_error",
                code="admin_disabled",
            )
        return
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(
        token.strip().encode(), api_key.encode()
    ):
        raise ApiError(
            401,
            "missing or invalid API key: send 'Authorization: Bearer KEY'",
            type="authentication_error",
            code="invalid_api_key",
            headers={"WWW-Authenticate": "Bearer"},
        )


@dataclass
class Limiter:
    """At most ``max_in_flight`` admitted requests; the rest are refused at once (429).

    Runs on the server's event loop only (no lock needed). Counters feed /health.
    """

    max_in_flight: int
    retry_after_s: int = 1
    in_flight: int = 0
    peak: int = 0
    num_admitted: int = 0
    num_refused: int = 0

    def __post_init__(self) -> None:
        if self.max_in_flight < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {self.max_in_flight}")

    def acquire(self) -> None:
        if self.in_flight >= self.max_in_flight:
            self.num_refused += 1
            raise ApiError(
                429,
                f"the server is at its concurrency limit "
                f"({self.max_in_flight} requests in flight); retry after "
                f"{self.retry_after_s} s",
                type="rate_limit_error",
                code="rate_limit_exceeded",
                headers={"Retry-After": str(self.retry_after_s)},
            )
        self.in_flight += 1
        self.num_admitted += 1
        self.peak = max(self.peak, self.in_flight)

    def release(self) -> None:
        self.in_flight -= 1

    def stats(self) -> dict[str, int]:
        return {
            "in_flight": self.in_flight,
            "peak_in_flight": self.peak,
            "max_concurrency": self.max_in_flight,
            "admitted": self.num_admitted,
            "refused": self.num_refused,
        }


class WeightsGate:
    """Readers (requests) share a model; a weights swap waits for them and holds new ones
    back, so each response was served by exactly one weights version."""

    def __init__(self) -> None:
        self._open = asyncio.Event()  # set: no swap pending, requests may start
        self._idle = asyncio.Event()  # set: no request is using the model
        self._open.set()
        self._idle.set()
        self._writer = asyncio.Lock()
        self._readers = 0

    async def acquire_read(self) -> None:
        while not self._open.is_set():
            await self._open.wait()
        self._readers += 1
        self._idle.clear()

    def release_read(self) -> None:
        self._readers -= 1
        if self._readers == 0:
            self._idle.set()

    async def acquire_write(self) -> None:
        await self._writer.acquire()
        self._open.clear()
        await self._idle.wait()

    def release_write(self) -> None:
        self._open.set()
        self._writer.release()


@dataclass
class Lease:
    """What one request acquired (a concurrency slot, a gate); ``release`` runs once."""

    releases: list[Callable[[], None]] = field(default_factory=list)
    _done: bool = False

    def add(self, release: Callable[[], None]) -> None:
        self.releases.append(release)

    def release(self) -> None:
        if self._done:
            return
        self._done = True
        for release in reversed(self.releases):
            release()


class BodyLimit:
    """ASGI middleware: bodies over ``max_bytes`` get 413 before the app sees them.

    The body is read here (by Content-Length a too-large one is refused unread; a chunked one
    is counted while read, at most ``max_bytes + 1`` bytes are kept) and replayed to the app.
    """

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or scope.get("method") in ("GET", "HEAD", "DELETE"):
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            await _send_413(send, int(length), self.max_bytes)
            return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away before sending its body
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                await _send_413(send, size, self.max_bytes)
                return
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()  # e.g. http.disconnect while streaming the response

        await self.app(scope, replay, send)


async def _send_413(send: Callable, size: int, limit: int) -> None:
    await send_error(
        send,
        ApiError(
            413,
            f"request body of at least {size} bytes exceeds the limit of {limit} bytes "
            "(--max-body-bytes)",
            code="request_too_large",
        ),
    )


class Auth:
    """ASGI middleware: the bearer-token check (``check_key``) before anything is parsed."""

    def __init__(
        self,
        app: Any,
        api_key: str | None,
        is_admin: Callable[[str], bool],
        open_paths: tuple[str, ...] = ("/health",),
    ) -> None:
        self.app, self.api_key, self.is_admin, self.open_paths = app, api_key, is_admin, open_paths

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        path = scope.get("path", "")
        if scope["type"] == "http" and path not in self.open_paths:
            headers = dict(scope.get("headers") or [])
            authorization = headers.get(b"authorization", b"").decode("latin-1") or None
            try:
                check_key(authorization, self.api_key, admin=self.is_admin(path))
            except ApiError as exc:
                await send_error(send, exc)
                return
        await self.app(scope, receive, send)


async def send_error(send: Callable, error: ApiError) -> None:
    """Send ``error`` as a complete JSON response (for ASGI middleware)."""
    body = json.dumps(error.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in error.headers.items()]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
