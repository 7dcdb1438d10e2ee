"""Parallel PR reviewers, side by side: forking one prefix vs independent calls.

The same LangGraph graph runs in two modes, on the same model and the same pull requests:

    load_pr ──> reviewers (security / performance / tests / style) ──> summary

    thaw      the reviewers node forks the prefix (instructions + the diff) with fork_fanout:
              computed once, every reviewer starts from its KV cache (in the engine's
              prefix cache; with --workers N snapshotted for N worker processes to load)
    baseline  the reviewers node makes four independent ChatThaw calls on an engine with
              vLLM's prefix cache off: every reviewer prefills the whole diff again

Each round reviews a new revision of the pull request (its number is the first line of the
prompt, so no round reuses another's KV). Round 1 includes the engines' first-request warm-up;
the later rounds are the steady state. Per round and mode: wall time of the reviewers step and
of the whole graph, prefill tokens computed, prompt tokens reused, time to first token (from
the start of the reviewers step, so the thaw column includes computing the prefix).

    python demos/pr_review.py [--mode both|thaw|baseline] [--rounds 3] [--workers 0]
                              [--model PATH] [--max-tokens 64] [--receipt PATH]

Writes a JSON receipt (default benchmarks/results/pr_review_<cpu|gpu-slug>.json).
"""

from __future__ import annotations

import argparse
import asyncio
import operator
import statistics
import time
from pathlib import Path
from typing import Annotated, Any, TypedDict

from demo_support import quiet_environment, where_it_ran, write_receipt
from langchain_core.messages import AnyMessage, HumanMessage, SystemMessage
from langchain_core.runnables import RunnableConfig
from langgraph.graph import END, START, StateGraph

from thaw_agents import ChatThaw, fork_fanout

MODES = ("thaw", "baseline")


DIFF = """\
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
diff --git a/app/orders.py b/app/orders.py
--- a/app/orders.py
+++ b/app/orders.py
@@ -1,22 +1,48 @@
 import json
+import os
+import pickle
+import requests

 from app.auth import SESSIONS

+CACHE_DIR = "/tmp/orders"
+
 def load_orders(path):
     with open(path) as f:
         return json.load(f)

-def total(orders):
-    return sum(o["price"] * o["quantity"] for o in orders)
+def total(orders):
+    result = 0
+    for o in orders:
+        for i in range(o["quantity"]):
+            result = result + o["price"]
+    return result
+
+def cached_orders(user):
+    path = os.path.join(CACHE_DIR, user + ".pkl")
+    if os.path.exists(path):
+        with open(path, "rb") as f:
+            return pickle.load(f)
+    orders = requests.get("http://orders.internal/api/" + user).json()
+    with open(path, "wb") as f:
+        pickle.dump(orders, f)
+    return orders
+
+def orders_for_token(token):
+    user = SESSIONS[token]
+    orders = cached_orders(user)
+    report = ""
+    for o in orders:
+        report = report + o["name"] + ": " + str(o["price"]) + "\\n"
+    return report, total(orders)
+
+def apply_discount(orders, code):
+    if code == "STAFF2024":
+        for o in orders:
+            o["price"] = o["price"] * 0.5
+    return orders
diff --git a/app/config.py b/app/config.py
--- a/app/config.py
+++ b/app/config.py
@@ -1,4 +1,7 @@
-DEBUG = False
+DEBUG = True
+SECRET_KEY = "hunter2-production-key"
+DATABASE_URL = "postgres://admin:admin@db.internal:5432/shop"
+ALLOWED_HOSTS = ["*"]
 LOG_LEVEL = "INFO"
diff --git a/tests/test_auth.py b/tests/test_auth.py
--- a/tests/test_auth.py
+++ b/tests/test_auth.py
@@ -1,5 +1,6 @@
 from app.auth import check_password

 def test_check_password(db):
-    assert check_password("alice", "secret", db)
+    assert check_password("alice", "secret")
"""

REVIEWERS = {
    "security": "As the SECURITY reviewer: list the most serious security problem in this diff "
    "and how to fix it. Be brief.",
    "performance": "As the PERFORMANCE reviewer: name one performance problem in this diff "
    "and the fix. Be brief.",
    "tests": "As the TESTS reviewer: which test is missing for this diff? Be brief.",
    "style": "As the STYLE reviewer: name one readability issue in this diff. Be brief.",
}


