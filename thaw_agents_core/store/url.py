"""Store URLs: :func:`open_store` (``shm://``, ``file://`` or a path), :func:`attach_url`, :func:`parse_size`."""

from __future__ import annotations

import os
import re
import urllib.parse

from thaw_agents_core.store.base import SnapshotStore
from thaw_agents_core.store.file import FileStore

_SIZE_RE = re.compile(r"(\d+)\s*([kmgt]?)(i?b)?", re.IGNORECASE)


def parse_size(text: str | int) -> int:
    """``"64MiB"``, ``"2g"``, ``"4096"`` -> bytes (k/m/g/t are binary: 1k = 1024)."""
    if isinstance(text, int):
        return text
    m = _SIZE_RE.fullmatch(text.strip())
    if m is None:
        raise ValueError(f"bad size {text!r}: use e.g. 4096, 64MiB, 2GiB")
    return int(m.group(1)) << (10 * " kmgt".index(m.group(2).lower() or " "))


def attach_url(url: str) -> str:
    """The URL an engine process uses: it attaches to a shared-memory store, never creates one
    (the store's owner is the user's process, which outlives its engines)."""
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme != "shm":
        return url
    query = dict(urllib.parse.parse_qsl(parsed.query))
    query["create"] = "false"
    query.pop("capacity", None)
    return urllib.parse.urlunsplit(parsed._replace(query=urllib.parse.urlencode(query)))


def open_store(url: str | os.PathLike[str]) -> SnapshotStore:
    """``shm://NAME?capacity=1GiB[&create=true|false]``, ``file:///PATH[?max_bytes=...]`` or a path.

    For ``shm://`` without ``create``: attach if the store exists, else create it (needs capacity).
    """
    text = os.fspath(url)
    parsed = urllib.parse.urlsplit(text)
    query = dict(urllib.parse.parse_qsl(parsed.query))
    if parsed.scheme == "shm":
        from thaw_agents_core.store.shm import ShmStore

        create = {"true": True, "false": False, None: None}.get(query.get("create"), "bad")
        if create == "bad":
            raise ValueError(f"bad create={query['create']!r} in {text!r}: use true or false")
        cap = parse_size(query["capacity"]) if "capacity" in query else None
        return ShmStore(parsed.netloc, cap, create=create)
    if parsed.scheme == "file":
        max_bytes = parse_size(query["max_bytes"]) if "max_bytes" in query else None
        return FileStore(urllib.parse.unquote(parsed.path), max_bytes=max_bytes)
    if parsed.scheme and len(parsed.scheme) > 1:  # (one letter: a Windows drive)
        raise ValueError(
            f"unsupported store URL {text!r}: use shm://NAME?capacity=1GiB, file:///PATH or a plain path"
        )
    return FileStore(text)
