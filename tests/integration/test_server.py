"""``thaw-agents serve`` as a real server process on 127.0.0.1, driven by real clients.

One server process per module (the tiny fp32 model: greedy outputs are deterministic, so
streamed and non-streamed texts compare equal), started by ``server`` with a bounded start
timeout and an API key, a shared-memory KV store, max-concurrency 4. The last test sends it
SIGTERM with requests in flight and checks the shutdown (exit within a timeout, no orphan
EngineCore, no /dev/shm store left); the fixture's teardown kills and reaps whatever is left.
Only loopback traffic; every wait has a timeout.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

KEY = "test-key-7f3a"
START_TIMEOUT_S = 300
STOP_TIMEOUT_S = 90
MAX_CONCURRENCY = 4
# Byte-level tokenizer: this system prompt alone is > 2 KV blocks (128 tokens each on CPU).
LONG_SYSTEM = (
    "You are a careful reviewer. Read the code, list the bugs, then propose fixes. " * 5
).strip()
GREEDY = {"temperature": 0.0, "max_tokens": 8}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """``python -m thaw_agents.cli serve ...`` in its own session, logging to a file."""

    def __init__(self, args: list[str], log_path: Path, env: dict[str, str] | None = None):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "thaw_agents.cli", "serve", "--port", str(self.port), *args],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env or _env(),
            start_new_session=True,
        )

    def log_tail(self, n: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-n:]

    def wait_ready(self, timeout_s: float = START_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"server exited with {self.proc.returncode}:\n{self.log_tail()}"
                )
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise AssertionError(f"server not ready within {timeout_s} s:\n{self.log_tail()}")

    def descendants(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def kill(self) -> None:
        """Kill the whole session (server and engine cores) and reap it."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(timeout=STOP_TIMEOUT_S)
        self._log.close()


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("THAW_AGENTS_API_KEY", None)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    return env


STORE_NAME = f"serve-test-{os.getpid()}"


BUCKET = "thaw-serve-test"


@pytest.fixture(scope="module")
def s3_endpoint():
    """moto's S3 over loopback HTTP, its endpoint and test credentials in the environment the
    server process inherits (None when moto is not installed: the s3:// steps skip)."""
    try:
        import moto.server  # noqa: F401
    except ImportError:
        yield None
        return
    from moto_s3 import moto_s3

    with moto_s3(BUCKET, endpoint_in_env=True) as url:
        yield url


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, s3_endpoint: str | None) -> ServerProcess:
    log = tmp_path_factory.mktemp("server") / "server.log"
    proc = ServerProcess(
        [
            "--register",
            "tiny=tiny",
            "--api-key",
            KEY,
            "--max-concurrency",
            str(MAX_CONCURRENCY),
            "--kv-store",
            f"shm://{STORE_NAME}?capacity=64MiB",
            "--max-model-len",
            "2048",
            "--max-prompt-tokens",
            "1500",
            "--max-body-bytes",
            "1MiB",
            "--engine-kwargs",
            json.dumps({"kv_cache_memory_bytes": 256 << 20}),
            "--shutdown-timeout",
            "60",
            "--log-level",
            "warning",
        ],
        log,
    )
    try:
        proc.wait_ready()
        yield proc
    finally:
        proc.kill()
        from thaw_agents_core.store.shm import ShmStore

        if os.path.exists(f"/dev/shm/thaw-{STORE_NAME}"):
            ShmStore.unlink(STORE_NAME)


def _auth(key: str = KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def http(server: ServerProcess) -> httpx.Client:
    with httpx.Client(base_url=server.url, headers=_auth(), timeout=120) as client:
        yield client


@pytest.fixture(scope="module")
def openai_client(server: ServerProcess):
    import openai

    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, timeout=120, max_retries=0)


def _chat(user: str = "Say hi.") -> list[dict[str, str]]:
    return [{"role": "system", "content": LONG_SYSTEM}, {"role": "user", "content": user}]


def _sse(text: str) -> list[Any]:
    events = []
    for line in text.splitlines():
        if line.startswith("data: "):
            payload = line[len("data: ") :]
            events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


# ---------------------------------------------------------------------- OpenAI clients


