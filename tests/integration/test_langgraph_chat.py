"""ChatThaw inside LangGraph, on the embedded SmolLM2 engine (shared with the other chat tests).

- a StateGraph whose node calls ChatThaw, with a checkpointer, streaming tokens with
  ``stream_mode="messages"``;
- the prebuilt ReAct agent with one tool: ChatThaw's auto tool routing (request_plan) makes
  the 135M model call the tool, then answer from the tool's result.
"""

from __future__ import annotations

from typing import Any

import pytest
from langchain_core.messages import AIMessage, AIMessageChunk, HumanMessage, ToolMessage
from langchain_core.tools import tool
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.graph import START, MessagesState, StateGraph

from thaw_agents import ChatThaw

# The standard suite's engine settings (one shared engine); greedy, so deterministic.
SMOL: dict[str, Any] = {"max_model_len": 4096}
GREEDY: dict[str, Any] = {"temperature": 0.0, "max_tokens": 200, "frequency_penalty": 0.5}


@pytest.fixture(scope="module")
def smol() -> ChatThaw:
    return ChatThaw(**SMOL, **GREEDY)


def _chat_graph(llm: ChatThaw, *, use_async: bool) -> Any:
    def chat(state: MessagesState) -> dict[str, list]:
        return {"messages": [llm.invoke(state["messages"], max_tokens=40)]}

    async def achat(state: MessagesState) -> dict[str, list]:
        return {"messages": [await llm.ainvoke(state["messages"], max_tokens=40)]}

    builder = StateGraph(MessagesState)
    builder.add_node("chat", achat if use_async else chat)
    builder.add_edge(START, "chat")
    return builder.compile(checkpointer=InMemorySaver())


def _check_turns(graph: Any, config: dict, streamed: list[list[AIMessageChunk]]) -> None:
    messages = graph.get_state(config).values["messages"]
    assert [type(m) for m in messages] == [HumanMessage, AIMessage, HumanMessage, AIMessage]
    first, second = messages[1], messages[3]
    assert "Paris" in first.content
    # The checkpointer carried turn one into turn two's prompt.
    assert second.usage_metadata["input_tokens"] > (
        first.usage_metadata["input_tokens"] + first.usage_metadata["output_tokens"]
    )
    for chunks, answer in zip(streamed, (first, second)):
        assert len(chunks) >= 3  # token by token, not one final message
        assert "".join(str(chunk.content) for chunk in chunks) == answer.content


def test_state_graph_streams_tokens_with_checkpointer(smol: ChatThaw):
    graph = _chat_graph(smol, use_async=False)
    config = {"configurable": {"thread_id": "sync-thread"}}
    streamed = []
    for question in ("What is the capital of France?", "And what is the capital of Germany?"):
        chunks = []
        for chunk, metadata in graph.stream(
            {"messages": [HumanMessage(question)]}, config, stream_mode="messages"
        ):
            assert metadata["langgraph_node"] == "chat"
            chunks.append(chunk)
        assert all(isinstance(chunk, AIMessageChunk) for chunk in chunks)
        streamed.append(chunks)
    _check_turns(graph, config, streamed)


async def test_async_state_graph_streams_tokens_with_checkpointer(smol: ChatThaw):
    graph = _chat_graph(smol, use_async=True)
    config = {"configurable": {"thread_id": "async-thread"}}
    streamed = []
    for question in ("What is the capital of France?", "And what is the capital of Germany?"):
        chunks = [
            chunk
            async for chunk, metadata in graph.astream(
                {"messages": [HumanMessage(question)]}, config, stream_mode="messages"
            )
            if metadata["langgraph_node"] == "chat"
        ]
        streamed.append(chunks)
    _check_turns(graph, config, streamed)


def test_react_agent_calls_the_tool_then_answers(smol: ChatThaw):
    from langgraph.prebuilt import create_react_agent

    cities: list[str] = []

    @tool
    def get_weather(city: str) -> str:
        """Get the current weather in a city."""
        cities.append(city)
        return f"It is sunny and 22 degrees Celsius in {city}."

    agent = create_react_agent(smol, [get_weather])
    result = agent.invoke(
        {"messages": [HumanMessage("What is the weather in Paris?")]}, {"recursion_limit": 8}
    )
    messages = result["messages"]
    assert [type(m) for m in messages] == [HumanMessage, AIMessage, ToolMessage, AIMessage], [
        (type(m).__name__, m.content, getattr(m, "tool_calls", None)) for m in messages
    ]
    call_message, tool_message, answer = messages[1], messages[2], messages[3]
    [call] = call_message.tool_calls
    assert call["name"] == "get_weather"
    assert cities == [call["args"]["city"]] and "Paris" in cities[0]
    assert call_message.response_metadata["tool_routing"] == "tool"
    assert tool_message.tool_call_id == call["id"]
    assert answer.tool_calls == []
    assert "sunny" in answer.content.lower() or "22" in answer.content  # read the result
