"""``with_structured_output`` for ChatThaw: JSON schema through vLLM's structured outputs.

Methods:
- ``json_schema`` (default): the output is constrained to the schema by vLLM's structured
  outputs (xgrammar/guidance); the text is parsed into the pydantic class / dict.
- ``function_calling``: the schema becomes a tool and the call is forced (also constrained).
- ``json_mode``: the output is constrained to a JSON object (to the schema's, when one is
  given); the prompt should ask for the keys.
"""

from __future__ import annotations

from operator import itemgetter
from typing import Any

from langchain_core.output_parsers import JsonOutputParser, PydanticOutputParser
from langchain_core.output_parsers.openai_tools import (
    JsonOutputKeyToolsParser,
    PydanticToolsParser,
)
from langchain_core.runnables import Runnable, RunnableMap, RunnablePassthrough
from langchain_core.utils.function_calling import convert_to_json_schema, convert_to_openai_tool
from langchain_core.utils.pydantic import is_basemodel_subclass

METHODS = ("json_schema", "function_calling", "json_mode")


def _is_pydantic_class(schema: Any) -> bool:
    if not isinstance(schema, type):
        return False
    if is_basemodel_subclass(schema):
        return True
    try:  # pydantic.v1 models (langchain_core.pydantic_v1 / pydantic.v1)
        from pydantic import v1

        return issubclass(schema, v1.BaseModel)
    except (ImportError, TypeError):
        return False


def _text_parser(schema: Any) -> Runnable:
    if _is_pydantic_class(schema):
        return PydanticOutputParser(pydantic_object=schema)
    return JsonOutputParser()


def build(
    model: Any,
    schema: Any,
    *,
    method: str = "json_schema",
    include_raw: bool = False,
    strict: bool | None = None,
) -> Runnable:
    """The runnable ``model.with_structured_output(...)`` returns."""
    if schema is None:
        raise ValueError(
            "with_structured_output needs a schema (pydantic class, TypedDict, "
            "JSON schema dict or OpenAI function dict)"
        )
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    trace = {"kwargs": {"method": method, "strict": strict}, "schema": schema}
    if method == "function_calling":
        name = convert_to_openai_tool(schema)["function"]["name"]
        bound = model.bind_tools([schema], tool_choice=name, ls_structured_output_format=trace)
        parser: Runnable = (
            PydanticToolsParser(tools=[schema], first_tool_only=True)
            if _is_pydantic_class(schema)
            else JsonOutputKeyToolsParser(key_name=name, first_tool_only=True)
        )
    elif method == "json_schema":
        json_schema = convert_to_json_schema(schema)
        response_format = {
            "type": "json_schema",
            "json_schema": {
                "name": json_schema.get("title", "output"),
                "schema": json_schema,
                "strict": strict,
            },
        }
        bound = model.bind(response_format=response_format, ls_structured_output_format=trace)
        parser = _text_parser(schema)
    else:
        # JSON mode guarantees "a JSON object". Given a schema (our field, not OpenAI's), the
        # object is also held to it: SmolLM2-135M, asked in words for "setup" and "punchline"
        # keys, wrote {"./jokes": [...]} under a bare JSON-object constraint. Stricter than
        # OpenAI's JSON mode, never looser.
        response_format = {"type": "json_object", "schema": convert_to_json_schema(schema)}
        bound = model.bind(response_format=response_format, ls_structured_output_format=trace)
        parser = _text_parser(schema)
    if not include_raw:
        return bound | parser
    parser_assign = RunnablePassthrough.assign(
        parsed=itemgetter("raw") | parser, parsing_error=lambda _: None
    )
    parser_none = RunnablePassthrough.assign(parsed=lambda _: None)
    with_fallback = parser_assign.with_fallbacks([parser_none], exception_key="parsing_error")
    return RunnableMap(raw=bound) | with_fallback


def schema_instructions(schema: dict[str, Any] | None) -> str | None:
    """A system-prompt line naming the keys to write (the constraint alone does not tell the
    model what the keys mean; with SmolLM2-135M it also cut run-on string values)."""
    properties = (schema or {}).get("properties")
    if not properties:
        return None
    lines = [
        f'- "{name}" ({spec.get("type", "any")}): {spec.get("description", "")}'.rstrip(": ")
        for name, spec in properties.items()
    ]
    return "Reply with a JSON object with these keys:\n" + "\n".join(lines)


def response_format_options(
    response_format: dict[str, Any] | None,
) -> tuple[dict[str, Any], str | None]:
    """OpenAI-style ``response_format`` -> (generation options, system instructions)."""
    if not response_format:
        return {}, None
    kind = response_format.get("type")
    if kind == "json_schema":
        spec = response_format.get("json_schema") or {}
        schema = spec.get("schema", spec)
        return {"json_schema": schema}, schema_instructions(schema)
    if kind == "json_object":
        schema = response_format.get("schema")
        if schema:
            return {"json_schema": schema}, schema_instructions(schema)
        return {"json_object": True}, None
    if kind == "text":
        return {}, None
    raise ValueError(
        f"response_format type must be 'json_schema', 'json_object' or 'text', got {kind!r}"
    )
