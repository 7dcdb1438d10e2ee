"""KVTransport and StreamScheduler on their own: paged KV <-> snapshot, chunk by chunk.

The connector tests drive the same code inside vLLM; these pin down the data path's edges with
small caches: sub-ranges that do not start on a chunk, many copy pieces, a corrupted chunk in
the middle (nothing from it or after it reaches the cache), the wrong namespace (nothing at all
reaches it). CPU always; CUDA (registered and pageable host memory) when a GPU is present.
"""

from __future__ import annotations

import random
import time

import pytest
import torch

from thaw_agents_core.snapshot.errors import SnapshotChecksumError, SnapshotMismatchError
from thaw_agents_core.snapshot.namespace import Namespace
from thaw_agents_core.store.file import FileStore
from thaw_agents_core.store.shm import ShmStore
from thaw_agents_core.testing import flip_payload_bit
from thaw_agents_core.transport.kv import KVTransport
from thaw_agents_core.transport.prefetch import DevicePrefetcher
from thaw_agents_core.transport.stream_scheduler import StreamScheduler
from thaw_kernels import chunk_crc32c_reference

LAYERS, BLOCKS, BLOCK_SIZE, KV_HEADS, HEAD_DIM = 3, 24, 4, 2, 8
POISON = -12345.0

DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[
            pytest.mark.gpu,
            pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
        ],
    ),
]


def make_layers(device: str) -> list[torch.Tensor]:
    """Random float32 caches in the engine's layout for ``device`` (vLLM-CPU or FlashAttention)."""
    shape = (
        (BLOCKS, KV_HEADS, BLOCK_SIZE, 2 * HEAD_DIM)
        if device == "cpu"
        else (2, BLOCKS, BLOCK_SIZE, KV_HEADS, HEAD_DIM)
    )
    return [torch.randn(shape, device=device) for _ in range(LAYERS)]


def namespace(device: str, model: str = "tiny") -> Namespace:
    return Namespace(
        model,
        "",
        "float32",
        "auto",
        "cpu" if device == "cpu" else "cuda",
        BLOCK_SIZE,
        LAYERS,
        (BLOCK_SIZE, KV_HEADS, HEAD_DIM),
        "test",
    )


def block(layers: list[torch.Tensor], b: int) -> torch.Tensor:
    """Every layer's KV of block ``b``, stacked."""
    return torch.stack([t[b] if t.shape[0] == BLOCKS else t[:, b] for t in layers])


def poison(layers: list[torch.Tensor], block_ids: list[int]) -> None:
    for t in layers:
        if t.shape[0] == BLOCKS:
            t[block_ids] = POISON
        else:
            t[:, block_ids] = POISON


@pytest.fixture(params=["file", "shm"])
def store(request, tmp_path):
    if request.param == "file":
        s = FileStore(tmp_path / "store")
    else:
        s = ShmStore(f"test-kvt-{random.getrandbits(32):08x}", 16 << 20, create=True)
    yield s
    s.close()


@pytest.fixture
def transport_for():
    """Make transports whose snapshots have ``blocks_per_chunk``-block chunks, copied
    ``copy_chunks`` chunks at a time (several pieces even for these small caches). Their
    copiers are closed (the arena unregistered from CUDA) before the store goes away."""
    made: list[KVTransport] = []

    def make(
        device: str,
        store,
        layers,
        *,
        blocks_per_chunk: int = 2,
        copy_chunks: int = 2,
        model: str = "tiny",
    ) -> KVTransport:
        t = KVTransport(
            layers, namespace(device, model), store, StreamScheduler(torch.device(device))
        )
        made.append(t)
        t.blocks_per_chunk = blocks_per_chunk
        t.copier.copy_chunk_bytes = copy_chunks * blocks_per_chunk * t.block_bytes
        if hasattr(store, "arena_view"):
            t.copier.register_host(store.arena_view())
        return t

    yield make
    for t in made:
        t.copier.close()


def count_copies(t: KVTransport) -> list:
    """Record each copy a transport starts (spans), for asserting on the speculative copy."""
    calls: list = []
    start = t._start_copy
    t._start_copy = lambda payload, span: calls.append(span) or start(payload, span)
    return calls


