"""Soak: an engine that survives load (bounded in count and time; counts asserted, no timings).

1. 200 concurrent calls on one engine (the float32 tiny model) mixing seeds, temperatures,
   max_tokens and streaming, 20% of them cancelled mid-flight: every call ends (a reply, or
   CancelledError for the cancelled ones), seeded calls reproduce their tokens alone, and the
   engine ends with no unfinished request and still answers.
2. fork_fanout with n=16 and a seed over a 2-worker pool: 16 branches, all ok, the seeded
   samples distinct and reproducible.
3. Afterwards: no worker or engine-core process of this test left, no shared-memory segment.
"""

from __future__ import annotations

import asyncio
import os
import random

import psutil
import pytest
from fanout_procs import PREFIX_TEXT, parent_model
from langchain_core.messages import SystemMessage

from thaw_agents import ChatThaw, fork_fanout

STORE = f"soak-{os.getpid()}"
NUM_CALLS = 200
CANCEL_EVERY = 5  # 20%


def _children() -> set[int]:
    """This process's descendants, less multiprocessing's resource tracker (one per process
    for its lifetime, started by the first engine)."""
    kids = set()
    for child in psutil.Process().children(recursive=True):
        try:
            if "resource_tracker" not in " ".join(child.cmdline()):
                kids.add(child.pid)
        except psutil.NoSuchProcess:
            continue
    return kids


async def _one_call(llm: ChatThaw, i: int) -> tuple[int, str, list[int] | None]:
    kwargs = {"max_tokens": 4 + i % 12, "temperature": (0.0, 0.7, 1.0)[i % 3]}
    if i % 2:
        kwargs["seed"] = 1000 + i
    prompt = f"request {i}: " + "abc" * (1 + i % 9)
    if i % 4 == 0:
        text = ""
        async for chunk in llm.astream(prompt, **kwargs):
            text += chunk.content
        return i, text, None
    message = await llm.ainvoke(prompt, **kwargs)
    return i, message.content, None


@pytest.mark.slow
async def test_200_mixed_calls_with_cancellations_then_seeded_fanout():
    before = _children()
    with parent_model(STORE, max_tokens=16) as llm:
        engine = llm.engine
        await asyncio.to_thread(engine.start)
        tasks = [asyncio.create_task(_one_call(llm, i)) for i in range(NUM_CALLS)]
        rng = random.Random(7)
        await asyncio.sleep(0.5)
        cancelled = set()
        for i in range(0, NUM_CALLS, CANCEL_EVERY):
            await asyncio.sleep(rng.random() * 0.02)
            if tasks[i].cancel():
                cancelled.add(i)
        results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 900)

        errors = [
            r
            for r in results
            if isinstance(r, BaseException) and not isinstance(r, asyncio.CancelledError)
        ]
        assert errors == [], errors[:3]
        finished = [r for r in results if not isinstance(r, BaseException)]
        was_cancelled = [r for r in results if isinstance(r, asyncio.CancelledError)]
        assert len(finished) + len(was_cancelled) == NUM_CALLS
        assert len(was_cancelled) <= len(cancelled)
        assert len(finished) >= NUM_CALLS - len(cancelled)

        # nothing left in the engine, and it still serves
        for _ in range(100):
            if engine.llm.get_num_unfinished_requests() == 0:
                break
            await asyncio.sleep(0.2)
        assert engine.llm.get_num_unfinished_requests() == 0
        assert engine.num_restarts == 0  # seeded load did not kill the engine core

        # seeded calls are reproducible alone (the same seed and prompt, the same tokens)
        texts = {i: text for i, text, _ in finished}
        seeded = [i for i in texts if i % 2 and i % 4 != 0][:5]
        for i in seeded:
            _, again, _ = await _one_call(llm, i)
            assert again == texts[i], f"call {i} (seed {1000 + i}) differs alone and under load"

        # a seeded fanout of 16 over a 2-worker pool
        with llm.fork_pool(2) as pool:
            prefix = [SystemMessage(PREFIX_TEXT)]
            options = {"temperature": 0.9, "seed": 11, "max_tokens": 6}
            branches = await fork_fanout(
                llm, prefix, ["Continue."], n=16, options=options, pool=pool
            )
            assert len(branches) == 16 and all(b.ok for b in branches), [
                b.error for b in branches if not b.ok
            ]
            assert {b.sample_index for b in branches} == set(range(16))
            again = await fork_fanout(llm, prefix, ["Continue."], n=16, options=options, pool=pool)
            assert [b.token_ids for b in again] == [b.token_ids for b in branches]
            assert len({tuple(b.token_ids) for b in branches}) > 1  # seeds differ per sample
        assert "".join((await llm.ainvoke("still there?")).content) is not None
    leftover = _children() - before
    alive = [
        pid
        for pid in leftover
        if psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    ]
    assert alive == [], f"processes left behind: {alive}"
    assert not [n for n in os.listdir("/dev/shm") if STORE in n]
