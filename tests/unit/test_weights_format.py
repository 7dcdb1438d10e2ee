"""The ``.thaw`` weight format: golden bytes, edge cases, exact errors, per-rank names, fuzzing.

Property fuzzed (hypothesis, profiles in fuzz_profiles.py): a corrupted copy of a valid file is
rejected by the parser (WeightsFormatError), or it parses with a table that still fits its
payload and then the CRC32C check either names the bad chunks or every tensor's bytes equal
the original's, or a flipped tensor name no longer fits the engine's table (refused by the
restore before any write: the header has no checksum of its own, like ``.thawkv``). Nothing else
comes out of the reader.
"""

from __future__ import annotations

import json
import struct

import pytest
import torch
from fuzz_profiles import FUZZ_TIMEOUT, fuzz
from hypothesis import given
from hypothesis import strategies as st

from thaw_agents_core.snapshot.errors import SnapshotError
from thaw_agents_core.transport.stream_scheduler import StreamScheduler
from thaw_agents_core.weights.buffer import WeightsBuffer
from thaw_agents_core.weights.format import (
    MAGIC,
    TENSOR_ALIGNMENT,
    WeightsChecksumError,
    WeightsFormatError,
    WeightsMismatchError,
    WeightsNamespace,
    parse_header,
    parse_weights,
)
from thaw_agents_core.weights.io import (
    build_header,
    fill_image,
    image_bytes,
    open_image,
    open_weights,
    write_weights,
)
from thaw_agents_core.weights.ranks import check_rank_set, rank_path, rank_paths, split_rank_path
from thaw_agents_core.weights.restore import restore_into, table_mismatches

NS = WeightsNamespace(
    model_fingerprint="f" * 32,
    architecture="LlamaForCausalLM",
    dtype="float32",
    layout="engine",
    tp_rank=0,
    tp_size=1,
    weights_version="step-1",
)


def _tensors(seed: int = 0) -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        ("model.embed_tokens.weight", torch.randn(7, 5, generator=g)),
        ("model.layers.0.self_attn.qkv_proj.weight", torch.randn(12, 5, generator=g)),
        ("model.norm.weight", torch.randn(5, generator=g).to(torch.bfloat16)),
        ("empty", torch.empty(0)),
        ("model.ids", torch.arange(9, dtype=torch.int64)),
    ]


def _image(named=None, chunk: int = 256, ns: WeightsNamespace = NS) -> bytearray:
    named = named if named is not None else _tensors()
    header = build_header(named, ns, crc_chunk_bytes=chunk)
    buf = bytearray(image_bytes(header))
    fill_image(buf, named, header)
    return buf


def _header_obj(buf: bytes) -> dict:
    (n,) = struct.unpack_from("<Q", buf, 8)
    return json.loads(bytes(buf[16 : 16 + n]))


def _with_header(buf: bytes, obj: dict) -> bytes:
    """The same payload under a rewritten header (payload moved to the new aligned offset)."""
    _, payload = parse_weights(buf)
    body = json.dumps(obj).encode()
    prefix = MAGIC + struct.pack("<Q", len(body)) + body
    pad = (-len(prefix)) % 4096
    return prefix + bytes(pad) + bytes(payload)


# ---------------------------------------------------------------------- golden and round trip


def test_golden_layout_is_readable_in_ten_lines():
    buf = bytes(_image())
    assert buf[:8] == b"THAWWT01"
    (n,) = struct.unpack_from("<Q", buf, 8)
    header = json.loads(buf[16 : 16 + n])
    base = (16 + n + 4095) // 4096 * 4096
    assert header["format"] == "thaw" and header["version"] == 1
    assert [t["offset"] for t in header["tensors"]] == [0, 256, 512, 768, 768]
    assert header["payload_bytes"] == 1024 and len(buf) == base + 1024  # 768 + 72, aligned
    t = header["tensors"][1]
    raw = buf[base + t["offset"] : base + t["offset"] + t["nbytes"]]
    assert torch.equal(
        torch.frombuffer(bytearray(raw), dtype=torch.float32).view(12, 5), _tensors()[1][1]
    )
    assert header["tensors"][3]["crc32c"] == [] and len(header["tensors"][1]["crc32c"]) == 1
    assert all(len(c) == 8 for t in header["tensors"] for c in t["crc32c"])


def test_round_trip_file_is_bit_exact(tmp_path):
    path = tmp_path / "w.thaw"
    stats = write_weights(path, _tensors(), NS, crc_chunk_bytes=256)
    assert stats.num_tensors == 5 and stats.num_bytes == 140 + 240 + 10 + 72
    with open_weights(path) as wf:
        wf.verify()
        assert wf.header.namespace == NS
        for name, tensor in _tensors():
            assert torch.equal(wf.tensor(name), tensor)


