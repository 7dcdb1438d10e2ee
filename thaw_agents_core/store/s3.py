"""Move ``.thawkv`` snapshots to and from S3 (or any S3-compatible endpoint) with boto3.

boto3 is optional (``pip install 'thaw-agents[s3]'``) and imported on first use. Transfers go
through boto3's managed transfer (multipart above ``multipart_threshold``, parallel parts).
The endpoint is, in order: ``endpoint_url=``, ``$AWS_ENDPOINT_URL_S3``, ``$AWS_ENDPOINT_URL``,
else AWS. Snapshots are validated before upload and after download (header, bounds and every
chunk CRC); a download becomes visible at ``dest_path`` only once it is complete and valid.
"""

from __future__ import annotations

import io
import os
from typing import Any

from thaw_agents_core.snapshot.chunks import check_chunks
from thaw_agents_core.snapshot.format import SnapshotHeader, parse_snapshot
from thaw_agents_core.snapshot.io import open_snapshot_file
from thaw_agents_core.snapshot.namespace import Namespace
from thaw_agents_core.util.files import atomic_replace

MiB = 1 << 20
_MISSING_CODES = {"404", "NoSuchKey", "NoSuchBucket", "NotFound"}


def _boto3() -> Any:
    try:
        import boto3
        import boto3.s3.transfer  # noqa: F401
    except ImportError as e:
        raise ImportError(
            "S3 support needs boto3: pip install 'thaw-agents[s3]' (or pip install boto3)"
        ) from e
    return boto3


def parse_s3_url(url: str) -> tuple[str, str]:
    """``s3://bucket/some/key`` -> (bucket, key)."""
    if not isinstance(url, str) or not url.startswith("s3://"):
        raise ValueError(f"bad S3 URL {url!r}: expected s3://BUCKET/KEY")
    bucket, _, key = url[len("s3://") :].partition("/")
    if not bucket or not key or key.endswith("/"):
        raise ValueError(
            f"bad S3 URL {url!r}: expected s3://BUCKET/KEY with a non-empty bucket and object key"
        )
    return bucket, key


def make_client(endpoint_url: str | None = None) -> Any:
    """An S3 client for ``endpoint_url`` or the endpoint from the environment."""
    endpoint = (
        endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    )
    return _boto3().client("s3", endpoint_url=endpoint or None)


def _config(multipart_threshold: int, multipart_chunksize: int, max_concurrency: int) -> Any:
    from boto3.s3.transfer import TransferConfig

    return TransferConfig(
        multipart_threshold=multipart_threshold,
        multipart_chunksize=multipart_chunksize,
        max_concurrency=max_concurrency,
    )


def _is_missing(err: BaseException) -> bool:
    code = getattr(err, "response", {}).get("Error", {}).get("Code")
    return code in _MISSING_CODES or any(c in str(err) for c in ("NoSuchBucket", "NoSuchKey"))


def _where(client: Any) -> str:
    return f"endpoint {client.meta.endpoint_url}"


def upload_snapshot(
    src: str | os.PathLike[str] | bytes | bytearray | memoryview,
    url: str,
    *,
    client: Any = None,
    endpoint_url: str | None = None,
    multipart_threshold: int = 64 * MiB,
    multipart_chunksize: int = 64 * MiB,
    max_concurrency: int = 8,
) -> SnapshotHeader:
    """Validate a snapshot (a file path or its bytes) and upload it to ``url``."""
    bucket, key = parse_s3_url(url)
    boto3 = _boto3()
    client = client or make_client(endpoint_url)
    cfg = _config(multipart_threshold, multipart_chunksize, max_concurrency)
    if isinstance(src, (str, os.PathLike)):
        with open_snapshot_file(src) as view:
            check_chunks(view)
            header = view.header
    else:
        view = parse_snapshot(src)
        check_chunks(view)
        header = view.header
        view.payload.release()
    try:
        if isinstance(src, (str, os.PathLike)):
            client.upload_file(os.fspath(src), bucket, key, Config=cfg)
        else:
            client.upload_fileobj(io.BytesIO(src), bucket, key, Config=cfg)
    except (boto3.exceptions.S3UploadFailedError, client.exceptions.ClientError) as e:
        if _is_missing(e):
            msg = f"cannot upload to {url}: bucket {bucket!r} does not exist ({_where(client)})"
            raise FileNotFoundError(msg) from e
        raise
    return header


def download_snapshot(
    url: str,
    dest_path: str | os.PathLike[str],
    *,
    client: Any = None,
    endpoint_url: str | None = None,
    expect_namespace: Namespace | None = None,
    multipart_threshold: int = 64 * MiB,
    multipart_chunksize: int = 64 * MiB,
    max_concurrency: int = 8,
) -> SnapshotHeader:
    """Download ``url`` to ``dest_path`` atomically (temp file, validate, fsync, rename)."""
    bucket, key = parse_s3_url(url)
    _boto3()
    client = client or make_client(endpoint_url)
    cfg = _config(multipart_threshold, multipart_chunksize, max_concurrency)
    with atomic_replace(dest_path, suffix=".download") as tmp:
        try:
            client.download_file(bucket, key, tmp, Config=cfg)
        except client.exceptions.ClientError as e:
            if _is_missing(e):
                msg = f"{url} does not exist (bucket {bucket!r}, key {key!r}, {_where(client)})"
                raise FileNotFoundError(msg) from None
            raise
        with open_snapshot_file(tmp, expect_namespace=expect_namespace) as view:
            check_chunks(view)
            header = view.header
    return header
