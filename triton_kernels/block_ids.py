"""Block ids for the KV gather/scatter: validated on the host (no device sync) and staged to the GPU.

The connector passes Python lists; they are checked with numpy (dtype, range, repeats for a
scatter) and copied to the device through reusable pinned slots (:mod:`.id_staging`), so a call
neither pins memory nor synchronises. Ids that already live on a device are checked there (one
sync).
"""

from __future__ import annotations

from typing import Sequence, Union

import numpy as np
import torch

from .id_staging import StagedIds, stager_for
from .kv_pages import KVPageSpec

BlockIds = Union[Sequence[int], torch.Tensor]
"""Block ids as a Python sequence, a numpy array, or a CPU or device tensor."""


def bad_ids_dtype(block_ids: BlockIds, dtype, shape) -> ValueError:
    """The error for ids that are not a 1-D integer sequence (names the dtype torch would infer)."""
    if not isinstance(block_ids, torch.Tensor):
        try:  # name the dtype torch would have inferred, as the error always did
            dtype = torch.as_tensor(list(block_ids)).dtype
        except Exception:
            pass
    return ValueError(f"block_ids must be a 1-D integer sequence, got {dtype} shape {tuple(shape)}")


def check_id_values(lo: int, hi: int, n_distinct: int | None, n: int, spec: KVPageSpec) -> None:
    """Raise unless ids lie in 0..num_blocks-1 and, when ``n_distinct`` is given, none repeats."""
    if lo < 0 or hi >= spec.num_blocks:
        bad = lo if lo < 0 else hi
        raise ValueError(
            f"block id {bad} out of range: the cache has {spec.num_blocks} blocks "
            f"(0..{spec.num_blocks - 1})"
        )
    if n_distinct is not None and n_distinct != n:
        raise ValueError(
            "block_ids has repeats; a scatter would write one block twice in an undefined order"
        )


def host_ids(block_ids: BlockIds, spec: KVPageSpec, unique: bool) -> np.ndarray | None:
    """Validated int64 ids as a numpy array, checked on the host (no device sync).

    Takes a Python sequence, a numpy array or a CPU tensor; returns None for a device tensor
    (see :func:`device_tensor_ids`). ~5 us for 65 ids in a list.
    """
    if isinstance(block_ids, torch.Tensor):
        if block_ids.device.type != "cpu":
            return None
        if (
            block_ids.ndim != 1
            or block_ids.dtype.is_floating_point
            or block_ids.dtype.is_complex
            or block_ids.dtype == torch.bool
        ):
            raise bad_ids_dtype(block_ids, block_ids.dtype, block_ids.shape)
        arr = block_ids.detach().numpy()
    else:
        arr = np.asarray(
            block_ids if isinstance(block_ids, (list, tuple, np.ndarray)) else list(block_ids)
        )
        if arr.size == 0 and arr.ndim == 1:
            return np.empty(0, dtype=np.int64)
        if arr.ndim != 1 or arr.dtype.kind not in "iu":
            raise bad_ids_dtype(block_ids, arr.dtype, arr.shape)
    n = arr.shape[0]
    if n:
        distinct = len(set(arr.tolist())) if unique else None
        check_id_values(int(arr.min()), int(arr.max()), distinct, n, spec)
    return arr.astype(np.int64, copy=False)


def device_tensor_ids(ids: torch.Tensor, spec: KVPageSpec, unique: bool) -> torch.Tensor:
    """Validate ids that already live on a device: one sync for min/max (pass a list to avoid it)."""
    if (
        ids.ndim != 1
        or ids.dtype.is_floating_point
        or ids.dtype.is_complex
        or ids.dtype == torch.bool
    ):
        raise bad_ids_dtype(ids, ids.dtype, ids.shape)
    if ids.numel():
        lo, hi = (int(v) for v in torch.stack([ids.min(), ids.max()]).tolist())  # the sync
        distinct = torch.unique(ids).numel() if unique else None
        check_id_values(lo, hi, distinct, ids.numel(), spec)
    return ids.to(dtype=torch.int64).contiguous()


def block_id_tensor(
    block_ids: BlockIds, spec: KVPageSpec, device: torch.device, unique: bool
) -> torch.Tensor:
    """Validated int64 ids on ``device`` for the references and the CPU path (the Triton path stages
    them through :mod:`.id_staging` instead, see :func:`stage_ids`)."""
    arr = host_ids(block_ids, spec, unique)
    if arr is None:
        return device_tensor_ids(block_ids, spec, unique).to(device)
    return torch.from_numpy(arr if arr.flags.writeable else arr.copy()).to(device)


def stage_ids(
    block_ids: BlockIds, spec: KVPageSpec, device: torch.device, unique: bool
) -> StagedIds:
    """Validated int64 block ids on ``device`` for one Triton launch (release after queueing it).

    Host ids (lists, arrays, CPU tensors) are checked with numpy and staged through the device's
    stager (:mod:`.id_staging`); device tensors are checked on their device (one sync) and used
    as they are.
    """
    arr = host_ids(block_ids, spec, unique)
    if arr is None:
        ids = device_tensor_ids(block_ids, spec, unique).to(device)
        return StagedIds(ids, ids.shape[0], None, -1)
    if device.type != "cuda" or arr.shape[0] == 0:  # the interpreter (tests) runs on CPU tensors
        ids = torch.from_numpy(arr if arr.flags.writeable else arr.copy()).to(device)
        return StagedIds(ids, arr.shape[0], None, -1)
    return stager_for(device).stage(arr)
