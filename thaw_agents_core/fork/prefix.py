"""PrefixHandle: a computed, snapshotted prompt prefix that other engines can start from.

A handle is plain data (JSON), so it survives LangGraph checkpointers and process boundaries.
It names the snapshot (store, namespace, id) and carries the prefix's token ids: a branch's
prompt is ``handle.prefix_token_ids + suffix ids``, so every engine that sees that prompt finds
the snapshot through its block-hash chain.

Durable copies: ``handle.save("dir/or/file.thawkv" | "s3://bucket/key")`` writes the snapshot's
``.thawkv`` bytes (one file per rank for a tensor-parallel engine); ``PrefixHandle.load(src,
store)`` validates them (header, checksums, and the namespace when given) and publishes them
into a store for local engines to find.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from thaw_agents_core.connector.settings import PARAMS_KEY  # noqa: F401 - re-exported
from thaw_agents_core.snapshot.chunks import check_chunks
from thaw_agents_core.snapshot.errors import SnapshotMismatchError
from thaw_agents_core.snapshot.format import encode_header, parse_snapshot
from thaw_agents_core.snapshot.io import write_snapshot_file
from thaw_agents_core.snapshot.namespace import Namespace
from thaw_agents_core.snapshot.ranks import rank_name
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

    def read_bytes(self, store: SnapshotStore | None = None, *, rank: int = 0) -> bytes:
        """The snapshot's complete ``.thawkv`` bytes (tensor-parallel rank ``rank``'s shard),
        read from its store."""
        own = store is None
        store = store or open_store(attach_url(self.store))
        ref = self.ref
        if rank:
            ns = Namespace.from_json(self.namespace).for_rank(rank)
            ref = SnapshotRef(ns.key(), self.snapshot_id)
        try:
            with store.open(ref) as view:
                return encode_header(view.header) + bytes(view.payload)
        finally:
            if own:
                store.close()

    def save(self, dest: str | os.PathLike[str]) -> str:
        """Write the snapshot to a file, a directory (``<id>.thawkv`` in it) or ``s3://...``.

        Returns where it went. The handle itself can be saved next to it with ``to_json``.
        A tensor-parallel engine's snapshot is one shard per rank: it is written as one file per
        rank (``x.tp0of2.thawkv``, ``x.tp1of2.thawkv``, see snapshot/ranks.py) and the name
        returned is their common one, ``x.thawkv``, which :meth:`load` takes.
        """
        size = Namespace.from_json(self.namespace).tensor_size
        shards = [self.read_bytes(rank=r) for r in range(size)]  # every shard before any write
        text = os.fspath(dest)
        if not text.startswith("s3://"):
            path = Path(text)
            if path.is_dir() or text.endswith(os.sep):
                path.mkdir(parents=True, exist_ok=True)
                path = path / f"{self.snapshot_id}.thawkv"
            text = str(path)
        for rank, data in enumerate(shards):
            target = rank_name(text, rank, size, ".thawkv")
            if target.startswith("s3://"):
                from thaw_agents_core.store.s3 import upload_snapshot

                upload_snapshot(data, target)
            else:
                write_snapshot_file(target, data)
        return text

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
        For a tensor-parallel ``expect_namespace`` (rank 0 of n), ``src`` names the set that
        :meth:`save` wrote: every rank's file is read and checked (its own rank's namespace,
        every CRC, one snapshot) before any of them is published.
        """
        text = os.fspath(src)
        size = expect_namespace.tensor_size if expect_namespace is not None else 1
        headers, datas = [], []
        for rank in range(size):
            data = _read_source(_rank_source(text, rank, size))
            view = parse_snapshot(
                data,
                expect_namespace=expect_namespace.for_rank(rank) if size > 1 else expect_namespace,
            )
            try:
                check_chunks(view)
                headers.append(view.header)
            finally:
                view.close()
            datas.append(data)
        header = headers[0]
        for rank, other in enumerate(headers[1:], 1):
            if (other.snapshot_id, other.token_ids) != (header.snapshot_id, header.token_ids):
                raise SnapshotMismatchError(
                    [f"rank {rank}'s file is another snapshot than rank 0's "
                     f"({other.snapshot_id} vs {header.snapshot_id})"]
                )  # fmt: skip
        refs = []
        for shard, data in zip(headers, datas):
            ref = SnapshotRef(shard.namespace.key(), shard.snapshot_id)
            try:
                store.info(ref)  # already published (e.g. loaded twice): reuse it
            except SnapshotNotFoundError:
                ref = store.publish_bytes(shard.namespace.key(), data)
            refs.append(ref)
        return cls(
            snapshot_id=refs[0].snapshot_id,
            namespace_key=refs[0].namespace_key,
            namespace=header.namespace.to_json(),
            store=store_url,
            prefix_token_ids=list(header.token_ids),
            num_snapshot_tokens=header.num_tokens,
            model_name=model_name,
            extra=dict(header.extra),
        )


def _rank_source(src: str, rank: int, size: int) -> str:
    """Rank ``rank``'s file of the set named ``src``; ``src`` itself when it is a single-rank
    file and the set is missing (its namespace check then names ``tensor_rank``)."""
    name = rank_name(src, rank, size, ".thawkv")
    if size > 1 and not src.startswith("s3://") and not Path(name).exists() and Path(src).is_file():
        return src
    return name


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
