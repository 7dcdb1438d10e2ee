"""S3 for ``.thaw`` and ``.thawkv`` files: concurrent multipart upload, concurrent ranged GETs
into a local cache validated by ETag, size and checksums, resume of an interrupted download.

    upload(path, "s3://b/k")        validate (header + every CRC) -> boto3 managed transfer
                                    (TransferConfig: multipart, max_concurrency parallel parts)
    fetch("s3://b/k") -> Path        HEAD (ETag, size)
        cached file + sidecar with the same ETag and size           -> hit, no GET
        else: parts of part_bytes, max_concurrency ranged GETs at once, each If-Match the ETag,
              written into CACHE/x.part; every finished part is recorded in x.part.json, so an
              interrupted fetch resumes with the missing parts only (a changed ETag discards
              them); then header + every CRC32C checked -> renamed into place + sidecar

Cache: ``$THAW_AGENTS_CACHE/s3`` (models.cache_dir), one folder per bucket/key digest. The
object is read-only once validated; a changed object (new ETag or size) is fetched again.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from thaw_agents_core.store.s3 import MiB, _boto3, _is_missing, make_client, parse_s3_url
from thaw_agents_core.util.files import atomic_replace

DEFAULT_PART_BYTES = 16 * MiB


@dataclass(slots=True)
class FetchStats:
    """What one fetch did."""

    path: Path
    num_bytes: int
    etag: str
    cache_hit: bool = False
    parts_fetched: int = 0
    parts_resumed: int = 0


def validate_file(path: str | os.PathLike[str]) -> str:
    """Header and every chunk CRC32C of a .thaw or .thawkv file; returns its kind."""
    with open(path, "rb") as f:
        magic = f.read(8)
    if magic == b"THAWWT01":
        from thaw_agents_core.weights.io import open_weights

        with open_weights(path) as wf:
            wf.verify()
        return "weights"
    from thaw_agents_core.snapshot.chunks import check_chunks
    from thaw_agents_core.snapshot.io import open_snapshot_file

    with open_snapshot_file(path) as view:
        check_chunks(view)
    return "kv"


def upload(
    path: str | os.PathLike[str],
    url: str,
    *,
    client: Any = None,
    endpoint_url: str | None = None,
    part_bytes: int = 64 * MiB,
    max_concurrency: int = 8,
) -> str:
    """Validate ``path`` and upload it (concurrent multipart above ``part_bytes``); its ETag."""
    from boto3.s3.transfer import TransferConfig

    bucket, key = parse_s3_url(url)
    boto3 = _boto3()
    kind = validate_file(path)
    client = client or make_client(endpoint_url)
    config = TransferConfig(
        multipart_threshold=part_bytes,
        multipart_chunksize=part_bytes,
        max_concurrency=max_concurrency,
    )
    try:
        client.upload_file(
            os.fspath(path), bucket, key, Config=config, ExtraArgs={"Metadata": {"thaw-kind": kind}}
        )
    except (boto3.exceptions.S3UploadFailedError, client.exceptions.ClientError) as exc:
        if _is_missing(exc):
            raise FileNotFoundError(
                f"cannot upload to {url}: bucket {bucket!r} does not exist"
            ) from exc
        raise
    return str(client.head_object(Bucket=bucket, Key=key)["ETag"])


def cache_path(url: str, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Where ``url`` lives in the local cache."""
    if cache_dir is None:
        cache_dir = _default_cache() / "s3"
    bucket, key = parse_s3_url(url)
    digest = hashlib.sha256(f"{bucket}/{key}".encode()).hexdigest()[:16]
    return Path(cache_dir) / digest / Path(key).name


def _default_cache() -> Path:
    """``$THAW_AGENTS_CACHE`` or the user cache folder (as engine/models.py's cache_dir)."""
    env = os.environ.get("THAW_AGENTS_CACHE")
    if env:
        return Path(env).expanduser()
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("thaw-agents"))


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    with atomic_replace(path) as tmp:
        Path(tmp).write_text(json.dumps(obj))