def tokens(num_blocks: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 250) for _ in range(num_blocks * BLOCK_SIZE)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("first_block,end_block", [(0, 9), (3, 9), (1, 2), (5, 6), (0, 1)])
def test_load_writes_exactly_the_requested_blocks(
    device, store, transport_for, first_block, end_block
):
    layers = make_layers(device)
    t = transport_for(device, store, layers)
    src = [7, 2, 11, 0, 19, 4, 13, 21, 9]  # 9 blocks: 5 chunks of 2 (the last of 1), 3 pieces
    ref, stats = t.save(tokens(len(src)), src)
    assert stats.num_blocks == 9
    expected = {b: block(layers, b).clone() for b in src}
    dst = [5, 6, 8, 10, 12, 14, 15, 16, 17][: end_block - first_block]
    poison(layers, [5, 6, 8, 10, 12, 14, 15, 16, 17])
    copies = count_copies(t)
    t.load(ref, first_block, end_block, dst)
    assert len(copies) == 1  # started from the prefix, before the header was parsed
    for i, b in enumerate(dst):
        assert torch.equal(block(layers, b), expected[src[first_block + i]])
    for b in {5, 6, 8, 10, 12, 14, 15, 16, 17} - set(dst):
        assert bool((block(layers, b) == POISON).all())
    for b in src:  # the sources are untouched
        assert torch.equal(block(layers, b), expected[b])


@pytest.mark.parametrize("device", DEVICES)
def test_corrupt_chunk_stops_the_load_at_that_chunk(device, tmp_path, transport_for):
    store = FileStore(tmp_path / "store")
    layers = make_layers(device)
    t = transport_for(device, store, layers, copy_chunks=1)  # one piece per chunk
    src = list(range(8))  # chunks: blocks 0-1, 2-3, 4-5, 6-7
    ref, _ = t.save(tokens(8, seed=1), src)
    flip_payload_bit(store, ref, 2 * t.blocks_per_chunk * t.block_bytes + 5, bit=0x01)  # chunk 2
    dst = list(range(8, 16))
    poison(layers, dst)
    with pytest.raises(SnapshotChecksumError) as err:
        t.load(ref, 0, 8, dst)
    assert err.value.bad_chunks == [2]
    for b in dst[4:]:  # the bad chunk and every block after it: never written
        assert bool((block(layers, b) == POISON).all())


@pytest.mark.parametrize("device", DEVICES)
def test_snapshot_of_other_chunk_geometry_is_copied_again(device, store, transport_for):
    """The loader starts copying assuming its own chunk size; the header says otherwise."""
    layers = make_layers(device)
    ref, _ = transport_for(device, store, layers, blocks_per_chunk=3).save(
        tokens(7), list(range(7))
    )
    expected = [block(layers, b).clone() for b in range(7)]
    loader = transport_for(device, store, layers, blocks_per_chunk=2)
    dst = list(range(10, 15))
    poison(layers, dst)
    copies = count_copies(loader)
    loader.load(ref, 2, 7, dst)
    assert len(copies) == 2  # the guess (2-block chunks), then the header's 3-block chunks
    for i, b in enumerate(dst):
        assert torch.equal(block(layers, b), expected[2 + i])


@pytest.mark.parametrize("device", DEVICES)
def test_other_namespace_is_refused_before_any_write(device, tmp_path, transport_for):
    store = FileStore(tmp_path / "store")
    layers = make_layers(device)
    ref, _ = transport_for(device, store, layers).save(tokens(4), [0, 1, 2, 3])
    other = transport_for(device, store, layers, model="other")
    poison(layers, [4, 5, 6, 7])
    with pytest.raises(SnapshotMismatchError):
        other.load(ref, 0, 4, [4, 5, 6, 7])
    for b in [4, 5, 6, 7]:
        assert bool((block(layers, b) == POISON).all())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("registered", [True, False])
