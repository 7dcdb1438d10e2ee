"""Parallel coding agents: one repository context, one task per coder, one prefix.

    repo context (the module's source) --fork_fanout--> coder per task (docstring, tests,
    type hints, a bug hunt), each starting from the context's KV cache

The context is computed once; each coder pays only for its task and its answer.

    python demos/parallel_coders.py [--workers 0] [--model PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import time

from langchain_core.messages import HumanMessage, SystemMessage

from thaw_agents import ChatThaw, fork_fanout
from thaw_agents_core.pool import wire

TASKS = {
    "docstring": "Write a better docstring for FrameBuffer.feed. Reply with the docstring only.",
    "tests": "Write one pytest test for encode() and FrameBuffer.feed round trip. Code only.",
    "types": "Which function here lacks precise type hints? Name it and give the fixed "
             "signature.",
    "bugs": "Name one input that makes read_message raise, and what it raises.",
}


async def run(args: argparse.Namespace) -> None:
    llm = ChatThaw(model=args.model, temperature=0.0, max_tokens=args.max_tokens,
                   frequency_penalty=0.5, max_model_len=4096, kv_store="auto")
    pool = llm.fork_pool(args.workers) if args.workers else None
    source = inspect.getsource(wire)
    context = [SystemMessage("You are a careful Python engineer working in this repository."),
               HumanMessage(f"Module thaw_agents_core/wire.py:\n```python\n{source}\n```")]
    try:
        began = time.perf_counter()
        coders = await fork_fanout(llm, context, list(TASKS.values()), pool=pool)
        elapsed = time.perf_counter() - began
    finally:
        if pool is not None:
            pool.close()
        llm.close()
    print(f"\n=== {len(coders)} coders forked from one {coders[0].usage['input_tokens']}-token "
          f"context ({elapsed:.1f} s) ===")
    for name, coder in zip(TASKS, coders):
        usage = coder.usage
        print(f"\n[{name}] on {coder.engine}, reused "
              f"{usage['input_token_details']['cache_read']}/{usage['input_tokens']} prompt "
              f"tokens:\n{coder.text.strip()[:500]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--model", default=None)
    parser.add_argument("--max-tokens", type=int, default=120)
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
