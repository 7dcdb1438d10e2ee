"""``thaw-agents serve`` without an engine: request schemas, parameter mapping onto the
options builder, error bodies, response conversion, limits."""

from __future__ import annotations

import asyncio

import pytest
from langchain_core.messages import AIMessage

from thaw_agents.chat_model import ChatThaw
from thaw_agents.options import build_options
from thaw_agents.server.chat import chat_choice, choice_kwargs, finish_reason
from thaw_agents.server.limits import (
    Lease,
    Limiter,
    WeightsGate,
    check_bind,
    check_key,
    is_loopback,
)
from thaw_agents.server.schemas import (
    ApiError,
    ChatCompletionRequest,
    CompletionRequest,
    Usage,
    completion_logprobs,
    error_body,
    param_of,
)
from thaw_agents_core.engine.sampling import GenerationOptions, validate

USER = [{"role": "user", "content": "hi"}]


def test_chat_params_map_onto_chat_thaw_kwargs() -> None:
    request = ChatCompletionRequest.model_validate(
        {
            "model": "m",
            "messages": USER,
            "temperature": 0.2,
            "top_p": 0.9,
            "seed": 7,
            "stop": "END",
            "max_completion_tokens": 12,
            "max_tokens": 99,
            "logprobs": True,
            "top_logprobs": 3,
            "logit_bias": {"5": -1.0},
            "top_k": 4,
            "min_p": 0.1,
            "presence_penalty": 0.5,
            "frequency_penalty": 0.25,
            "repetition_penalty": 1.1,
            "response_format": {"type": "json_object"},
            "n": 2,
            "user": "u",
            "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}],
            "tool_choice": "auto",
        }
    )
    kwargs = request.call_kwargs()
    assert kwargs["max_tokens"] == 12  # max_completion_tokens wins
    assert kwargs["stop"] == ["END"]
    assert kwargs["tools"] == [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    assert "n" not in kwargs and "user" not in kwargs and "stream" not in kwargs
    sampling = {
        k: v for k, v in kwargs.items() if k not in ("tools", "tool_choice", "response_format")
    }
    # Every mapped name is one the shared options builder knows, and the values pass.
    options = build_options(ChatThaw().generation_defaults(), sampling)
    generation = GenerationOptions.from_mapping(options)
    validate(generation)
    assert generation.logprobs == 3 and generation.logit_bias == {5: -1.0}
    assert generation.top_k == 4 and generation.stop == ["END"]


def test_unknown_fields_are_ignored_and_listed() -> None:
    request = ChatCompletionRequest.model_validate(
        {"model": "m", "messages": USER, "store": True, "metadata": {"a": 1}}
    )
    assert request.ignored_fields() == ["metadata", "store"]
    assert "store" not in request.call_kwargs()


def test_choices_get_distinct_seeds() -> None:
    assert [choice_kwargs({"seed": 5}, k, 3)["seed"] for k in range(3)] == [5, 6, 7]
    assert choice_kwargs({"seed": 5}, 0, 1) == {"seed": 5}
    assert choice_kwargs({}, 2, 3) == {}


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"temperature": -1.0}, "temperature"),
        ({"top_p": 2.0}, "top_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"top_k": -5}, "top_k"),
        ({"min_p": 3.0}, "min_p"),
        ({"presence_penalty": 9.0}, "presence_penalty"),
        ({"frequency_penalty": -9.0}, "frequency_penalty"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"logprobs": 99}, "logprobs"),
        ({"stop": [""]}, "stop"),
        ({"json_schema": {}, "json_object": True}, "response_format"),
    ],
)
def test_the_validators_message_names_the_field(options: dict, field: str) -> None:
    with pytest.raises(ValueError) as info:
        validate(GenerationOptions.from_mapping(options), max_model_len=100)
    assert param_of(str(info.value)) == field


def test_param_of_other_messages() -> None:
    assert param_of("max_tokens=500 does not fit the context of 100 tokens") == "max_tokens"
    assert param_of("tool_choice='x' names no bound tool; bound tools: ['f']") == "tool_choice"
    assert param_of("the prompt has 9 tokens; ...") == "messages"
    assert param_of("the prompt has 9 tokens", prompt_field="prompt") == "prompt"
    assert param_of("something else entirely") is None