def fetch(
    url: str,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    client: Any = None,
    endpoint_url: str | None = None,
    part_bytes: int = DEFAULT_PART_BYTES,
    max_concurrency: int = 8,
    verify_hit: bool = False,
    on_part: Callable[[int], None] | None = None,
) -> FetchStats:
    """The validated local copy of ``url`` (see module docstring). ``on_part(index)`` runs after
    each part is stored (progress; tests interrupt a fetch there). ``verify_hit``: re-check
    every CRC of a cached copy too (restores verify on the device anyway)."""
    bucket, key = parse_s3_url(url)
    client = client or make_client(endpoint_url)
    try:
        head = client.head_object(Bucket=bucket, Key=key)
    except client.exceptions.ClientError as exc:
        if _is_missing(exc):
            raise FileNotFoundError(
                f"{url} does not exist (bucket {bucket!r}, key {key!r})"
            ) from None
        raise
    etag, size = str(head["ETag"]), int(head["ContentLength"])
    path = cache_path(url, cache_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta_path = path.with_name(path.name + ".meta.json")
    meta = _read_json(meta_path)
    if (
        meta
        and meta.get("etag") == etag
        and meta.get("size") == size
        and path.is_file()
        and path.stat().st_size == size
    ):
        if not verify_hit:
            return FetchStats(path, size, etag, cache_hit=True)
        try:
            validate_file(path)
            return FetchStats(path, size, etag, cache_hit=True)
        except ValueError:
            path.unlink(missing_ok=True)  # corrupt in the cache: fetch it again
    meta_path.unlink(missing_ok=True)
    stats = _fetch_parts(
        client, bucket, key, etag, size, path, part_bytes, max_concurrency, on_part
    )
    validate_file(path.with_name(path.name + ".part"))
    os.replace(path.with_name(path.name + ".part"), path)
    path.with_name(path.name + ".part.json").unlink(missing_ok=True)
    _write_json(meta_path, {"url": url, "etag": etag, "size": size})
    return stats


def _fetch_parts(
    client: Any,
    bucket: str,
    key: str,
    etag: str,
    size: int,
    path: Path,
    part_bytes: int,
    max_concurrency: int,
    on_part: Callable[[int], None] | None,
) -> FetchStats:
    part, state_path = path.with_name(path.name + ".part"), path.with_name(path.name + ".part.json")
    state = _read_json(state_path)
    if not (
        state
        and state.get("etag") == etag
        and state.get("size") == size
        and state.get("part_bytes") == part_bytes
        and part.is_file()
    ):
        state = {"etag": etag, "size": size, "part_bytes": part_bytes, "done": []}
        part.unlink(missing_ok=True)
    with open(part, "ab") as f:
        f.truncate(size)
    num_parts = -(-size // part_bytes)
    done = set(state["done"])
    todo = [i for i in range(num_parts) if i not in done]
    lock = threading.Lock()

    def get(index: int) -> None:
        lo = index * part_bytes
        hi = min(size, lo + part_bytes) - 1
        body = client.get_object(Bucket=bucket, Key=key, Range=f"bytes={lo}-{hi}", IfMatch=etag)[
            "Body"
        ].read()
        if len(body) != hi - lo + 1:
            raise OSError(
                f"s3://{bucket}/{key}: part {index} returned {len(body)} bytes, expected {hi - lo + 1}"
            )
        with open(part, "r+b") as out:
            out.seek(lo)
            out.write(body)
            out.flush()
            os.fsync(out.fileno())
        with lock:
            done.add(index)
            _write_json(state_path, {**state, "done": sorted(done)})
        if on_part is not None:
            on_part(index)

    with ThreadPoolExecutor(max(1, max_concurrency), thread_name_prefix="thaw-s3") as pool:
        for future in [pool.submit(get, i) for i in todo]:
            future.result()
    return FetchStats(
        path, size, etag, parts_fetched=len(todo), parts_resumed=num_parts - len(todo)
    )
