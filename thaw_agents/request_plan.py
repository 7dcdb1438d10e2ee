"""One LangChain call planned into engine requests (shared by the sync and async paths).

    RequestPlan.create   options = model defaults + call kwargs; tools, tool_choice and
                         response_format resolved; bad values raise ValueError here
    [router_call]        only for tool_choice="auto" on a template without native tools:
                         a short request constrained to "yes"/"no": does a tool help?
    decide(output)       "yes" -> the call is forced (constrained JSON), "no" -> free text
    [answer_from_tools]  instead of the router when the last message is a tool result: the
                         request and the results become one user turn, answered in text
    main_call            the prompt rendered once, tokenized, length-checked -> EngineCall

Why the router: a small model (SmolLM2-135M) never elects to call a tool on its own, so
LangGraph agents on the embedded model would never act. Asked the yes/no question directly,
constrained, it routes requests that need a tool to the tool (tried 2026-11-23: 4 of 4
tool requests routed to the tool; 2 of 3 chit-chat requests answered in text).

Why the fold after a tool result: shown the tool list, its own JSON call and the tool's
result, the same model repeats the call (3 of 4 cases, tried 2026-11-23), so a ReAct agent
never finishes; the router, asked again, says "yes" every time. Asked the request with the
results in the same user turn ("Result of get_weather: ... Answer using this result.") it
answered from the results in 4 of 4 cases.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

from langchain_core.messages import (
    AIMessage,
    BaseMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
)

from thaw_agents import messages as msg
from thaw_agents import structured
from thaw_agents import tool_calls as tc
from thaw_agents.options import build_options
from thaw_agents.outputs import CompletionAssembler, ToolMode
from thaw_agents_core.engine.sampling import GenerationOptions, to_sampling_params

# Call kwargs that LangChain integrations accept but that mean nothing for a local engine.
IGNORED_KWARGS = ("parallel_tool_calls", "strict", "stream_options", "user", "n")


@dataclass(slots=True)
class EngineCall:
    """What goes to the engine for one request, and how to read what comes back."""

    prompt_ids: list[int]
    params: Any
    assembler: CompletionAssembler


@dataclass
class RequestPlan:
    """One LangChain call: its messages, merged options and tool handling (see module doc)."""

    messages: Sequence[BaseMessage]
    options: dict[str, Any]
    tokenizer: Any
    max_model_len: int
    model_name: str
    stream: bool
    tools: list[dict[str, Any]] | None = None
    tool_mode: ToolMode = "none"
    instructions: str | None = None
    needs_routing: bool = False
    routing: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def create(
        cls,
        *,
        messages: Sequence[BaseMessage],
        defaults: dict[str, Any],
        kwargs: dict[str, Any],
        stop: list[str] | None,
        stream: bool,
        tokenizer: Any,
        max_model_len: int,
        model_name: str,
        auto_tool_routing: bool,
    ) -> RequestPlan:
        kwargs = dict(kwargs)
        if not messages:
            raise ValueError("ChatThaw needs at least one message; got an empty list")
        tools: list[dict[str, Any]] | None = kwargs.pop("tools", None)
        tool_choice = kwargs.pop("tool_choice", None)
        options = dict(defaults)
        format_options, instructions = structured.response_format_options(
            kwargs.pop("response_format", None)
        )
        options.update(format_options)
        for name in IGNORED_KWARGS:
            kwargs.pop(name, None)
        if stop is not None:
            kwargs["stop"] = stop
        # Fails on unknown names or bad values before anything reaches the engine.
        options = build_options(options, kwargs)

        plan = cls(
            messages=messages,
            options=options,
            tokenizer=tokenizer,
            max_model_len=max_model_len,
            model_name=model_name,
            stream=stream,
            instructions=instructions,
        )
        if tools and tool_choice != "none":
            plan.tools = tools
            forced = tc.forced_tool_names(tools, tool_choice)
            if forced:
                plan._force(forced)
            else:
                plan.tool_mode = "auto"
                routed = auto_tool_routing and not msg.template_supports_tools(tokenizer)
                if routed and isinstance(messages[-1], ToolMessage):
                    plan._answer_from_tools()
                else:
                    plan.needs_routing = routed
        return plan

    def _force(self, names: list[str]) -> None:
        if "json_schema" in self.options or self.options.get("json_object"):
            raise ValueError("a forced tool_choice and response_format are exclusive")
        assert self.tools is not None
        self.options["json_schema"] = tc.forced_call_schema(self.tools, names)
        self.tool_mode = "forced"

    def _answer_from_tools(self) -> None:
        """Fold the last request and the tool results after it into one user turn; text only."""
        folded = fold_tool_results(self.messages)
        if folded is not None:
            self.messages, self.tools, self.tool_mode = folded, None, "none"

    # ------------------------------------------------------------------ auto-tool routing

    def router_call(self) -> EngineCall:
        assert self.tools is not None
        request = next(
            (m for m in reversed(self.messages) if isinstance(m, HumanMessage)), self.messages[-1]
        )
        router_messages = [
            SystemMessage(tc.router_system_prompt(self.tools)),
            HumanMessage(tc.router_question(msg.text_of(request.content))),
        ]
        rendered = msg.render(self.tokenizer, router_messages)
        options = GenerationOptions(
            max_tokens=4, temperature=0.0, json_schema={"enum": ["yes", "no"]}
        )
        params = to_sampling_params(options, stream=False, max_model_len=self.max_model_len)
        assembler = CompletionAssembler(
            model_name=self.model_name, prompt_tokens=len(rendered.token_ids)
        )
        return EngineCall(rendered.token_ids, params, assembler)

    def decide(self, router: EngineCall, output: Any) -> None:
        """Apply the router's answer: force a tool call on "yes"."""
        answer = router.assembler.message(output)
        usage = answer.usage_metadata or {}
        self.routing = {
            "tool_routing": "yes" in answer.text,
            "routing_input_tokens": usage.get("input_tokens", 0),
            "routing_output_tokens": usage.get("output_tokens", 0),
        }
        if self.routing["tool_routing"]:
            assert self.tools is not None
            self._force([tool["function"]["name"] for tool in self.tools])

    # ------------------------------------------------------------------ the request itself

    def main_call(self) -> EngineCall:
        generation = GenerationOptions.from_mapping(self.options)
        rendered = msg.render(
            self.tokenizer, self.messages, tools=self.tools, instructions=self.instructions
        )
        if len(rendered.token_ids) >= self.max_model_len:
            raise ValueError(
                f"the prompt has {len(rendered.token_ids)} tokens; this engine's context holds "
                f"max_model_len={self.max_model_len} (prompt + output). Shorten the messages or "
                "start ChatThaw with a larger max_model_len."
            )
        params = to_sampling_params(
            generation, stream=self.stream, max_model_len=self.max_model_len
        )
        assembler = CompletionAssembler(
            model_name=self.model_name,
            prompt_tokens=len(rendered.token_ids),
            tool_mode=self.tool_mode,
            routing=self.routing,
            tool_names=[tool["function"]["name"] for tool in self.tools or []],
        )
        return EngineCall(rendered.token_ids, params, assembler)


def fold_tool_results(messages: Sequence[BaseMessage]) -> list[BaseMessage] | None:
    """The messages with the last user request and the tool exchange after it folded into one
    user turn (None when there is no user request to fold into)."""
    last = next(
        (i for i in range(len(messages) - 1, -1, -1) if isinstance(messages[i], HumanMessage)), None
    )
    if last is None:
        return None
    names = {
        call["id"]: call["name"]
        for m in messages[last:]
        if isinstance(m, AIMessage)
        for call in m.tool_calls
    }
    results = []
    for message in messages[last + 1 :]:
        if isinstance(message, ToolMessage):
            name = message.name or names.get(message.tool_call_id, "the tool")
            error = "Error: " if getattr(message, "status", "success") == "error" else ""
            results.append(f"Result of {name}: {error}{msg.text_of(message.content)}")
    these = "this result" if len(results) == 1 else "these results"
    request = msg.text_of(messages[last].content)
    text = f"{request}\n\n" + "\n".join(results) + f"\nAnswer using {these}."
    return [*messages[:last], HumanMessage(text)]
