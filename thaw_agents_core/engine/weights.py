"""An engine's weights: hot swap (``load_weights``), freeze, registered buffers, and the rule
that a swap which failed part-way leaves the engine refusing requests.

Mixed into :class:`~.engine.Engine` (which holds the fields: ``_weights_version``,
``last_weights_file``, ``_weights_failure``); every call goes through vLLM's ``collective_rpc``
to ``weights/extension.ThawWorkerExtension`` on every rank.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any

from thaw_agents_core.engine.errors import EngineError
from thaw_agents_core.util import compat

logger = logging.getLogger("thaw_agents.engine")


class EngineWeights:
    """Weight methods of an Engine (``self`` provides ``spec``, ``llm`` and ``run_sync``)."""

    spec: Any
    _weights_version: str | None
    last_weights_file: str | None
    _weights_failure: str | None

    @property
    def llm(self) -> Any:
        raise NotImplementedError

    def run_sync(self, coro: Any, timeout_s: float | None = None) -> Any:
        raise NotImplementedError

    def check_weights(self) -> None:
        """Raise EngineError while the last swap's failure left the weights unverified."""
        if self._weights_failure is not None:
            raise EngineError(
                f"this engine refuses requests: {self._weights_failure}; load_weights a good "
                "source first"
            )

    def _reapply_weights(self) -> None:
        """After a restart (the new engine booted the spec's weights): load the last swap's
        ``.thaw`` file again under its version; when the last swap came from a buffer or a state
        dict (their bytes may have changed since), refuse requests until a ``load_weights``.
        Never serve the boot weights under the swapped version."""
        version, self._weights_version = self._weights_version, None
        if version is None:  # never swapped: the boot weights are the right ones
            return
        source = self.last_weights_file
        try:
            if source is None:
                raise EngineError(
                    f"its last swap (weights_version {version!r}) came from a buffer or a state "
                    "dict, which cannot be read again"
                )
            self.load_weights(source, version)
            logger.warning("thaw: restarted engine re-loaded %s (%s)", source, version)
        except Exception as exc:  # noqa: BLE001 - recorded: requests are refused
            self._weights_failure = (
                f"it restarted on its boot weights and its last swap could not be re-applied "
                f"({exc})"
            )[:500]
            logger.error("thaw: %s", self._weights_failure)

    @property
    def weights_version(self) -> str:
        """The version of the weights this engine serves (the KV namespace's weights_version):
        the spec's until a ``load_weights``, then the last swap's."""
        if self._weights_version is not None:
            return self._weights_version
        settings = self.spec.connector_settings
        return settings.weights_version if settings is not None else ""

    def load_weights(
        self,
        src: Any,
        weights_version: str | None = None,
        *,
        layout: str = "auto",
        timeout_s: float | None = 600.0,
    ) -> dict[str, Any]:
        """Hot-swap the weights of the running engine, no restart; returns rank 0's stats, with
        ``caller``: this side's seconds (describe, the load RPC, the cache reset, total).

        ``src``: a ``.thaw`` path, a ``WeightsBuffer`` (registered once per worker, reused: the
        PCIe-rate path) or a state dict of tensors (CUDA tensors on the engine's GPU travel as
        CUDA IPC handles; CPU tensors through a temporary shared-memory image). Every rank loads
        through vLLM's ``collective_rpc`` (ThawWorkerExtension), verifies CRC32C, then the prefix
        cache is reset and the KV namespace takes ``weights_version`` (default: the snapshot's,
        else a fresh one): KV saved under the old weights is refused from now on.
        """
        from thaw_agents_core.weights import fence
        from thaw_agents_core.weights.sources import describe, resolve_version

        called = time.perf_counter()
        version = resolve_version(src, weights_version, self.weights_version)
        llm = self.llm
        desc, cleanup = describe(src, version, layout)

        spans: dict[str, float] = {"describe_s": time.perf_counter() - called}

        async def swap() -> list[dict[str, Any]]:
            t0 = time.perf_counter()
            # Both calls leave now, the load first (each is sent before its coroutine first
            # waits, and tasks start in order): the engine core takes them from its input queue
            # in that order and runs the reset right after the load, before its next step, so
            # no step sees the new weights beside blocks cached under the old ones. The reset's
            # round trip overlaps the load.
            load = asyncio.ensure_future(
                llm.collective_rpc("thaw_load_weights", timeout=timeout_s, args=(desc, version))
            )
            reset_call = llm.reset_prefix_cache
            reset = asyncio.ensure_future(
                reset_call(**compat.reset_prefix_cache_kwargs(reset_call))
            )
            try:
                stats = await load
            except BaseException:
                await asyncio.gather(reset, return_exceptions=True)
                raise
            t1 = time.perf_counter()
            if await reset is False:
                logger.warning("thaw: vLLM did not reset its prefix cache after a weight swap")
            fence.clear_published(llm.vllm_config)  # the scheduler has the version now
            spans.update(rpc_s=t1 - t0, reset_s=time.perf_counter() - t1)
            return stats

        try:
            stats = self.run_sync(swap(), timeout_s)
        except Exception as exc:
            self._check_weights_after_failure(exc)
            raise
        finally:
            cleanup()
        self._weights_failure = None
        self._weights_version = version
        self.last_weights_file = desc["path"] if desc["kind"] == "file" else None
        spans["total_s"] = time.perf_counter() - called
        return {
            **stats[0],
            "ranks": len(stats),
            "caller": {k: round(v, 5) for k, v in spans.items()},
        }

    def _check_weights_after_failure(self, exc: BaseException) -> None:
        """After a failed swap: if any rank's parameters were written before the failure (a bad
        CRC found where the bytes landed, an I/O error), refuse requests until a load succeeds;
        a failure before the first write (wrong model, table, namespace) changes nothing."""
        llm = self.llm
        try:
            intact = all(self.run_sync(llm.collective_rpc("thaw_weights_intact", timeout=60), 60))
        except Exception:  # noqa: BLE001 - cannot tell: assume the worst
            intact = False
        if not intact:
            self._weights_failure = (
                "its last load_weights failed after it began writing the weights, so they are "
                f"not a verified set ({type(exc).__name__}: {exc})"
            )[:500]
            logger.error("thaw: %s", self._weights_failure)

    def freeze_weights(
        self, path: str | Path, *, durable: bool = False, timeout_s: float | None = 600.0
    ) -> list[dict[str, Any]]:
        """Write the engine's parameters (engine layout, one file per tensor-parallel rank).

        Returns when the files are complete in the page cache; ``durable=True`` also fsyncs
        them (a torn file is refused at restore either way: every chunk has a CRC32C).
        """
        llm = self.llm
        return self.run_sync(
            llm.collective_rpc(
                "thaw_freeze", timeout=timeout_s, args=(str(path), self.weights_version, durable)
            ),
            timeout_s,
        )

    def register_weights_buffer(
        self, buffer: Any, *, timeout_s: float | None = 600.0
    ) -> list[dict[str, Any]]:
        """Pin a ``WeightsBuffer`` in every worker now (CUDA: cudaHostRegister, once)."""
        llm = self.llm
        return self.run_sync(
            llm.collective_rpc(
                "thaw_register_buffer", timeout=timeout_s, args=(buffer.descriptor(),)
            ),
            timeout_s,
        )
