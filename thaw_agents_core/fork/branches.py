"""Forking on token ids: snapshot a prefix in the parent engine, run branches where it is fastest.

    asnapshot_ids(engine, prefix_ids)   one request (max_tokens=1) whose prompt's full blocks the
                                        connector saves -> PrefixHandle
    run_branches(engine, branches, pool=..., route=...)
        each branch prompt = prefix ids + its suffix ids, so every engine finds the prefix:
        the parent in its own prefix cache, pool workers in the snapshot store

Where each branch runs: ``routing.plan_routes``.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from thaw_agents_core.connector.settings import PARAMS_KEY
from thaw_agents_core.engine.engine import Engine
from thaw_agents_core.engine.results import GenerationResult
from thaw_agents_core.engine.sampling import GenerationOptions, to_sampling_params
from thaw_agents_core.fork.prefix import PrefixHandle
from thaw_agents_core.fork.routing import Route, plan_routes, routing_rule
from thaw_agents_core.pool.fork_pool import ForkPool
from thaw_agents_core.snapshot.errors import SnapshotError
from thaw_agents_core.util import compat

DeltaCallback = Callable[[int, str], None]


# ---------------------------------------------------------------------- snapshots


def _snapshot_params(extra: dict[str, Any] | None) -> Any:
    options = GenerationOptions(
        max_tokens=1,
        temperature=0.0,
        kv_transfer_params={PARAMS_KEY: {"save": True, "extra": dict(extra or {})}},
    )
    return to_sampling_params(options, stream=False)


def _handle(engine: Engine, prefix_ids: Sequence[int], output: Any) -> PrefixHandle:
    params = (getattr(output, "kv_transfer_params", None) or {}).get(PARAMS_KEY) or {}
    result = params.get("snapshot")
    if not result:
        raise SnapshotError(
            "the engine returned no snapshot result: is ThawConnector loaded "
            "(a kv_store / kv_transfer config)?"
        )
    if not result.get("ok"):
        raise SnapshotError(f"snapshot failed: {result.get('error')}")
    return PrefixHandle(
        snapshot_id=result["snapshot_id"],
        namespace_key=result["namespace_key"],
        namespace=result["namespace"],
        store=engine.store_url or result["store"],
        prefix_token_ids=list(prefix_ids),
        num_snapshot_tokens=result["num_tokens"],
    )


def _check_length(engine: Engine, prefix_ids: Sequence[int]) -> None:
    if len(prefix_ids) >= engine.max_model_len:
        raise ValueError(
            f"the prefix has {len(prefix_ids)} tokens; the engine's context holds "
            f"max_model_len={engine.max_model_len}"
        )


async def asnapshot_ids(
    engine: Engine, prefix_ids: Sequence[int], extra: dict[str, Any] | None = None
) -> PrefixHandle:
    """Compute ``prefix_ids`` in ``engine`` (reusing its prefix cache) and snapshot them."""
    if not engine.is_started:
        await asyncio.to_thread(engine.start)
    _check_length(engine, prefix_ids)
    final = None
    async for final in engine.stream(list(prefix_ids), _snapshot_params(extra)):
        pass
    return _handle(engine, prefix_ids, final)


def snapshot_ids(
    engine: Engine, prefix_ids: Sequence[int], extra: dict[str, Any] | None = None
) -> PrefixHandle:
    """Blocking twin of ``asnapshot_ids``."""
    _check_length(engine, prefix_ids)
    final = None
    for final in engine.stream_sync(list(prefix_ids), _snapshot_params(extra)):
        pass
    return _handle(engine, prefix_ids, final)


# ---------------------------------------------------------------------- branches


@dataclass(slots=True)
class Branch:
    """One branch: its full prompt (prefix + suffix ids) and its own sampling options."""

    prompt_ids: list[int]
    options: GenerationOptions
    suffix_index: int = 0
    sample_index: int = 0


async def _run_in_parent(
    engine: Engine,
    index: int,
    branch: Branch,
    on_delta: DeltaCallback | None,
    timeout_s: float | None,
) -> GenerationResult:
    began = time.perf_counter()
    result = _new_result(index, branch, "parent")
    params = to_sampling_params(branch.options, stream=True)
    async for out in engine.stream(branch.prompt_ids, params, timeout_s=timeout_s):
        text = result.absorb(out, began, time.perf_counter())
        if on_delta is not None and text:
            on_delta(index, text)
    result.total_s = time.perf_counter() - began
    return result


def _new_result(index: int, branch: Branch, engine: str, **values: Any) -> GenerationResult:
    return GenerationResult(
        index=index,
        suffix_index=branch.suffix_index,
        sample_index=branch.sample_index,
        engine=engine,
        prompt_tokens=len(branch.prompt_ids),
        **values,
    )


async def _run_in_pool(
    pool: ForkPool,
    index: int,
    branch: Branch,
    on_delta: DeltaCallback | None,
    timeout_s: float | None,
) -> GenerationResult:
    callback = None if on_delta is None else (lambda text: on_delta(index, text))
    result = await pool.generate(
        branch.prompt_ids, branch.options, on_delta=callback, timeout_s=timeout_s
    )
    result.index, result.suffix_index, result.sample_index = (
        index,
        branch.suffix_index,
        branch.sample_index,
    )
    return result


async def run_branches(
    engine: Engine,
    branches: Sequence[Branch],
    *,
    pool: ForkPool | None = None,
    route: Route = "auto",
    on_delta: DeltaCallback | None = None,
    timeout_s: float | None = None,
) -> list[GenerationResult]:
    """Run every branch concurrently; a failed branch is reported, the others are kept."""
    parent_in_flight = compat.num_unfinished_requests(engine.llm) if engine.is_started else 0
    routes = plan_routes(len(branches), pool, route, parent_in_flight)
    rule = routing_rule(pool, route)
    tasks = []
    for index, (branch, where) in enumerate(zip(branches, routes)):
        if where == "parent":
            tasks.append(_run_in_parent(engine, index, branch, on_delta, timeout_s))
        else:
            assert pool is not None
            tasks.append(_run_in_pool(pool, index, branch, on_delta, timeout_s))
    results = await asyncio.gather(*tasks, return_exceptions=True)
    outcomes = []
    for index, (branch, where, result) in enumerate(zip(branches, routes, results)):
        if isinstance(result, BaseException):
            if isinstance(result, asyncio.CancelledError):
                raise result
            result = _new_result(index, branch, where, error=f"{type(result).__name__}: {result}")
        result.route["rule"] = rule
        outcomes.append(result)
    return outcomes