def test_openai_chat_usage_and_weights_version(openai_client) -> None:
    first = openai_client.chat.completions.create(model="tiny", messages=_chat(), **GREEDY)
    raw = openai_client.chat.completions.with_raw_response.create(
        model="tiny", messages=_chat(), **GREEDY
    )
    second = raw.parse()
    assert first.object == "chat.completion" and first.model == "tiny"
    assert isinstance(first.choices[0].message.content, str)
    assert first.choices[0].finish_reason in ("stop", "length")
    assert 1 <= first.usage.completion_tokens <= GREEDY["max_tokens"]
    assert first.usage.prompt_tokens > 256
    # The same prompt again: its full blocks come from the prefix cache.
    assert second.usage.prompt_tokens_details.cached_tokens >= 256
    assert second.choices[0].message.content == first.choices[0].message.content  # greedy fp32
    assert raw.headers["x-thaw-weights-version"] == "0"
    assert second.system_fingerprint == "thaw-weights-0"

    import openai

    with pytest.raises(openai.BadRequestError) as bad:
        openai_client.chat.completions.create(model="tiny", messages=_chat(), temperature=-1)
    assert bad.value.param == "temperature" and bad.value.type == "invalid_request_error"
    with pytest.raises(openai.NotFoundError) as missing:
        openai_client.chat.completions.create(model="gpt-4o", messages=_chat())
    assert missing.value.code == "model_not_found"


def test_openai_streaming_matches_and_reports_usage(openai_client) -> None:
    whole = openai_client.chat.completions.create(model="tiny", messages=_chat("Stream."), **GREEDY)
    chunks = list(
        openai_client.chat.completions.create(
            model="tiny",
            messages=_chat("Stream."),
            stream=True,
            stream_options={"include_usage": True},
            **GREEDY,
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert finishes == [whole.choices[0].finish_reason]
    usage = chunks[-1].usage
    assert not chunks[-1].choices and usage.prompt_tokens == whole.usage.prompt_tokens
    assert usage.completion_tokens == whole.usage.completion_tokens
    assert usage.prompt_tokens_details.cached_tokens >= 256


def test_openai_n_choices_streamed_and_forced_tool_call(openai_client) -> None:
    chunks = list(
        openai_client.chat.completions.create(
            model="tiny", messages=_chat("Two."), stream=True, n=2, **GREEDY
        )
    )
    texts = ["", ""]
    for chunk in chunks:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
    assert texts[0] == texts[1] != ""  # greedy: both choices agree
    weather = {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "required": ["city"],
                "properties": {"city": {"type": "string", "enum": ["Paris", "Rome"]}},
            },
        },
    }
    reply = openai_client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "Weather in Paris?"}],
        tools=[weather],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        temperature=0,
        max_tokens=60,
    )
    call = reply.choices[0].message.tool_calls[0]
    assert reply.choices[0].finish_reason == "tool_calls"
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments)["city"] in ("Paris", "Rome")


def test_openai_completions_text_and_stream(openai_client) -> None:
    whole = openai_client.completions.create(model="tiny", prompt="def add(a, b):", **GREEDY)
    assert whole.object == "text_completion" and len(whole.choices) == 1
    pieces = list(
        openai_client.completions.create(
            model="tiny", prompt="def add(a, b):", stream=True, **GREEDY
        )
    )
    assert "".join(p.choices[0].text for p in pieces if p.choices) == whole.choices[0].text
    two = openai_client.completions.create(model="tiny", prompt=["ab", "cd"], n=2, **GREEDY)
    assert [c.index for c in two.choices] == [0, 1, 2, 3]
    assert two.choices[0].text == two.choices[1].text  # greedy: both samples of "ab" agree


