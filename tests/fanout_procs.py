"""Processes for the fork_fanout / ForkPool tests: each mode runs in a fresh interpreter.

    python tests/fanout_procs.py reference            a fresh engine with no connector and no
                                                      prefix cache; reads one JSON request a
                                                      line on stdin ({"prompts": [[ids]],
                                                      "max_tokens": N}) and answers each with
                                                      one RESULT line (greedy tokens, cached)
    python tests/fanout_procs.py hydrate SRC STORE SUFFIXES_JSON
                                                      ChatThaw on its own STORE:
                                                      load_snapshot(SRC) (a file or s3://),
                                                      fork_fanout from the handle; one RESULT
                                                      line per branch
    python tests/fanout_procs.py orphan STORE         ChatThaw on STORE + a 1-worker ForkPool;
                                                      prints PIDS {json}, then sleeps (the test
                                                      SIGKILLs it)

Every engine is the float32 tiny Llama, whose greedy tokens are bit-exact across processes and
batch shapes, so a fork that restored the wrong KV would change them.
"""

from __future__ import annotations

import json
import os
import sys
import time

MAX_MODEL_LEN = 4096
KV_CACHE_BYTES = 256 << 20


def chat_model(store: str, **overrides):
    """The tests' ChatThaw (tiny, float32, greedy) on ``store``."""
    from thaw_agents import ChatThaw

    settings = dict(model="tiny", dtype="float32", temperature=0.0, max_tokens=16,
                    max_model_len=MAX_MODEL_LEN,
                    engine_kwargs={"kv_cache_memory_bytes": KV_CACHE_BYTES}, kv_store=store)
    return ChatThaw(**{**settings, **overrides})


def run_reference() -> None:
    # In-process engine (no engine-core child): starts in seconds. No connector, no prefix
    # cache: every prompt is computed from its first token.
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from thaw_agents_core.models import tiny_model_path

    llm = LLM(model=str(tiny_model_path()), dtype="float32", enforce_eager=True,
              max_model_len=MAX_MODEL_LEN, kv_cache_memory_bytes=KV_CACHE_BYTES,
              enable_prefix_caching=False)
    print("READY", flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        params = SamplingParams(temperature=0.0, max_tokens=request["max_tokens"],
                                ignore_eos=bool(request.get("ignore_eos")))
        outputs = llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in request["prompts"]],
                               params, use_tqdm=False)
        print("RESULT " + json.dumps([{"tokens": list(o.outputs[0].token_ids),
                                       "cached": int(o.num_cached_tokens or 0)}
                                      for o in outputs]), flush=True)


def run_hydrate(src: str, store: str, suffixes_json: str) -> None:
    from thaw_agents import fork_fanout_sync

    llm = chat_model(store)
    handle = llm.load_snapshot(src)
    print("HANDLE " + json.dumps({"store": handle.store, "snapshot_id": handle.snapshot_id,
                                  "num_snapshot_tokens": handle.num_snapshot_tokens}),
          flush=True)
    for result in fork_fanout_sync(llm, handle, json.loads(suffixes_json)):
        print("RESULT " + json.dumps(result.to_dict()), flush=True)
    llm.close()


def run_orphan(store: str) -> None:
    llm = chat_model(store)
    pool = llm.fork_pool(1)
    print("PIDS " + json.dumps({"parent": os.getpid(), "workers": pool.worker_pids()}),
          flush=True)
    while True:
        time.sleep(60)


def main(argv: list[str]) -> None:
    from thaw_agents_core.compat import configure_vllm_environment

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
