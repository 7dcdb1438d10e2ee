"""ChatThaw: a LangChain chat model over a local vLLM engine.

Input flow
    invoke / ainvoke / stream / astream / batch (LangChain)
      -> ``request_plan.RequestPlan``: per-call options = instance defaults + call kwargs
         (each call its own); tools / tool_choice / response_format -> prompt + constraint;
         chat template applied once (``messages.render``), tokenized without an extra BOS
      -> ``Engine.stream`` / ``Engine.stream_sync``: one vLLM request per call; concurrent calls
         are concurrent requests in one engine (vLLM batches them continuously)

Output flow
    vLLM ``RequestOutput`` (DELTA when streaming, FINAL_ONLY otherwise)
      -> ``outputs.CompletionAssembler``: text / tool calls / usage (``cache_read`` = prompt
         tokens served from the prefix cache) / response_metadata (model_name, finish_reason)
      -> ``AIMessage`` or ``AIMessageChunk``s (the last one with ``chunk_position="last"``)

Lifecycle: constructing a ChatThaw starts nothing. The engine starts on first use and is shared
by every ChatThaw with the same engine settings; ``close()`` / ``with ChatThaw() as llm:`` /
interpreter exit shut it down.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Iterator, Literal, Sequence

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel, LanguageModelInput
from langchain_core.language_models.chat_models import LangSmithParams
from langchain_core.messages import AIMessage, BaseMessage
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.runnables import Runnable
from langchain_core.tools import BaseTool
from langchain_core.utils.function_calling import convert_to_openai_tool
from pydantic import ConfigDict, Field, PrivateAttr

from thaw_agents import structured
from thaw_agents import tool_calls as tc
from thaw_agents.chat_snapshots import SnapshotsAndWeights
from thaw_agents.options import OPTION_FIELDS
from thaw_agents.request_plan import EngineCall, RequestPlan
from thaw_agents_core.engine import models
from thaw_agents_core.engine.engine import Engine
from thaw_agents_core.engine.registry import acquire_engine, release_engine
from thaw_agents_core.engine.spec import EngineSpec

EMBEDDED_SAMPLING: dict[str, Any] = {"temperature": 0.0, "top_p": 0.9}
"""Defaults for the embedded SmolLM2-135M when the user sets nothing. The model card samples
with top_p=0.9 at temperature 0.2, but the dequantized 135M model is split on its first token
("The" vs "L'Étoile..."): at 0.2 it answered "What is the capital of France?" with Paris on 6 of
10 seeds, at vLLM's default (1.0) it talks nonsense, greedy answers Paris on 10 of 10 (measured
here, 2026-12-01). So: greedy, and the card's top_p when a temperature is set."""


