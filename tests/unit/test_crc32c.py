"""thaw_kernels.crc32c: CRC32C of every fixed-size chunk, and combining chunk CRCs.

Every CRC is checked against ``google_crc32c.value`` of the same bytes (fresh random buffers, at
offsets 0 and 1 so unaligned starts take the byte-load path); see kernel_cases.py for the three
ways a kernel runs here:

- CPU: the public dispatch (libcrc32c through ctypes, threads for big buffers, the
  ``google_crc32c.value`` fallback), the reference, the combines, error messages.
- Interpreter (``test_interp_*``): the Triton kernels on CPU tensors, in this process.
- Offline compile (CPU machines): the kernels compile for sm_90, the data loads are 128-bit.
- GPU (``-m gpu``, needs CUDA): the compiled kernels, defaults and tuning variants.
"""

from __future__ import annotations

import os

import google_crc32c
import pytest
import torch
from kernel_cases import (
    compile_sm90,
    gpu,
    interpret_kernels,
    needs_cuda,
    offline_compile,
    require_nvidia_backend,
)

from thaw_kernels import chunk_crc32c, chunk_crc32c_reference, combine_chunk_crcs, crc32c_combine
from thaw_kernels import crc32c as crc_mod

CRC_CASES = [  # (n_bytes, chunk_bytes, kernel config)
    (1000, 256, dict(lanes=16, piece_bytes=128)),  # tails in every chunk
    (4096, 4096, dict(lanes=32, piece_bytes=1024)),  # exact fit
    (5003, 1000, dict(lanes=8, piece_bytes=256, table_bits=8)),
    (9999, 16384, dict(lanes=64, piece_bytes=1024)),  # one short chunk
    (3, 1, {}),
    (1, 7, dict(table_bits=2)),
    (20000, 4096, dict(lanes=128, piece_bytes=2048)),  # short last chunk with full pieces + tail
    (
        12000,
        3000,
        dict(lanes=32, piece_bytes=1024),
    ),  # whole-word tails in every chunk: masked word loads
]


def check_crc(fn, n: int, chunk: int, offset: int = 0, device="cpu", **cfg):
    buf = torch.randint(0, 256, (n + offset,), dtype=torch.uint8, device=device)[offset:]
    got = fn(buf, chunk, **cfg)
    data = buf.cpu().numpy().tobytes()
    expected = [google_crc32c.value(data[i : i + chunk]) for i in range(0, n, chunk)]
    assert got.dtype == torch.int64 and got.device == buf.device
    assert got.cpu().tolist() == expected, (n, chunk, offset, cfg)


@pytest.fixture
def interpreter(monkeypatch):
    """crc32c's Triton kernels (and their jit helpers) run under the interpreter for this test."""
    interpret_kernels(monkeypatch, crc_mod)


# ---------------------------------------------------------------------------------------------
# The Triton kernels under the interpreter.


@pytest.mark.parametrize("case", CRC_CASES)
@pytest.mark.parametrize("offset", [0, 1])
def test_interp_chunk_crc32c(interpreter, case, offset):
    n, chunk, cfg = case
    check_crc(crc_mod._chunk_crc32c_triton, n, chunk, offset, **cfg)


def test_interp_chunk_crc32c_defaults(interpreter):
    check_crc(crc_mod._chunk_crc32c_triton, 70_000, 65_536)


# ---------------------------------------------------------------------------------------------
# CPU dispatch (the product's CPU path), the reference and the combines.


@pytest.mark.parametrize(
    "n,chunk", [(0, 5), (1, 1), (1000, 1000), (1000, 3), (10_001, 4096), (65_536, 1 << 20)]
)
def test_chunk_crc32c_cpu(n, chunk):
    check_crc(chunk_crc32c, n, chunk)
    check_crc(chunk_crc32c_reference, n, chunk)


def test_chunk_crc32c_cpu_threads_and_fallback(monkeypatch):
    check_crc(chunk_crc32c, (32 << 20) + 3, 4 << 20)  # big enough for the thread pool
    monkeypatch.setattr(crc_mod, "_libcrc32c", lambda: None)  # google_crc32c.value(bytes) path
    check_crc(chunk_crc32c, 10_001, 4096, offset=1)


@pytest.mark.parametrize(
    "n,chunk", [(0, 7), (1, 7), (7, 7), (8, 7), (100_003, 4096), (1 << 16, 1 << 12)]
)
def test_combine_chunk_crcs_matches_serial(n, chunk):
    buf = torch.randint(0, 256, (n,), dtype=torch.uint8)
    crcs = chunk_crc32c(buf, chunk)
    assert combine_chunk_crcs(crcs, chunk, n) == google_crc32c.value(buf.numpy().tobytes())