def test_stream_scheduler_round_trip(device, registered):
    if device == "cpu" and not registered:
        pytest.skip("registration is a CUDA notion")
    crc_chunk = 4096
    copier = StreamScheduler(
        torch.device(device), copy_chunk_bytes=3 * crc_chunk, staging_bytes=2 * crc_chunk
    )
    host = torch.randint(0, 256, (10 * crc_chunk + 100,), dtype=torch.uint8)
    if registered:
        copier.register_host(host)
    expected = chunk_crc32c_reference(host, crc_chunk).tolist()
    dst = torch.full((host.numel(),), 0xA5, dtype=torch.uint8, device=device)
    pieces = copier.to_device_pieces(host, dst, crc_chunk)
    step = (3 if registered else 2) * crc_chunk  # pageable memory: pieces fit a staging buffer
    assert [(p.lo, p.hi) for p in pieces][:2] == [(0, step), (step, 2 * step)]
    assert sum((p.wait() for p in pieces), []) == expected
    assert torch.equal(dst.cpu(), host)
    assert copier.to_device(host, dst, crc_chunk).tolist() == expected
    back = torch.zeros_like(host)
    if registered:
        copier.register_host(back)
    assert copier.to_host(dst, back, crc_chunk) == expected
    assert torch.equal(back, host)
    copier.close()


# ---------------------------------------------------------------------- DevicePrefetcher
# Verified device copies (transport/prefetch.py): a good snapshot is held and loads exactly
# without a second copy; a flipped byte anywhere makes the status False before any byte
# reaches a cache; another namespace is refused; the budget evicts least recently used copies.


def settle(prefetcher: DevicePrefetcher, ref, timeout_s: float = 30.0):
    """Ask until the status is final (as vLLM does, once per step)."""
    deadline = time.monotonic() + timeout_s
    while (status := prefetcher.status(ref)) is None:
        if time.monotonic() > deadline:
            raise TimeoutError(f"prefetch of {ref} still pending after {timeout_s} s")
        time.sleep(0.005)
    return status


def make_prefetcher(device: str, store, budget: int = 1 << 30, model: str = "tiny"):
    return DevicePrefetcher(
        torch.device(device), lambda: store, lambda: namespace(device, model), budget
    )


@pytest.mark.parametrize("device", DEVICES)
def test_pageable_snapshot_on_cuda_is_left_to_the_host_check(device, tmp_path, transport_for):
    """On CUDA only memory registered with CUDA is prefetched (a file store's is not)."""
    store = FileStore(tmp_path / "store")
    layers = make_layers(device)
    ref, _ = transport_for(device, store, layers).save(tokens(4), [0, 1, 2, 3])
    prefetcher = make_prefetcher(device, store)
    try:
        assert settle(prefetcher, ref) == ("host" if device == "cuda" else True)
    finally:
        prefetcher.close()


