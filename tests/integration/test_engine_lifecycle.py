"""The first five minutes of a new user, and an engine that dies: behaviour on real engines.

- ``ChatThaw()`` with nothing set answers the capital question with Paris on every seed (the
  embedded model's defaults, ``EMBEDDED_SAMPLING``).
- An engine core killed with SIGKILL: the call in flight gets ``EngineError``; the next call
  starts a fresh engine (``num_restarts`` 1) and is answered; no process is left behind.
- A shared-memory store whose owner was SIGKILLed is removed by the next store created.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from thaw_agents import ChatThaw
from thaw_agents_core.engine.engine import EngineError
from thaw_agents_core.store.shm import ShmStore
from thaw_agents_core.util import compat


@pytest.mark.slow
def test_embedded_defaults_answer_paris_on_every_seed():
    with ChatThaw(max_tokens=24) as llm:
        answers = [
            llm.invoke("What is the capital of France?", seed=seed).content for seed in range(10)
        ]
    assert sum("Paris" in a for a in answers) >= 9, answers


@pytest.mark.slow
async def test_killed_engine_core_raises_engine_error_then_restarts():
    llm = ChatThaw(
        model="tiny",
        dtype="float32",
        temperature=0.0,
        max_model_len=1024,
        engine_kwargs={"kv_cache_memory_bytes": 64 << 20},
    )
    try:
        engine = llm.engine
        await asyncio.to_thread(engine.start)
        (core,) = compat.engine_core_pids(engine.llm)
        in_flight = asyncio.create_task(llm.ainvoke("x" * 50, max_tokens=1000, ignore_eos=True))
        await asyncio.sleep(1.0)
        os.kill(core, signal.SIGKILL)
        with pytest.raises(EngineError):
            await asyncio.wait_for(in_flight, 120)
        reply = await asyncio.wait_for(llm.ainvoke("ab" * 20, max_tokens=4), 300)
        assert reply.usage_metadata["output_tokens"] > 0
        assert engine.num_restarts == 1
        (new_core,) = compat.engine_core_pids(engine.llm)
        assert new_core != core
    finally:
        llm.close()


def test_store_of_a_sigkilled_owner_is_removed_by_the_next_store(tmp_path):
    root = str(tmp_path)
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from thaw_agents_core.store.shm import ShmStore; "
            f"s = ShmStore('orphan', 1 << 20, create=True, shm_root={root!r}); "
            "print('ready', flush=True); time.sleep(600)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout.readline().strip() == "ready"
        assert os.path.isdir(os.path.join(root, "thaw-orphan"))
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
    assert os.path.isdir(os.path.join(root, "thaw-orphan"))  # SIGKILL: no clean-up ran
    deadline = time.monotonic() + 10
    while psutil.pid_exists(child.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    fresh = ShmStore("fresh", 1 << 20, create=True, shm_root=root)
    try:
        assert not os.path.exists(os.path.join(root, "thaw-orphan"))
    finally:
        fresh.close()
    assert os.listdir(root) == []
