"""fork_fanout in LangGraph: as a node, as a Runnable, and with ``Send``.

1. A node that fans out and writes results to a reducer key::

       class State(TypedDict):
           messages: list[AnyMessage]
           branches: Annotated[list[dict], operator.add]

       graph.add_node("review", fanout_node(llm, suffixes=REVIEWERS, output_key="branches"))

2. A Runnable: ``ForkFanout(llm).invoke({"prefix": messages, "suffixes": [...]})``.

3. ``Send``: one node snapshots the prefix (a JSON handle in the state, so checkpointers
   keep it), ``branch_sends`` routes one ``Send`` per suffix, and each branch node runs
   ``run_branch`` from the handle::

       graph.add_node("prefix", snapshot_node(llm))
       graph.add_node("branch", branch_node(llm, output_key="branches"))
       graph.add_conditional_edges("prefix", lambda s: branch_sends(s, "branch", SUFFIXES))

Branch tokens stream as custom events named "thaw_branch_token" (``astream_events`` /
``stream_mode="custom"`` consumers see them).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Sequence

from langchain_core.messages import messages_from_dict
from langchain_core.runnables import RunnableConfig, RunnableSerializable
from langgraph.types import Send

from thaw_agents.fanout import BranchResult, Suffix, fork_fanout
from thaw_agents_core.fork.prefix import PrefixHandle
from thaw_agents_core.pool.fork_pool import ForkPool

if TYPE_CHECKING:
    from thaw_agents.chat_model import ChatThaw

SuffixSource = Sequence[Suffix] | Callable[[dict[str, Any]], Sequence[Suffix]]


def fanout_node(
    llm: ChatThaw,
    *,
    suffixes: SuffixSource,
    prefix_key: str = "messages",
    output_key: str = "branches",
    n: int = 1,
    options: dict[str, Any] | Sequence[dict[str, Any]] | None = None,
    pool: ForkPool | None = None,
    route: str = "auto",
):
    """A LangGraph node: fork the state's ``prefix_key`` messages into ``suffixes``.

    Returns ``{output_key: [branch.to_dict(), ...]}``; give that key an ``operator.add``
    reducer to collect branches from several nodes or rounds.
    """

    async def node(state: dict[str, Any], config: RunnableConfig) -> dict[str, Any]:
        chosen = suffixes(state) if callable(suffixes) else suffixes
        results = await fork_fanout(
            llm,
            state[prefix_key],
            chosen,
            n=n,
            options=options,
            pool=pool,
            route=route,
            config=config,
        )  # type: ignore[arg-type]
        return {output_key: [r.to_dict() for r in results]}

    node.__name__ = f"fork_fanout_{output_key}"
    return node


class ForkFanout(RunnableSerializable[dict, list]):
    """fork_fanout as a Runnable: input ``{"prefix": messages | handle, "suffixes": [...]}``."""

    llm: Any
    n: int = 1
    options: Any = None
    pool: Any = None
    route: str = "auto"

    def invoke(
        self, input: dict, config: RunnableConfig | None = None, **kwargs: Any
    ) -> list[BranchResult]:
        from thaw_agents.fanout import fork_fanout_sync

        return self._call_with_config(
            lambda inp: fork_fanout_sync(
                self.llm,
                inp["prefix"],
                inp["suffixes"],
                n=self.n,
                options=self.options,
                pool=self.pool,
                route=self.route,
            ),
            input,
            config,
            run_type="chain",
        )

    async def ainvoke(
        self, input: dict, config: RunnableConfig | None = None, **kwargs: Any
    ) -> list[BranchResult]:
        # The parameter must be named ``config``: that is how LangChain decides to pass it.
        async def run(inp: dict, config: RunnableConfig) -> list[BranchResult]:
            return await fork_fanout(
                self.llm,
                inp["prefix"],
                inp["suffixes"],
                n=self.n,
                options=self.options,
                pool=self.pool,
                route=self.route,
                config=config,
            )  # type: ignore[arg-type]

        return await self._acall_with_config(run, input, config, run_type="chain")


def snapshot_node(
    llm: ChatThaw, *, prefix_key: str = "messages", handle_key: str = "prefix_handle"
):
    """A node that computes and snapshots the prefix once; the handle goes into the state."""

    async def node(state: dict[str, Any]) -> dict[str, Any]:
        handle = await llm.asnapshot(state[prefix_key])
        return {handle_key: handle.to_json()}

    node.__name__ = "snapshot_prefix"
    return node


def branch_sends(
    state: dict[str, Any],
    node: str,
    suffixes: Sequence[Suffix] | None = None,
    *,
    handle_key: str = "prefix_handle",
    suffixes_key: str = "suffixes",
) -> list[Send]:
    """One ``Send(node, {...})`` per suffix, each carrying the (JSON) prefix handle."""
    chosen = suffixes if suffixes is not None else state[suffixes_key]
    return [
        Send(node, {handle_key: state[handle_key], "suffix": suffix, "branch_index": i})
        for i, suffix in enumerate(chosen)
    ]


async def run_branch(
    llm: ChatThaw,
    handle: PrefixHandle | dict[str, Any],
    suffix: Suffix,
    *,
    options: dict[str, Any] | None = None,
    pool: ForkPool | None = None,
    route: str = "auto",
    config: RunnableConfig | None = None,
) -> BranchResult:
    """One branch from a prefix handle (the ``Send`` target's work)."""
    if isinstance(handle, dict):
        handle = PrefixHandle.from_json(handle)
    if isinstance(suffix, list) and suffix and isinstance(suffix[0], dict):
        suffix = messages_from_dict(suffix)
    (result,) = await fork_fanout(
        llm, handle, [suffix], options=options, pool=pool, route=route, config=config
    )  # type: ignore[arg-type]
    return result


def branch_node(
    llm: ChatThaw,
    *,
    handle_key: str = "prefix_handle",
    output_key: str = "branches",
    options: dict[str, Any] | None = None,
    pool: ForkPool | None = None,
    route: str = "auto",
):
    """The node ``branch_sends`` targets: runs its branch, appends to ``output_key``."""

    async def node(state: dict[str, Any], config: RunnableConfig) -> dict[str, Any]:
        result = await run_branch(
            llm,
            state[handle_key],
            state["suffix"],
            options=options,
            pool=pool,
            route=route,
            config=config,
        )
        data = result.to_dict()
        data["branch_index"] = state.get("branch_index", 0)
        return {output_key: [data]}

    node.__name__ = "fork_branch"
    return node
