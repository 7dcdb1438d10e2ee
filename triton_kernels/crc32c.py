"""CRC32C (Castagnoli, as ``google_crc32c.value``) of every fixed-size chunk of a byte buffer.

    buf   | chunk 0            | chunk 1            | ... | last chunk (may be short) |
    crcs  [ crc(chunk 0),        crc(chunk 1),        ...,  crc(last) ]    int64 in [0, 2**32)

``combine_chunk_crcs(crcs, chunk_bytes, len(buf))`` folds them into the CRC of the whole buffer.

In this module, in order: the GF(2) host math and the combines (``crc32c_combine``,
``combine_chunk_crcs``), the reference (``chunk_crc32c_reference``) and the CPU path, the Triton
kernels (``_crc32c_pieces_kernel``, ``_crc32c_chunks_kernel``) and their launcher
(``_chunk_crc32c_triton``), and the public dispatch (``chunk_crc32c``).

CUDA: Triton. CPU: libcrc32c (SSE4.2) through ctypes, which releases the GIL, so chunks run on
threads without copying the tensor to ``bytes``; ``google_crc32c.value(bytes(...))`` if the library
cannot be found.

How the GPU kernel uses linearity. Let ``raw(M)`` be the CRC register after feeding M from 0 (no
pre/post inversion) and ``S_n`` the linear map "feed n zero bytes" (multiply by x^(8n) mod P).
Then ``raw(A||B) = S_len(B)(raw(A)) ^ raw(B)``, ``raw(0^k||M) = raw(M)`` and
``crc(M) = raw(M) ^ S_len(M)(0xFFFFFFFF) ^ 0xFFFFFFFF``. A chunk is cut into pieces of PIECE bytes
(one program each); a piece is read as LANES interleaved 32-bit word streams::

    piece words   w0 w1 w2 ... w(L-1) | wL ... w(2L-1) | ...        (one row = one coalesced load)
    lane j        r_j <- S_4L(r_j ^ w(j + t*L))  for all rows but the last, then S_4(r_j ^ w)

so lane j holds the piece's raw CRC with every other lane's words zeroed, "short" by 4(L-1-j)
bytes. A pairwise tree ``S_(4*2^k)(even) ^ odd`` (k = 0..log2 L - 1) folds the lanes, and a second
tiny kernel folds pieces into chunks (Horner with S_PIECE), shifts past the chunk's short tail
piece (computed right-aligned, zero-padded in front, so no inverse shift is ever needed) and
applies the pre/post inversion constant. Every ``S_n`` is applied as an XOR of table lookups:
32/BITS tables of 2**BITS entries for n = 2**k bytes, one table set per k.

Measured on the H100 (triton 3.6, 1.07 GB buffer, 1 MiB chunks, benchmarks/kernels.py): the data
loads are 128-bit and coalesced; the cost is the table lookups and their latency.

    lanes  piece   bits  warps  GB/s      lanes  piece   bits  warps  GB/s
    1024   64 KiB  4     4       171      2048   256 KiB 8     4      1674   <- default
    512    256 KiB 4     4       617      1024   256 KiB 8     4      1204
    2048   256 KiB 4     4       532      2048   64 KiB  8     4      1198
    512    64 KiB  8     4       766      2048   256 KiB 8     8       685

8-bit tables (4 lookups per word) beat 4-bit ones (8 lookups) 2-3x: the L1 replays of a 1 KiB
table cost less than twice the lookups. More lanes per thread is more independent chains in
flight (2048 lanes / 128 threads = 16 per thread; 65 registers, 7 programs per SM); 8 warps
halve that and run 2-3x slower. Bigger pieces spread the fold tree (2*LANES lookups, serial at
its end) over more words. At 136 MB a 256 KiB piece gives 520 programs: one wave on 132 SMs.
"""

from __future__ import annotations

import ctypes
import glob
import os
from concurrent.futures import ThreadPoolExecutor
from functools import cache, lru_cache
from typing import Sequence

import google_crc32c
import numpy as np
import torch
import triton
import triton.language as tl

_POLY = 0x82F63B78  # Castagnoli polynomial, bit-reflected (bit 31 is x^0)

# Kernel defaults: the best of the first H100 sweep (1674 GB/s at 1.07 GB, table in the docstring).
DEFAULT_LANES = 2048
DEFAULT_PIECE_BYTES = 256 * 1024
DEFAULT_TABLE_BITS = 8
DEFAULT_NUM_WARPS = 4
_COMBINE_BLOCK = 64

