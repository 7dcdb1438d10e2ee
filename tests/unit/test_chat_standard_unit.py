"""LangChain's standard chat-model unit suite: construction, serialization, binding tools and
structured output, without an engine. The integration suite, on a real engine:
tests/integration/test_chat_standard.py.
"""

from __future__ import annotations

from typing import Any

from langchain_tests.unit_tests import ChatModelUnitTests

from thaw_agents import ChatThaw

# The unit suite adds max_tokens/stop itself.
UNIT_PARAMS = {"temperature": 0.0, "max_model_len": 4096}


class TestChatThawUnit(ChatModelUnitTests):
    @property
    def chat_model_class(self) -> type[ChatThaw]:
        return ChatThaw

    @property
    def chat_model_params(self) -> dict[str, Any]:
        return UNIT_PARAMS

    @property
    def supports_json_mode(self) -> bool:
        return True
