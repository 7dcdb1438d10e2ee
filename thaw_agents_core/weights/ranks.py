"""Tensor-parallel weight snapshots: one ``.thaw`` file per rank, named after the snapshot.

    x.thaw            tp_size 1 (and any checkpoint-layout file: every rank reads it)
    x.tp0of2.thaw     rank 0 of 2 (engine layout: that rank's shard of every parameter)
    x.tp1of2.thaw     rank 1 of 2

Each rank's worker writes and restores its own file (``ThawWorkerExtension``); a set is valid
when it is ranks 0..n-1 of one snapshot (:func:`check_rank_set`).
"""

from __future__ import annotations

import re
from pathlib import Path

from thaw_agents_core.snapshot.framing import is_int
from thaw_agents_core.weights.format import WeightsMismatchError, WeightsNamespace

_RANK_SUFFIX = re.compile(r"^(?P<stem>.+)\.tp(?P<rank>\d+)of(?P<size>\d+)$")


def rank_path(path: str | Path, tp_rank: int, tp_size: int) -> Path:
    """The file of one tensor-parallel rank: ``x.thaw`` for tp_size 1, else ``x.tp{r}of{n}.thaw``."""
    if not (is_int(tp_size) and tp_size >= 1 and is_int(tp_rank) and 0 <= tp_rank < tp_size):
        raise ValueError(
            f"need 0 <= tp_rank < tp_size, got tp_rank={tp_rank!r}, tp_size={tp_size!r}"
        )
    path = Path(path)
    if tp_size == 1:
        return path
    if path.suffix != ".thaw":
        raise ValueError(f"a tensor-parallel snapshot name must end in .thaw, got {str(path)!r}")
    return path.with_name(f"{path.stem}.tp{tp_rank}of{tp_size}.thaw")


def split_rank_path(path: str | Path) -> tuple[Path, int, int]:
    """Inverse of :func:`rank_path`: (base path, tp_rank, tp_size); (path, 0, 1) for plain names."""
    path = Path(path)
    match = _RANK_SUFFIX.match(path.stem) if path.suffix == ".thaw" else None
    if match is None:
        return path, 0, 1
    rank, size = int(match["rank"]), int(match["size"])
    if not 0 <= rank < size:
        raise ValueError(f"{path.name}: rank {rank} is not below size {size}")
    return path.with_name(match["stem"] + ".thaw"), rank, size


def resolve_rank_file(path: str | Path, tp_rank: int, tp_size: int) -> Path:
    """The file rank ``tp_rank`` of a ``tp_size``-way engine restores: its own
    ``x.tp{r}of{n}.thaw`` (engine layout), else ``x.thaw`` itself (a checkpoint-layout file
    serves every rank: vLLM's weight loaders take each rank's shard)."""
    own = rank_path(path, tp_rank, tp_size)
    if own.is_file():
        return own
    if Path(path).is_file():
        return Path(path)
    raise FileNotFoundError(
        f"no weight snapshot for tensor-parallel rank {tp_rank} of {tp_size}: "
        f"neither {str(own)!r} nor {str(path)!r} exists"
    )


def rank_paths(path: str | Path, tp_size: int) -> list[Path]:
    """Every rank's file of a ``tp_size``-way snapshot named ``path``."""
    return [rank_path(path, r, tp_size) for r in range(tp_size)]


def check_rank_set(namespaces: list[WeightsNamespace]) -> None:
    """A tensor-parallel set must be ranks 0..n-1 of one snapshot (same version and model)."""
    if not namespaces:
        raise WeightsMismatchError(["no rank file"])
    size = namespaces[0].tp_size
    problems = []
    if sorted(ns.tp_rank for ns in namespaces) != list(range(size)) or len(namespaces) != size:
        problems.append(
            f"ranks {sorted(ns.tp_rank for ns in namespaces)} do not cover 0..{size - 1}"
        )
    for field_name in (
        "tp_size",
        "weights_version",
        "model_fingerprint",
        "architecture",
        "dtype",
        "layout",
    ):
        values = {getattr(ns, field_name) for ns in namespaces}
        if len(values) > 1:
            problems.append(f"{field_name} differs between rank files: {sorted(map(str, values))}")
    if problems:
        raise WeightsMismatchError(problems)
