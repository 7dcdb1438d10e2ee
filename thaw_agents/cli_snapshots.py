"""``thaw-agents freeze | info | verify | diff``: weight (``.thaw``) and KV (``.thawkv``) snapshots.

thaw-agents freeze MODEL_DIR OUT.thaw [--from safetensors|engine] [--weights-version V]
    safetensors (default): the folder's tensors, checkpoint layout, no engine
    engine: start a vLLM engine on MODEL_DIR, freeze its parameters (engine layout,
            fused projections, one file per tensor-parallel rank)
    the CLI's files are fsynced before it returns (durable=True)
thaw-agents info FILE [--json]        the header of a .thaw or .thawkv (by its magic)
thaw-agents verify FILE               every chunk CRC32C; exit status 1 if any is bad
thaw-agents diff A.thawkv B.thawkv [--json]
    the prefix blocks both share (equal block-hash chains) and why they part: another
    namespace, another hash salt or block size, or the first token that differs
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

_KV_MAGIC = b"THAWKV01"
_WEIGHTS_MAGIC = b"THAWWT01"


def register(subparsers: Any) -> None:
    """Add the snapshot commands to the ``thaw-agents`` parser."""
    p = subparsers.add_parser("freeze", help="weights of a model folder or engine -> .thaw")
    p.add_argument("model", help="model folder (safetensors)")
    p.add_argument("out", help="output .thaw file")
    p.add_argument(
        "--from", dest="source", choices=["safetensors", "engine"], default="safetensors"
    )
    p.add_argument("--weights-version", default="", help="the version the snapshot installs")
    p.add_argument("--dtype", default="auto", help="engine dtype (--from engine)")
    p.set_defaults(func=_freeze)

    p = subparsers.add_parser("info", help="print the header of a .thaw or .thawkv file")
    p.add_argument("path")
    p.add_argument("--json", action="store_true", help="the header as JSON")
    p.set_defaults(func=_info)

    p = subparsers.add_parser("verify", help="check every chunk CRC32C of a .thaw or .thawkv")
    p.add_argument("path")
    p.set_defaults(func=_verify)

    p = subparsers.add_parser("diff", help="compare two KV snapshots' block-hash chains")
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_diff)


def _magic(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read(8)


def _kind(path: str) -> str:
    magic = _magic(path)
    if magic == _WEIGHTS_MAGIC:
        return "weights"
    if magic == _KV_MAGIC:
        return "kv"
    raise SystemExit(
        f"{path}: not a thaw snapshot (magic {magic!r}; expected {_WEIGHTS_MAGIC!r} "
        f"for .thaw or {_KV_MAGIC!r} for .thawkv)"
    )


def _gib(n: int) -> str:
    return f"{n / (1 << 30):.3f} GiB" if n >= 1 << 26 else f"{n / (1 << 20):.2f} MiB"


# ---------------------------------------------------------------------- freeze


def _freeze(args: argparse.Namespace) -> int:
    if args.source == "safetensors":
        from thaw_agents_core.weights.freeze import freeze_safetensors

        stats = freeze_safetensors(
            args.model, args.out, weights_version=args.weights_version, durable=True
        )
        print(
            f"froze {stats.num_tensors} tensors ({_gib(stats.num_bytes)}) from {args.model} -> "
            f"{args.out} in {stats.seconds:.2f} s (checkpoint layout)"
        )
        return 0
    from thaw_agents_core.engine.engine import Engine
    from thaw_agents_core.engine.spec import EngineSpec

    engine = Engine(EngineSpec.create(str(Path(args.model).resolve()), dtype=args.dtype))
    try:
        for rank in engine.freeze_weights(Path(args.out).resolve(), durable=True):
            print(
                f"froze {rank['num_tensors']} tensors ({_gib(rank['num_bytes'])}) -> "
                f"{rank['path']} in {rank['seconds']:.2f} s (engine layout)"
            )
    finally:
        engine.close()
    return 0


# ---------------------------------------------------------------------- info


def _weights_info(path: str) -> dict[str, Any]:
    from thaw_agents_core.weights.io import open_weights

    with open_weights(path) as wf:
        return wf.header.to_json()


def _kv_info(path: str) -> dict[str, Any]:
    from thaw_agents_core.snapshot.io import read_snapshot_header

    header, _ = read_snapshot_header(path)
    return header.to_json()


def _info(args: argparse.Namespace) -> int:
    kind = _kind(args.path)
    header = _weights_info(args.path) if kind == "weights" else _kv_info(args.path)
    if args.json:
        print(json.dumps(header, indent=2))
        return 0
    ns = header["namespace"]
    if kind == "weights":
        tensors = header["tensors"]
        print(f"{args.path}: .thaw weight snapshot, version {header['version']}")
        print(
            f"  weights_version {ns['weights_version']!r}, {ns['architecture'] or '(any architecture)'}, "
            f"{ns['dtype']}, {ns['layout']} layout, tp rank {ns['tp_rank']} of {ns['tp_size']}"
        )
        print(
            f"  {len(tensors)} tensors, {_gib(sum(t['nbytes'] for t in tensors))}, "
            f"CRC32C every {_gib(header['crc_chunk_bytes'])}; model fingerprint {ns['model_fingerprint']}"
        )
        for t in tensors[:8]:
            print(f"    {t['name']:<48} {t['dtype']:<9} {t['shape']}")
        if len(tensors) > 8:
            print(f"    ... {len(tensors) - 8} more (--json for all)")
    else:
        print(f"{args.path}: .thawkv KV snapshot {header['snapshot_id']}")
        print(
            f"  {header['num_tokens']} tokens = {len(header['block_hashes'])} blocks of "
            f"{ns['block_size']}, {_gib(header['payload_bytes'])}, {len(header['chunk_crc32c'])} chunks"
        )
        print(
            f"  namespace: weights_version {ns['weights_version']!r}, {ns['dtype']} (kv {ns['kv_cache_dtype']}), "
            f"layout {ns['layout']}, {ns['num_layers']} layers, vLLM {ns['vllm_version']}"
        )
        print(f"  model fingerprint {ns['model_fingerprint']}")
    return 0


# ---------------------------------------------------------------------- verify


def _verify(args: argparse.Namespace) -> int:
    from thaw_agents_core.snapshot.errors import SnapshotError

    try:
        if _kind(args.path) == "weights":
            from thaw_agents_core.weights.format import verify_payload
            from thaw_agents_core.weights.io import open_weights

            with open_weights(args.path) as wf:
                bad = verify_payload(wf.header, wf.payload)
                total = sum(len(t.crc32c) for t in wf.header.tensors)
        else:
            from thaw_agents_core.snapshot.chunks import verify_chunks
            from thaw_agents_core.snapshot.io import open_snapshot_file

            with open_snapshot_file(args.path) as view:
                bad = verify_chunks(view)
                total = view.header.num_chunks
    except SnapshotError as exc:
        print(f"{args.path}: INVALID: {exc}", file=sys.stderr)
        return 1
    if bad:
        print(
            f"{args.path}: CORRUPT: {len(bad)} of {total} chunks fail CRC32C: {bad[:20]}",
            file=sys.stderr,
        )
        return 1
    print(f"{args.path}: OK, {total} chunks verified")
    return 0


# ---------------------------------------------------------------------- diff


def kv_diff(a: Any, b: Any) -> dict[str, Any]:
    """How two KV snapshot headers relate: shared leading blocks and the reasons they part."""
    from thaw_agents_core.snapshot.namespace import Namespace

    ns_a, ns_b = a.namespace, b.namespace
    shared = 0
    for ha, hb in zip(a.block_hashes, b.block_hashes):
        if ha != hb:
            break
        shared += 1
    reasons = []
    diff = Namespace.mismatches(ns_a, ns_b)
    if diff:
        reasons.append(
            "namespace differs (the blocks cannot be shared between these engines): "
            + "; ".join(
                d.replace("this engine has", "B has").replace("snapshot has", "A has") for d in diff
            )
        )
    if a.hash_salt != b.hash_salt:
        reasons.append(
            f"hash salt differs ({a.hash_salt.hex()!r} vs {b.hash_salt.hex()!r}): every block hash differs"
        )
    if ns_a.block_size != ns_b.block_size:
        reasons.append(f"block size differs ({ns_a.block_size} vs {ns_b.block_size})")
    first_token = None
    if shared < min(a.num_blocks, b.num_blocks) and a.hash_salt == b.hash_salt:
        first_token = next(
            (i for i, (x, y) in enumerate(zip(a.token_ids, b.token_ids)) if x != y), None
        )
        if first_token is not None:
            reasons.append(
                f"token {first_token} differs (A has {a.token_ids[first_token]}, B has "
                f"{b.token_ids[first_token]}): block {first_token // ns_a.block_size} and every "
                "later block hash differ (each hash chains its parent's)"
            )
    elif shared == min(a.num_blocks, b.num_blocks) and a.num_blocks != b.num_blocks:
        longer = "A" if a.num_blocks > b.num_blocks else "B"
        reasons.append(
            f"one is a prefix of the other: {longer} continues for "
            f"{abs(a.num_blocks - b.num_blocks)} more block(s)"
        )
    return {
        "a": {
            "snapshot_id": a.snapshot_id,
            "num_blocks": a.num_blocks,
            "namespace_key": ns_a.key(),
        },
        "b": {
            "snapshot_id": b.snapshot_id,
            "num_blocks": b.num_blocks,
            "namespace_key": ns_b.key(),
        },
        "shared_blocks": shared,
        "shared_tokens": shared * ns_a.block_size,
        "same_namespace": not diff,
        "reusable_blocks": shared if not diff else 0,
        "first_differing_token": first_token,
        "reasons": reasons,
    }


def _diff(args: argparse.Namespace) -> int:
    from thaw_agents_core.snapshot.io import read_snapshot_header

    for path in (args.a, args.b):
        if _kind(path) != "kv":
            raise SystemExit(
                f"{path}: diff compares KV snapshots (.thawkv); this is a .thaw weight file"
            )
    report = kv_diff(read_snapshot_header(args.a)[0], read_snapshot_header(args.b)[0])
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(
        f"A {report['a']['snapshot_id']}: {report['a']['num_blocks']} blocks; "
        f"B {report['b']['snapshot_id']}: {report['b']['num_blocks']} blocks"
    )
    print(
        f"shared prefix: {report['shared_blocks']} blocks ({report['shared_tokens']} tokens) with equal "
        f"block-hash chains; reusable across them: {report['reusable_blocks']}"
    )
    for reason in report["reasons"] or ["identical block-hash chains and namespace"]:
        print(f"  - {reason}")
    return 0
