"""S3 for weights and KV over real HTTP (moto's server): concurrent multipart upload, ranged
parallel GETs into the local cache, ETag/size/checksum validation, an interrupted download that
resumes, and an object that changes under the cache."""

from __future__ import annotations

import pytest
import torch
from moto_s3 import moto_s3

pytest.importorskip("boto3")
pytest.importorskip("moto.server")

from thaw_agents_core.snapshot.io import build_snapshot, write_snapshot_file  # noqa: E402
from thaw_agents_core.snapshot.namespace import Namespace  # noqa: E402
from thaw_agents_core.store.s3 import make_client  # noqa: E402
from thaw_agents_core.weights import s3  # noqa: E402
from thaw_agents_core.weights.format import WeightsChecksumError, WeightsNamespace  # noqa: E402
from thaw_agents_core.weights.io import open_weights, write_weights  # noqa: E402

BUCKET = "thaw-weights"
MiB = 1 << 20
PART = 5 * MiB  # S3's smallest multipart part
NS = WeightsNamespace("f" * 32, "LlamaForCausalLM", "float32", "engine", 0, 1, "v1")


@pytest.fixture(scope="module")
def endpoint():
    with moto_s3(BUCKET, endpoint_in_env=False) as url:
        yield url


@pytest.fixture()
def client(endpoint):
    return make_client(endpoint)


def _weights(path, seed: int, version: str = "v1"):
    g = torch.Generator().manual_seed(seed)
    named = [(f"layer{i}.weight", torch.randn(1 << 20, generator=g)) for i in range(6)]  # 24 MiB
    ns = WeightsNamespace(**{**NS.to_json(), "weights_version": version})
    write_weights(path, named, ns)
    return named


def test_multipart_upload_and_cached_ranged_download(tmp_path, client):
    named = _weights(tmp_path / "w.thaw", seed=0)
    etag = s3.upload(tmp_path / "w.thaw", f"s3://{BUCKET}/w.thaw", client=client, part_bytes=PART)
    assert etag.strip('"').endswith("-5")  # 24 MiB + header in 5 MiB parts: multipart
    cache = tmp_path / "cache"
    first = s3.fetch(f"s3://{BUCKET}/w.thaw", cache_dir=cache, client=client, part_bytes=PART)
    assert (first.cache_hit, first.parts_fetched, first.parts_resumed) == (False, 5, 0)
    with open_weights(first.path) as wf:
        assert all(torch.equal(wf.tensor(n), t) for n, t in named)
    again = s3.fetch(f"s3://{BUCKET}/w.thaw", cache_dir=cache, client=client, part_bytes=PART)
    assert again.cache_hit and again.path == first.path


def test_interrupted_download_resumes_missing_parts(tmp_path, client):
    _weights(tmp_path / "w.thaw", seed=1)
    url = f"s3://{BUCKET}/resume.thaw"
    s3.upload(tmp_path / "w.thaw", url, client=client, part_bytes=PART)
    cache = tmp_path / "cache"

    def die_after_two(index: int) -> None:
        if index >= 2:
            raise ConnectionError("network gone")

    with pytest.raises(ConnectionError):
        s3.fetch(
            url,
            cache_dir=cache,
            client=client,
            part_bytes=PART,
            max_concurrency=1,
            on_part=die_after_two,
        )
    assert not s3.cache_path(url, cache).exists()  # nothing half-done is visible
    resumed = s3.fetch(url, cache_dir=cache, client=client, part_bytes=PART, max_concurrency=2)
    assert resumed.parts_resumed >= 2 and resumed.parts_fetched + resumed.parts_resumed == 5
    assert s3.validate_file(resumed.path) == "weights"


def test_changed_object_is_fetched_again_and_partial_discarded(tmp_path, client):
    url = f"s3://{BUCKET}/changing.thaw"
    cache = tmp_path / "cache"
    _weights(tmp_path / "v1.thaw", seed=2, version="v1")
    s3.upload(tmp_path / "v1.thaw", url, client=client, part_bytes=PART)
    assert not s3.fetch(url, cache_dir=cache, client=client, part_bytes=PART).cache_hit
    v2 = _weights(tmp_path / "v2.thaw", seed=3, version="v2")
    s3.upload(tmp_path / "v2.thaw", url, client=client, part_bytes=PART)
    stats = s3.fetch(url, cache_dir=cache, client=client, part_bytes=PART)
    assert not stats.cache_hit and stats.parts_resumed == 0
    with open_weights(stats.path) as wf:
        assert wf.header.namespace.weights_version == "v2"
        assert torch.equal(wf.tensor("layer0.weight"), v2[0][1])

    # interrupted under v2, then the object changes: the parts of v2 are not reused for v3
    url3 = f"s3://{BUCKET}/changing3.thaw"
    s3.upload(tmp_path / "v2.thaw", url3, client=client, part_bytes=PART)

    def stop(index: int) -> None:
        raise ConnectionError("stop")

    with pytest.raises(ConnectionError):
        s3.fetch(
            url3, cache_dir=cache, client=client, part_bytes=PART, max_concurrency=1, on_part=stop
        )
    s3.upload(tmp_path / "v1.thaw", url3, client=client, part_bytes=PART)
    fresh = s3.fetch(url3, cache_dir=cache, client=client, part_bytes=PART)
    assert fresh.parts_resumed == 0
    with open_weights(fresh.path) as wf:
        assert wf.header.namespace.weights_version == "v1"


def test_corrupt_cache_and_corrupt_upload_are_refused(tmp_path, client):
    _weights(tmp_path / "w.thaw", seed=4)
    url = f"s3://{BUCKET}/verify.thaw"
    s3.upload(tmp_path / "w.thaw", url, client=client, part_bytes=PART)
    cache = tmp_path / "cache"
    path = s3.fetch(url, cache_dir=cache, client=client, part_bytes=PART).path
    data = bytearray(path.read_bytes())
    data[-100] ^= 0xFF  # same size, same ETag in the sidecar: only the checksums can tell
    path.chmod(0o644)
    path.write_bytes(bytes(data))
    healed = s3.fetch(url, cache_dir=cache, client=client, part_bytes=PART, verify_hit=True)
    assert not healed.cache_hit and s3.validate_file(healed.path) == "weights"
    bad = tmp_path / "bad.thaw"
    bad.write_bytes(bytes(data))
    with pytest.raises(WeightsChecksumError):
        s3.upload(bad, f"s3://{BUCKET}/bad.thaw", client=client)


def test_kv_snapshots_go_the_same_way(tmp_path, client):
    ns = Namespace("tiny-model", "w1", "float32", "auto", "cpu", 4, 2, (1, 4, 2), "0.32.0")
    write_snapshot_file(tmp_path / "p.thawkv", build_snapshot(ns, list(range(16)), 64, bytes(256)))
    url = f"s3://{BUCKET}/p.thawkv"
    s3.upload(tmp_path / "p.thawkv", url, client=client)
    stats = s3.fetch(url, cache_dir=tmp_path / "cache", client=client)
    assert s3.validate_file(stats.path) == "kv"
    assert stats.path.read_bytes() == (tmp_path / "p.thawkv").read_bytes()
