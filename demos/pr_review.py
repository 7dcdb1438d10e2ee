"""Parallel PR reviewers: one diff, four reviewers, one prefix computed once.

A LangGraph graph on ChatThaw (the embedded SmolLM2-135M by default):

    load_pr ──> reviewers (fork_fanout node: security / performance / tests / style,
                each starting from the diff's KV cache) ──> summary

The shared prefix (instructions + the diff) is rendered once and computed once by the parent
engine, which snapshots its KV cache; every reviewer branch starts from it. With
``--workers N`` the branches may run in N warm worker processes that load the snapshot.
Branch tokens stream as they are generated (LangGraph "custom" stream mode).

    python demos/pr_review.py [--workers 2] [--model PATH] [--max-tokens 96]
"""

from __future__ import annotations

import argparse
import asyncio
import operator
import time
from typing import Annotated, Any, TypedDict

from langchain_core.messages import AnyMessage, HumanMessage, SystemMessage
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.graph import END, START, StateGraph

from thaw_agents import ChatThaw, fanout_node

DIFF = '''\
diff --git a/app/auth.py b/app/auth.py
--- a/app/auth.py
+++ b/app/auth.py
@@ -1,18 +1,31 @@
 import hashlib
+import sqlite3
+import time
 
-def check_password(user, password, db):
-    row = db.get_user(user)
-    return row and row.hash == hashlib.sha256(password.encode()).hexdigest()
+SESSIONS = {}
+
+def check_password(user, password, db_path="users.db"):
+    conn = sqlite3.connect(db_path)
+    cur = conn.execute(f"SELECT hash FROM users WHERE name = '{user}'")
+    row = cur.fetchone()
+    if row is None:
+        return False
+    return row[0] == hashlib.md5(password.encode()).hexdigest()
+
+def login(user, password):
+    for attempt in range(1000000):
+        if check_password(user, password):
+            token = hashlib.md5(f"{user}{time.time()}".encode()).hexdigest()
+            SESSIONS[token] = user
+            return token
+    return None
+
+def logout(token):
+    del SESSIONS[token]
diff --git a/tests/test_auth.py b/tests/test_auth.py
--- a/tests/test_auth.py
+++ b/tests/test_auth.py
@@ -1,5 +1,6 @@
 from app.auth import check_password
 
 def test_check_password(db):
-    assert check_password("alice", "secret", db)
+    assert check_password("alice", "secret")
'''

REVIEWERS = {
    "security": "As the SECURITY reviewer: list the most serious security problem in this diff "
                "and how to fix it. Be brief.",
    "performance": "As the PERFORMANCE reviewer: name one performance problem in this diff "
                   "and the fix. Be brief.",
    "tests": "As the TESTS reviewer: which test is missing for this diff? Be brief.",
    "style": "As the STYLE reviewer: name one readability issue in this diff. Be brief.",
}


class ReviewState(TypedDict, total=False):
    messages: list[AnyMessage]
    branches: Annotated[list[dict[str, Any]], operator.add]
    summary: str


def build_graph(llm: ChatThaw, pool: Any = None):
    def load_pr(state: ReviewState) -> dict:
        return {"messages": [
            SystemMessage("You are a senior engineer reviewing a pull request. Answer in at "
                          "most three sentences."),
            HumanMessage(f"Here is the pull request diff:\n\n{DIFF}"),
        ]}

    async def summary(state: ReviewState) -> dict:
        reviews = "\n".join(f"- {name}: {b['text'].strip()}"
                            for name, b in zip(REVIEWERS, state["branches"]))
        reply = await llm.ainvoke([HumanMessage(
            f"Reviews of a pull request:\n{reviews}\n\nShould it be merged? One sentence.")])
        return {"summary": reply.content}

    graph = StateGraph(ReviewState)
    graph.add_node("load_pr", load_pr)
    graph.add_node("reviewers", fanout_node(llm, suffixes=list(REVIEWERS.values()),
                                            output_key="branches", pool=pool))
    graph.add_node("summary", summary)
    graph.add_edge(START, "load_pr")
    graph.add_edge("load_pr", "reviewers")
    graph.add_edge("reviewers", "summary")
    graph.add_edge("summary", END)
    return graph.compile(checkpointer=InMemorySaver())


async def run(args: argparse.Namespace) -> dict:
    llm = ChatThaw(model=args.model, temperature=0.0, max_tokens=args.max_tokens,
                   frequency_penalty=0.5, max_model_len=4096, kv_store="auto")
    pool = llm.fork_pool(args.workers) if args.workers else None
    try:
        graph = build_graph(llm, pool)
        config = {"configurable": {"thread_id": "pr-1"}}
        began = time.perf_counter()
        tokens = 0
        state: dict = {}
        async for mode, chunk in graph.astream({}, config, stream_mode=["custom", "values"]):
            if mode == "custom" and isinstance(chunk, dict) and "branch" in chunk:
                tokens += 1  # custom events: one per streamed piece of a reviewer's text
            elif mode == "values":
                state = chunk
        elapsed = time.perf_counter() - began
    finally:
        if pool is not None:
            pool.close()
        llm.close()
    print(f"\n=== PR review ({llm.model_name}, {len(REVIEWERS)} reviewers forked from one "
          f"prefix, {elapsed:.1f} s, {tokens} streamed pieces) ===")
    for name, branch in zip(REVIEWERS, state["branches"]):
        usage = branch["usage"]
        print(f"\n[{name}] on {branch['engine']}: prefix tokens reused "
              f"{usage['input_token_details']['cache_read']}/{usage['input_tokens']}, "
              f"first token {branch['timings']['ttft_s'] * 1e3:.0f} ms")
        print(f"  {branch['text'].strip()}")
    print(f"\n[summary] {state['summary'].strip()}")
    return state


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=0,
                        help="warm worker processes for the branches (default: none)")
    parser.add_argument("--model", default=None, help="model folder (default: embedded)")
    parser.add_argument("--max-tokens", type=int, default=96)
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
