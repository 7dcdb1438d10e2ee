"""StreamScheduler with file spans: freeze writes tensors into a file with pwrite, through the
staging pipeline on CUDA (chunk k's DMA while chunk k - 1 is written)."""

from __future__ import annotations

import os

import pytest
import torch

from thaw_agents_core.transport.stream_scheduler import FileSpan, StreamScheduler
from thaw_kernels import chunk_crc32c

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
CRC_CHUNK = 1 << 16


def _scheduler(device: str) -> StreamScheduler:
    # small staging: many chunks per call, so both staging buffers turn over
    return StreamScheduler(torch.device(device), copy_chunk_bytes=1 << 18, staging_bytes=1 << 18)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("nbytes", [1, CRC_CHUNK + 3, (5 << 18) + 17])
def test_to_host_writes_a_file_span(tmp_path, device, nbytes):
    """Fresh random bytes into a span of a file poisoned with 0xAB: exactly those bytes land
    there, nothing outside the span changes, and the CRCs are those of the source."""
    src = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, device=device)
    path = tmp_path / "out.bin"
    path.write_bytes(b"\xab" * (nbytes + 64))
    fd = os.open(path, os.O_RDWR)
    sched = _scheduler(device)
    try:
        crcs = sched.to_host(src, FileSpan(fd, 32, nbytes), CRC_CHUNK)
        crcs_again = sched.to_host(src, FileSpan(fd, 32, nbytes), CRC_CHUNK)  # staging reused
    finally:
        sched.close()
        os.close(fd)
    data = path.read_bytes()
    assert data[:32] == b"\xab" * 32 and data[32 + nbytes :] == b"\xab" * 32
    assert data[32 : 32 + nbytes] == src.cpu().numpy().tobytes()
    assert crcs == crcs_again == chunk_crc32c(src.cpu(), CRC_CHUNK).tolist()


@pytest.mark.parametrize("device", DEVICES)
def test_file_span_size_must_match(tmp_path, device):
    path = tmp_path / "out.bin"
    path.write_bytes(b"")
    fd = os.open(path, os.O_RDWR)
    try:
        with pytest.raises(ValueError, match="source has 8 bytes, destination 7"):
            _scheduler(device).to_host(
                torch.zeros(8, dtype=torch.uint8, device=device), FileSpan(fd, 0, 7), CRC_CHUNK
            )
    finally:
        os.close(fd)