@pytest.mark.parametrize("device", DEVICES)
def test_held_copy_loads_exactly_and_skips_the_host_copy(device, tmp_path, transport_for):
    store = ShmStore(f"test-pf-{random.getrandbits(32):08x}", 16 << 20, create=True)
    layers = make_layers(device)
    t = transport_for(device, store, layers)
    src = [7, 2, 11, 0, 19, 4, 13]
    ref, _ = t.save(tokens(len(src)), src)
    expected = {b: block(layers, b).clone() for b in src}
    t.prefetcher = make_prefetcher(device, store)
    try:
        assert settle(t.prefetcher, ref) is True
        assert t.prefetcher.held_bytes() == len(src) * t.block_bytes
        dst = [5, 6, 8, 10, 12]
        poison(layers, dst + [14, 15])
        started = []
        t._start_copy = lambda payload, span: started.append(span)  # must not be called
        stats = t.load(ref, 2, 7, dst)
        assert stats.num_blocks == 5 and not started
        for i, b in enumerate(dst):
            assert torch.equal(block(layers, b), expected[src[2 + i]])
        for b in (14, 15):
            assert bool((block(layers, b) == POISON).all())
        assert t.prefetcher.counts["verified"] == 1 and t.prefetcher.counts["taken"] == 1
    finally:
        t.prefetcher.close()
        t.copier.close()  # unregister the arena before it goes
        store.close()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_flipped_byte_is_bad_and_nothing_is_held(device, transport_for, where):
    store = ShmStore(f"test-pf-{random.getrandbits(32):08x}", 16 << 20, create=True)
    layers = make_layers(device)
    t = transport_for(device, store, layers, blocks_per_chunk=2)
    ref, _ = t.save(tokens(8, seed=3), list(range(8)))
    size = 8 * t.block_bytes
    flip_payload_bit(
        store, ref, bit=0x10, at={"first": 0, "middle": size // 2 + 3, "last": size - 1}[where]
    )
    prefetcher = make_prefetcher(device, store)
    try:
        assert settle(prefetcher, ref) is False
        assert "checksum" in (prefetcher.reason(ref) or "").lower()
        assert prefetcher.take(ref) is None and prefetcher.held_bytes() == 0
        assert prefetcher.status(ref) is False  # a verdict holds: not copied again
        assert prefetcher.counts["bad"] == 1
    finally:
        prefetcher.close()
        t.copier.close()
        store.close()


@pytest.mark.parametrize("device", DEVICES)
def test_other_namespace_is_refused(device, tmp_path, transport_for):
    store = FileStore(tmp_path / "store")
    layers = make_layers(device)
    ref, _ = transport_for(device, store, layers).save(tokens(4), [0, 1, 2, 3])
    prefetcher = make_prefetcher(device, store, model="other")
    try:
        assert settle(prefetcher, ref) is False
        assert SnapshotMismatchError.__name__ in (prefetcher.reason(ref) or "")
    finally:
        prefetcher.close()


def test_budget_evicts_least_recently_used(tmp_path, transport_for):
    store = FileStore(tmp_path / "store")
    layers = make_layers("cpu")
    t = transport_for("cpu", store, layers)
    refs = [t.save(tokens(4, seed=s), [0, 1, 2, 3])[0] for s in range(3)]
    size = 4 * t.block_bytes
    prefetcher = make_prefetcher("cpu", store, budget=2 * size)
    try:
        assert settle(prefetcher, refs[0]) is True
        assert settle(prefetcher, refs[1]) is True
        assert prefetcher.take(refs[0]) is not None  # refs[0] is now the most recently used
        assert settle(prefetcher, refs[2]) is True
        assert prefetcher.take(refs[1]) is None and prefetcher.take(refs[0]) is not None
        assert prefetcher.counts["evicted"] == 1 and prefetcher.held_bytes() == 2 * size
        too_small = make_prefetcher("cpu", store, budget=size - 1)
        assert settle(too_small, refs[0]) == "host"  # does not fit: check it another way
        too_small.close()
        prefetcher.forget()
        assert prefetcher.held_bytes() == 0 and prefetcher.take(refs[0]) is None
    finally:
        prefetcher.close()


def test_missing_snapshot_is_bad(tmp_path, transport_for):
    store = FileStore(tmp_path / "store")
    layers = make_layers("cpu")
    t = transport_for("cpu", store, layers)
    ref, _ = t.save(tokens(2), [0, 1])
    store.delete(ref)
    prefetcher = make_prefetcher("cpu", store)
    try:
        assert settle(prefetcher, ref) is False
    finally:
        prefetcher.close()


def test_an_adopted_copy_loads_exactly_and_only_in_its_namespace(tmp_path, transport_for):
    """A copy verified elsewhere (a device share) is held like a prefetched one."""
    from thaw_agents_core.transport.prefetch import HeldSnapshot

    store = FileStore(tmp_path / "store")
    layers = make_layers("cpu")
    t = transport_for("cpu", store, layers)
    src, dst = [3, 7, 11, 12], [20, 21, 22, 23]
    ref, _ = t.save(tokens(4), src)
    with store.open(ref) as view:
        held = HeldSnapshot(
            view.header, torch.frombuffer(bytearray(view.payload), dtype=torch.uint8), 0.0
        )
    other = make_prefetcher("cpu", store, model="other")
    t.prefetcher = make_prefetcher("cpu", store)
    try:
        assert not other.adopt(held) and other.held_bytes() == 0  # another engine's namespace
        assert t.prefetcher.adopt(held) and t.prefetcher.status(ref) is True
        poison(layers, dst)
        stats = t.load(ref, 0, 4, dst)
        assert stats.prefetched and t.prefetcher.counts["adopted"] == 1
        for s, d in zip(src, dst):
            assert torch.equal(block(layers, s), block(layers, d))
    finally:
        other.close()
        t.prefetcher.close()
