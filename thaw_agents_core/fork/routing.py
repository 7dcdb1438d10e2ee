"""Where each branch of a fork runs: the parent engine or a pool worker.

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

from typing import Literal

from thaw_agents_core.pool.fork_pool import ForkPool

Route = Literal["auto", "parent", "pool"]


def _pool_shares_parent_gpu(pool: ForkPool) -> bool:
    from thaw_agents_core.util import compat

    if compat.is_cpu_platform():
        return False
    return (
        all(p.cuda_device is not None for p in pool.placements)
        and len({p.cuda_device for p in pool.placements}) <= 1
    )


def routing_rule(pool: ForkPool | None, route: Route) -> str:
    """Which rule of the module docstring applies: "forced", "no pool", "shared GPU" or
    "least loaded" (reported in each branch's ``route["rule"]``)."""
    if route not in ("auto", "parent", "pool"):
        raise ValueError(f"route must be 'auto', 'parent' or 'pool', got {route!r}")
    started = pool is not None and bool(pool.alive_workers())
    if route == "pool" and not started:
        raise ValueError("route='pool' needs a started ForkPool with live workers")
    if route != "auto":
        return "forced"
    if not started:
        return "no pool"
    if _pool_shares_parent_gpu(pool):  # type: ignore[arg-type]
        return "shared GPU"
    return "least loaded"


def plan_routes(
    num_branches: int, pool: ForkPool | None, route: Route, parent_in_flight: int = 0
) -> list[str]:
    """ "parent" or "pool" for each branch (see the module docstring for the rule)."""
    rule = routing_rule(pool, route)
    if route == "pool":
        return ["pool"] * num_branches
    if rule != "least loaded":
        return ["parent"] * num_branches
    assert pool is not None
    loads = {"parent": parent_in_flight, **{f"w{i}": n for i, n in pool.load().items()}}
    routes = []
    for _ in range(num_branches):
        target = min(loads, key=lambda name: (loads[name], name != "parent"))
        loads[target] += 1
        routes.append("parent" if target == "parent" else "pool")
    return routes
