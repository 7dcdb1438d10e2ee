"""Session migration: snapshot a running agent conversation, end the process, continue it in
a new process without recomputing it.

    process 1 (origin)   a short conversation (two turns, greedy) -> snapshot of the session's
                         KV cache saved to DEST (a folder, or s3://bucket/key) + session.json
                         (messages + handle); also the reply it would give next (the reference)
                         -> exits
    process 2 (restore)  a fresh engine: load_snapshot(DEST) (header, checksums, namespace
                         checked) -> the next turn forked from the loaded KV -> exits
    this process         starts both (no engine of its own), checks the restored reply equals
                         the reference token for token, prints the prefix tokens process 2 did
                         not recompute, writes a JSON receipt
                         (default benchmarks/results/agent_fork_<cpu|gpu-slug>.json)

Greedy decoding is deterministic here: the origin computes its reference with the same request
shape as the restore (cached prefix blocks + the rest), one request at a time. ``--model tiny``
(float32) is bit-exact on any batch shape; the embedded float16 SmolLM2 is the default.

    python demos/agent_fork.py [--dest DIR | s3://bucket/key] [--model tiny|PATH]
                               [--max-tokens 48]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from demo_support import quiet_environment, where_it_ran, write_receipt

SYSTEM = """You are a trip-planning assistant. You keep track of what the traveller said and
answer in two or three sentences.

Traveller profile (from earlier sessions):
- Two adults, mid-thirties, travelling in late May; budget mid-range, about 150 euros a day each.
- They walk a lot (15 km a day is fine) and prefer public transport: metro, trams, trains.
- Food: they love seafood and local markets; one of them is allergic to peanuts.
- They dislike crowded tourist traps and long queues; early mornings are fine.
- They booked a small hotel in Alfama, near the Sé Cathedral, for three nights.
- Interests: old neighbourhoods, viewpoints (miradouros), tiles (azulejos), the sea, fado.

