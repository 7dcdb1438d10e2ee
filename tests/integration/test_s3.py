"""S3 transfers against a real HTTP endpoint (moto's threaded server on loopback).

(S3 URL parsing, no server: tests/unit/test_s3_urls.py.)
"""

from __future__ import annotations

import os

import pytest
from moto_s3 import moto_s3

pytest.importorskip("boto3")
pytest.importorskip("moto.server")

from thaw_agents_core.snapshot.errors import SnapshotChecksumError, SnapshotMismatchError  # noqa: E402
from thaw_agents_core.snapshot.format import parse_snapshot
from thaw_agents_core.snapshot.io import build_snapshot, write_snapshot_file  # noqa: E402
from thaw_agents_core.snapshot.namespace import Namespace
from thaw_agents_core.store.s3 import download_snapshot, make_client, upload_snapshot  # noqa: E402

NS = Namespace("tiny-model", "w1", "float32", "auto", "cpu", 4, 2, (1, 4, 2), "0.32.0")
BUCKET = "thaw-test"
MiB = 1 << 20


def snapshot(num_blocks: int, block_bytes: int = 64, **kw) -> bytearray:
    payload = bytes((i * 7 + 3) % 256 for i in range(256)) * (num_blocks * block_bytes // 256 + 1)
    return build_snapshot(
        NS, list(range(4 * num_blocks)), block_bytes, payload[: num_blocks * block_bytes], **kw
    )


@pytest.fixture(scope="module")
def endpoint():
    with moto_s3(BUCKET, endpoint_in_env=False) as url:  # clients get it explicitly
        yield url


@pytest.fixture
def client(endpoint):
    return make_client(endpoint)


def test_upload_download_round_trip(client, tmp_path):
    data = snapshot(3)
    header = upload_snapshot(data, f"s3://{BUCKET}/snaps/a.thawkv", client=client)
    dest = tmp_path / "a.thawkv"
    got = download_snapshot(
        f"s3://{BUCKET}/snaps/a.thawkv", dest, client=client, expect_namespace=NS
    )
    assert got == header and dest.read_bytes() == data
    assert os.listdir(tmp_path) == ["a.thawkv"]  # no temp file left behind


def test_upload_from_file_and_endpoint_from_environment(endpoint, tmp_path, monkeypatch):
    src = tmp_path / "src.thawkv"
    write_snapshot_file(src, snapshot(2))
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)  # no client, no endpoint_url: from the env
    upload_snapshot(src, f"s3://{BUCKET}/from-file.thawkv")
    download_snapshot(f"s3://{BUCKET}/from-file.thawkv", tmp_path / "dst.thawkv")
    assert (tmp_path / "dst.thawkv").read_bytes() == src.read_bytes()


def test_multipart_transfer(client, tmp_path):
    data = snapshot(12 * 16, block_bytes=MiB // 16)  # 12 MiB payload -> 3 parts of 5 MiB
    url = f"s3://{BUCKET}/big.thawkv"
    upload_snapshot(
        data, url, client=client, multipart_threshold=5 * MiB, multipart_chunksize=5 * MiB
    )
    etag = client.head_object(Bucket=BUCKET, Key="big.thawkv")["ETag"]
    assert etag.strip('"').endswith("-3")  # S3 ETags of multipart uploads end in -<parts>
    download_snapshot(url, tmp_path / "big.thawkv", client=client, multipart_threshold=5 * MiB,
                      multipart_chunksize=5 * MiB)  # fmt: skip
    assert (tmp_path / "big.thawkv").read_bytes() == data


def test_missing_object_and_bucket(client, endpoint, tmp_path):
    dest = tmp_path / "x.thawkv"
    with pytest.raises(FileNotFoundError) as e:
        download_snapshot(f"s3://{BUCKET}/nope.thawkv", dest, client=client)
    assert str(e.value) == (
        f"s3://{BUCKET}/nope.thawkv does not exist (bucket '{BUCKET}', key 'nope.thawkv', endpoint {endpoint})"
    )
    with pytest.raises(
        FileNotFoundError,
        match="cannot upload to s3://no-such-bucket/a: bucket 'no-such-bucket' does not exist",
    ):
        upload_snapshot(snapshot(1), "s3://no-such-bucket/a", client=client)
    assert os.listdir(tmp_path) == []


def test_invalid_snapshots_are_rejected_both_ways(client, tmp_path):
    bad = snapshot(3)
    bad[-1] ^= 0xFF
    with pytest.raises(SnapshotChecksumError):  # never upload a corrupt snapshot
        upload_snapshot(bad, f"s3://{BUCKET}/bad.thawkv", client=client)
    client.put_object(Bucket=BUCKET, Key="bad.thawkv", Body=bytes(bad))  # corrupted at rest
    dest = tmp_path / "bad.thawkv"
    with pytest.raises(SnapshotChecksumError, match=r"chunk\(s\) \[0\]"):
        download_snapshot(f"s3://{BUCKET}/bad.thawkv", dest, client=client)
    other = Namespace(**{**NS.to_json(), "dtype": "bfloat16"})
    upload_snapshot(snapshot(1), f"s3://{BUCKET}/ok.thawkv", client=client)
    with pytest.raises(
        SnapshotMismatchError, match="dtype: snapshot has 'float32', this engine has 'bfloat16'"
    ):
        download_snapshot(f"s3://{BUCKET}/ok.thawkv", dest, client=client, expect_namespace=other)
    assert os.listdir(tmp_path) == []  # the destination only ever appears complete and valid
    assert (
        parse_snapshot(
            client.get_object(Bucket=BUCKET, Key="ok.thawkv")["Body"].read()
        ).header.num_blocks
        == 1
    )
