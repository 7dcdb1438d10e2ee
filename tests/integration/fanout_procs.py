"""Processes for the fork_fanout / ForkPool tests: each mode runs in a fresh interpreter.

Run by path, ``python tests/integration/fanout_procs.py MODE ...`` (the tests use sys.executable):

    fanout_procs.py reference            a fresh engine with no connector and no
                                         prefix cache; reads one JSON request a
                                         line on stdin ({"prompts": [[ids]],
                                         "max_tokens": N}) and answers each with
                                         one RESULT line (greedy tokens, cached)
    fanout_procs.py hydrate SRC STORE SUFFIXES_JSON
                                         ChatThaw on its own STORE:
                                         load_snapshot(SRC) (a file or s3://),
                                         fork_fanout from the handle; one RESULT
                                         line per branch
    fanout_procs.py orphan STORE         ChatThaw on STORE + a 1-worker ForkPool;
                                         prints PIDS {json}, then sleeps (the test
                                         SIGKILLs it)

Every engine is the float32 tiny Llama, whose greedy tokens are bit-exact across processes and
batch shapes, so a fork that restored the wrong KV would change them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

MAX_MODEL_LEN = 4096
KV_CACHE_BYTES = 256 << 20
BLOCK = 128  # vLLM-CPU's KV block size
# A system prompt of ~2400 tokens (the tiny model's tokenizer is byte-level: 1 char, 1 token).
PREFIX_TEXT = " ".join(f"fact {i}: the sky {i % 7} is blue." for i in range(90))
# Different lengths and contents; chosen so that the tiny model's greedy replies all differ
# (most short questions get the same reply from this 2-layer random model).
SUFFIXES = ["x" * 50, "ab" * 30, "q" * 80, "mmmmm nnnnn " * 6]


def chat_model(store: str, **overrides):
    """The tests' ChatThaw (tiny, float32, greedy) on ``store``."""
    from thaw_agents import ChatThaw

    settings = dict(
        model="tiny",
        dtype="float32",
        temperature=0.0,
        max_tokens=16,
        max_model_len=MAX_MODEL_LEN,
        engine_kwargs={"kv_cache_memory_bytes": KV_CACHE_BYTES},
        kv_store=store,
    )
    return ChatThaw(**{**settings, **overrides})


@contextmanager
def parent_model(store_name: str, **overrides) -> Iterator[Any]:
    """The tests' parent ChatThaw on a fresh shared-memory store; once it is closed, the store
    must be gone from /dev/shm."""
    model = chat_model(f"shm://{store_name}?capacity=256MiB", **overrides)
    try:
        yield model
    finally:
        model.close()
    assert not os.path.exists(f"/dev/shm/thaw-{store_name}"), "the parent's store leaked"


def running(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie is not)."""
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


class Reference:
    """Client of a ``reference`` process (started at once, waited for on first use)."""

    def __init__(self) -> None:
        self.log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "reference"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
        )
        self.ready = False

    def _line(self, prefix: str) -> str:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith(prefix):
                return line[len(prefix) :]
        self.log.seek(0)
        tail = self.log.read()[-4000:].decode(errors="replace")
        raise AssertionError(f"the reference engine exited ({self.proc.wait()}):\n{tail}")

    def greedy(
        self, prompts: list[list[int]], max_tokens: int, ignore_eos: bool = False
    ) -> list[dict]:
        """Greedy tokens of each full prompt, computed from scratch: [{"tokens", "cached"}]."""
        if not self.ready:
            self._line("READY")
            self.ready = True
        assert self.proc.stdin is not None
        self.proc.stdin.write(
            json.dumps({"prompts": prompts, "max_tokens": max_tokens, "ignore_eos": ignore_eos})
            + "\n"
        )
        self.proc.stdin.flush()
        return json.loads(self._line("RESULT "))

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def run_reference() -> None:
    # In-process engine (no engine-core child): starts in seconds. No connector, no prefix
    # cache: every prompt is computed from its first token.
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from thaw_agents_core.engine.models import tiny_model_path

    llm = LLM(
        model=str(tiny_model_path()),
        dtype="float32",
        enforce_eager=True,
        max_model_len=MAX_MODEL_LEN,
        kv_cache_memory_bytes=KV_CACHE_BYTES,
        enable_prefix_caching=False,
    )
    print("READY", flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        params = SamplingParams(
            temperature=0.0,
            max_tokens=request["max_tokens"],
            ignore_eos=bool(request.get("ignore_eos")),
        )
        outputs = llm.generate(
            [TokensPrompt(prompt_token_ids=ids) for ids in request["prompts"]],
            params,
            use_tqdm=False,
        )
        print(
            "RESULT "
            + json.dumps(
                [
                    {
                        "tokens": list(o.outputs[0].token_ids),
                        "cached": int(o.num_cached_tokens or 0),
                    }
                    for o in outputs
                ]
            ),
            flush=True,
        )


def run_hydrate(src: str, store: str, suffixes_json: str) -> None:
    from thaw_agents import fork_fanout_sync

    llm = chat_model(store)
    handle = llm.load_snapshot(src)
    print(
        "HANDLE "
        + json.dumps(
            {
                "store": handle.store,
                "snapshot_id": handle.snapshot_id,
                "num_snapshot_tokens": handle.num_snapshot_tokens,
            }
        ),
        flush=True,
    )
    for result in fork_fanout_sync(llm, handle, json.loads(suffixes_json)):
        print("RESULT " + json.dumps(result.to_dict()), flush=True)
    llm.close()


def run_orphan(store: str) -> None:
    llm = chat_model(store)
    pool = llm.fork_pool(1)
    print("PIDS " + json.dumps({"parent": os.getpid(), "workers": pool.worker_pids()}), flush=True)
    while True:
        time.sleep(60)


def main(argv: list[str]) -> None:
    from thaw_agents_core.util.compat import configure_vllm_environment

    configure_vllm_environment()
    mode, *args = argv
    if mode == "reference":
        run_reference()
    elif mode == "hydrate":
        run_hydrate(*args)
    elif mode == "orphan":
        run_orphan(*args)
    else:
        raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