def test_chat_openai_inside_langgraph(server: ServerProcess) -> None:
    from langchain_core.messages import AIMessage, HumanMessage, SystemMessage
    from langchain_openai import ChatOpenAI
    from langgraph.graph import END, START, MessagesState, StateGraph

    llm = ChatOpenAI(
        base_url=f"{server.url}/v1",
        api_key=KEY,
        model="tiny",
        temperature=0,
        max_tokens=6,
        max_retries=0,
        timeout=120,
    )

    def answer(state: MessagesState) -> dict[str, Any]:
        return {"messages": [llm.invoke(state["messages"])]}

    def review(state: MessagesState) -> dict[str, Any]:
        return {"messages": [llm.invoke([*state["messages"], HumanMessage("Check it.")])]}

    graph = StateGraph(MessagesState)
    graph.add_node("answer", answer)
    graph.add_node("review", review)
    graph.add_edge(START, "answer")
    graph.add_edge("answer", "review")
    graph.add_edge("review", END)
    out = graph.compile().invoke(
        {"messages": [SystemMessage(LONG_SYSTEM), HumanMessage("Fix my loop.")]}
    )
    replies = [m for m in out["messages"] if isinstance(m, AIMessage)]
    assert len(replies) == 2
    for reply in replies:
        assert isinstance(reply.content, str)
        assert reply.response_metadata["model_name"] == "tiny"
        assert reply.usage_metadata["input_tokens"] > 256
    # The review turn starts with the answer turn's prompt: served from the prefix cache.
    assert replies[1].usage_metadata["input_token_details"]["cache_read"] >= 256


# ---------------------------------------------------------------------- fork and snapshots


def test_fork_json_and_sse(http: httpx.Client) -> None:
    body = {
        "model": "tiny",
        "messages": [{"role": "system", "content": LONG_SYSTEM}],
        "suffixes": ["Fix A.", [{"role": "user", "content": "Fix B."}]],
        "n": 2,
        "options": {"temperature": 0, "max_tokens": 6},
    }
    response = http.post("/v1/fork", json=body)
    assert response.status_code == 200, response.text
    data = response.json()
    assert response.headers["x-thaw-weights-version"] == "0"
    assert data["object"] == "fork" and data["prefix"]["num_snapshot_tokens"] >= 256
    branches = data["branches"]
    assert [(b["suffix_index"], b["sample_index"]) for b in branches] == [
        (0, 0),
        (0, 1),
        (1, 0),
        (1, 1),
    ]
    assert all(b["error"] is None for b in branches)
    assert all(b["usage"]["prompt_tokens_details"]["cached_tokens"] >= 256 for b in branches)
    assert branches[0]["text"] == branches[1]["text"]  # greedy samples of one suffix agree
    assert data["usage"]["completion_tokens"] == sum(len(b["token_ids"]) for b in branches)

    with http.stream("POST", "/v1/fork", json={**body, "stream": True}) as stream:
        assert stream.status_code == 200
        assert stream.headers["content-type"].startswith("text/event-stream")
        events = _sse(stream.read().decode())
    assert events[-1] == "[DONE]" and events[-2]["type"] == "done"
    streamed: dict[int, str] = {}
    for event in events:
        if isinstance(event, dict) and event["type"] == "token":
            streamed[event["branch"]] = streamed.get(event["branch"], "") + event["text"]
    results = {e["branch"]: e for e in events if isinstance(e, dict) and e["type"] == "branch"}
    assert sorted(results) == [0, 1, 2, 3]
    assert {i: r["text"] for i, r in results.items()} == {b["index"]: b["text"] for b in branches}
    assert all(streamed.get(i, "") == r["text"] for i, r in results.items())

    bad = http.post("/v1/fork", json={**body, "options": {"temperature": -1}})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "options.temperature"
    bad = http.post("/v1/fork", json={**body, "options": {"kv_transfer_params": {}}})
    assert bad.status_code == 400
    assert bad.json()["error"]["param"] == "options.kv_transfer_params"