def test_completion_prompts_and_unsupported() -> None:
    def req(**values) -> CompletionRequest:
        return CompletionRequest.model_validate({"model": "m", **values})

    assert req(prompt="a").prompts() == ["a"]
    assert req(prompt=[1, 2]).prompts() == [[1, 2]]
    assert req(prompt=[[1], [2, 3]]).prompts() == [[1], [2, 3]]
    assert req(prompt=["a", "b"]).prompts() == ["a", "b"]
    with pytest.raises(ApiError) as info:
        req(prompt=[]).prompts()
    assert info.value.param == "prompt"
    assert req(prompt="a", echo=True).unsupported()[0] == "echo"
    assert req(prompt="a", suffix="x").unsupported()[0] == "suffix"
    assert req(prompt="a", n=2, best_of=2).unsupported() is None
    assert req(prompt="a", logprobs=2, stop="x").call_kwargs() == {"logprobs": 2, "stop": ["x"]}


def test_usage_and_error_body_shapes() -> None:
    usage = Usage.from_langchain(
        {
            "input_tokens": 10,
            "output_tokens": 3,
            "total_tokens": 13,
            "input_token_details": {"cache_read": 8},
        }
    )
    total = usage + Usage.of(5, 1, 0)
    assert total.model_dump() == {
        "prompt_tokens": 15,
        "completion_tokens": 4,
        "total_tokens": 19,
        "prompt_tokens_details": {"cached_tokens": 8},
    }
    assert error_body("bad", param="temperature") == {
        "error": {
            "message": "bad",
            "type": "invalid_request_error",
            "param": "temperature",
            "code": None,
        }
    }


def test_chat_choice_from_ai_message() -> None:
    message = AIMessage(
        content="",
        tool_calls=[{"name": "f", "args": {"a": 1}, "id": "c1"}],
        response_metadata={"finish_reason": "tool_calls"},
    )
    choice = chat_choice(0, message)
    assert choice["message"] == {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}
        ],
    }
    assert choice["finish_reason"] == "tool_calls"
    text = chat_choice(1, AIMessage(content="hi", response_metadata={"finish_reason": "length"}))
    assert text["message"] == {"role": "assistant", "content": "hi"} and text["index"] == 1
    assert finish_reason("abort") == "stop" and finish_reason(None) == "stop"


def test_completion_logprobs_shape() -> None:
    entries = [
        {"token": "ab", "logprob": -0.5, "top_logprobs": [{"token": "ab", "logprob": -0.5}]},
        {"token": "c", "logprob": -1.0, "top_logprobs": []},
    ]
    assert completion_logprobs(entries) == {
        "tokens": ["ab", "c"],
        "token_logprobs": [-0.5, -1.0],
        "top_logprobs": [{"ab": -0.5}, {}],
        "text_offset": [0, 2],
    }


def test_bind_and_keys() -> None:
    for host in ("127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost"):
        assert is_loopback(host)
        check_bind(host, None)
    for host in ("0.0.0.0", "::", "192.168.1.4", "example.com"):
        assert not is_loopback(host)
        with pytest.raises(SystemExit, match="without an API key"):
            check_bind(host, None)
        check_bind(host, "key")
    check_key(None, None, admin=False)
    check_key("Bearer k", "k", admin=True)
    for header, key, admin in (
        (None, None, True),
        (None, "k", False),
        ("Bearer x", "k", False),
        ("Basic k", "k", True),
    ):
        with pytest.raises(ApiError) as info:
            check_key(header, key, admin=admin)
        assert info.value.status == 401 and info.value.type == "authentication_error"


def test_limiter_refuses_with_retry_after() -> None:
    limiter = Limiter(2, retry_after_s=3)
    limiter.acquire()
    limiter.acquire()
    with pytest.raises(ApiError) as info:
        limiter.acquire()
    assert info.value.status == 429 and info.value.headers == {"Retry-After": "3"}
    limiter.release()
    limiter.acquire()
    assert limiter.stats() == {
        "in_flight": 2,
        "peak_in_flight": 2,
        "max_concurrency": 2,
        "admitted": 3,
        "refused": 1,
    }
    lease = Lease([limiter.release])
    lease.release()
    lease.release()  # once only
    assert limiter.in_flight == 1
    with pytest.raises(ValueError, match="max_concurrency"):
        Limiter(0)


def test_weights_gate_orders_swaps_and_requests() -> None:
    async def scenario() -> list[str]:
        gate, log = WeightsGate(), []
        await gate.acquire_read()  # a request in flight

        async def swap() -> None:
            await gate.acquire_write()
            log.append("swap")
            gate.release_write()

        async def late_request() -> None:
            await asyncio.sleep(0.01)  # arrives while the swap waits
            await gate.acquire_read()
            log.append("late request")
            gate.release_read()

        tasks = [asyncio.create_task(swap()), asyncio.create_task(late_request())]
        await asyncio.sleep(0.05)
        log.append("first request done")
        gate.release_read()
        await asyncio.wait_for(asyncio.gather(*tasks), 5)
        return log

    assert asyncio.run(scenario()) == ["first request done", "swap", "late request"]