# ---------------------------------------------------------------------------------------------
# GF(2) arithmetic (zlib's crc32_combine, for the Castagnoli polynomial).


def _multmodp(a: int, b: int) -> int:
    """a(x) * b(x) mod P in the reflected representation."""
    m, p = 1 << 31, 0
    while a:
        if a & m:
            p ^= b
            if not a & (m - 1):
                break
        m >>= 1
        b = (b >> 1) ^ _POLY if b & 1 else b >> 1
    return p


@cache
def _x2n(k: int) -> int:
    """x^(2^k) mod P."""
    return 1 << 30 if k == 0 else _multmodp(_x2n(k - 1), _x2n(k - 1))


@lru_cache(maxsize=4096)
def _x8n(n_bytes: int) -> int:
    """x^(8 n) mod P: the operator that feeds n zero bytes through the register."""
    p, k = 1 << 31, 3
    while n_bytes:
        if n_bytes & 1:
            p = _multmodp(_x2n(k), p)
        n_bytes >>= 1
        k += 1
    return p


def _shift(crc: int, n_bytes: int) -> int:
    return _multmodp(_x8n(n_bytes), crc)


def crc32c_combine(crc_a: int, crc_b: int, len_b: int) -> int:
    """CRC32C of A||B from crc(A), crc(B) and len(B) in bytes."""
    if len_b < 0:
        raise ValueError(f"len_b must be >= 0, got {len_b}")
    return _shift(int(crc_a), len_b) ^ int(crc_b)


@lru_cache(maxsize=64)
def _byte_tables(n_bytes: int) -> tuple[tuple[int, ...], ...]:
    """S_n as 4 byte tables: S_n(c) = T0[c & 255] ^ T1[c >> 8 & 255] ^ T2[c >> 16 & 255] ^ T3[c >> 24]."""
    op = _x8n(n_bytes)
    basis = [_multmodp(op, 1 << i) for i in range(32)]  # S_n is linear: XOR of its columns
    tables = []
    for j in range(4):
        t = [0] * 256
        for v in range(1, 256):
            low = v & -v
            t[v] = t[v ^ low] ^ basis[8 * j + low.bit_length() - 1]
        tables.append(tuple(t))
    return tuple(tables)


def combine_chunk_crcs(
    crcs: Sequence[int] | torch.Tensor | np.ndarray, chunk_bytes: int, total_bytes: int
) -> int:
    """CRC32C of the whole buffer from the per-chunk CRCs of :func:`chunk_crc32c`.

    Table-driven S_chunk_bytes: 0.28 ms for 1024 chunks on the 2-core CPU host (+0.45 ms once per
    chunk size to build the tables).
    """
    values = [int(v) for v in (crcs.tolist() if hasattr(crcs, "tolist") else crcs)]
    expected = -(-total_bytes // chunk_bytes) if chunk_bytes > 0 else -1
    if chunk_bytes < 1 or total_bytes < 0 or len(values) != expected:
        raise ValueError(
            f"{len(values)} chunk CRCs do not cover {total_bytes} bytes in chunks of {chunk_bytes} "
            f"(expected {max(expected, 0)} chunks)"
        )
    if not values:
        return 0
    t0, t1, t2, t3 = _byte_tables(chunk_bytes)
    crc = values[0]
    for v in values[1:-1]:
        crc = t0[crc & 255] ^ t1[crc >> 8 & 255] ^ t2[crc >> 16 & 255] ^ t3[crc >> 24] ^ v
    if len(values) > 1:
        crc = crc32c_combine(crc, values[-1], total_bytes - (len(values) - 1) * chunk_bytes)
    return crc


# ---------------------------------------------------------------------------------------------
# CPU path and reference.


def _check_buf(buf: torch.Tensor, chunk_bytes: int) -> None:
    if (
        not isinstance(buf, torch.Tensor)
        or buf.dtype != torch.uint8
        or buf.ndim != 1
        or not buf.is_contiguous()
    ):
        desc = (
            f"{buf.dtype} shape {tuple(buf.shape)}"
            if isinstance(buf, torch.Tensor)
            else type(buf).__name__
        )
        raise ValueError(
            f"buf must be a 1-D contiguous uint8 tensor, got {desc}; use t.view(torch.uint8).flatten()"
        )
    if not isinstance(chunk_bytes, int) or chunk_bytes < 1:
        raise ValueError(f"chunk_bytes must be a positive int, got {chunk_bytes!r}")


def chunk_crc32c_reference(buf: torch.Tensor, chunk_bytes: int) -> torch.Tensor:
    """One ``google_crc32c.value`` per chunk, on a host copy; the oracle for the kernel."""
    _check_buf(buf, chunk_bytes)
    data = buf.cpu().numpy().tobytes()
    crcs = [
        google_crc32c.value(data[i : i + chunk_bytes]) for i in range(0, len(data), chunk_bytes)
    ]
    return torch.tensor(crcs, dtype=torch.int64, device=buf.device)


@lru_cache(maxsize=1)
def _libcrc32c():
    """crc32c_extend(crc, ptr, n) from the library google_crc32c wraps; None if not found."""
    site = os.path.dirname(os.path.dirname(google_crc32c.__file__))
    for path in sorted(glob.glob(os.path.join(site, "google_crc32c.libs", "libcrc32c*.so*"))):
        try:
            fn = ctypes.CDLL(path).crc32c_extend
        except (OSError, AttributeError):
            continue
        fn.restype, fn.argtypes = (
            ctypes.c_uint32,
            [ctypes.c_uint32, ctypes.c_void_p, ctypes.c_size_t],
        )
        return fn
    return None


_CPU_THREADS = min(
    8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
)


@lru_cache(maxsize=1)
def _pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=_CPU_THREADS, thread_name_prefix="crc32c")