def test_snapshots_create_use_save_delete_load(
    http: httpx.Client, tmp_path: Path, s3_endpoint: str | None
) -> None:
    created = http.post(
        "/v1/snapshots",
        json={
            "model": "tiny",
            "name": "reviewer",
            "messages": [{"role": "system", "content": LONG_SYSTEM}],
        },
    )
    assert created.status_code == 200, created.text
    snap = created.json()
    assert snap["object"] == "snapshot" and snap["num_snapshot_tokens"] >= 256
    assert [s["id"] for s in http.get("/v1/snapshots").json()["data"]] == [snap["id"]]
    assert http.get("/v1/snapshots/reviewer").json()["handle"]["snapshot_id"] == snap["id"]
    assert "reviewer" in [m["id"] for m in http.get("/v1/models").json()["data"]]

    # The snapshot as a model: its messages go first, their KV is reused.
    reply = http.post(
        "/v1/chat/completions",
        json={"model": "reviewer", "messages": [{"role": "user", "content": "Go."}], **GREEDY},
    )
    assert reply.status_code == 200, reply.text
    assert (
        reply.json()["usage"]["prompt_tokens_details"]["cached_tokens"]
        >= snap["num_snapshot_tokens"]
    )

    dest = tmp_path / "reviewer.thawkv"
    assert (
        http.post(
            f"/v1/snapshots/{snap['id']}/save",
            json={"dest": str(dest)},
            headers={"Authorization": ""},
        ).status_code
        == 401
    )
    saved = http.post(f"/v1/snapshots/{snap['id']}/save", json={"dest": str(dest)})
    assert saved.status_code == 200 and dest.is_file()
    assert http.delete("/v1/snapshots/reviewer").json()["deleted"] is True
    assert http.get("/v1/snapshots/reviewer").status_code == 404
    loaded = http.post(
        "/v1/snapshots/load", json={"src": str(dest), "model": "tiny", "name": "reviewer"}
    )
    assert loaded.status_code == 200, loaded.text
    assert loaded.json()["id"] == snap["id"]
    if s3_endpoint is not None:  # the same through s3:// (moto over loopback HTTP)
        url = f"s3://{BUCKET}/snapshots/reviewer.thawkv"
        assert http.post(f"/v1/snapshots/{snap['id']}/save", json={"dest": url}).json() == {
            "id": snap["id"],
            "object": "snapshot",
            "saved_to": url,
        }
        http.delete(f"/v1/snapshots/{snap['id']}")
        from_s3 = http.post("/v1/snapshots/load", json={"src": url, "model": "tiny"})
        assert from_s3.status_code == 200, from_s3.text
        assert from_s3.json()["num_snapshot_tokens"] == snap["num_snapshot_tokens"]
    missing = http.post(
        "/v1/snapshots/load", json={"src": str(tmp_path / "no.thawkv"), "model": "tiny"}
    )
    assert missing.status_code == 400 and missing.json()["error"]["param"] == "src"
    short = http.post(
        "/v1/snapshots", json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}
    )
    assert short.status_code == 400 and short.json()["error"]["code"] == "prefix_too_short"
    http.delete("/v1/snapshots/reviewer")


# ---------------------------------------------------------------------- models and weights


def _hot_swap(http: httpx.Client, tmp_path: Path, before: dict[str, Any]) -> None:
    """The same weights, frozen as a new version, swapped in: every later response says so."""
    from thaw_agents_core.engine.models import tiny_model_path
    from thaw_agents_core.weights.freeze import freeze_safetensors

    path = tmp_path / "tiny-step1.thaw"
    freeze_safetensors(tiny_model_path(), path, weights_version="step-1", show_progress=False)
    swap = http.post("/admin/models/tiny-b/weights", json={"src": str(path)})
    assert swap.status_code == 200, swap.text
    assert swap.json()["previous_weights_version"] == "0"
    assert swap.json()["weights_version"] == swap.headers["x-thaw-weights-version"] == "step-1"
    for name in ("tiny-b", "tiny"):  # one engine behind both names
        after = http.post(
            "/v1/chat/completions",
            json={"model": name, "messages": [{"role": "user", "content": "hi"}], **GREEDY},
        )
        assert after.headers["x-thaw-weights-version"] == "step-1"
        assert after.json()["system_fingerprint"] == "thaw-weights-step-1"
        assert (
            after.json()["choices"][0]["message"]["content"]
            == before["choices"][0]["message"]["content"]
        )  # same weights, same greedy text