def test_restore_through_the_stream_scheduler_checks_every_chunk():
    buf = _image(chunk=256)
    targets = {n: torch.zeros_like(t) for n, t in _tensors()}
    stats = restore_into(open_image(buf), targets, StreamScheduler(torch.device("cpu")))
    assert stats.num_tensors == 5
    assert all(torch.equal(targets[n], t) for n, t in _tensors())
    header, _ = parse_header(buf)
    base = len(buf) - header.payload_bytes
    buf[base + 256 + 3] ^= 0x10  # a byte of qkv_proj
    with pytest.raises(WeightsChecksumError, match=r"qkv_proj.weight', 0"):
        restore_into(open_image(buf), targets, StreamScheduler(torch.device("cpu")))


def test_restore_refuses_a_table_that_does_not_fit_before_writing():
    targets = {n: torch.zeros_like(t) for n, t in _tensors()}
    targets["model.norm.weight"] = torch.zeros(6, dtype=torch.bfloat16)
    targets["extra.bias"] = torch.zeros(3)
    with pytest.raises(WeightsMismatchError) as info:
        restore_into(open_image(_image()), targets, StreamScheduler(torch.device("cpu")))
    assert info.value.mismatches == [
        "model.norm.weight: snapshot has bfloat16[5], this engine has bfloat16[6]",
        "extra.bias: a parameter of this engine, missing from the snapshot",
    ]
    assert torch.count_nonzero(targets["model.embed_tokens.weight"]) == 0


def test_multi_chunk_tensors_and_chunk_size_boundaries():
    named = [
        ("a", torch.arange(256, dtype=torch.float32)),
        ("b", torch.arange(65, dtype=torch.float32)),
    ]
    header, _ = parse_header(_image(named, chunk=256))
    assert [len(t.crc32c) for t in header.tensors] == [4, 2]  # 1024 B / 256, 260 B / 256


def test_namespace_mismatches_name_each_field():
    other = WeightsNamespace("0" * 32, "MistralForCausalLM", "bfloat16", "engine", 1, 2, "x")
    assert NS.mismatches(other) == [
        "architecture: snapshot has 'LlamaForCausalLM', this engine has 'MistralForCausalLM'",
        "dtype: snapshot has 'float32', this engine has 'bfloat16'",
        "tp_rank: snapshot has 0, this engine has 1",
        "tp_size: snapshot has 1, this engine has 2",
    ]
    loose = WeightsNamespace("", "", "float16", "checkpoint", 0, 1, "")
    assert loose.mismatches(NS) == []  # state dicts: any architecture; checkpoint: cast on load


def test_weights_buffer_round_trip_and_unlink():
    named = dict(_tensors())
    with WeightsBuffer.for_tensors(named) as buf:
        buf.write(named, "v7")
        other = WeightsBuffer.attach(buf.name)
        with other.open() as view:
            assert view.header.namespace.weights_version == "v7"
            assert torch.equal(view.tensor("model.ids"), named["model.ids"])
        other.close()
        with pytest.raises(ValueError, match="create a larger WeightsBuffer"):
            buf.write({"big": torch.zeros(10_000)}, "v8")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        WeightsBuffer.attach(buf.name)


# ---------------------------------------------------------------------- exact errors


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda h: h.update(format="thawkv"), "header field 'format' is 'thawkv', expected 'thaw'"),
        (lambda h: h.update(version=2), "unsupported .thaw file version 2"),
        (lambda h: h.pop("tensors"), "missing required field(s): tensors"),
        (lambda h: h.update(bonus=1), "unknown field(s): bonus"),
        (
            lambda h: h.update(crc_chunk_bytes=100),
            "'crc_chunk_bytes' must be a positive multiple of 256",
        ),
        (
            lambda h: h["tensors"][1].update(offset=128),
            "offset must be a non-negative multiple of 256, got 128",
        ),
        (lambda h: h["tensors"][1].update(offset=0), "offset 0 overlaps the previous tensor"),
        (lambda h: h["tensors"][1].update(dtype="complex64"), "dtype 'complex64' is not one of"),
        (
            lambda h: h["tensors"][1].update(nbytes=1),
            "nbytes is 1, expected prod([12, 5]) * 4 = 240",
        ),
        (
            lambda h: h["tensors"][1].update(crc32c=["0" * 8] * 2),
            "must list ceil(240 / 256) = 1 chunk CRCs",
        ),
        (
            lambda h: h["tensors"][1].update(crc32c=["XYZ00000"]),
            "8 lowercase hex chars, got 'XYZ00000'",
        ),
        (
            lambda h: h["tensors"][2].update(name="model.embed_tokens.weight"),
            "duplicate tensor name",
        ),
        (
            lambda h: h.update(payload_bytes=4096),
            "expected the aligned end of the last tensor, 1024",
        ),
        (
            lambda h: h["namespace"].update(layout="fused"),
            "'layout' must be one of ('engine', 'checkpoint')",
        ),
        (
            lambda h: h["namespace"].update(tp_rank=2),
            "'tp_rank' must be an int in [0, tp_size=1), got 2",
        ),
        (lambda h: h["namespace"].pop("architecture"), "missing ['architecture']"),
    ],
)
def test_header_errors_are_exact(mutate, message):
    buf = bytes(_image())
    obj = _header_obj(buf)
    mutate(obj)
    with pytest.raises(WeightsFormatError) as info:
        parse_weights(_with_header(buf, obj))
    assert message in str(info.value)


