"""thaw-agents: fork() for LLM agents on vLLM.

- ``ChatThaw``: a LangChain chat model over a local vLLM engine.
"""

from thaw_agents.chat_model import ChatThaw

__all__ = ["ChatThaw"]
