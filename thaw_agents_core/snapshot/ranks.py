"""Per-rank names of tensor-parallel snapshots, for ``.thaw`` weights and ``.thawkv`` KV alike.

    x.thawkv           one rank (tp_size 1)
    x.tp0of2.thawkv    rank 0 of 2 (that rank's KV heads, or its shard of the weights)
    x.tp1of2.thawkv    rank 1 of 2

Names are strings, so local paths and ``s3://`` URLs follow the same rule.
"""

from __future__ import annotations

import re

from thaw_agents_core.snapshot.framing import is_int

_RANK_SUFFIX = re.compile(r"^(?P<stem>.+)\.tp(?P<rank>\d+)of(?P<size>\d+)$")


def rank_name(name: str, tp_rank: int, tp_size: int, suffix: str) -> str:
    """The name of one rank's file: ``name`` itself for tp_size 1, else ``x.tp{r}of{n}<suffix>``
    (``name`` must end in ``suffix``)."""
    if not (is_int(tp_size) and tp_size >= 1 and is_int(tp_rank) and 0 <= tp_rank < tp_size):
        raise ValueError(
            f"need 0 <= tp_rank < tp_size, got tp_rank={tp_rank!r}, tp_size={tp_size!r}"
        )
    if tp_size == 1:
        return name
    if not name.endswith(suffix):
        raise ValueError(f"a tensor-parallel snapshot name must end in {suffix}, got {name!r}")
    return f"{name[: -len(suffix)]}.tp{tp_rank}of{tp_size}{suffix}"


def split_rank_name(name: str, suffix: str) -> tuple[str, int, int]:
    """Inverse of :func:`rank_name`: (base name, tp_rank, tp_size); (name, 0, 1) for a plain
    name."""
    match = _RANK_SUFFIX.match(name[: -len(suffix)]) if name.endswith(suffix) else None
    if match is None:
        return name, 0, 1
    rank, size = int(match["rank"]), int(match["size"])
    if not 0 <= rank < size:
        raise ValueError(f"{name}: rank {rank} is not below size {size}")
    return match["stem"] + suffix, rank, size