Notes for the assistant:
- Suggest one main area per half day so that walking distances stay short.
- Mention opening days when a place is closed on Mondays.
- Prefer restaurants where a table can be booked; mention the neighbourhood.
- Keep every answer short; the traveller asks follow-up questions."""
TURNS = [
    "I am planning three days in Lisbon in May with my partner. We like food, old "
    "neighbourhoods and the sea, and we do not want to rent a car. What should day one be?",
    "Great. For day two we want a day trip by train. Which town do you suggest and why?",
]
NEXT_TURN = "And on day three, where should we have dinner on our last evening?"
PHASE_TIMEOUT_S = 900


def _llm(args: argparse.Namespace) -> Any:
    from thaw_agents import ChatThaw

    return ChatThaw(
        model=args.model,
        temperature=0.0,
        max_tokens=args.max_tokens,
        max_model_len=4096,
        kv_store="auto",
    )


def origin(args: argparse.Namespace) -> dict[str, Any]:
    """Process 1: converse, snapshot the session, compute the reference reply."""
    from langchain_core.messages import HumanMessage, SystemMessage, messages_to_dict

    from thaw_agents import fork_fanout_sync

    began = time.perf_counter()
    with _llm(args) as llm:
        llm.engine.start()
        ready_s = time.perf_counter() - began
        messages: list = [SystemMessage(SYSTEM)]
        for turn in TURNS:
            messages.append(HumanMessage(turn))
            messages.append(llm.invoke(messages))
        t = time.perf_counter()
        handle = llm.snapshot(messages)
        saved = handle.save(args.dest)
        snapshot_s = time.perf_counter() - t
        (reference,) = fork_fanout_sync(llm, handle, [NEXT_TURN])
    return {
        "pid": os.getpid(),
        "engine_ready_s": round(ready_s, 2),
        "snapshot": saved,
        "snapshot_s": round(snapshot_s, 3),
        "handle": handle.to_json(),
        "messages": messages_to_dict(messages),
        "reference": {
            "text": reference.text,
            "token_ids": reference.token_ids,
            "cached_tokens": reference.cached_tokens,
        },
    }


def restore(args: argparse.Namespace, session: dict[str, Any]) -> dict[str, Any]:
    """Process 2: a fresh engine loads the snapshot and continues the conversation."""
    from thaw_agents import fork_fanout_sync

    began = time.perf_counter()
    with _llm(args) as llm:
        llm.engine.start()
        ready_s = time.perf_counter() - began
        t = time.perf_counter()
        handle = llm.load_snapshot(session["snapshot"])
        load_s = time.perf_counter() - t
        (reply,) = fork_fanout_sync(llm, handle, [NEXT_TURN])
    if not reply.ok:
        raise RuntimeError(f"the continued turn failed: {reply.error}")
    return {
        "pid": os.getpid(),
        "engine_ready_s": round(ready_s, 2),
        "load_snapshot_s": round(load_s, 3),
        "num_snapshot_tokens": handle.num_snapshot_tokens,
        "text": reply.text,
        "token_ids": reply.token_ids,
        "prompt_tokens": reply.prompt_tokens,
        "cached_tokens": reply.cached_tokens,
        "ttft_s": reply.ttft_s,
    }


def _phase(args: argparse.Namespace, phase: str, session: Path, out: Path) -> dict[str, Any]:
    """Run one phase in a new Python process (same settings); returns its JSON answer."""
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--phase",
        phase,
        "--session",
        str(session),
        "--phase-out",
        str(out),
        "--dest",
        args.dest,
        "--max-tokens",
        str(args.max_tokens),
    ]
    if args.model:
        command += ["--model", args.model]
    began = time.perf_counter()
    done = subprocess.run(
        command,
        timeout=PHASE_TIMEOUT_S,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    if done.returncode != 0:
        raise RuntimeError(
            f"the {phase} process failed (exit {done.returncode}):\n{done.stdout[-4000:]}"
        )
    answer = json.loads(out.read_text())
    answer["process_wall_s"] = round(time.perf_counter() - began, 2)
    return answer


def coordinate(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="thaw-session-"))
    if args.dest is None:
        args.dest = str(work) + os.sep  # handle.save writes <snapshot_id>.thawkv in it
    session_path = work / "session.json"
    first = _phase(args, "origin", session_path, session_path)
    print(
        f"process 1 (pid {first['pid']}): {len(TURNS)} turns, session snapshot "
        f"{first['handle']['num_snapshot_tokens']}/{len(first['handle']['prefix_token_ids'])} "
        f"tokens -> {first['snapshot']} ({first['snapshot_s'] * 1e3:.0f} ms), then exited"
    )
    for message in first["messages"][1:]:
        role = "user" if message["type"] == "human" else "agent"
        print(f"  {role}: {message['data']['content'].strip()[:160]}")
    second = _phase(args, "restore", session_path, work / "restored.json")
    same = second["token_ids"] == first["reference"]["token_ids"]
    print(
        f"process 2 (pid {second['pid']}, new engine): load_snapshot "
        f"{second['load_snapshot_s'] * 1e3:.0f} ms, next turn: {second['cached_tokens']}/"
        f"{second['prompt_tokens']} prompt tokens not recomputed, first token "
        f"{second['ttft_s'] * 1e3:.0f} ms"
    )
    print(f"  user: {NEXT_TURN}\n  agent: {second['text'].strip()}")
    print(
        f"greedy continuation equals what process 1 would have produced: {same} "
        f"({len(second['token_ids'])} tokens compared)"
    )
    receipt = write_receipt(
        args.receipt,
        "agent_fork",
        {
            "model": args.model or "SmolLM2-135M-Instruct (embedded)",
            "dest": "s3" if args.dest.startswith("s3://") else "file",
            "turns": len(TURNS),
            "max_tokens": args.max_tokens,
            "origin": {
                k: first[k] for k in ("pid", "engine_ready_s", "snapshot_s", "process_wall_s")
            },
            "restore": {
                k: second[k]
                for k in (
                    "pid",
                    "engine_ready_s",
                    "load_snapshot_s",
                    "num_snapshot_tokens",
                    "prompt_tokens",
                    "cached_tokens",
                    "ttft_s",
                    "process_wall_s",
                )
            },
            "continuation_equal": same,
            "tokens_compared": len(second["token_ids"]),
            "reference_text": first["reference"]["text"],
            "restored_text": second["text"],
        },
    )
    print(f"receipt: {receipt}  ({where_it_ran()})")
    if not same:
        raise SystemExit("the restored continuation differs from the original process's")
    return {"receipt": str(receipt), "continuation_equal": same}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--dest",
        default=None,
        help="where the snapshot goes: a folder or s3://bucket/key (default: a new temp folder)",
    )
    parser.add_argument(
        "--model",
        default=None,
        help='"tiny" (float32, bit-exact) or a model folder (default: the embedded SmolLM2-135M)',
    )
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--receipt", type=Path, default=None)
    parser.add_argument("--phase", choices=["origin", "restore"], help=argparse.SUPPRESS)
    parser.add_argument("--session", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--phase-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    quiet_environment()
    if args.phase is None:
        coordinate(args)
        return
    if args.phase == "origin":
        answer = origin(args)
    else:
        answer = restore(args, json.loads(args.session.read_text()))
    args.phase_out.write_text(json.dumps(answer))


if __name__ == "__main__":
    main()