def _chunk_crc32c_cpu(buf: torch.Tensor, chunk_bytes: int) -> torch.Tensor:
    extend = _libcrc32c()
    n = buf.numel()
    starts = range(0, n, chunk_bytes)
    if extend is None:
        data = buf.numpy()
        crcs = [google_crc32c.value(data[s : s + chunk_bytes].tobytes()) for s in starts]
    else:
        ptr = buf.data_ptr()

        def one(s: int) -> int:
            return extend(0, ptr + s, min(chunk_bytes, n - s))

        # ~6 GB/s per core (SSE4.2); threads only pay off with enough bytes and cores.
        if n >= (32 << 20) and len(starts) > 1 and _CPU_THREADS > 1:
            crcs = list(_pool().map(one, starts))
        else:
            crcs = [one(s) for s in starts]
    return torch.tensor(crcs, dtype=torch.int64)


# ---------------------------------------------------------------------------------------------
# Triton path.


@lru_cache(maxsize=16)
def _tables_host(bits: int, n_sets: int) -> np.ndarray:
    """[n_sets, (32/bits) << bits] int32: set k, row j, entry v = S_(2^k bytes)(v << bits*j)."""
    npos, size = 32 // bits, 1 << bits
    v = np.arange(size, dtype=np.uint64)
    out = np.zeros((n_sets, npos, size), dtype=np.uint64)
    for k in range(n_sets):
        op = _x8n(1 << k)
        basis = [_multmodp(op, 1 << i) for i in range(32)]  # S is linear: XOR of its columns
        for j in range(npos):
            for b in range(bits):
                out[k, j] ^= np.where((v >> b) & 1, np.uint64(basis[j * bits + b]), np.uint64(0))
    return out.astype(np.uint32).view(np.int32).reshape(n_sets, npos * size)


_TABLES: dict[tuple, torch.Tensor] = {}


def _tables(bits: int, n_sets: int, device: torch.device) -> torch.Tensor:
    key = (bits, n_sets, str(device))
    if key not in _TABLES:
        _TABLES[key] = torch.from_numpy(_tables_host(bits, n_sets).copy()).to(device)
    return _TABLES[key]


@triton.jit
def _shift_by(x, tab_ptr, SET: tl.constexpr, BITS: tl.constexpr):
    """S_(2^SET bytes)(x) for a uint32 tensor x: XOR of 32/BITS table lookups."""
    NPOS: tl.constexpr = 32 // BITS
    MASK: tl.constexpr = (1 << BITS) - 1
    base = tab_ptr + SET * (NPOS << BITS)
    acc = tl.load(base + (x & MASK).to(tl.int32))
    for j in tl.static_range(1, NPOS):
        acc ^= tl.load(base + (j << BITS) + ((x >> (j * BITS)) & MASK).to(tl.int32))
    return acc.to(tl.uint32, bitcast=True)


