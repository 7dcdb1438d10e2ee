"""Tools for models whose chat template has no tool support (SmolLM2's has none).

How a tool call travels:

    bind_tools(tools)         -> OpenAI-format tool dicts on the binding
    prompt (no native tools)  -> a system block listing the tools as signatures and the call
                                 format {"name": ..., "arguments": {...}} (a JSON object)
    tool_choice="any"/name    -> the output is *constrained* to that JSON (vLLM structured
                                 outputs), so even a 135M model returns a well-formed call
    tool_choice None/"auto"   -> free text; a reply that is one such JSON object, or
                                 <tool_call>...</tool_call> blocks in it, become tool calls
    history                   -> AIMessage.tool_calls are written back in the same format,
                                 ToolMessages become role "tool" turns

Templates that do support tools (their source mentions ``tools``) get the tools and
``tool_calls`` natively through ``apply_chat_template(tools=...)`` instead.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

from langchain_core.messages.tool import InvalidToolCall, ToolCall

TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"
_TOOL_CALL_RE = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)


def _signature(function: dict[str, Any]) -> str:
    properties = (function.get("parameters") or {}).get("properties") or {}
    args = ", ".join(f"{name}: {spec.get('type', 'any')}" for name, spec in properties.items())
    return f"{function['name']}({args})"


def tool_system_prompt(tools: list[dict[str, Any]]) -> str:
    """The system block that describes the tools to a model without native tool support.

    Signatures rather than raw JSON schemas, and "using the values given by the user": with
    SmolLM2-135M this wording made the constrained call copy the user's argument
    (magic_function(3) -> {"input": 3}); a JSON-schema listing or a Hermes-style prompt made
    it invent {"input": 100} (tried 2026-11-23, greedy).
    """
    lines = [
        f"- {_signature(tool['function'])}: {tool['function'].get('description', '')}"
        for tool in tools
    ]
    return (
        "You have access to the following tools:\n" + "\n".join(lines) + "\n"
        'To use a tool, reply with a JSON object {"name": tool name, "arguments": '
        "{argument: value}} using the values given by the user."
    )


def router_system_prompt(tools: list[dict[str, Any]]) -> str:
    lines = [
        f"- {_signature(tool['function'])}: {tool['function'].get('description', '')}"
        for tool in tools
    ]
    return ("Tool available:\n" if len(tools) == 1 else "Tools available:\n") + "\n".join(lines)


def router_question(request: str) -> str:
    return f"User request: {request}\nDoes a tool help with this request? Answer yes or no."


def format_tool_call(name: str, args: dict[str, Any]) -> str:
    return json.dumps({"name": name, "arguments": args}, ensure_ascii=False)


def forced_tool_names(tools: list[dict[str, Any]], tool_choice: Any) -> list[str] | None:
    """Names the output must call one of, or None when the model may answer in text."""
    names = [tool["function"]["name"] for tool in tools]
    if tool_choice in (None, "auto", "none", False):
        return None
    if tool_choice in ("any", "required", True):
        return names
    if isinstance(tool_choice, dict):
        tool_choice = (tool_choice.get("function") or {}).get("name") or tool_choice.get("name")
    if isinstance(tool_choice, str):
        if tool_choice not in names:
            raise ValueError(
                f"tool_choice={tool_choice!r} names no bound tool; bound tools: {names}"
            )
        return [tool_choice]
    raise ValueError(
        f"tool_choice must be None, 'auto', 'none', 'any', 'required', a tool name or "
        f"{{'type': 'function', 'function': {{'name': ...}}}}; got {tool_choice!r}"
    )


def forced_call_schema(tools: list[dict[str, Any]], names: list[str]) -> dict[str, Any]:
    """JSON schema of exactly one call to one of ``names`` (for constrained decoding)."""
    options = []
    for tool in tools:
        function = tool["function"]
        if function["name"] not in names:
            continue
        parameters = function.get("parameters") or {"type": "object", "properties": {}}
        options.append(
            {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "enum": [function["name"]]},
                    "arguments": parameters,
                },
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
        )
    return options[0] if len(options) == 1 else {"anyOf": options}


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _to_call(payload: str) -> ToolCall | InvalidToolCall:
    try:
        data = json.loads(payload)
        name = data["name"]
        args = data.get("arguments", data.get("parameters", {}))
        if isinstance(args, str):
            args = json.loads(args) if args.strip() else {}
        if not isinstance(name, str) or not isinstance(args, dict):
            raise TypeError("name must be a string and arguments an object")
        return ToolCall(name=name, args=args, id=new_call_id(), type="tool_call")
    except (ValueError, KeyError, TypeError) as exc:
        return InvalidToolCall(
            name=None, args=payload, id=new_call_id(), error=str(exc), type="invalid_tool_call"
        )


def parse_forced(text: str) -> tuple[list[ToolCall], list[InvalidToolCall]]:
    """Parse a constrained output (the whole text is one call's JSON)."""
    call = _to_call(text.strip())
    return ([call], []) if call.get("type") == "tool_call" else ([], [call])  # type: ignore[list-item]


def _whole_text_call(text: str, tool_names: list[str]) -> ToolCall | None:
    stripped = text.strip()
    if not (stripped.startswith("{") and stripped.endswith("}")):
        return None
    try:
        data = json.loads(stripped)
    except ValueError:
        return None
    if not isinstance(data, dict) or data.get("name") not in tool_names:
        return None
    call = _to_call(stripped)
    return call if call.get("type") == "tool_call" else None  # type: ignore[return-value]


def parse_text(
    text: str, tool_names: list[str]
) -> tuple[str, list[ToolCall], list[InvalidToolCall]]:
    """Split free text into (content, tool_calls, invalid_tool_calls)."""
    if TOOL_CALL_OPEN not in text:
        call = _whole_text_call(text, tool_names)
        return ("", [call], []) if call else (text, [], [])
    calls: list[ToolCall] = []
    invalid: list[InvalidToolCall] = []
    for payload in _TOOL_CALL_RE.findall(text):
        call = _to_call(payload)
        (calls if call.get("type") == "tool_call" else invalid).append(call)  # type: ignore[arg-type]
    content = _TOOL_CALL_RE.sub("", text).strip()
    return content, calls, invalid


def safe_text_prefix(text: str) -> int:
    """How much of streamed free text can be shown now.

    Nothing while the reply may still turn out to be a JSON tool call (it starts with "{"),
    else everything up to a (partial) ``<tool_call>``.
    """
    stripped = text.lstrip()
    if not stripped or stripped.startswith("{"):
        return 0
    start = text.find(TOOL_CALL_OPEN)
    if start >= 0:
        return start
    for keep in range(min(len(TOOL_CALL_OPEN) - 1, len(text)), 0, -1):
        if TOOL_CALL_OPEN.startswith(text[-keep:]):
            return len(text) - keep
    return len(text)