def test_prefix_errors():
    buf = bytes(_image())
    with pytest.raises(WeightsFormatError, match="bad magic b'THAWKV01'"):
        parse_weights(b"THAWKV01" + buf[8:])
    with pytest.raises(WeightsFormatError, match="shorter than the 16-byte prefix"):
        parse_weights(buf[:10])
    with pytest.raises(WeightsFormatError, match=r"payload needs bytes \[4096, 5120\)"):
        parse_weights(buf[:-1])
    with pytest.raises(WeightsFormatError, match="exceeds the 16777216-byte cap"):
        parse_weights(buf[:8] + struct.pack("<Q", 1 << 40) + buf[16:])
    assert issubclass(WeightsFormatError, SnapshotError)


@pytest.mark.parametrize(
    "body",
    [b"[" * 200_000 + b"]" * 200_000, b'{"a":' + b"9" * 5000 + b"}", b"\xff{}"],
    ids=["nested past the recursion limit", "int past the digit limit", "not UTF-8"],
)
def test_a_header_json_can_not_parse_is_a_format_error(body):
    with pytest.raises(WeightsFormatError, match="header is not valid UTF-8 JSON"):
        parse_weights(MAGIC + struct.pack("<Q", len(body)) + body)


# ---------------------------------------------------------------------- tensor-parallel names


def test_rank_file_names_round_trip():
    assert rank_path("m/x.thaw", 0, 1).as_posix() == "m/x.thaw"
    assert [p.name for p in rank_paths("m/x.thaw", 4)] == [f"x.tp{r}of4.thaw" for r in range(4)]
    assert split_rank_path("m/x.tp3of4.thaw") == (rank_path("m/x.thaw", 0, 1), 3, 4)
    assert split_rank_path("m/x.thaw")[1:] == (0, 1)
    with pytest.raises(ValueError, match="0 <= tp_rank < tp_size"):
        rank_path("x.thaw", 2, 2)
    with pytest.raises(ValueError, match="must end in .thaw"):
        rank_path("x.bin", 0, 2)


def test_rank_set_must_be_complete_and_consistent():
    ranks = [WeightsNamespace("f", "L", "bfloat16", "engine", r, 2, "v1") for r in range(2)]
    check_rank_set(ranks)
    with pytest.raises(WeightsMismatchError, match=r"ranks \[0\] do not cover 0..1"):
        check_rank_set(ranks[:1])
    mixed = [ranks[0], WeightsNamespace("f", "L", "bfloat16", "engine", 1, 2, "v2")]
    with pytest.raises(WeightsMismatchError, match="weights_version differs"):
        check_rank_set(mixed)


# ---------------------------------------------------------------------- fuzzing


_VALID = bytes(_image(chunk=256))


def _outcome(data: bytes) -> str:
    try:
        view = open_image(bytearray(data))
    except WeightsFormatError:
        return "rejected"
    try:
        view.verify()
    except WeightsChecksumError:
        return "detected"
    original = dict(_tensors())
    for entry in view.header.tensors:
        if entry.name in original:
            want = original[entry.name].contiguous().view(-1).view(torch.uint8)
            got = (
                torch.frombuffer(bytearray(view.raw(entry)), dtype=torch.uint8)
                if entry.nbytes
                else want[:0]
            )
            if entry.nbytes != want.numel() or not torch.equal(got, want):
                return "WRONG"
        else:  # a flipped name: the restore's table check refuses it before any write
            targets = {n: t for n, t in original.items()}
            return "refused" if table_mismatches(view.header.tensors, targets) else "WRONG"
    return "harmless"


@FUZZ_TIMEOUT
@fuzz(300)
@given(st.integers(0, len(_VALID) - 1), st.integers(0, 7))
def test_fuzz_bit_flips(position, bit):
    data = bytearray(_VALID)
    data[position] ^= 1 << bit
    result = _outcome(bytes(data))
    assert result in ("rejected", "detected", "refused", "harmless")
    header, _ = parse_header(_VALID)
    if position >= len(_VALID) - header.payload_bytes:  # inside the payload
        entry_hit = any(
            t.offset <= position - (len(_VALID) - header.payload_bytes) < t.offset + t.nbytes
            for t in header.tensors
        )
        assert result == ("detected" if entry_hit else "harmless")


