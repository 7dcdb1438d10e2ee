"""PrefixHandle: a computed, snapshotted prompt prefix that other engines can start from.

A handle is plain data (JSON), so it survives LangGraph checkpointers and process boundaries.
It names the snapshot (store, namespace, id) and carries the prefix's token ids: a branch's
prompt is ``handle.prefix_token_ids + suffix ids``, so every engine that sees that prompt finds
the snapshot through its block-hash chain.

Durable copies: ``handle.save("dir/or/file.thawkv" | "s3://bucket/key")`` writes the snapshot's
``.thawkv`` bytes; ``PrefixHandle.load(src, store)`` validates them (header, checksums, and the
namespace when given) and publishes them into a store for local engines to find.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from thaw_agents_core.connector.settings import PARAMS_KEY  # noqa: F401 - re-exported
from thaw_agents_core.snapshot.format import check_chunks, encode_header, parse_snapshot
from thaw_agents_core.snapshot.io import write_snapshot_file
from thaw_agents_core.snapshot.namespace import Namespace
from thaw_agents_core.store.base import SnapshotNotFoundError, SnapshotRef, SnapshotStore
from thaw_agents_core.store.url import attach_url, open_store


@dataclass(frozen=True, slots=True)
class PrefixHandle:
    """A snapshotted prefix: where its KV lives and which tokens it covers."""

    snapshot_id: str
    namespace_key: str
    namespace: dict[str, Any]
    store: str
    """URL of the store holding the snapshot (``shm://...`` or a directory)."""
    prefix_token_ids: list[int]
    """Every token of the rendered prefix (the snapshot covers its full blocks)."""
    num_snapshot_tokens: int
    """Tokens whose KV is in the snapshot (prefix length rounded down to whole blocks)."""
    model_name: str = ""
    prefix_text: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def num_tokens(self) -> int:
        """Tokens in the whole prefix (``num_snapshot_tokens`` of them are in the snapshot)."""
        return len(self.prefix_token_ids)

    @property
    def ref(self) -> SnapshotRef:
        """The snapshot's key in its store (namespace key, snapshot id)."""
        return SnapshotRef(self.namespace_key, self.snapshot_id)

    def to_json(self) -> dict[str, Any]:
        """The handle as a JSON-able dict (:meth:`from_json` reads it back)."""
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any] | str) -> PrefixHandle:
        """The handle :meth:`to_json` wrote (or its JSON text); ``ValueError`` for anything else:
        handles come back from checkpointers and other processes."""
        try:
            obj = json.loads(data) if isinstance(data, str) else data
        except RecursionError:
            raise ValueError("PrefixHandle JSON is nested too deeply") from None
        if not isinstance(obj, dict):
            raise ValueError(f"a PrefixHandle is a JSON object, got {type(obj).__name__}")
        names = [f.name for f in fields(cls)]
        missing = [
            f.name
            for f in fields(cls)
            if f.name not in obj and f.default is MISSING and f.default_factory is MISSING
        ]
        unknown = sorted(repr(k) for k in obj if k not in names)
        if missing or unknown:
            raise ValueError(f"not a PrefixHandle: missing {missing}, unknown {unknown}")
        handle = cls(**obj)
        tokens, n = handle.prefix_token_ids, handle.num_snapshot_tokens
        bad = [
            k
            for k in ("snapshot_id", "namespace_key", "store", "model_name", "prefix_text")
            if not isinstance(getattr(handle, k), str)
        ]
        bad += [k for k in ("namespace", "extra") if not isinstance(getattr(handle, k), dict)]
        if not (
            isinstance(tokens, list) and all(type(t) is int and 0 <= t < 2**31 for t in tokens)
        ):
            bad.append("prefix_token_ids (ints in [0, 2**31))")
        elif not (type(n) is int and 0 <= n <= len(tokens)):
            bad.append("num_snapshot_tokens (an int in [0, len(prefix_token_ids)])")
        if bad:
            raise ValueError(f"PrefixHandle field(s) of the wrong type or range: {', '.join(bad)}")
        return handle

    # ------------------------------------------------------------------ durable copies

    def read_bytes(self, store: SnapshotStore | None = None) -> bytes:
        """The snapshot's complete ``.thawkv`` bytes, read from its store."""
        own = store is None
        store = store or open_store(attach_url(self.store))
        try:
            with store.open(self.ref) as view:
                return encode_header(view.header) + bytes(view.payload)
        finally:
            if own:
                store.close()

    def save(self, dest: str | os.PathLike[str]) -> str:
        """Write the snapshot to a file, a directory (``<id>.thawkv`` in it) or ``s3://...``.

        Returns where it went. The handle itself can be saved next to it with ``to_json``.
        A tensor-parallel engine's snapshot is one shard per rank in its store; one file cannot
        hold it yet, so that is refused.
        """
        if self.namespace.get("tensor_rank"):
            raise ValueError(
                "this snapshot is one shard per tensor-parallel rank in its store; saving it to "
                "a file is not supported yet (in-store loads work on every rank)"
            )
        data = self.read_bytes()
        text = os.fspath(dest)
        if text.startswith("s3://"):
            from thaw_agents_core.store.s3 import upload_snapshot

            upload_snapshot(data, text)
            return text
        path = Path(text)
        if path.is_dir() or text.endswith(os.sep):
            path.mkdir(parents=True, exist_ok=True)
            path = path / f"{self.snapshot_id}.thawkv"
        write_snapshot_file(path, data)
        return str(path)

    @classmethod
    def load(
        cls,
        src: str | os.PathLike[str],
        store: SnapshotStore,
        *,
        store_url: str,
        expect_namespace: Namespace | None = None,
        model_name: str = "",
    ) -> PrefixHandle:
        """Validate a saved snapshot (file or ``s3://``) and publish it into ``store``.

        Raises ``SnapshotMismatchError`` naming every differing namespace field when the
        snapshot was made by another model, dtype, block size, ... than ``expect_namespace``.
        """
        data = _read_source(os.fspath(src))
        view = parse_snapshot(data, expect_namespace=expect_namespace)
        try:
            check_chunks(view)
            header = view.header
        finally:
            view.close()
        ref = SnapshotRef(header.namespace.key(), header.snapshot_id)
        try:
            store.info(ref)  # already published (e.g. loaded twice): reuse it
        except SnapshotNotFoundError:
            ref = store.publish_bytes(header.namespace.key(), data)
        return cls(
            snapshot_id=ref.snapshot_id,
            namespace_key=ref.namespace_key,
            namespace=header.namespace.to_json(),
            store=store_url,
            prefix_token_ids=list(header.token_ids),
            num_snapshot_tokens=header.num_tokens,
            model_name=model_name,
            extra=dict(header.extra),
        )


def _read_source(src: str) -> bytes:
    if src.startswith("s3://"):
        from thaw_agents_core.store.s3 import download_snapshot

        with tempfile.TemporaryDirectory(prefix="thaw-s3-") as tmp:
            path = Path(tmp) / "snapshot.thawkv"
            download_snapshot(src, path)
            return path.read_bytes()
    path = Path(src)
    if not path.is_file():
        raise FileNotFoundError(f"no snapshot file at {path}")
    return path.read_bytes()
