"""fork_fanout inside LangGraph, on real vLLM engines: a node, ``Send`` and a Runnable.

One parent ChatThaw (float32 tiny Llama, its own shared-memory store) and one 2-worker ForkPool
for the module. Branches run in the workers (``route="pool"``), so their tokens cross a process
and a thread before they reach the graph's streams. Correctness of the tokens themselves is
test_fork_fanout.py's subject; here each graph's branches must equal a direct fork_fanout's.
"""

from __future__ import annotations

import json
import operator
import os
from typing import Annotated, Any, TypedDict

import pytest
from fanout_procs import BLOCK, PREFIX_TEXT, SUFFIXES, parent_model, running
from langchain_core.messages import AnyMessage, HumanMessage, SystemMessage
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.graph import END, START, StateGraph

from thaw_agents import (
    BRANCH_TOKEN_EVENT,
    ForkFanout,
    PrefixHandle,
    branch_node,
    branch_sends,
    fanout_node,
    fork_fanout,
    snapshot_node,
)

pytestmark = pytest.mark.slow  # engines: ~40 s to start the parent and its pool

STORE = f"graph-{os.getpid()}"
QUESTION = "Review the facts above."


class State(TypedDict, total=False):
    topic: str
    messages: list[AnyMessage]
    prefix_handle: dict
    branches: Annotated[list[dict], operator.add]
    verdict: str


def prefix(state: State) -> dict[str, Any]:
    return {"messages": [SystemMessage(state["topic"]), HumanMessage(QUESTION)]}


def join(state: State) -> dict[str, Any]:
    ok = [b for b in state["branches"] if b["error"] is None]
    return {"verdict": f"{len(ok)}/{len(state['branches'])} branches"}


@pytest.fixture(scope="module")
def llm():
    with parent_model(STORE) as model:
        yield model


@pytest.fixture(scope="module")
def pool(llm):
    with llm.fork_pool(2, start=False) as workers:
        pids = workers.worker_pids()
        yield workers
    assert not [pid for pid in pids if running(pid)], "a pool worker outlived the pool"


@pytest.fixture(scope="module")
def direct(llm, pool):
    """What fork_fanout itself returns for the graphs' prefix (token ids per suffix)."""
    import asyncio

    messages = prefix({"topic": PREFIX_TEXT})["messages"]
    results = asyncio.run(fork_fanout(llm, messages, SUFFIXES, pool=pool, route="pool"))
    assert all(r.ok for r in results)
    return [r.token_ids for r in results]


def full_block_tokens(llm) -> int:
    messages = prefix({"topic": PREFIX_TEXT})["messages"]
    ids = llm.render_prefix(messages).token_ids
    assert len(ids) >= 2000
    return len(ids) // BLOCK * BLOCK


def fanout_graph(llm, pool):
    builder = StateGraph(State)
    builder.add_node("prefix", prefix)
    builder.add_node(
        "review",
        fanout_node(llm, suffixes=SUFFIXES, output_key="branches", pool=pool, route="pool"),
    )
    builder.add_node("join", join)
    builder.add_edge(START, "prefix")
    builder.add_edge("prefix", "review")
    builder.add_edge("review", "join")
    builder.add_edge("join", END)
    return builder.compile(checkpointer=InMemorySaver())


def check_branches(branches: list[dict], direct: list[list[int]], cached_at_least: int) -> None:
    assert [b["token_ids"] for b in branches] == direct
    for branch in branches:
        assert branch["error"] is None and branch["engine"].startswith("worker-")
        assert branch["usage"]["input_token_details"]["cache_read"] >= cached_at_least
        assert json.loads(json.dumps(branch)) == branch  # checkpointable plain data


async def test_fanout_node_streams_branch_tokens_with_a_checkpointer(llm, pool, direct):
    graph = fanout_graph(llm, pool)
    config = {"configurable": {"thread_id": "fanout-events"}}
    pieces: dict[int, list[str]] = {}
    async for event in graph.astream_events({"topic": PREFIX_TEXT}, config, version="v2"):
        if event["event"] == "on_custom_event" and event["name"] == BRANCH_TOKEN_EVENT:
            data = event["data"]
            assert data["suffix_index"] == data["branch"] and data["sample_index"] == 0
            pieces.setdefault(data["branch"], []).append(data["text"])
    state = graph.get_state(config).values
    check_branches(state["branches"], direct, full_block_tokens(llm))
    assert state["verdict"] == f"{len(SUFFIXES)}/{len(SUFFIXES)} branches"
    assert sorted(pieces) == list(range(len(SUFFIXES)))
    for branch in state["branches"]:
        streamed = pieces[branch["index"]]
        assert len(streamed) >= 2  # token by token, not one final piece
        assert "".join(streamed) == branch["text"]

    # The checkpointer keeps the thread: a second run appends four more branches.
    await graph.ainvoke({"topic": PREFIX_TEXT}, config)
    state = graph.get_state(config).values
    assert len(state["branches"]) == 2 * len(SUFFIXES)
    assert [b["token_ids"] for b in state["branches"][len(SUFFIXES) :]] == direct


