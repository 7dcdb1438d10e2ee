"""LangChain messages -> the token ids vLLM gets.

The chat template is applied exactly once, here, to text; the text is then tokenized with
``add_special_tokens=False`` so no tokenizer adds a second BOS on top of the template's own.
vLLM receives token ids (``TokensPrompt``) and never re-templates or re-tokenizes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Sequence

from langchain_core.messages import (
    AIMessage,
    BaseMessage,
    ChatMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
)

from thaw_agents import tool_calls as tc

_ROLES = {
    HumanMessage: "user",
    AIMessage: "assistant",
    SystemMessage: "system",
    ToolMessage: "tool",
}


@dataclass(slots=True)
class RenderedPrompt:
    """A conversation rendered by the chat template and tokenized."""

    text: str
    token_ids: list[int]


def text_of(content: str | list[Any]) -> str:
    """The text of a message's content; non-text blocks are refused with a clear error."""
    if isinstance(content, str):
        return content
    parts: list[str] = []
    for block in content:
        if isinstance(block, str):
            parts.append(block)
            continue
        kind = block.get("type")
        if kind == "text":
            parts.append(block.get("text", ""))
        elif kind in ("tool_use", "tool_call", "function_call", "reasoning", "thinking"):
            continue  # carried by AIMessage.tool_calls / not part of the visible text
        else:
            raise ValueError(
                f"ChatThaw's models take text only; got a content block of type {kind!r}. "
                "Pass text, or describe the image/audio/file in words."
            )
    return "".join(parts)


def template_supports_tools(tokenizer: Any) -> bool:
    template = getattr(tokenizer, "chat_template", None) or ""
    return "tools" in template


def to_chat_dicts(messages: Sequence[BaseMessage], *, native_tools: bool) -> list[dict[str, Any]]:
    """Convert messages to the dicts chat templates take (OpenAI-like)."""
    if not messages:
        raise ValueError("ChatThaw needs at least one message; got an empty list")
    result: list[dict[str, Any]] = []
    for message in messages:
        role = message.role if isinstance(message, ChatMessage) else _ROLES.get(type(message))
        if role is None:
            for cls, name in _ROLES.items():
                if isinstance(message, cls):
                    role = name
                    break
        if role is None:
            raise ValueError(f"unsupported message type {type(message).__name__}")
        entry: dict[str, Any] = {"role": role, "content": text_of(message.content)}
        if isinstance(message, AIMessage) and message.tool_calls:
            if native_tools:
                entry["tool_calls"] = [
                    {
                        "id": call.get("id"),
                        "type": "function",
                        "function": {"name": call["name"], "arguments": call["args"]},
                    }
                    for call in message.tool_calls
                ]
            else:
                calls = "\n".join(
                    tc.format_tool_call(c["name"], c["args"]) for c in message.tool_calls
                )
                entry["content"] = f"{entry['content']}\n{calls}".strip()
        if isinstance(message, ToolMessage):
            entry["tool_call_id"] = message.tool_call_id
            if message.name:
                entry["name"] = message.name
            if getattr(message, "status", "success") == "error":
                entry["content"] = f"Error: {entry['content']}"
        result.append(entry)
    return result


def with_system_block(chat: list[dict[str, Any]], block: str) -> list[dict[str, Any]]:
    """Append a block to the (first) system message, adding one if there is none."""
    if chat and chat[0]["role"] == "system":
        return [{**chat[0], "content": f"{chat[0]['content']}\n\n{block}".strip()}, *chat[1:]]
    return [{"role": "system", "content": block}, *chat]


def render(
    tokenizer: Any,
    messages: Sequence[BaseMessage],
    *,
    tools: list[dict[str, Any]] | None = None,
    instructions: str | None = None,
    add_generation_prompt: bool = True,
) -> RenderedPrompt:
    """Apply the chat template once and tokenize without adding special tokens again.

    ``instructions`` (e.g. the keys of a structured output) join the system message.
    """
    native = bool(tools) and template_supports_tools(tokenizer)
    chat = to_chat_dicts(messages, native_tools=native)
    if tools and not native:
        chat = with_system_block(chat, tc.tool_system_prompt(tools))
    if instructions:
        chat = with_system_block(chat, instructions)
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(
            "this model's tokenizer has no chat template; use a chat/instruct model or set "
            "tokenizer.chat_template"
        )
    text = tokenizer.apply_chat_template(
        chat,
        tools=tools if native else None,
        tokenize=False,
        add_generation_prompt=add_generation_prompt,
    )
    token_ids = tokenizer.encode(text, add_special_tokens=False)
    return RenderedPrompt(text=text, token_ids=list(token_ids))


def dumps_args(args: dict[str, Any]) -> str:
    return json.dumps(args, ensure_ascii=False)
