"""The FastAPI app of ``thaw-agents serve``: routes, auth, admission and error bodies.

    OpenAI       GET /v1/models[/{name}]   POST /v1/chat/completions   POST /v1/completions
    fork         POST /v1/fork
    snapshots    POST/GET /v1/snapshots   GET/DELETE /v1/snapshots/{id}
                 POST /v1/snapshots/{id}/save (admin)   POST /v1/snapshots/load (admin)
    admin        POST /admin/models   DELETE /admin/models/{name}
                 POST /admin/models/{name}/weights
    health       GET /health (no key: liveness, admission counters)

Every generating request: resolve ``model`` (404) -> a concurrency slot (429 + Retry-After)
-> the model's weights gate (shared) -> ChatThaw / Engine. Responses carry
``x-thaw-weights-version`` and ``system_fingerprint = "thaw-weights-<version>"``. Every error,
ours, FastAPI's (bad JSON, wrong types -> 400 naming the field) or Starlette's (404 route,
405), is OpenAI's error body.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from thaw_agents.server import chat, forks
from thaw_agents.server.limits import Auth, BodyLimit, Lease, Limiter, ServerSettings
from thaw_agents.server.registry import ModelEntry, Registry
from thaw_agents.server.schemas import (
    ApiError,
    ChatCompletionRequest,
    CompletionRequest,
    ForkRequest,
    ModelRegisterRequest,
    SnapshotCreateRequest,
    SnapshotLoadRequest,
    SnapshotSaveRequest,
    WeightsLoadRequest,
    error_body,
)
from thaw_agents.server.streaming import Served, guarded, primed, to_api_error

logger = logging.getLogger("thaw_agents.server")
WEIGHTS_HEADER = "x-thaw-weights-version"
IGNORED_HEADER = "x-thaw-ignored-fields"


def is_admin_path(path: str) -> bool:
    return (
        path.startswith("/admin/")
        or path == "/v1/snapshots/load"
        or (path.startswith("/v1/snapshots/") and path.endswith("/save"))
    )


class LeasedStream(StreamingResponse):
    """A streamed response that gives its request's lease back however it ends."""

    def __init__(self, content: AsyncIterator[str], lease: Lease, **kwargs: Any) -> None:
        super().__init__(content, media_type="text/event-stream", **kwargs)
        self.lease = lease

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            try:
                await self.body_iterator.aclose()  # type: ignore[attr-defined]
            finally:
                self.lease.release()


def _validation_error(exc: RequestValidationError) -> ApiError:
    error = exc.errors()[0] if exc.errors() else {}
    loc = [p for p in error.get("loc", ()) if p != "body"]
    if error.get("type") == "json_invalid":
        return ApiError(
            400,
            f"the body is not valid JSON: {error.get('ctx', {}).get('error')}",
            code="invalid_json",
        )
    if not loc:
        return ApiError(400, f"bad request body: {error.get('msg', 'invalid')}; send a JSON object")
    param = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")
    # A union's branch name (e.g. "str" or "list[int]") is noise in the field path.
    param = ".".join(p for p in param.split(".") if not _is_type_name(p)) or param
    got = repr(error.get("input"))
    got = got if len(got) <= 200 else got[:200] + "..."
    return ApiError(400, f"{param}: {error.get('msg', 'invalid value')} (got {got})", param=param)


def _is_type_name(part: str) -> bool:
    return part in ("str", "int", "float", "bool", "dict", "list") or part.startswith(
        ("list[", "dict[", "function-", "ChatMessage")
    )