def test_crc32c_combine():
    data = os.urandom(777)
    for cut in (0, 1, 400, 777):
        a, b = google_crc32c.value(data[:cut]), google_crc32c.value(data[cut:])
        assert crc32c_combine(a, b, 777 - cut) == google_crc32c.value(data)


def test_crc_input_errors():
    with pytest.raises(
        ValueError, match=r"1-D contiguous uint8 tensor, got torch.int32 shape \(4,\)"
    ):
        chunk_crc32c(torch.zeros(4, dtype=torch.int32), 2)
    with pytest.raises(
        ValueError, match=r"1-D contiguous uint8 tensor, got torch.uint8 shape \(2, 2\)"
    ):
        chunk_crc32c(torch.zeros(2, 2, dtype=torch.uint8), 2)
    with pytest.raises(ValueError, match=r"chunk_bytes must be a positive int, got 0"):
        chunk_crc32c(torch.zeros(4, dtype=torch.uint8), 0)
    with pytest.raises(
        ValueError, match=r"3 chunk CRCs do not cover 20 bytes in chunks of 4 \(expected 5 chunks"
    ):
        combine_chunk_crcs([1, 2, 3], 4, 20)
    with pytest.raises(ValueError, match=r"len_b must be >= 0"):
        crc32c_combine(1, 2, -1)


# ---------------------------------------------------------------------------------------------
# Offline compile for the H100/H200 (sm_90): catches compiler-only failures the interpreter cannot,
# and checks the data loads vectorize to 16-byte accesses.


@offline_compile
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_crc32c_kernels_compile_for_sm90():
    require_nvidia_backend()
    crc_sig = dict(
        buf_ptr="*u8",
        out_ptr="*i32",
        tab_ptr="*i32",
        chunk_bytes="i32",
        q_full="i32",
        n_chunks="i32",
        q_last="i32",
        tail_len_full="i32",
        tail_len_last="i32",
        first_tail="i32",
    )
    ptx = compile_sm90(
        crc_mod._crc32c_pieces_kernel,
        crc_sig,
        dict(
            PIECE=crc_mod.DEFAULT_PIECE_BYTES,
            LANES=crc_mod.DEFAULT_LANES,
            LOG_LANES=crc_mod.DEFAULT_LANES.bit_length() - 1,
            BITS=crc_mod.DEFAULT_TABLE_BITS,
            TAIL=False,
            WORD_LOADS=True,
            DATA_CACHE="",
        ),
        ["buf_ptr", "out_ptr", "tab_ptr", "chunk_bytes"],
    )
    assert "ld.global.v4.b32" in ptx
    for word_loads in (False, True):
        compile_sm90(
            crc_mod._crc32c_pieces_kernel,
            crc_sig,
            dict(
                PIECE=1024,
                LANES=64,
                LOG_LANES=6,
                BITS=8,
                TAIL=True,
                WORD_LOADS=word_loads,
                DATA_CACHE="",
            ),
            [],
        )
    compile_sm90(
        crc_mod._crc32c_chunks_kernel,
        dict(
            piece_ptr="*i32",
            tail_ptr="*i32",
            tab_ptr="*i32",
            out_ptr="*i64",
            n_chunks="i32",
            q_full="i32",
            q_last="i32",
            tail_len_full="i32",
            tail_len_last="i32",
            first_tail="i32",
            k_full="i64",
            k_last="i64",
        ),
        dict(LOG_PIECE=10, BITS=4, BLOCK_C=64),
        [],
    )


# ---------------------------------------------------------------------------------------------
# Compiled kernels on CUDA.


@gpu
@needs_cuda
@pytest.mark.parametrize(
    "case",
    CRC_CASES + [(70_000, 65_536, {}), ((64 << 20) + 5, 1 << 20, {}), (3 << 20, 1_000_000, {})],
)
@pytest.mark.parametrize("offset", [0, 1])
def test_chunk_crc32c_cuda(case, offset):
    n, chunk, cfg = case
    check_crc(crc_mod._chunk_crc32c_triton, n, chunk, offset, device="cuda", **cfg)
    if not cfg:
        check_crc(chunk_crc32c, n, chunk, offset, device="cuda")


@gpu
@needs_cuda
@pytest.mark.parametrize("bits_", [4, 8])
@pytest.mark.parametrize("lanes,piece", [(512, 65536), (1024, 65536), (2048, 262144)])
def test_chunk_crc32c_variants_cuda(bits_, lanes, piece):
    check_crc(
        crc_mod._chunk_crc32c_triton,
        (8 << 20) + 12,
        1 << 20,
        device="cuda",
        lanes=lanes,
        piece_bytes=piece,
        table_bits=bits_,
    )
