"""thaw-agents: fork() for LLM agents on vLLM.

- ``ChatThaw``: a LangChain chat model over a local vLLM engine (streaming, tools, structured
  output, usage with cached-token counts), with prefix snapshots (``kv_store=...``).
- ``fork_fanout``: one prefix, N branches, each starting from the prefix's KV cache, in the
  parent engine or in a ``ForkPool`` of warm workers.
- LangGraph helpers: ``fanout_node``, ``ForkFanout``, ``snapshot_node`` / ``branch_sends`` /
  ``branch_node`` (the ``Send`` pattern).
"""

from thaw_agents.chat_model import ChatThaw
from thaw_agents.fanout import BRANCH_TOKEN_EVENT, BranchResult, fork_fanout, fork_fanout_sync
from thaw_agents.graph import (
    ForkFanout,
    branch_node,
    branch_sends,
    fanout_node,
    run_branch,
    snapshot_node,
)
from thaw_agents_core.fork.prefix import PrefixHandle
from thaw_agents_core.pool.fork_pool import ForkPool

__all__ = [
    "BRANCH_TOKEN_EVENT",
    "BranchResult",
    "ChatThaw",
    "ForkFanout",
    "ForkPool",
    "PrefixHandle",
    "branch_node",
    "branch_sends",
    "fanout_node",
    "fork_fanout",
    "fork_fanout_sync",
    "run_branch",
    "snapshot_node",
]