@FUZZ_TIMEOUT
@fuzz(200)
@given(st.integers(0, len(_VALID)), st.binary(max_size=64))
def test_fuzz_truncation_and_splices(cut, junk):
    assert _outcome(_VALID[:cut] + junk) in ("rejected", "detected", "refused", "harmless")


@FUZZ_TIMEOUT
@fuzz(200)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["float32", "bfloat16", "int8", "int64"]),
            st.lists(st.integers(0, 9), max_size=3),
        ),
        min_size=1,
        max_size=6,
    ),
    st.sampled_from([256, 512, 4096]),
)
def test_fuzz_layouts_round_trip(specs, chunk):
    g = torch.Generator().manual_seed(len(specs))
    named = []
    for i, (dtype, shape) in enumerate(specs):
        dt = getattr(torch, dtype)
        numel = int(torch.tensor(shape, dtype=torch.int64).prod()) if shape else 1
        raw = torch.randint(0, 256, (numel * dt.itemsize,), dtype=torch.uint8, generator=g)
        named.append((f"t{i}", raw.view(dt).view(shape)))
    view = open_image(_image(named, chunk=chunk))
    view.verify()
    assert all(t.offset % TENSOR_ALIGNMENT == 0 for t in view.header.tensors)
    for name, tensor in named:  # bytes, not values: random bits include NaNs
        assert torch.equal(
            view.tensor(name).reshape(-1).view(torch.uint8), tensor.reshape(-1).view(torch.uint8)
        )


# ---------------------------------------------------------------------- CUDA (run by scripts/gpu_run.sh weights-tests)


@pytest.mark.gpu
@pytest.mark.parametrize("registered", [False, True])
def test_restore_on_cuda_verifies_on_the_device(registered):
    """Pageable (staged through pinned double buffers) and registered host memory, many tensors
    back to back (staging reused across calls), CRC32C on the device; a flipped byte is named."""
    import mmap

    named = [(f"t{i}", torch.randn(1 << 18 + (i % 3)).to(torch.bfloat16)) for i in range(12)]
    header = build_header(named, NS, crc_chunk_bytes=1 << 20)
    image = mmap.mmap(-1, image_bytes(header))
    fill_image(image, named, header)
    copier = StreamScheduler(torch.device("cuda"), copy_chunk_bytes=1 << 20, staging_bytes=1 << 20)
    if registered:
        copier.register_host(image)
    try:
        targets = {n: torch.empty_like(t, device="cuda") for n, t in named}
        restore_into(open_image(image), targets, copier)
        assert all(torch.equal(targets[n].cpu(), t) for n, t in named)
        base = len(image) - header.payload_bytes
        entry = open_image(image).header.tensors[5]
        image[base + entry.offset + (1 << 20) + 7] ^= 1
        with pytest.raises(WeightsChecksumError, match=r"'t5', 1\)"):
            restore_into(open_image(image), targets, copier)
    finally:
        copier.close()


def test_each_rank_finds_its_file(tmp_path):
    base = tmp_path / "x.thaw"
    from thaw_agents_core.weights.ranks import resolve_rank_file

    with pytest.raises(FileNotFoundError, match="rank 1 of 2"):
        resolve_rank_file(base, 1, 2)
    base.write_bytes(b"")  # a checkpoint-layout file serves every rank
    assert resolve_rank_file(base, 1, 2) == base
    own = rank_path(base, 1, 2)
    own.write_bytes(b"")
    assert resolve_rank_file(base, 1, 2) == own and resolve_rank_file(base, 0, 1) == base


def _tied_model() -> torch.nn.Module:
    class Block(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = torch.nn.Linear(4, 4)
            self.norm = torch.nn.LayerNorm(4)

    model = torch.nn.Module()
    model.embed = torch.nn.Embedding(10, 4)
    model.layers = torch.nn.ModuleList([Block(), Block()])
    model.alias = model.layers[1]  # one module under two names
    model.head = torch.nn.Linear(4, 10, bias=False)
    model.head.weight = model.embed.weight  # tied: listed once
    return model


def test_targets_follow_named_parameters_and_see_replaced_parameters():
    from thaw_agents_core.weights.model_params import targets

    model = _tied_model()

    def expected() -> list[tuple[str, int]]:
        return [(n, p.data_ptr()) for n, p in model.named_parameters()]

    def got() -> list[tuple[str, int]]:
        return [(n, t.data_ptr()) for n, t in targets(model).items()]

    assert got() == expected() and len(got()) == 9
    assert got() == expected()  # the kept walk
    model.layers[0].proj.weight = torch.nn.Parameter(torch.zeros(4, 4))  # replaced in its module
    assert got() == expected()
    model.layers[1].norm.bias.data = torch.ones(4)  # .data re-pointed
    assert got() == expected()