@triton.jit
def _load_words(
    buf_ptr, start, v, pad, WORD_LOADS: tl.constexpr, PADDED: tl.constexpr, DATA_CACHE: tl.constexpr
):
    """Little-endian 32-bit words at word index v of the piece at byte ``start`` (shifted by pad).

    PADDED (right-aligned tails): words before ``pad`` bytes read as zeros; WORD_LOADS then needs
    pad % 4 == 0.
    """
    if WORD_LOADS:
        words = (buf_ptr + start).to(tl.pointer_type(tl.int32))
        if PADDED:
            pad_w = pad // 4
            w = tl.load(words + (v - pad_w), mask=v >= pad_w, other=0, cache_modifier=DATA_CACHE)
        else:
            w = tl.load(words + v, cache_modifier=DATA_CACHE)
        return w.to(tl.uint32, bitcast=True)
    else:
        # Unaligned buffers and right-aligned tails: byte loads, zeros in front of the data.
        boff = (4 * v)[:, None] + tl.arange(0, 4)[None, :] - pad
        b = tl.load(buf_ptr + start + boff, mask=boff >= 0, other=0).to(tl.uint32)
        return tl.xor_sum(b << (8 * tl.arange(0, 4)).to(tl.uint32)[None, :], axis=1)


@triton.jit
def _crc32c_pieces_kernel(
    buf_ptr,
    out_ptr,
    tab_ptr,
    chunk_bytes,
    q_full,
    n_chunks,
    q_last,
    tail_len_full,
    tail_len_last,
    first_tail,
    PIECE: tl.constexpr,
    LANES: tl.constexpr,
    LOG_LANES: tl.constexpr,
    BITS: tl.constexpr,
    TAIL: tl.constexpr,
    WORD_LOADS: tl.constexpr,
    DATA_CACHE: tl.constexpr,
):
    """raw CRC of one PIECE-byte piece (TAIL: of a chunk's short remainder, right-aligned)."""
    pid = tl.program_id(0)
    if TAIL:
        chunk = first_tail + pid
        is_last = chunk == n_chunks - 1
        q = tl.where(is_last, q_last, q_full)
        length = tl.where(is_last, tail_len_last, tail_len_full)
        start = chunk.to(tl.int64) * chunk_bytes + q.to(tl.int64) * PIECE
        pad = PIECE - length
    else:
        start = (pid // q_full).to(tl.int64) * chunk_bytes + (pid % q_full).to(tl.int64) * PIECE
        pad = 0
    STEPS: tl.constexpr = PIECE // (4 * LANES)
    lane = tl.arange(0, LANES)
    r = tl.zeros([LANES], dtype=tl.uint32)
    for t in range(STEPS - 1):
        w = _load_words(buf_ptr, start, t * LANES + lane, pad, WORD_LOADS, TAIL, DATA_CACHE)
        r = _shift_by(r ^ w, tab_ptr, LOG_LANES + 2, BITS)  # own word + the other lanes' words
    w = _load_words(buf_ptr, start, (STEPS - 1) * LANES + lane, pad, WORD_LOADS, TAIL, DATA_CACHE)
    r = _shift_by(
        r ^ w, tab_ptr, 2, BITS
    )  # lane j now ends 4*(LANES-1-j) bytes before the piece end
    for k in tl.static_range(LOG_LANES):  # fold neighbours: the even lane is 4*2^k bytes short
        even, odd = tl.split(tl.reshape(r, [LANES >> (k + 1), 2]))
        r = _shift_by(even, tab_ptr, k + 2, BITS) ^ odd
    tl.store(out_ptr + pid + tl.arange(0, 1), r.to(tl.int32, bitcast=True))


@triton.jit
def _crc32c_chunks_kernel(
    piece_ptr,
    tail_ptr,
    tab_ptr,
    out_ptr,
    n_chunks,
    q_full,
    q_last,
    tail_len_full,
    tail_len_last,
    first_tail,
    k_full,
    k_last,
    LOG_PIECE: tl.constexpr,
    BITS: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Fold piece CRCs into chunk CRCs, one lane per chunk."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    valid = c < n_chunks
    is_last = c == n_chunks - 1
    q = tl.where(is_last, q_last, q_full)
    r = tl.zeros([BLOCK_C], dtype=tl.uint32)
    for p in range(0, q_full):
        raw = tl.load(piece_ptr + c.to(tl.int64) * q_full + p, mask=valid & (p < q), other=0)
        r = tl.where(
            p < q, _shift_by(r, tab_ptr, LOG_PIECE, BITS) ^ raw.to(tl.uint32, bitcast=True), r
        )
    tail_len = tl.where(is_last, tail_len_last, tail_len_full)
    for k in tl.static_range(LOG_PIECE):  # S_tail_len, tail_len < PIECE, one bit at a time
        r = tl.where(((tail_len >> k) & 1) != 0, _shift_by(r, tab_ptr, k, BITS), r)
    has_tail = valid & (c >= first_tail)
    r ^= tl.load(tail_ptr + (c - first_tail), mask=has_tail, other=0).to(tl.uint32, bitcast=True)
    r ^= tl.where(is_last, k_last, k_full).to(tl.uint32)
    tl.store(out_ptr + c, r.to(tl.int64), mask=valid)


@lru_cache(maxsize=256)
def _inversion_constant(n_bytes: int) -> int:
    return _shift(0xFFFFFFFF, n_bytes) ^ 0xFFFFFFFF


def _chunk_crc32c_triton(
    buf: torch.Tensor,
    chunk_bytes: int,
    *,
    lanes: int = DEFAULT_LANES,
    piece_bytes: int = DEFAULT_PIECE_BYTES,
    table_bits: int = DEFAULT_TABLE_BITS,
    num_warps: int = DEFAULT_NUM_WARPS,
    data_cache: str = "",
) -> torch.Tensor:
    _check_buf(buf, chunk_bytes)
    if table_bits not in (2, 4, 8) or lanes & (lanes - 1) or piece_bytes & (piece_bytes - 1):
        raise ValueError(
            f"table_bits in (2, 4, 8), lanes and piece_bytes powers of two; got "
            f"{table_bits}, {lanes}, {piece_bytes}"
        )
    n = buf.numel()
    n_chunks = triton.cdiv(n, chunk_bytes)
    out = torch.empty(n_chunks, dtype=torch.int64, device=buf.device)
    if n_chunks == 0:
        return out
    piece = min(piece_bytes, max(16, triton.next_power_of_2(chunk_bytes)))
    lanes = max(1, min(lanes, piece // 4))
    q_full, tail_full = divmod(chunk_bytes, piece)
    last_len = n - (n_chunks - 1) * chunk_bytes
    q_last, tail_last = divmod(last_len, piece)
    n_pieces = (n_chunks - 1) * q_full + q_last
    first_tail = 0 if tail_full else (n_chunks - 1 if tail_last else n_chunks)
    log_piece = piece.bit_length() - 1
    tab = _tables(table_bits, log_piece + 1, buf.device)
    pieces = torch.empty(max(n_pieces, 1), dtype=torch.int32, device=buf.device)
    tails = torch.empty(max(n_chunks - first_tail, 1), dtype=torch.int32, device=buf.device)
    common = dict(
        PIECE=piece,
        LANES=lanes,
        LOG_LANES=lanes.bit_length() - 1,
        BITS=table_bits,
        DATA_CACHE=data_cache,
        num_warps=num_warps,
    )
    args = (chunk_bytes, q_full, n_chunks, q_last, tail_full, tail_last, first_tail)
    aligned = buf.data_ptr() % 4 == 0 and chunk_bytes % 4 == 0
    if n_pieces:
        _crc32c_pieces_kernel[(n_pieces,)](
            buf, pieces, tab, *args, TAIL=False, WORD_LOADS=aligned, **common
        )
    if n_chunks - first_tail:
        # Tails are right-aligned in a zero-padded piece; word loads when the padding is whole words.
        _crc32c_pieces_kernel[(n_chunks - first_tail,)](
            buf, tails, tab, *args, TAIL=True, WORD_LOADS=aligned and n % 4 == 0, **common
        )
    _crc32c_chunks_kernel[(triton.cdiv(n_chunks, _COMBINE_BLOCK),)](
        pieces,
        tails,
        tab,
        out,
        n_chunks,
        q_full,
        q_last,
        tail_full,
        tail_last,
        first_tail,
        _inversion_constant(chunk_bytes),
        _inversion_constant(last_len),
        LOG_PIECE=log_piece,
        BITS=table_bits,
        BLOCK_C=_COMBINE_BLOCK,
    )
    return out


def chunk_crc32c(buf: torch.Tensor, chunk_bytes: int) -> torch.Tensor:
    """CRC32C of each ``chunk_bytes`` chunk of a 1-D contiguous uint8 tensor (the last may be short).

    Returns an int64 tensor of values in [0, 2**32) on ``buf``'s device, one per chunk; no host
    sync on CUDA.
    """
    _check_buf(buf, chunk_bytes)
    if buf.device.type == "cuda":
        return _chunk_crc32c_triton(buf, chunk_bytes)
    if buf.device.type != "cpu":
        raise ValueError(f"chunk_crc32c supports cpu and cuda tensors, got {buf.device}")
    return _chunk_crc32c_cpu(buf, chunk_bytes)
