"""RL-style rollouts: one reasoning trunk, many sampled continuations, then forks of the best.

    trunk (problem + start of the reasoning) --fork_fanout(n=8, temperature=0.8, seed)-->
    8 rollouts, each starting from the trunk's KV cache --reward--> best rollout
    --fork_fanout(n=4) from best.messages--> 4 deeper rollouts (a fork of a fork)

Every rollout reports how many prefix tokens it reused instead of recomputing.

    python demos/rl_rollouts.py [--samples 8] [--workers 0] [--model PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import re
import time

from langchain_core.messages import AIMessage, HumanMessage, SystemMessage

from thaw_agents import ChatThaw, fork_fanout

PROBLEM = ("A warehouse has 12 shelves. Each shelf holds 8 boxes and each box holds 15 "
           "widgets. A truck takes away 240 widgets. How many widgets are left?")
ANSWER = 12 * 8 * 15 - 240
# A worked example in the trunk: the shared reasoning context every rollout starts from.
EXAMPLE_PROBLEM = ("A bakery bakes 9 trays of rolls. Each tray has 6 rows of 7 rolls. It sells "
                   "150 rolls in the morning and 98 in the afternoon. How many rolls are left?")
EXAMPLE_SOLUTION = (
    "Step 1: rolls per tray = 6 rows x 7 rolls = 42 rolls.\n"
    "Step 2: rolls baked = 9 trays x 42 rolls = 378 rolls.\n"
    "Step 3: rolls sold = 150 in the morning + 98 in the afternoon = 248 rolls.\n"
    "Step 4: rolls left = 378 - 248 = 130 rolls.\n"
    "Check: 130 + 248 = 378, and 378 / 9 = 42 = 6 x 7, so every step is consistent.\n"
    "Answer: 130")


def reward(text: str) -> float:
    """1 for the right number, 0.1 for any number (a well-formed attempt), else 0."""
    numbers = [int(n) for n in re.findall(r"\d+", text.replace(",", ""))]
    if ANSWER in numbers:
        return 1.0
    return 0.1 if numbers else 0.0


async def run(args: argparse.Namespace) -> None:
    llm = ChatThaw(model=args.model, max_tokens=args.max_tokens, max_model_len=4096,
                   kv_store="auto")
    pool = llm.fork_pool(args.workers) if args.workers else None
    trunk = [SystemMessage("You solve word problems step by step and end with 'Answer: N'."),
             HumanMessage(EXAMPLE_PROBLEM), AIMessage(EXAMPLE_SOLUTION), HumanMessage(PROBLEM)]
    try:
        began = time.perf_counter()
        rollouts = await fork_fanout(llm, trunk, ["Solve it step by step."], n=args.samples,
                                     options={"temperature": 0.8, "seed": 1}, pool=pool)
        scored = sorted(rollouts, key=lambda r: reward(r.text), reverse=True)
        best = scored[0]
        deeper = await fork_fanout(llm, best.messages, ["Check your answer once more."], n=4,
                                   options={"temperature": 0.8, "seed": 100}, pool=pool)
        elapsed = time.perf_counter() - began
    finally:
        if pool is not None:
            pool.close()
        llm.close()
    print(f"\n=== {len(rollouts)} rollouts from one trunk + 4 from the best ({elapsed:.1f} s) ===")
    for r in rollouts:
        usage = r.usage
        print(f"rollout {r.sample_index} seed {1 + r.sample_index}: reward {reward(r.text):.1f}, "
              f"reused {usage['input_token_details']['cache_read']}/{usage['input_tokens']} "
              f"prompt tokens on {r.engine}")
    print(f"\nbest rollout (reward {reward(best.text):.1f}):\n  {best.text.strip()[:400]}")
    for r in deeper:
        usage = r.usage
        print(f"deeper {r.sample_index}: reward {reward(r.text):.1f}, reused "
              f"{usage['input_token_details']['cache_read']}/{usage['input_tokens']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--model", default=None)
    parser.add_argument("--max-tokens", type=int, default=96)
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
