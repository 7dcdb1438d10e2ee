"""Forking on token ids: snapshot a prefix in the parent engine, run branches where it is fastest.

    asnapshot_ids(engine, prefix_ids)   one request (max_tokens=1) whose prompt's full blocks the
                                        connector saves -> PrefixHandle
    run_branches(engine, branches, pool=..., route=...)
        each branch prompt = prefix ids + its suffix ids, so every engine finds the prefix:
        the parent in its own prefix cache, pool workers in the snapshot store

Routing (``route="auto"``), per branch, in this order:
1. no started pool                         -> the parent (vLLM shares the prefix blocks and
                                              batches the branches' decode)
2. the pool's workers share the parent's GPU -> the parent: one GPU decodes a batch in one pass;
                                              other processes on it add context switches and
                                              KV loads, not compute
3. otherwise (own CPU cores or own GPUs)    -> whichever engine has the fewest branches in
                                              flight, the parent counted as one engine and
                                              preferred on ties (it holds the prefix already)
``route="parent"`` and ``route="pool"`` force one side.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any, Callable, Literal, Sequence

from thaw_agents_core.connector.settings import PARAMS_KEY
from thaw_agents_core.engine.engine import Engine
from thaw_agents_core.engine.sampling import GenerationOptions, to_sampling_params
from thaw_agents_core.fork.prefix import PrefixHandle
from thaw_agents_core.pool.fork_pool import ForkPool
from thaw_agents_core.snapshot.format import SnapshotError
from thaw_agents_core.util import compat

Route = Literal["auto", "parent", "pool"]
DeltaCallback = Callable[[int, str], None]


# ---------------------------------------------------------------------- snapshots


def _snapshot_params(extra: dict[str, Any] | None) -> Any:
    options = GenerationOptions(max_tokens=1, temperature=0.0, kv_transfer_params={
        PARAMS_KEY: {"save": True, "extra": dict(extra or {})}})
    return to_sampling_params(options, stream=False)


def _handle(engine: Engine, prefix_ids: Sequence[int], output: Any) -> PrefixHandle:
    params = (getattr(output, "kv_transfer_params", None) or {}).get(PARAMS_KEY) or {}
    result = params.get("snapshot")
    if not result:
        raise SnapshotError("the engine returned no snapshot result: is ThawConnector loaded "
                            "(a kv_store / kv_transfer config)?")
    if not result.get("ok"):
        raise SnapshotError(f"snapshot failed: {result.get('error')}")
    return PrefixHandle(
        snapshot_id=result["snapshot_id"], namespace_key=result["namespace_key"],
        namespace=result["namespace"], store=engine.store_url or result["store"],
        prefix_token_ids=list(prefix_ids), num_snapshot_tokens=result["num_tokens"])


def _check_length(engine: Engine, prefix_ids: Sequence[int]) -> None:
    if len(prefix_ids) >= engine.max_model_len:
        raise ValueError(f"the prefix has {len(prefix_ids)} tokens; the engine's context holds "
                         f"max_model_len={engine.max_model_len}")


async def asnapshot_ids(engine: Engine, prefix_ids: Sequence[int],
                        extra: dict[str, Any] | None = None) -> PrefixHandle:
    """Compute ``prefix_ids`` in ``engine`` (reusing its prefix cache) and snapshot them."""
    if not engine.is_started:
        await asyncio.to_thread(engine.start)
    _check_length(engine, prefix_ids)
    final = None
    async for final in engine.stream(list(prefix_ids), _snapshot_params(extra)):
        pass
    return _handle(engine, prefix_ids, final)


def snapshot_ids(engine: Engine, prefix_ids: Sequence[int],
                 extra: dict[str, Any] | None = None) -> PrefixHandle:
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


@dataclass(slots=True)
class BranchOutcome:
    index: int
    suffix_index: int
    sample_index: int
    engine: str
    """"parent" or "worker-<i>"."""
    text: str = ""
    token_ids: list[int] | None = None
    finish_reason: str | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0
    ttft_s: float | None = None
    total_s: float = 0.0
    retries: int = 0
    error: str | None = None


def _pool_shares_parent_gpu(pool: ForkPool) -> bool:
    from thaw_agents_core.util import compat

    if compat.is_cpu_platform():
        return False
    return all(p.cuda_device is not None for p in pool.placements) and len(
        {p.cuda_device for p in pool.placements}) <= 1


def plan_routes(num_branches: int, pool: ForkPool | None, route: Route,
                parent_in_flight: int = 0) -> list[str]:
    """"parent" or "pool" for each branch (see the module docstring for the rule)."""
    if route not in ("auto", "parent", "pool"):
        raise ValueError(f"route must be 'auto', 'parent' or 'pool', got {route!r}")
    started = pool is not None and bool(pool.alive_workers())
    if route == "pool":
        if not started:
            raise ValueError("route='pool' needs a started ForkPool with live workers")
        return ["pool"] * num_branches
    if route == "parent" or not started or _pool_shares_parent_gpu(pool):  # type: ignore[arg-type]
        return ["parent"] * num_branches
    assert pool is not None
    loads = {"parent": parent_in_flight, **{f"w{i}": n for i, n in pool.load().items()}}
    routes = []
    for _ in range(num_branches):
        target = min(loads, key=lambda name: (loads[name], name != "parent"))
        loads[target] += 1
        routes.append("parent" if target == "parent" else "pool")
    return routes


async def _run_in_parent(engine: Engine, index: int, branch: Branch,
                         on_delta: DeltaCallback | None,
                         timeout_s: float | None) -> BranchOutcome:
    began = time.perf_counter()
    outcome = BranchOutcome(index, branch.suffix_index, branch.sample_index, "parent",
                            token_ids=[], prompt_tokens=len(branch.prompt_ids))
    params = to_sampling_params(branch.options, stream=True)
    async for out in engine.stream(branch.prompt_ids, params, timeout_s=timeout_s):
        completion = out.outputs[0]
        if completion.token_ids and outcome.ttft_s is None:
            outcome.ttft_s = time.perf_counter() - began
        outcome.text += completion.text
        outcome.token_ids.extend(completion.token_ids)  # type: ignore[union-attr]
        outcome.cached_tokens = int(out.num_cached_tokens or 0)
        if completion.finish_reason is not None:
            outcome.finish_reason = completion.finish_reason
        if on_delta is not None and completion.text:
            on_delta(index, completion.text)
    outcome.total_s = time.perf_counter() - began
    return outcome


async def _run_in_pool(pool: ForkPool, index: int, branch: Branch,
                       on_delta: DeltaCallback | None,
                       timeout_s: float | None) -> BranchOutcome:
    callback = None if on_delta is None else (lambda text: on_delta(index, text))
    result = await pool.generate(branch.prompt_ids, branch.options, on_delta=callback,
                                 timeout_s=timeout_s)
    return BranchOutcome(index, branch.suffix_index, branch.sample_index, f"worker-{result.worker}",
                         text=result.text, token_ids=result.token_ids,
                         finish_reason=result.finish_reason, prompt_tokens=result.prompt_tokens,
                         cached_tokens=result.num_cached_tokens, ttft_s=result.ttft_s,
                         total_s=result.total_s, retries=result.retries)


async def run_branches(engine: Engine, branches: Sequence[Branch], *,
                       pool: ForkPool | None = None, route: Route = "auto",
                       on_delta: DeltaCallback | None = None,
                       timeout_s: float | None = None) -> list[BranchOutcome]:
    """Run every branch concurrently; a failed branch is reported, the others are kept."""
    parent_in_flight = (compat.num_unfinished_requests(engine.llm) if engine.is_started
                        else 0)
    routes = plan_routes(len(branches), pool, route, parent_in_flight)
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
            result = BranchOutcome(index, branch.suffix_index, branch.sample_index, where,
                                   prompt_tokens=len(branch.prompt_ids),
                                   error=f"{type(result).__name__}: {result}")
        outcomes.append(result)
    return outcomes
