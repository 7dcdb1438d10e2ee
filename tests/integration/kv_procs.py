"""Engine processes for the KV-connector tests: each run is a fresh process with its own engine.

Run by path, ``python tests/integration/kv_procs.py MODE ...`` (the tests use sys.executable):

    kv_procs.py save  STORE EVENTS LEN [LEN ...]   snapshot each prompt, then
                                                   generate prompt+suffix
    kv_procs.py load  STORE EVENTS LEN [LEN ...]   generate prompt+suffix (loads)
    kv_procs.py plain -     -      LEN [LEN ...]   no connector at all
    kv_procs.py warm  -     -      LEN [LEN ...]   no connector; the prefix first
                                                   (vLLM's own prefix cache)
    kv_procs.py chat  STORE FILE|-                 ChatThaw: [load_snapshot(FILE)],
                                                   then invoke CHAT_PREFIX + question

Engines are built the way a user builds their own (``LLM`` + ``kv_transfer_config``), in vLLM's
default multi-process mode. One ``RESULT {json}`` line per prompt on stdout. The model is the
float32 tiny Llama, or with ``THAW_TEST_MODEL=llama8b`` (GPU) Llama-3.1-8B shapes with vLLM's
seeded dummy weights in bfloat16, in KV blocks of 64 tokens as ChatThaw's CUDA engines.
"""

from __future__ import annotations

import json
import os
import random
import sys

SUFFIX_LEN = 20
NEW_TOKENS = 32


GPU_MODEL = os.environ.get("THAW_TEST_MODEL") == "llama8b"


def prompt_tokens(length: int) -> tuple[list[int], list[int]]:
    """Deterministic prefix of ``length`` tokens and a 20-token suffix."""
    rng = random.Random(length)
    lo, hi = (1000, 120000) if GPU_MODEL else (3, 259)  # tiny model: byte tokens 3..258
    prefix = [rng.randrange(lo, hi) for _ in range(length)]
    suffix = [rng.randrange(lo, hi) for _ in range(SUFFIX_LEN)]
    return prefix, suffix


CHAT_PREFIX = " ".join(f"fact {i}: the sky {i % 7} is blue." for i in range(80))
CHAT_QUESTION = "question one?"


def chat_model(store: str | None):
    from thaw_agents import ChatThaw

    return ChatThaw(
        model="tiny",
        dtype="float32",
        temperature=0.0,
        max_tokens=24,
        max_model_len=4096,
        engine_kwargs={"kv_cache_memory_bytes": 256 << 20},
        kv_store=store,
    )


def chat_messages() -> list:
    from langchain_core.messages import HumanMessage, SystemMessage

    return [SystemMessage(CHAT_PREFIX), HumanMessage(CHAT_QUESTION)]


def run_chat(store: str, load_file: str) -> None:
    llm = chat_model(store)
    if load_file != "-":
        llm.load_snapshot(load_file)
    reply = llm.invoke(chat_messages())
    print(
        "RESULT " + json.dumps({"usage": reply.usage_metadata, "content": reply.content}),
        flush=True,
    )
    llm.close()


def build_engine(store: str | None, events: str | None):
    from vllm import LLM
    from vllm.config import KVTransferConfig

    from thaw_agents_core.connector.facade import kv_transfer_config
    from thaw_agents_core.engine.models import tiny_model_path
    from thaw_agents_core.testing import llama_8b_shaped_path
    from thaw_agents_core.util.compat import SHARED_PREFIX_BLOCK_SIZE, connector_engine_defaults

    kwargs: dict = {}
    if store is not None:
        config = kv_transfer_config(store, events_path=events)
        # THAW_TEST_CONNECTOR: more kv_connector_extra_config as JSON (the verification mode)
        config["kv_connector_extra_config"].update(
            json.loads(os.environ.get("THAW_TEST_CONNECTOR") or "{}")
        )
        kwargs["kv_transfer_config"] = KVTransferConfig(**config)
        kwargs = connector_engine_defaults(kwargs)  # as ChatThaw's engines get them
    if GPU_MODEL:
        return LLM(
            model=str(llama_8b_shaped_path()),
            load_format="dummy",
            skip_tokenizer_init=True,
            dtype="bfloat16",
            enforce_eager=True,
            max_model_len=4096,
            gpu_memory_utilization=0.4,
            block_size=SHARED_PREFIX_BLOCK_SIZE,  # what ChatThaw's CUDA engines take
            **kwargs,
        )
    return LLM(
        model=str(tiny_model_path()),
        dtype="float32",
        enforce_eager=True,
        max_model_len=4096,
        kv_cache_memory_bytes=256 << 20,
        **kwargs,
    )


def main(argv: list[str]) -> None:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from thaw_agents_core.util.compat import configure_vllm_environment

    configure_vllm_environment()
    if argv[0] == "chat":
        run_chat(argv[1], argv[2])
        return
    mode, store, events, *lengths = argv
    connector = mode in ("save", "load")
    llm = build_engine(store if connector else None, events if connector else None)
    greedy = SamplingParams(
        temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True, detokenize=not GPU_MODEL
    )
    for length in map(int, lengths):
        prefix, suffix = prompt_tokens(length)
        result: dict = {"length": length}
        if mode in ("save", "warm"):
            extra = {"kv_transfer_params": {"thaw": {"save": True}}} if mode == "save" else None
            first = SamplingParams(max_tokens=1, extra_args=extra, detokenize=not GPU_MODEL)
            out = llm.generate([TokensPrompt(prompt_token_ids=prefix)], first, use_tqdm=False)[0]
            if mode == "save":
                result["snapshot"] = (out.kv_transfer_params or {}).get("thaw", {}).get("snapshot")
        out = llm.generate(
            [TokensPrompt(prompt_token_ids=prefix + suffix)], greedy, use_tqdm=False
        )[0]
        result["cached"] = out.num_cached_tokens
        result["tokens"] = list(out.outputs[0].token_ids)
        print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