def test_admin_models_and_weights(
    http: httpx.Client, server: ServerProcess, tmp_path: Path
) -> None:
    spec = {"name": "tiny-b", "model": "tiny"}
    assert httpx.post(f"{server.url}/admin/models", json=spec).status_code == 401
    added = http.post("/admin/models", json=spec)
    assert added.status_code == 200, added.text
    assert {"tiny", "tiny-b"} <= {m["id"] for m in http.get("/v1/models").json()["data"]}
    reply = http.post(
        "/v1/chat/completions",
        json={"model": "tiny-b", "messages": [{"role": "user", "content": "hi"}], **GREEDY},
    )
    assert reply.status_code == 200 and reply.json()["model"] == "tiny-b"
    assert http.post("/admin/models", json=spec).status_code == 409

    from thaw_agents import ChatThaw

    if not hasattr(ChatThaw, "load_weights"):
        swap = http.post("/admin/models/tiny-b/weights", json={"src": "/nonexistent.thaw"})
        assert swap.status_code == 501 and swap.json()["error"]["type"] == "not_implemented"
    else:
        missing = http.post("/admin/models/tiny-b/weights", json={"src": "/nonexistent.thaw"})
        assert missing.status_code == 400 and missing.json()["error"]["param"] == "src"
        _hot_swap(http, tmp_path, reply.json())
    assert http.delete("/admin/models/tiny-b").status_code == 200
    gone = http.post(
        "/v1/chat/completions",
        json={"model": "tiny-b", "messages": [{"role": "user", "content": "hi"}]},
    )
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "model_not_found"


# ---------------------------------------------------------------------- safety


def test_auth_refusals(server: ServerProcess, tmp_path: Path) -> None:
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}
    for headers in ({}, _auth("wrong")):
        refused = httpx.post(f"{server.url}/v1/chat/completions", json=chat, headers=headers)
        assert refused.status_code == 401
        assert refused.json()["error"]["type"] == "authentication_error"
    # Off loopback without a key: refused before any engine starts, nothing bound.
    port = _free_port()
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "thaw_agents.cli",
            "serve",
            "--host",
            "0.0.0.0",
            "--port",
            str(port),
            "--register",
            "tiny=tiny",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=_env(),
    )
    assert result.returncode != 0
    assert "refusing to bind '0.0.0.0' without an API key" in result.stderr


def test_errors_name_the_field_and_the_engine_keeps_serving(http: httpx.Client) -> None:
    def error(response: httpx.Response, status: int) -> dict[str, Any]:
        assert response.status_code == status, response.text[:800]
        return response.json()["error"]

    chat = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}
    bad_json = http.post(
        "/v1/chat/completions",
        content=b'{"model": "tiny", "messages": [',
        headers={"content-type": "application/json"},
    )
    assert error(bad_json, 400)["code"] == "invalid_json"
    for field, value in (
        ("temperature", -1),
        ("top_p", 2.0),
        ("max_tokens", 0),
        ("logprobs", "maybe"),
        ("top_k", -5),
    ):
        body = error(http.post("/v1/chat/completions", json={**chat, field: value}), 400)
        assert body["param"] == field, body
        assert body["type"] == "invalid_request_error"
    streamed = http.post("/v1/chat/completions", json={**chat, "stream": True, "temperature": -1})
    assert error(streamed, 400)["param"] == "temperature"  # JSON error, not a broken stream
    assert (
        error(http.post("/v1/chat/completions", json={**chat, "model": "gpt-4o"}), 404)["param"]
        == "model"
    )
    too_long = {**chat, "messages": [{"role": "user", "content": "x" * 1600}]}
    assert (
        error(http.post("/v1/chat/completions", json=too_long), 400)["code"]
        == "context_length_exceeded"
    )
    assert (
        error(http.post("/v1/chat/completions", json={**chat, "x": "y" * (1 << 20)}), 413)["code"]
        == "request_too_large"
    )
    assert (
        error(http.post("/v1/completions", json={"model": "tiny", "prompt": [10**6]}), 400)["param"]
        == "prompt"
    )
    assert error(http.get("/v1/nothing"), 404)["code"] == "not_found"
    ok = http.post("/v1/chat/completions", json={**chat, **GREEDY})
    assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["role"] == "assistant"