def pr_messages(pr_number: int) -> list[AnyMessage]:
    """The shared prefix of one round: instructions + the diff (the PR number comes first, so
    rounds never share KV blocks)."""
    return [
        SystemMessage(
            f"Pull request #{pr_number}. You are a senior engineer reviewing "
            "this pull request. Answer in at most three sentences."
        ),
        HumanMessage(f"Here is the pull request diff:\n\n{DIFF}"),
    ]


class ReviewState(TypedDict, total=False):
    pr: int
    messages: list[AnyMessage]
    branches: Annotated[list[dict[str, Any]], operator.add]
    reviewers_wall_s: float
    prefix_tokens: int
    summary: str


def _branch(
    name: str, text: str, engine: str, prompt: int, cached: int, ttft_s: float | None
) -> dict[str, Any]:
    return {
        "reviewer": name,
        "text": text,
        "engine": engine,
        "prompt_tokens": prompt,
        "cached_tokens": cached,
        "ttft_s": ttft_s,
    }


def build_graph(llm: ChatThaw, mode: str, *, pool: Any = None, summary_tokens: int = 48):
    """The review graph; ``mode`` "thaw" forks the prefix, "baseline" makes independent calls."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    names, suffixes = list(REVIEWERS), list(REVIEWERS.values())

    def load_pr(state: ReviewState) -> dict:
        return {"messages": pr_messages(state["pr"])}

    async def thaw_reviewers(state: ReviewState, config: RunnableConfig) -> dict:
        began = time.perf_counter()
        first: dict[int, float] = {}
        results = await fork_fanout(
            llm,
            state["messages"],
            suffixes,
            pool=pool,
            config=config,
            on_token=lambda i, _text: first.setdefault(i, time.perf_counter() - began),
        )
        wall = time.perf_counter() - began
        failed = [r.error for r in results if not r.ok]
        if failed:
            raise RuntimeError(f"reviewer branches failed: {failed}")
        prefix = llm.render_prefix(state["messages"]).token_ids
        return {
            "reviewers_wall_s": wall,
            "prefix_tokens": len(prefix),
            "branches": [
                _branch(
                    names[r.suffix_index],
                    r.text,
                    r.engine,
                    r.prompt_tokens,
                    r.cached_tokens,
                    first.get(r.index),
                )
                for r in results
            ],
        }

    async def baseline_reviewers(state: ReviewState) -> dict:
        began = time.perf_counter()

        async def review(name: str, suffix: str) -> dict[str, Any]:
            ttft, reply = None, None
            async for chunk in llm.astream([*state["messages"], HumanMessage(suffix)]):
                if ttft is None and chunk.content:
                    ttft = time.perf_counter() - began
                reply = chunk if reply is None else reply + chunk
            usage = reply.usage_metadata or {}
            cached = (usage.get("input_token_details") or {}).get("cache_read", 0)
            return _branch(
                name, reply.content, "parent", usage.get("input_tokens", 0), cached, ttft
            )

        branches = await asyncio.gather(*(review(n, s) for n, s in zip(names, suffixes)))
        prefix = llm.render_prefix(state["messages"]).token_ids
        return {
            "reviewers_wall_s": time.perf_counter() - began,
            "prefix_tokens": len(prefix),
            "branches": list(branches),
        }

    async def summary(state: ReviewState) -> dict:
        reviews = "\n".join(f"- {b['reviewer']}: {b['text'].strip()}" for b in state["branches"])
        reply = await llm.ainvoke(
            [
                HumanMessage(
                    f"Reviews of a pull request:\n{reviews}\n\nShould it be merged? One sentence."
                )
            ],
            max_tokens=summary_tokens,
        )
        return {"summary": reply.content}

    graph = StateGraph(ReviewState)
    graph.add_node("load_pr", load_pr)
    graph.add_node("reviewers", thaw_reviewers if mode == "thaw" else baseline_reviewers)
    graph.add_node("summary", summary)
    graph.add_edge(START, "load_pr")
    graph.add_edge("load_pr", "reviewers")
    graph.add_edge("reviewers", "summary")
    graph.add_edge("summary", END)
    return graph.compile()


def make_llm(mode: str, model: str | None, max_tokens: int, workers: int = 0) -> ChatThaw:
    """thaw: prefix cache on (+ a snapshot store when worker processes load the prefix);
    baseline: prefix cache off, no store. Without workers every branch runs in the parent
    engine, which finds the prefix in its own cache: no snapshot needed (fork_fanout's rule)."""
    common = {
        "model": model,
        "temperature": 0.0,
        "max_tokens": max_tokens,
        "frequency_penalty": 0.5,
        "max_model_len": 4096,
    }
    if mode == "thaw":
        return ChatThaw(**common, kv_store="auto" if workers else None)
    return ChatThaw(**common, enable_prefix_caching=False)


def round_stats(mode: str, round_no: int, state: dict[str, Any], graph_wall_s: float) -> dict:
    """One row of the table: walls, prefill tokens computed/reused, TTFTs."""
    branches = state["branches"]
    reused = sum(b["cached_tokens"] for b in branches)
    computed = sum(b["prompt_tokens"] - b["cached_tokens"] for b in branches)
    if mode == "thaw":
        computed += state["prefix_tokens"]  # the parent computes the (new) prefix once
    ttfts = [b["ttft_s"] for b in branches if b["ttft_s"] is not None]
    return {
        "round": round_no,
        "mode": mode,
        "pr": state["pr"],
        "reviewers_wall_s": round(state["reviewers_wall_s"], 3),
        "graph_wall_s": round(graph_wall_s, 3),
        "prefix_tokens": state["prefix_tokens"],
        "prefill_computed": computed,
        "tokens_reused": reused,
        "ttft_p50_s": round(statistics.median(ttfts), 3) if ttfts else None,
        "branches": branches,
        "summary": state["summary"],
    }


async def run_rounds(graphs: dict[str, Any], rounds: int, first_pr: int = 1041) -> list[dict]:
    """Every round runs each mode's graph once on the same (new) pull request."""
    rows = []
    for r in range(1, rounds + 1):
        for mode, graph in graphs.items():
            began = time.perf_counter()
            state = await graph.ainvoke({"pr": first_pr + r - 1})
            rows.append(round_stats(mode, r, state, time.perf_counter() - began))
    return rows


def steady_state(rows: list[dict]) -> dict[str, Any]:
    """Medians over rounds 2.. (round 1 alone when there is one), and thaw/baseline ratios."""
    last = max(row["round"] for row in rows)
    keep = [row for row in rows if row["round"] >= 2 or last == 1]
    out: dict[str, Any] = {"rounds": sorted({row["round"] for row in keep})}
    for mode in MODES:
        mine = [row for row in keep if row["mode"] == mode]
        if mine:
            out[mode] = {
                key: statistics.median(row[key] for row in mine)
                for key in (
                    "reviewers_wall_s",
                    "graph_wall_s",
                    "prefill_computed",
                    "tokens_reused",
                    "ttft_p50_s",
                )
            }
    if "thaw" in out and "baseline" in out:
        thaw, base = out["thaw"], out["baseline"]
        out["reviewers_speedup"] = round(base["reviewers_wall_s"] / thaw["reviewers_wall_s"], 2)
        out["graph_speedup"] = round(base["graph_wall_s"] / thaw["graph_wall_s"], 2)
        out["prefill_ratio"] = round(thaw["prefill_computed"] / base["prefill_computed"], 3)
        out["ttft_ratio"] = round(thaw["ttft_p50_s"] / base["ttft_p50_s"], 3)
    return out


def format_table(rows: list[dict]) -> str:
    """The side-by-side table: one line per round, each measure with its modes next to it."""
    modes = [m for m in MODES if any(row["mode"] == m for row in rows)]
    columns = [
        ("reviewers wall", "reviewers_wall_s", lambda v: f"{v:.2f} s"),
        ("graph wall", "graph_wall_s", lambda v: f"{v:.2f} s"),
        ("prefill computed", "prefill_computed", lambda v: f"{v:,}"),
        ("tokens reused", "tokens_reused", lambda v: f"{v:,}"),
        ("TTFT p50", "ttft_p50_s", lambda v: "-" if v is None else f"{v * 1e3:,.0f} ms"),
    ]
    width = 10
    groups = [max(width * len(modes), len(title) + 1) + 2 for title, _, _ in columns]
    head1 = "round " + "".join(f"{title:<{g}}" for (title, _, _), g in zip(columns, groups))
    head2 = "      " + "".join(f"{''.join(f'{m:<{width}}' for m in modes):<{g}}" for g in groups)
    lines = [head1.rstrip(), head2.rstrip()]
    for r in sorted({row["round"] for row in rows}):
        by_mode = {row["mode"]: row for row in rows if row["round"] == r}
        cells = "".join(
            f"{''.join(f'{fmt(by_mode[m][key]):<{width}}' for m in modes):<{g}}"
            for (_, key, fmt), g in zip(columns, groups)
        )
        lines.append(f"{r:<6}{cells}".rstrip())
    return "\n".join(lines)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    modes = MODES if args.mode == "both" else (args.mode,)
    llms = {mode: make_llm(mode, args.model, args.max_tokens, args.workers) for mode in modes}
    pool = None
    try:
        started: dict[str, float] = {}
        for mode, llm in llms.items():  # engines start before any timing
            began = time.perf_counter()
            await asyncio.to_thread(llm.engine.start)
            started[mode] = round(time.perf_counter() - began, 2)
        if args.workers and "thaw" in llms:
            pool = llms["thaw"].fork_pool(args.workers)
        graphs = {
            mode: build_graph(llm, mode, pool=pool if mode == "thaw" else None)
            for mode, llm in llms.items()
        }
        rows = await run_rounds(graphs, args.rounds)
    finally:
        if pool is not None:
            pool.close()
        for llm in llms.values():
            llm.close()
    model_name = next(iter(llms.values())).model_name
    prefix = rows[0]["prefix_tokens"]
    print(
        f"\n=== PR review: {len(REVIEWERS)} reviewers on a {prefix}-token prefix, "
        f"{model_name}, {where_it_ran()} ==="
    )
    print("thaw     = fork_fanout: the prefix computed once, every reviewer starts from its KV")
    print("baseline = the same graph, independent ChatThaw calls, vLLM prefix cache off\n")
    print(format_table(rows))
    summary = steady_state(rows)
    if "reviewers_speedup" in summary:
        print(
            f"\nsteady state (median of rounds {summary['rounds'][0]}-{summary['rounds'][-1]}):"
            f" reviewers {summary['reviewers_speedup']:.2f}x faster, graph "
            f"{summary['graph_speedup']:.2f}x, prefill tokens computed "
            f"{summary['prefill_ratio']:.2f}x, time to first token {summary['ttft_ratio']:.2f}x "
            "of the baseline"
        )
    last = {row["mode"]: row for row in rows if row["round"] == args.rounds}
    for i, name in enumerate(REVIEWERS):
        for mode, row in last.items():
            branch = row["branches"][i]
            same = (
                mode == "baseline"
                and "thaw" in last
                and last["thaw"]["branches"][i]["text"] == branch["text"]
            )
            print(
                f"\n[{name} | {mode} | {branch['engine']} | reused "
                f"{branch['cached_tokens']}/{branch['prompt_tokens']}]"
                + (" same text as thaw" if same else f"\n  {branch['text'].strip()}")
            )
    for mode, row in last.items():
        print(f"\n[summary | {mode}] {row['summary'].strip()}")
    receipt = write_receipt(
        args.receipt,
        "pr_review",
        {
            "model": model_name,
            "modes": list(modes),
            "workload": {
                "rounds": args.rounds,
                "reviewers": len(REVIEWERS),
                "prefix_tokens": prefix,
                "max_tokens": args.max_tokens,
                "workers": args.workers,
                "temperature": 0.0,
            },
            "engine_start_s": started,
            "steady_state": summary,
            "rounds": rows,
        },
    )
    print(f"\nreceipt: {receipt}")
    return {"rows": rows, "steady_state": summary, "receipt": str(receipt)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mode", choices=["both", *MODES], default="both")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--workers",
        type=int,
        default=0,
        help="warm worker processes for the thaw branches (default: none)",
    )
    parser.add_argument(
        "--model",
        default=None,
        help="model folder or hub id (default: "
        "the embedded SmolLM2-135M; a GPU model on a GPU machine)",
    )
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument(
        "--receipt",
        type=Path,
        default=None,
        help="JSON receipt path (default: benchmarks/results/pr_review_<where>.json)",
    )
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error(f"--rounds must be >= 1, got {args.rounds}")
    quiet_environment()
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