class ChatThaw(SnapshotsAndWeights, BaseChatModel):
    """LangChain chat model over a local vLLM engine, with shared-prefix reuse.

    ``ChatThaw()`` runs the embedded SmolLM2-135M-Instruct; ``ChatThaw(model=...)`` any local
    folder or hub id vLLM can serve. Drop it in wherever LangChain/LangGraph expects a chat
    model; concurrent ``ainvoke`` calls are batched in one engine.

    Example:
        .. code-block:: python

            from thaw_agents import ChatThaw

            with ChatThaw(temperature=0) as llm:
                print(llm.invoke("What is the capital of France?").content)
    """

    model_config = ConfigDict(arbitrary_types_allowed=True, populate_by_name=True)

    # ------------------------------------------------------------------ engine settings
    model: str | None = None
    """Model folder or hub id; None = the embedded SmolLM2-135M-Instruct; "tiny" = the tiny
    float32 test model. Default: None."""
    dtype: str = "auto"
    """Weights/activations dtype for vLLM ("auto", "float16", "bfloat16", "float32").
    Default: "auto"."""
    max_model_len: int | None = None
    """Context length of the engine; None = the model's own. Default: None."""
    enable_prefix_caching: bool = True
    """vLLM automatic prefix caching (shared prefixes computed once). Default: True."""
    engine_kwargs: dict[str, Any] = Field(default_factory=dict)
    """Extra vLLM ``AsyncEngineArgs`` (e.g. ``{"gpu_memory_utilization": 0.5}``). Default: {}."""
    kv_store: str | None = None
    """Where KV snapshots of prefixes live, enabling ``snapshot()`` and forks into other
    processes: ``"shm://NAME?capacity=2GiB"`` (shared memory on this host, created and owned
    by this process), a directory path (durable files), or ``"auto"`` (a shared-memory store of
    ``kv_store_bytes`` private to this process). None = no snapshots. Default: None."""
    kv_store_bytes: int = 1 << 30
    """Capacity of the ``"auto"`` shared-memory store. Default: 1 GiB."""
    weights_version: str = ""
    """Part of the KV namespace: bump it when the weights change in place (RL), so snapshots of
    old weights are never loaded. Default: ""."""
    weights: str | None = None
    """A ``.thaw`` weight snapshot (path or ``s3://``) to start the engine from (``load_format="thaw"``: vLLM
    builds the model, then each rank restores its file, CRC-checked); its ``weights_version``
    becomes this model's unless ``weights_version`` is set. None = the model folder's weights.
    Default: None."""
    kv_events_path: str | None = None
    """Append one JSON line per snapshot save/load/failure here (observability). Default:
    None."""

    # ------------------------------------------------------------------ generation defaults
    temperature: float | None = None
    """Sampling temperature; 0 = greedy. None = vLLM's default (the model's generation
    config, else 1.0); for the embedded model 0 (see ``EMBEDDED_SAMPLING``). Default: None."""
    max_tokens: int | None = Field(default=512, alias="max_completion_tokens")
    """Most tokens to generate per call (also accepted as ``max_completion_tokens``).
    Default: 512."""
    top_p: float | None = None
    """Nucleus sampling mass. Default: None (vLLM: 1.0; the embedded model: 0.9)."""
    top_k: int | None = None
    """Sample among the k most likely tokens (0 or -1 = all). Default: None."""
    min_p: float | None = None
    """Minimum probability relative to the most likely token. Default: None."""
    seed: int | None = None
    """Per-request random seed (reproducible sampling). Default: None."""
    stop: list[str] | None = Field(default=None, alias="stop_sequences")
    """Stop strings (not included in the output). Default: None."""
    presence_penalty: float | None = None
    """Default: None."""
    frequency_penalty: float | None = None
    """Default: None."""
    repetition_penalty: float | None = None
    """Default: None."""
    logit_bias: dict[int, float] | None = None
    """Token id -> additive logit bias. Default: None."""
    logprobs: bool | None = None
    """Return log-probabilities of the chosen tokens in ``response_metadata["logprobs"]``.
    Default: None."""
    top_logprobs: int | None = None
    """With ``logprobs``: how many alternatives per token (0-20). Default: None."""
    streaming: bool = False
    """Use the streaming path for ``invoke`` too (callbacks get tokens). Default: False."""
    timeout: float | None = None
    """Seconds one request may take before it is aborted (TimeoutError). Default: None."""
    auto_tool_routing: bool = True
    """With tool_choice="auto" on a chat template without native tool support, first ask the
    model (constrained to yes/no) whether a tool helps, then force a well-formed call or answer
    in text. Small models otherwise never call tools on their own. Default: True."""

    _engine: Engine | None = PrivateAttr(default=None)

    # ------------------------------------------------------------------ identity

    @property
    def _llm_type(self) -> str:
        return "thaw-vllm"

    @property
    def model_name(self) -> str:
        """Human name of the model (reported as ``response_metadata["model_name"]``)."""
        if self.model is None:
            return models.EMBEDDED_MODEL_NAME
        if self.model == "tiny":
            return models.TINY_MODEL_NAME
        path = Path(self.model)
        return path.name if path.exists() else self.model

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"model_name": self.model_name, "dtype": self.dtype, **self.generation_defaults()}

    def generation_defaults(self) -> dict[str, Any]:
        """This model's generation fields (``temperature``, ``max_tokens``, ...): the defaults
        of every call and every fork_fanout branch. For the embedded model, fields left unset
        take ``EMBEDDED_SAMPLING``."""
        defaults = {name: getattr(self, name) for name in OPTION_FIELDS}
        if self.model is None:
            for name, value in EMBEDDED_SAMPLING.items():
                if defaults[name] is None:
                    defaults[name] = value
        return defaults

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        params = LangSmithParams(
            ls_provider="thaw",
            ls_model_type="chat",
            ls_model_name=kwargs.get("model") or self.model_name,
        )
        temperature = kwargs.get("temperature", self.temperature)
        if temperature is not None:
            params["ls_temperature"] = temperature
        max_tokens = kwargs.get("max_tokens", self.max_tokens)
        if max_tokens is not None:
            params["ls_max_tokens"] = max_tokens
        if stop or self.stop:
            params["ls_stop"] = stop or self.stop
        return params

    # ------------------------------------------------------------------ engine lifecycle

    def resolved_kv_store(self) -> str | None:
        """``kv_store`` with "auto" resolved to this process's shared-memory store URL."""
        if self.kv_store == "auto":
            return f"shm://auto-{os.getpid()}?capacity={self.kv_store_bytes}"
        return self.kv_store

    def engine_spec(self) -> EngineSpec:
        """The settings that identify this model's engine (equal specs share one engine)."""
        store = self.resolved_kv_store()
        kv_transfer = None
        engine_kwargs, weights_version = dict(self.engine_kwargs), self.weights_version
        if self.weights is not None:
            from thaw_agents_core.weights.sources import local_path, snapshot_version

            path = local_path(self.weights)  # s3://: fetched into the local cache
            engine_kwargs.update(load_format="thaw", model_loader_extra_config={"snapshot": path})
            weights_version = weights_version or snapshot_version(path) or ""
        if store is not None:
            from thaw_agents_core.connector.facade import kv_transfer_config

            kv_transfer = kv_transfer_config(
                store, weights_version=weights_version, events_path=self.kv_events_path
            )
        return EngineSpec.create(
            models.resolve_model(self.model),
            dtype=self.dtype,
            max_model_len=self.max_model_len,
            enable_prefix_caching=self.enable_prefix_caching,
            engine_kwargs=engine_kwargs,
            kv_transfer=kv_transfer,
        )

    @property
    def engine(self) -> Engine:
        """The (shared) engine of this model; created on first access, started on first use."""
        if self._engine is None:
            self._engine = acquire_engine(self.engine_spec())
        return self._engine

    def close(self) -> None:
        """Release this model's engine; the last user of an engine shuts it down."""
        engine, self._engine = self._engine, None
        if engine is not None:
            release_engine(engine)

    async def aclose(self) -> None:
        """Async twin of ``close``."""
        await asyncio.to_thread(self.close)

    def __enter__(self) -> ChatThaw:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------------ request planning

    def _plan(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None,
        kwargs: dict[str, Any],
        stream: bool,
    ) -> RequestPlan:
        kwargs = dict(kwargs)
        requested_model = kwargs.pop("model", None)
        if requested_model not in (None, self.model, self.model_name):
            raise ValueError(
                f"this ChatThaw serves {self.model_name!r}; per-call model={requested_model!r} "
                "is not supported (create another ChatThaw for another model)"
            )
        engine = self.engine
        return RequestPlan.create(
            messages=messages,
            defaults=self.generation_defaults(),
            kwargs=kwargs,
            stop=stop,
            stream=stream,
            tokenizer=engine.tokenizer,
            max_model_len=self.max_model_len or engine.max_model_len,
            model_name=self.model_name,
            auto_tool_routing=self.auto_tool_routing,
        )

    def _call_sync(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None,
        kwargs: dict[str, Any],
        stream: bool,
    ) -> EngineCall:
        plan = self._plan(messages, stop, kwargs, stream)
        if plan.needs_routing:
            router = plan.router_call()
            plan.decide(
                router,
                _last(
                    self.engine.stream_sync(
                        router.prompt_ids, router.params, timeout_s=self.timeout
                    )
                ),
            )
        return plan.main_call()

    async def _call_async(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None,
        kwargs: dict[str, Any],
        stream: bool,
    ) -> EngineCall:
        if self._engine is not None and self._engine.is_started:
            plan = self._plan(messages, stop, kwargs, stream)
        else:  # first use: model build and engine start run off the event loop
            plan = await asyncio.to_thread(self._plan, messages, stop, kwargs, stream)
        if plan.needs_routing:
            router = plan.router_call()
            final = None
            async for out in self.engine.stream(
                router.prompt_ids, router.params, timeout_s=self.timeout
            ):
                final = out
            plan.decide(router, final)
        return plan.main_call()

    # ------------------------------------------------------------------ generation paths

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        call = self._call_sync(messages, stop, kwargs, stream=False)
        final = _last(self.engine.stream_sync(call.prompt_ids, call.params, timeout_s=self.timeout))
        return _result(call.assembler.message(final))

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        call = await self._call_async(messages, stop, kwargs, stream=False)
        final = None
        async for out in self.engine.stream(call.prompt_ids, call.params, timeout_s=self.timeout):
            final = out
        return _result(call.assembler.message(final))

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        call = self._call_sync(messages, stop, kwargs, stream=True)
        for out in self.engine.stream_sync(call.prompt_ids, call.params, timeout_s=self.timeout):
            chunk = call.assembler.feed(out)
            if chunk is not None:
                yield ChatGenerationChunk(message=chunk)
        yield ChatGenerationChunk(message=call.assembler.final_chunk())

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        call = await self._call_async(messages, stop, kwargs, stream=True)
        async for out in self.engine.stream(call.prompt_ids, call.params, timeout_s=self.timeout):
            chunk = call.assembler.feed(out)
            if chunk is not None:
                yield ChatGenerationChunk(message=chunk)
        yield ChatGenerationChunk(message=call.assembler.final_chunk())

    # ------------------------------------------------------------------ tools / structure

    def bind_tools(
        self,
        tools: Sequence[dict[str, Any] | type | Callable | BaseTool],
        *,
        tool_choice: str | dict[str, Any] | bool | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, AIMessage]:
        """Bind tools (pydantic classes, functions, LangChain tools or OpenAI dicts).

        ``tool_choice``: None/"auto" (the model may call), "none", "any"/"required"/True (must
        call one), or a tool name (must call that one). Forced calls are constrained decoding.
        """
        formatted = [convert_to_openai_tool(tool) for tool in tools]
        if tool_choice is not None:
            tc.forced_tool_names(formatted, tool_choice)  # validate early, with a clear error
        return super().bind(tools=formatted, tool_choice=tool_choice, **kwargs)

    def with_structured_output(
        self,
        schema: Any = None,
        *,
        method: Literal["json_schema", "function_calling", "json_mode"] = "json_schema",
        include_raw: bool = False,
        strict: bool | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, Any]:
        """Outputs parsed into ``schema``; by default constrained by vLLM structured outputs."""
        if kwargs:
            raise ValueError(f"unsupported arguments {sorted(kwargs)}")
        return structured.build(self, schema, method=method, include_raw=include_raw, strict=strict)


def _result(message: AIMessage) -> ChatResult:
    return ChatResult(generations=[ChatGeneration(message=message)])


def _last(outputs: Iterator[Any]) -> Any:
    final = None
    for final in outputs:
        pass
    return final


__all__ = ["ChatThaw"]