def test_bounded_load_every_request_answered(server: ServerProcess, http: httpx.Client) -> None:
    """40 concurrent requests at max-concurrency 4: each answered 200 or refused 429."""
    before = http.get("/health").json()["limiter"]
    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "Count."}],
        "temperature": 0,
        "max_tokens": 16,
    }

    async def run() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
        async with httpx.AsyncClient(
            base_url=server.url, headers=_auth(), timeout=120, limits=limits
        ) as client:
            return await asyncio.gather(
                *[client.post("/v1/chat/completions", json=body) for _ in range(40)]
            )

    responses = asyncio.run(run())
    statuses = [r.status_code for r in responses]
    counts = {s: statuses.count(s) for s in set(statuses)}
    print(f"load test: 40 requests at max-concurrency {MAX_CONCURRENCY}: {counts}")
    assert set(counts) <= {200, 429}, counts
    assert counts.get(200, 0) + counts.get(429, 0) == 40
    assert counts.get(200, 0) >= MAX_CONCURRENCY and counts.get(429, 0) >= 1
    for r in responses:
        if r.status_code == 429:
            assert r.headers["retry-after"] == "1"
            assert r.json()["error"]["code"] == "rate_limit_exceeded"
        else:
            assert r.json()["usage"]["completion_tokens"] >= 1
    after = http.get("/health").json()["limiter"]
    assert after["peak_in_flight"] <= MAX_CONCURRENCY
    assert after["refused"] - before["refused"] == counts.get(429, 0)
    assert after["admitted"] - before["admitted"] == counts.get(200, 0)
    assert after["in_flight"] == 0
    assert http.get("/health").json()["models"]["tiny"]["engine_requests"] == 0


def test_client_disconnect_aborts_the_request(server: ServerProcess, http: httpx.Client) -> None:
    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "Go on."}],
        "temperature": 0,
        "max_tokens": 1000,
        "ignore_eos": True,
        "stream": True,
    }
    with httpx.stream(
        "POST", f"{server.url}/v1/chat/completions", json=body, headers=_auth(), timeout=60
    ) as response:
        for line in response.iter_lines():
            if line.startswith("data: ") and '"content": ""' not in line:
                break  # a real token arrived: the request is decoding; hang up
    deadline = time.monotonic() + 30
    while True:
        health = http.get("/health").json()
        if health["limiter"]["in_flight"] == 0 and health["models"]["tiny"]["engine_requests"] == 0:
            break
        assert time.monotonic() < deadline, f"request not aborted: {health}"
        time.sleep(0.2)


# ---------------------------------------------------------------------- shutdown (keep last)


def test_sigterm_with_requests_in_flight(server: ServerProcess) -> None:
    """SIGTERM: streams in flight finish, the process exits, no EngineCore or store is left."""
    engines = server.descendants()  # the engine core (and vLLM's helpers)
    assert engines, "the server should have an engine-core child process"
    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "Write a story."}],
        "temperature": 0,
        "max_tokens": 120,
        "ignore_eos": True,
        "stream": True,
    }
    first_chunk = threading.Barrier(4, timeout=120)
    outcomes: list[str] = []

    def stream() -> None:
        try:
            with httpx.stream(
                "POST", f"{server.url}/v1/chat/completions", json=body, headers=_auth(), timeout=120
            ) as response:
                lines = response.iter_lines()
                for line in lines:
                    if line.startswith("data: "):
                        break
                first_chunk.wait()
                rest = [line for line in lines if line.startswith("data: ")]
                outcomes.append(
                    "done" if rest and rest[-1] == "data: [DONE]" else f"cut: {rest[-1:]}"
                )
        except (httpx.HTTPError, threading.BrokenBarrierError) as exc:
            outcomes.append(f"error: {type(exc).__name__}")

    threads = [threading.Thread(target=stream) for _ in range(3)]
    for t in threads:
        t.start()
    first_chunk.wait()  # every stream has its first chunk: they are in flight
    server.proc.send_signal(signal.SIGTERM)
    for t in threads:
        t.join(timeout=STOP_TIMEOUT_S)
    server.proc.wait(timeout=STOP_TIMEOUT_S)
    assert outcomes == ["done"] * 3, (outcomes, server.log_tail())
    assert server.proc.returncode in (0, -signal.SIGTERM), server.log_tail()
    deadline = time.monotonic() + 30
    while any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in engines):
        assert time.monotonic() < deadline, f"orphan processes: {engines}"
        time.sleep(0.2)
    assert not os.path.exists(f"/dev/shm/thaw-{STORE_NAME}"), "the KV store was left behind"
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{server.url}/health", timeout=5)