def create_app(
    registry: Registry,
    settings: ServerSettings,
    snapshot_sources: list[tuple[str, str]] | None = None,
) -> FastAPI:
    """The app serving ``registry``'s models (engines start in the app's lifespan)."""
    limiter = Limiter(settings.max_concurrency, settings.retry_after_s)
    limit = settings.max_prompt_tokens

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        try:
            for entry in list(registry.models.values()):
                logger.warning("thaw-agents serve: starting %s (%s)", entry.name, entry.source)
                await registry.start(entry)
            for name, src in snapshot_sources or []:
                default = registry.model(registry.default_model or "")
                await forks.load_snapshot(registry, default, src, name)
            logger.warning("thaw-agents serve: ready (models: %s)", ", ".join(registry.models))
            yield
        finally:
            logger.warning("thaw-agents serve: shutting down (closing engines)")
            await registry.close()

    app = FastAPI(title="thaw-agents", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.registry, app.state.limiter, app.state.settings = registry, limiter, settings

    # ------------------------------------------------------------------ errors and auth

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return await _api_error(_, _validation_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return JSONResponse(
            error_body(str(exc.detail), kind, None, code),
            status_code=exc.status_code,
            headers=exc.headers,
        )

    @app.exception_handler(Exception)
    async def _crash(_: Request, exc: Exception) -> JSONResponse:
        return await _api_error(_, to_api_error(exc))

    # ------------------------------------------------------------------ helpers

    async def admit(name: str, id_prefix: str) -> tuple[Served, Lease]:
        entry, snapshot = registry.resolve(name)
        limiter.acquire()
        lease = Lease([limiter.release])
        try:
            await entry.gate.acquire_read()
        except BaseException:
            lease.release()
            raise
        lease.add(entry.gate.release_read)
        return Served(entry, snapshot, name, id_prefix=id_prefix), lease

    def headers(served: Served, body: Any) -> dict[str, str]:
        out = {WEIGHTS_HEADER: served.weights_version}
        ignored = body.ignored_fields()
        if ignored:
            out[IGNORED_HEADER] = ",".join(ignored)
        return out

    async def generate(
        body: Any,
        id_prefix: str,
        make_json: Callable[[Served], Awaitable[Any]],
        make_events: Callable[[Served], AsyncIterator[str]],
        prompt_field: str = "messages",
    ) -> Any:
        served, lease = await admit(body.model, id_prefix)
        streaming = False
        try:
            if body.stream:
                events = await primed(guarded(make_events(served), prompt_field))
                streaming = True
                return LeasedStream(events, lease, headers=headers(served, body))
            return JSONResponse(await make_json(served), headers=headers(served, body))
        except Exception as exc:
            raise to_api_error(exc, prompt_field=prompt_field) from exc
        finally:
            if not streaming:
                lease.release()

    def check_n(n: int) -> None:
        if n > settings.max_branches:
            raise ApiError(
                400,
                f"n={n} is more than this server's limit of "
                f"{settings.max_branches} (--max-branches)",
                param="n",
            )

    # ------------------------------------------------------------------ OpenAI routes

    @app.get("/health")
    async def health() -> dict[str, Any]:
        models = {
            name: {
                "weights_version": e.weights_version,
                "engine_requests": registry.engine_requests(e),
            }
            for name, e in registry.models.items()
        }
        return {"status": "ok", "models": models, "limiter": limiter.stats()}

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [c.model_dump() for c in registry.cards()]}

    @app.get("/v1/models/{name:path}")
    async def get_model(name: str) -> dict[str, Any]:
        entry, snapshot = registry.resolve(name)
        return (snapshot.card() if snapshot is not None else entry.card()).model_dump()

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest) -> Any:
        check_n(body.n)
        return await generate(
            body,
            "chatcmpl",
            lambda s: chat.chat_completion(s, body, limit),
            lambda s: chat.chat_events(s, body, limit),
        )

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest) -> Any:
        check_n(body.n * (len(body.prompts())))
        unsupported = body.unsupported()
        if unsupported is not None:
            raise ApiError(400, unsupported[1], param=unsupported[0])
        return await generate(
            body,
            "cmpl",
            lambda s: chat.completion(s, body, limit),
            lambda s: chat.completion_events(s, body, limit),
            prompt_field="prompt",
        )

    # ------------------------------------------------------------------ fork and snapshots

    @app.post("/v1/fork")
    async def fork(body: ForkRequest) -> Any:
        calls: dict[str, forks.ForkCall] = {}

        def call(served: Served) -> forks.ForkCall:
            if "call" not in calls:
                calls["call"] = forks.ForkCall(served, registry, body, limit, settings.max_branches)
            return calls["call"]

        async def as_json(served: Served) -> Any:
            fork_call = call(served)
            return fork_call.response(await fork_call.run())

        return await generate(body, "fork", as_json, lambda s: call(s).events())

    @app.post("/v1/snapshots")
    async def create_snapshot(body: SnapshotCreateRequest) -> Any:
        served, lease = await admit(body.model, "snap")
        try:
            entry = await forks.create_snapshot(served, registry, body.messages, body.name, limit)
        except Exception as exc:
            raise to_api_error(exc) from exc
        finally:
            lease.release()
        return JSONResponse(entry.to_json(full=True), headers=headers(served, body))

    @app.get("/v1/snapshots")
    async def list_snapshots() -> dict[str, Any]:
        return {"object": "list", "data": [e.to_json() for e in registry.snapshots.values()]}

    @app.post("/v1/snapshots/load")
    async def load_snapshot(body: SnapshotLoadRequest) -> Any:
        entry = registry.model(body.model)
        try:
            snapshot = await forks.load_snapshot(registry, entry, body.src, body.name)
        except Exception as exc:
            raise to_api_error(exc) from exc
        return snapshot.to_json(full=True)

    @app.get("/v1/snapshots/{key}")
    async def get_snapshot(key: str) -> dict[str, Any]:
        return registry.snapshot(key).to_json(full=True)

    @app.delete("/v1/snapshots/{key}")
    async def delete_snapshot(key: str) -> dict[str, Any]:
        return forks.delete_snapshot(registry, key)

    @app.post("/v1/snapshots/{key}/save")
    async def save_snapshot(key: str, body: SnapshotSaveRequest) -> dict[str, Any]:
        try:
            return await forks.save_snapshot(registry, key, body.dest)
        except Exception as exc:
            raise to_api_error(exc) from exc

    # ------------------------------------------------------------------ admin

    @app.post("/admin/models")
    async def register_model(body: ModelRegisterRequest) -> dict[str, Any]:
        try:
            entry: ModelEntry = await registry.add_model(body.name, body.model)
        except Exception as exc:
            raise to_api_error(exc) from exc
        return entry.card().model_dump()

    @app.delete("/admin/models/{name:path}")
    async def remove_model(name: str) -> dict[str, Any]:
        await registry.remove_model(name)
        return {"id": name, "object": "model", "deleted": True}

    @app.post("/admin/models/{name:path}/weights")
    async def swap_weights(name: str, body: WeightsLoadRequest) -> Any:
        entry = registry.model(name)
        try:
            result = await forks.load_weights(entry, body.src)
        except Exception as exc:
            raise to_api_error(exc, prompt_field="src") from exc
        return JSONResponse(result, headers={WEIGHTS_HEADER: entry.weights_version})

    app.add_middleware(Auth, api_key=settings.api_key, is_admin=is_admin_path)
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)  # outermost
    return app
