"""Tensor-parallel weight snapshots: one ``.thaw`` file per rank, named after the snapshot.

    x.thaw            tp_size 1 (and any checkpoint-layout file: every rank reads it)
    x.tp0of2.thaw     rank 0 of 2 (engine layout: that rank's shard of every parameter)
    x.tp1of2.thaw     rank 1 of 2

Each rank's worker writes and restores its own file (``ThawWorkerExtension``); a set is valid
when it is ranks 0..n-1 of one snapshot (:func:`check_rank_set`).
"""

from __future__ import annotations

from pathlib import Path

from thaw_agents_core.snapshot.ranks import rank_name, split_rank_name
from thaw_agents_core.weights.format import WeightsMismatchError, WeightsNamespace


def rank_path(path: str | Path, tp_rank: int, tp_size: int) -> Path:
    """The file of one tensor-parallel rank: ``x.thaw`` for tp_size 1, else ``x.tp{r}of{n}.thaw``."""
    return Path(rank_name(str(path), tp_rank, tp_size, ".thaw"))


def split_rank_path(path: str | Path) -> tuple[Path, int, int]:
    """Inverse of :func:`rank_path`: (base path, tp_rank, tp_size); (path, 0, 1) for plain names."""
    base, rank, size = split_rank_name(str(path), ".thaw")
    return Path(base), rank, size


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