async def test_fanout_node_custom_stream_mode(llm, pool, direct):
    graph = fanout_graph(llm, pool)
    config = {"configurable": {"thread_id": "fanout-custom"}}
    pieces: dict[int, list[str]] = {}
    async for chunk in graph.astream({"topic": PREFIX_TEXT}, config, stream_mode="custom"):
        pieces.setdefault(chunk["branch"], []).append(chunk["text"])
    state = graph.get_state(config).values
    check_branches(state["branches"], direct, full_block_tokens(llm))
    assert {i: "".join(p) for i, p in pieces.items()} == {
        b["index"]: b["text"] for b in state["branches"]
    }


async def test_send_pattern_with_json_handles(llm, pool, direct):
    builder = StateGraph(State)
    builder.add_node("prefix", prefix)
    builder.add_node("snapshot", snapshot_node(llm))
    builder.add_node("branch", branch_node(llm, output_key="branches", pool=pool, route="pool"))
    builder.add_node("join", join)
    builder.add_edge(START, "prefix")
    builder.add_edge("prefix", "snapshot")
    builder.add_conditional_edges(
        "snapshot", lambda s: branch_sends(s, "branch", SUFFIXES), ["branch"]
    )
    builder.add_edge("branch", "join")
    builder.add_edge("join", END)
    graph = builder.compile(checkpointer=InMemorySaver())
    config = {"configurable": {"thread_id": "send"}}

    await graph.ainvoke({"topic": PREFIX_TEXT}, config)
    state = graph.get_state(config).values
    handle = state["prefix_handle"]
    assert json.loads(json.dumps(handle)) == handle  # what the checkpointer stored: JSON
    restored = PrefixHandle.from_json(json.dumps(handle))
    assert restored.num_snapshot_tokens == full_block_tokens(llm)
    branches = sorted(state["branches"], key=lambda b: b["branch_index"])
    assert [b["branch_index"] for b in branches] == list(range(len(SUFFIXES)))
    check_branches(branches, direct, restored.num_snapshot_tokens)
    assert state["verdict"] == f"{len(SUFFIXES)}/{len(SUFFIXES)} branches"
    # every checkpoint after the snapshot carries the same handle
    handles = [s.values.get("prefix_handle") for s in graph.get_state_history(config)]
    assert handle in handles and all(h in (None, handle) for h in handles)


def test_fork_fanout_runnable_invoke(llm, pool, direct):
    runnable = ForkFanout(llm=llm, pool=pool, route="pool")
    messages = prefix({"topic": PREFIX_TEXT})["messages"]
    results = runnable.invoke({"prefix": messages, "suffixes": SUFFIXES[:2]})
    assert [r.token_ids for r in results] == direct[:2]
    assert all(
        r.usage["input_token_details"]["cache_read"] >= full_block_tokens(llm) for r in results
    )


async def test_fork_fanout_runnable_ainvoke_from_a_handle(llm, pool, direct):
    handle = await llm.asnapshot(prefix({"topic": PREFIX_TEXT})["messages"])
    runnable = ForkFanout(llm=llm, pool=pool, route="pool", options={"max_tokens": 5})
    results = await runnable.ainvoke({"prefix": handle, "suffixes": SUFFIXES[2:]})
    assert [r.token_ids for r in results] == [ids[:5] for ids in direct[2:]]
    assert all(r.prefix == handle for r in results)
    # its run config reaches fork_fanout: the branch tokens show up as custom events
    pieces: dict[int, str] = {}
    async for event in runnable.astream_events(
        {"prefix": handle, "suffixes": SUFFIXES[2:]}, version="v2"
    ):
        if event["event"] == "on_custom_event" and event["name"] == BRANCH_TOKEN_EVENT:
            pieces[event["data"]["branch"]] = (
                pieces.get(event["data"]["branch"], "") + event["data"]["text"]
            )
    assert pieces == {r.index: r.text for r in results}
