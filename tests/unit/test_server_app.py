"""The server app in process, engines never started (no lifespan): routing, auth, body and
schema errors as OpenAI error bodies, the CLI's defaults."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from thaw_agents.cli import build_parser
from thaw_agents.server import build
from thaw_agents.server.app import create_app, is_admin_path
from thaw_agents.server.limits import ServerSettings
from thaw_agents.server.registry import Registry
from thaw_agents_core.engine.models import EMBEDDED_MODEL_NAME

KEY = {"Authorization": "Bearer k"}
CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture(scope="module")
def client() -> TestClient:
    registry = Registry()
    registry.new_model("tiny", "tiny")
    return TestClient(create_app(registry, ServerSettings(api_key="k", max_body_bytes=2000)))


def _error(response, status: int) -> dict:
    assert response.status_code == status, response.text
    return response.json()["error"]


def test_auth(client: TestClient) -> None:
    assert client.get("/health").status_code == 200  # liveness needs no key
    assert _error(client.get("/v1/models"), 401)["code"] == "invalid_api_key"
    assert client.get("/v1/models", headers=KEY).json()["data"][0]["id"] == "tiny"
    assert (
        _error(client.post("/admin/models", json={"name": "a", "model": "tiny"}), 401)["type"]
        == "authentication_error"
    )


def test_admin_needs_a_configured_key() -> None:
    registry = Registry()
    registry.new_model("tiny", "tiny")
    open_client = TestClient(create_app(registry, ServerSettings(api_key=None)))
    assert open_client.get("/v1/models").status_code == 200  # loopback without a key
    assert (
        _error(open_client.post("/admin/models", json={"name": "a", "model": "tiny"}), 401)["code"]
        == "admin_disabled"
    )
    assert (
        _error(open_client.post("/v1/snapshots/x/save", json={"dest": "/tmp/x"}), 401)["code"]
        == "admin_disabled"
    )
    assert is_admin_path("/v1/snapshots/load") and not is_admin_path("/v1/snapshots/abc")


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({**CHAT, "temperature": "hot"}, "temperature"),
        ({**CHAT, "messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
        ({**CHAT, "messages": []}, "messages"),
        ({**CHAT, "n": 0}, "n"),
        ({**CHAT, "stop": 5}, "stop"),
        ({**CHAT, "tools": [{"type": "function"}]}, "tools[0].function"),
        ({"messages": CHAT["messages"]}, "model"),
    ],
)
def test_schema_errors_name_the_field(client: TestClient, body: dict, param: str) -> None:
    error = _error(client.post("/v1/chat/completions", json=body, headers=KEY), 400)
    assert error["param"] == param and error["type"] == "invalid_request_error"


def test_bad_json_unknown_model_and_routes(client: TestClient) -> None:
    bad = client.post(
        "/v1/chat/completions",
        content=b'{"model": ',
        headers={**KEY, "content-type": "application/json"},
    )
    assert _error(bad, 400)["code"] == "invalid_json"
    assert _error(client.post("/v1/chat/completions", json=[1], headers=KEY), 400)
    unknown = _error(
        client.post("/v1/chat/completions", json={**CHAT, "model": "gpt-4o"}, headers=KEY), 404
    )
    assert unknown["param"] == "model" and "tiny" in unknown["message"]
    assert (
        _error(client.get("/v1/snapshots/nope", headers=KEY), 404)["code"] == "snapshot_not_found"
    )
    assert _error(client.get("/v1/nothing", headers=KEY), 404)["code"] == "not_found"
    assert (
        _error(client.get("/v1/chat/completions", headers=KEY), 405)["code"] == "method_not_allowed"
    )
    assert (
        _error(client.post("/v1/chat/completions", json={**CHAT, "n": 1000}, headers=KEY), 400)[
            "param"
        ]
        == "n"
    )
    assert (
        _error(
            client.post(
                "/v1/completions", json={"model": "tiny", "prompt": "x", "echo": True}, headers=KEY
            ),
            400,
        )["param"]
        == "echo"
    )


def test_body_limit_by_length_and_chunked(client: TestClient) -> None:
    big = {**CHAT, "messages": [{"role": "user", "content": "x" * 5000}]}
    assert (
        _error(client.post("/v1/chat/completions", json=big, headers=KEY), 413)["code"]
        == "request_too_large"
    )

    def chunks():
        yield b'{"model": "tiny", "messages": [{"role": "user", "content": "'
        for _ in range(10):
            yield b"y" * 500
        yield b'"}]}'

    chunked = client.post(
        "/v1/chat/completions",
        content=chunks(),
        headers={**KEY, "content-type": "application/json"},
    )
    assert _error(chunked, 413)["code"] == "request_too_large"


def test_cli_defaults_serve_the_embedded_model_on_loopback(monkeypatch) -> None:
    monkeypatch.delenv("THAW_AGENTS_API_KEY", raising=False)
    args = build_parser().parse_args(["serve"])
    assert (args.host, args.port, args.api_key) == ("127.0.0.1", 8000, None)
    _, registry = build(args)
    assert list(registry.models) == [EMBEDDED_MODEL_NAME]
    assert registry.models[EMBEDDED_MODEL_NAME].source == "embedded"
    assert registry.models[EMBEDDED_MODEL_NAME].llm.model is None  # starts nothing yet

    with pytest.raises(SystemExit, match="refusing to bind"):
        build(build_parser().parse_args(["serve", "--host", "0.0.0.0"]))
    monkeypatch.setenv("THAW_AGENTS_API_KEY", "k")
    build(build_parser().parse_args(["serve", "--host", "0.0.0.0"]))  # a key from the env
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--register", "no-equals-sign"])
    args = build_parser().parse_args(
        [
            "serve",
            "--register",
            "a=tiny",
            "--register",
            "s=/x/snap.thawkv",
            "--max-body-bytes",
            "1MiB",
        ]
    )
    assert args.register == [("a", "tiny"), ("s", "/x/snap.thawkv")]
    assert args.max_body_bytes == 1 << 20
