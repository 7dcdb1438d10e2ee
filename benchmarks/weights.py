"""Weights move like KV: hot swap, restore, cold start, state-dict update and freeze, each next
to its baseline in the same run (issue 10's goals table).

GPU (default; Llama-3.1-8B shapes, bf16, random weights generated on the GPU):
  checkpoint   random safetensors shards written from GPU tensors (the CPU took 200 s for 16 GB)
  warmup       a dummy-load engine start, untimed: compile and kernel caches warm for every start
  normal       engine start, vLLM's own safetensors load (page cache)      -> reference tokens
  freeze       Engine.freeze_weights -> .thaw (engine layout)               goal >= 10 GB/s
               beside it: durable=True (fsync) and the page cache's own write rate here
  raw_pinned   dev.copy_(pinned host) of the same bytes                      (baseline)
  hot_swap     load_weights(WeightsBuffer registered once)                   goal >= 0.95x raw
  file_restore load_weights(page-cached .thaw, not registered)               goal >= 25 GB/s
  state_dict   load_weights({name: CUDA tensor of this process}) via IPC     goal <= 2x D2D copy
               (each timed push after a 16-token generation, as pushes come in an RL loop;
               also as views of one flat buffer; a push with the final norm zeroed first)
  sleep_wake   vLLM sleep(level=1) / wake_up() (the same weights back)       hot swap >= 1.5x faster
  cold_thaw    engine start with load_format="thaw"                          weight phase >= 4x faster
  dummy        engine start with load_format="dummy" (what is not the weight phase)
Every path's greedy tokens are compared with the normal load's.

--smoke: the same phases on the CPU with the tiny float32 model (CUDA-only phases record why
they were skipped). Each phase has its own timeout and try/except: one failure is recorded in
the JSON and the others still run.

    python benchmarks/weights.py [--smoke]   # -> results/weights_<gpu-slug|cpu>.json
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import sys
import threading
import time
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

# vLLM's INFO logs (each engine's output goes to a file under --workdir): its GPU model
# runner's "Model loading took ... seconds" times each engine's weight phase
os.environ.setdefault("VLLM_LOGGING_LEVEL", "INFO")
os.environ.setdefault("THAW_AGENTS_VERBOSE", "1")  # the thaw loader's own line (INFO) too
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from _common import RESULTS, device_slug, machine_info, write_results  # noqa: E402

PROMPT = [(7 * i + 3) % 250 + 3 for i in range(200)]  # < 259: valid for the tiny model too
REPS = 3


class Run:
    """Phases with their own timeouts; every outcome (or error) lands in ``results``."""

    def __init__(self, path: Path, meta: dict[str, Any]) -> None:
        self.path, self.results = path, {**meta, "phases": {}, "goals": {}}

    def phase(
        self, name: str, timeout_s: float, fn: Callable[[], dict[str, Any]]
    ) -> dict[str, Any] | None:
        box: dict[str, Any] = {}

        def target() -> None:
            try:
                box["value"] = fn()
            except BaseException as exc:  # noqa: BLE001 - recorded, the next phase still runs
                box["error"] = f"{type(exc).__name__}: {exc}"
                box["trace"] = traceback.format_exc()[-3000:]

        began = time.perf_counter()
        thread = threading.Thread(target=target, name=f"phase-{name}", daemon=True)
        thread.start()
        thread.join(timeout_s)
        record: dict[str, Any] = {"wall_s": round(time.perf_counter() - began, 3)}
        if thread.is_alive():
            record["error"] = f"timed out after {timeout_s} s"
        elif "error" in box:
            record.update(error=box["error"], trace=box["trace"])
        else:
            record.update(box["value"] or {})
        self.results["phases"][name] = record
        status = record.get("error") or {k: v for k, v in record.items() if k != "tokens"}
        print(f"[weights] {name}: {status}", flush=True)
        write_results(self.path, self.results)
        return None if "error" in record else record


def _median(
    fn: Callable[[], Any], reps: int = REPS, between: Callable[[], Any] | None = None
) -> tuple[float, list[float]]:
    """Median seconds of ``fn`` over ``reps`` calls (``between`` runs untimed before each)."""
    times = []
    for _ in range(reps):
        if between is not None:
            between()
        began = time.perf_counter()
        fn()
        times.append(time.perf_counter() - began)
    return statistics.median(times), [round(t, 4) for t in times]


def _page_cache_write_rate(folder: Path, smoke: bool) -> float:
    """GB/s of one pwrite stream from pinned memory into a new file in ``folder`` (no fsync):
    the page cache's own rate on this host, the bound of any freeze to a file there
    (``host_paths.write_file``, the probe's measurement)."""
    from concurrent.futures import ThreadPoolExecutor

    import torch
    from host_paths import write_file

    n = (64 << 20) if smoke else (4 << 30)
    src = torch.ones(n, dtype=torch.uint8, pin_memory=torch.cuda.is_available())
    path = folder / "write-rate.bin"
    with ThreadPoolExecutor(1) as pool:
        try:
            seconds = write_file(path, src, "fallocate+pwrite", 1, pool)
        finally:
            path.unlink(missing_ok=True)
    return round(n / seconds / 1e9, 2)


@contextmanager
def _output_to(path: Path) -> Iterator[None]:
    """fds 1 and 2 -> ``path`` meanwhile (vLLM logs to stdout): engine processes started inside
    inherit them (and keep writing there)."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    try:
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        for target, fd in zip((1, 2), saved):
            os.dup2(fd, target)
            os.close(fd)


def _model_loading_s(log: Path) -> float | None:
    """vLLM's own "Model loading took X GiB [memory] and Y seconds" (the model runner's load:
    init + weights; V1 and V2 runners word it differently), from an engine's log; None when it
    is not there (vLLM-CPU)."""
    found = re.findall(
        r"Model loading took [\d.]+ ?GiB(?: memory)? and ([\d.]+) seconds", log.read_text()
    )
    return float(found[-1]) if found else None


def _thaw_loader_s(log: Path) -> dict[str, float] | None:
    """The thaw loader's own "restore R s of T s in the loader (first-use setup W s)" line
    (None when absent; no warm_up_s from loaders older than that span)."""
    found = re.findall(
        r"thaw: loaded \d+ bytes from .*: restore ([\d.]+) s of ([\d.]+) s in the loader"
        r"(?: \(first-use (?:warm-up|setup) ([\d.]+) s\))?",
        log.read_text(),
    )
    if not found:
        return None
    restore, loader, warm = found[-1]
    out = {"restore_s": float(restore), "loader_s": float(loader)}
    return {**out, "warm_up_s": float(warm)} if warm else out


def _packed(tensors: dict[str, Any]) -> tuple[dict[str, Any], Any]:
    """``tensors`` copied into views of one flat CUDA buffer (256-byte aligned), and the buffer."""
    import torch

    def size(t: Any) -> int:
        return -(-t.numel() * t.element_size() // 256) * 256

    packed = torch.empty(sum(map(size, tensors.values())), dtype=torch.uint8, device="cuda")
    out, at = {}, 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        view = packed[at : at + nbytes].view(t.dtype).view(t.shape)
        view.copy_(t)
        out[name], at = view, at + size(t)
    _sync()
    return out, packed


def _writeback() -> float:
    """Seconds of ``sync()``: earlier phases' dirty pages written back before a timed write."""
    began = time.perf_counter()
    os.sync()
    return time.perf_counter() - began


WORKER_SPANS = ("parse_s", "check_s", "install_s", "release_s", "fence_s")


def _spans(swaps: list[dict[str, Any]]) -> dict[str, Any]:
    """Where each swap's time went: the worker's restore, and the caller's spans (describe, the
    load RPC around the worker, the prefix-cache reset), each swap in order."""
    return {
        "worker_seconds": [round(s["seconds"], 4) for s in swaps],
        "worker_call_seconds": [s.get("call_s") for s in swaps],
        "worker_spans": [{k: s[k] for k in WORKER_SPANS if k in s} for s in swaps],
        "caller_spans": [s.get("caller") for s in swaps],
    }


def _num_gpu_blocks(engine: Any) -> int | None:
    """The engine's KV blocks (vLLM's prefix-cache reset walks every one)."""
    return getattr(engine.llm.vllm_config.cache_config, "num_gpu_blocks", None)


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


# ---------------------------------------------------------------------- engines and tokens


def _engine(model: str, dtype: str, smoke: bool, **kwargs: Any) -> Any:
    from thaw_agents_core.engine.engine import Engine
    from thaw_agents_core.engine.spec import EngineSpec

    engine_kwargs = {"max_model_len": 1024, "enforce_eager": True, **kwargs}
    if not smoke:
        engine_kwargs.update(skip_tokenizer_init=True, gpu_memory_utilization=0.40)
    else:
        engine_kwargs.update(kv_cache_memory_bytes=128 << 20)
    max_len = engine_kwargs.pop("max_model_len")
    return Engine(
        EngineSpec.create(model, dtype=dtype, max_model_len=max_len, engine_kwargs=engine_kwargs)
    )


def _start(engine: Any) -> float:
    began = time.perf_counter()
    engine.start()
    return time.perf_counter() - began


def _greedy(engine: Any) -> list[int]:
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=16, temperature=0.0, detokenize=False)
    final = None
    for final in engine.stream_sync(PROMPT, params, timeout_s=120):
        pass
    return list(final.outputs[0].token_ids)


# ---------------------------------------------------------------------- checkpoints


def _make_checkpoint(target: Path, smoke: bool) -> dict[str, Any]:
    """Random bf16 safetensors with Llama-3.1-8B shapes, generated on the GPU (smoke: the tiny
    model's folder)."""
    if target.exists():
        shutil.rmtree(target)
    if smoke:
        from thaw_agents_core.engine.models import tiny_model_path

        shutil.copytree(tiny_model_path(seed=0), target)
        return {"num_bytes": sum(p.stat().st_size for p in target.glob("*.safetensors"))}
    import torch
    from safetensors.torch import save_file

    from thaw_agents_core.testing import LLAMA_3_1_8B_CONFIG, llama_8b_shaped_path

    c = LLAMA_3_1_8B_CONFIG
    h, i, v, kv = (
        c["hidden_size"],
        c["intermediate_size"],
        c["vocab_size"],
        c["num_key_value_heads"] * c["head_dim"],
    )
    shapes = {
        "model.embed_tokens.weight": (v, h),
        "model.norm.weight": (h,),
        "lm_head.weight": (v, h),
    }
    for n in range(c["num_hidden_layers"]):
        p = f"model.layers.{n}."
        shapes.update(
            {
                p + "input_layernorm.weight": (h,),
                p + "post_attention_layernorm.weight": (h,),
                p + "self_attn.q_proj.weight": (h, h),
                p + "self_attn.k_proj.weight": (kv, h),
                p + "self_attn.v_proj.weight": (kv, h),
                p + "self_attn.o_proj.weight": (h, h),
                p + "mlp.gate_proj.weight": (i, h),
                p + "mlp.up_proj.weight": (i, h),
                p + "mlp.down_proj.weight": (h, i),
            }
        )
    target.mkdir(parents=True)
    shutil.copy(llama_8b_shaped_path() / "config.json", target / "config.json")
    g = torch.Generator(device="cuda").manual_seed(0)
    names, total, shard = list(shapes), 0, 0
    for chunk in (names[k::4] for k in range(4)):
        tensors = {
            n: (torch.randn(shapes[n], generator=g, device="cuda", dtype=torch.bfloat16) * 0.02)
            for n in chunk
        }
        for n in chunk:
            if n.endswith("norm.weight"):
                tensors[n] = torch.ones_like(tensors[n])
        total += sum(t.numel() * 2 for t in tensors.values())
        save_file(tensors, str(target / f"model-{shard:05d}-of-00004.safetensors"))
        shard += 1
        del tensors
        torch.cuda.empty_cache()
    return {"num_bytes": total}


# ---------------------------------------------------------------------- the run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny float32 model")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/thaw-weights-bench"))
    parser.add_argument(
        "--quick",
        action="store_true",
        help="only the state dict and cold-start phases (and what they need: checkpoint, "
        "normal, one freeze), into weights_<gpu>_quick.json",
    )
    parser.add_argument(
        "--no-cold", action="store_true", help="skip the cold-start phases (cold_thaw, dummy)"
    )
    args = parser.parse_args(argv)
    import torch

    smoke = args.smoke or not torch.cuda.is_available()
    quick = args.quick
    dtype = "float32" if smoke else "bfloat16"
    suffix = ("_quick" if quick else "") + ("_no_cold" if args.no_cold else "")
    path = RESULTS / f"weights_{device_slug()}{suffix}.json"
    run = Run(
        path,
        {
            "benchmark": "weights",
            "smoke": smoke,
            "machine": machine_info(),
            "model": "tiny float32" if smoke else "Llama-3.1-8B shapes, bf16, random",
        },
    )
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    folder, thaw = work / "model", work / "weights.thaw"
    state: dict[str, Any] = {}
    t = (lambda cpu, gpu: cpu) if smoke else (lambda cpu, gpu: gpu)  # noqa: E731 - per-phase timeouts

    def cold(kind: str) -> dict[str, Any]:
        extra = (
            {"load_format": "thaw", "model_loader_extra_config": {"snapshot": str(thaw)}}
            if kind == "thaw"
            else {"load_format": "dummy"}
        )
        log = work / f"engine-{kind}.log"
        with _output_to(log):
            cold_engine = _engine(str(folder), dtype, smoke, **extra)
            try:
                start_s = _start(cold_engine)
            except BaseException:
                cold_engine.close()
                raise
        try:
            tokens = _greedy(cold_engine) if kind == "thaw" else None
        finally:
            cold_engine.close()
        out = {"start_s": round(start_s, 3), "model_loading_s": _model_loading_s(log)}
        if kind == "thaw":
            out["thaw_loader"] = _thaw_loader_s(log)
        if tokens is not None:
            out["tokens_identical"] = tokens == state.get("tokens")
        return out

    run.phase("checkpoint", t(60, 150), lambda: _make_checkpoint(folder, smoke))
    if not smoke and not quick:  # compile and kernel caches warm before any start is timed
        run.phase("warmup", 150, lambda: cold("dummy"))

    def normal() -> dict[str, Any]:
        log = work / "engine-normal.log"
        with _output_to(log):
            engine = _engine(str(folder), dtype, smoke, enable_sleep_mode=not smoke)
            state["engine"] = engine
            start_s = _start(engine)
        state["tokens"] = _greedy(engine)
        return {
            "start_s": round(start_s, 3),
            "model_loading_s": _model_loading_s(log),
            "tokens": state["tokens"],
        }

    run.phase("normal", t(120, 150), normal)
    engine = state.get("engine")

    def freeze() -> dict[str, Any]:
        # The checkpoint phase left ~16 GB of dirty pages: written back first (not counted), so
        # the freeze is not throttled by the kernel's writeback of another phase's file.
        writeback_s = _writeback()
        stats = engine.freeze_weights(thaw)
        nbytes, seconds = stats[0]["num_bytes"], stats[0]["seconds"]
        state["num_bytes"] = nbytes
        if quick:
            return {
                "num_bytes": nbytes,
                "seconds": seconds,
                "gb_per_s": round(nbytes / seconds / 1e9, 2),
            }
        writeback_s += _writeback()
        durable = engine.freeze_weights(thaw, durable=True)[0]["seconds"]
        bound = _page_cache_write_rate(work, smoke)
        return {
            "writeback_before_s": round(writeback_s, 2),
            "num_bytes": nbytes,
            "seconds": seconds,
            "gb_per_s": round(nbytes / seconds / 1e9, 2),
            "durable_seconds": durable,
            "durable_gb_per_s": round(nbytes / durable / 1e9, 2),
            "page_cache_write_gb_per_s": bound,
            "vs_page_cache_write": round(nbytes / seconds / 1e9 / bound, 3),
        }

    if engine is not None:
        run.phase("freeze", t(60, 120), freeze)

    def raw_pinned() -> dict[str, Any]:
        n = state["num_bytes"]
        host = torch.empty(n, dtype=torch.uint8, pin_memory=True)
        dev = torch.empty(n, dtype=torch.uint8, device="cuda")
        seconds, times = _median(lambda: (dev.copy_(host, non_blocking=True), _sync()))
        torch.cuda.empty_cache()
        return {
            "seconds": round(seconds, 4),
            "times": times,
            "gb_per_s": round(n / seconds / 1e9, 2),
        }

    def buffer_swap() -> dict[str, Any]:
        from thaw_agents_core.weights.buffer import WeightsBuffer
        from thaw_agents_core.weights.io import open_weights

        with open_weights(thaw) as wf:
            named = {e.name: wf.tensor_of(e) for e in wf.header.tensors}
            buf = WeightsBuffer.for_tensors(named, slack=0.01)
            buf.write(named, "buffered", layout="engine")
        state["buffer"] = buf
        register = engine.register_weights_buffer(buf)[0]["seconds"]
        versions = iter(f"buf-{k}" for k in range(100))
        swaps: list[dict[str, Any]] = []  # the worker's own time and the caller's spans
        seconds, times = _median(lambda: swaps.append(engine.load_weights(buf, next(versions))))
        same = _greedy(engine) == state["tokens"]
        from thaw_agents_core.util import compat

        llm = engine.llm
        reset = llm.reset_prefix_cache
        rpc_s, _ = _median(  # what a swap pays around the copy: vLLM's RPC, the cache reset
            lambda: engine.run_sync(llm.collective_rpc("thaw_weights_version", timeout=60), 60)
        )
        reset_s, _ = _median(
            lambda: engine.run_sync(reset(**compat.reset_prefix_cache_kwargs(reset)), 60)
        )
        return {
            "rpc_roundtrip_s": round(rpc_s, 5),
            "reset_prefix_cache_s": round(reset_s, 5),
            "register_s": register,
            "num_gpu_blocks": _num_gpu_blocks(engine),
            "seconds": round(seconds, 4),
            "times": times,
            **_spans(swaps),
            "gb_per_s": round(state["num_bytes"] / seconds / 1e9, 2),
            "tokens_identical": same,
        }

    def file_restore() -> dict[str, Any]:
        with open(
            thaw, "rb"
        ) as f:  # into the page cache (the goal is "page-cached, not registered")
            while f.read(64 << 20):
                pass
        versions = iter(f"file-{k}" for k in range(100))
        swaps: list[dict[str, Any]] = []
        seconds, times = _median(lambda: swaps.append(engine.load_weights(thaw, next(versions))))
        return {
            "seconds": round(seconds, 4),
            "times": times,
            **_spans(swaps),
            "gb_per_s": round(state["num_bytes"] / seconds / 1e9, 2),
            "tokens_identical": _greedy(engine) == state["tokens"],
        }

    def corrupted() -> dict[str, Any]:
        """One bit flipped in the file's last tensor (in place, flipped back after): the swap
        must fail at that chunk's CRC, the engine refuse requests, and a good load bring the
        reference tokens back."""
        from thaw_agents_core.engine.engine import EngineError
        from thaw_agents_core.weights.io import open_weights

        with open_weights(thaw) as wf:
            last = wf.header.tensors[-1]
            at = os.path.getsize(thaw) - wf.header.payload_bytes + last.offset + last.nbytes // 2
        fd = os.open(thaw, os.O_RDWR)
        try:
            good = os.pread(fd, 1, at)
            os.pwrite(fd, bytes([good[0] ^ 0x40]), at)
            try:
                engine.load_weights(thaw, "corrupt")
                refused = False
            except Exception as exc:  # noqa: BLE001 - the expected failure
                refused = "CRC32C mismatch" in str(exc)
        finally:
            os.pwrite(fd, good, at)
            os.close(fd)
        try:
            _greedy(engine)
            served_while_broken = True
        except EngineError:
            served_while_broken = False
        engine.load_weights(thaw, "recovered")
        return {
            "swap_refused_at_the_bad_chunk": refused,
            "served_while_broken": served_while_broken,
            "tokens_identical": _greedy(engine) == state["tokens"]
            and refused
            and not served_while_broken,
        }

    def state_dict() -> dict[str, Any]:
        from thaw_agents_core.weights.io import open_weights

        with open_weights(thaw) as wf:
            tensors = {e.name: wf.tensor_of(e).to("cuda") for e in wf.header.tensors}
        _sync()
        versions = iter(f"sd-{k}" for k in range(100))
        # A push must change what the engine serves: first the weights with the final norm
        # zeroed (every logit 0, so greedy tokens change), then the real ones (timed below).
        norm = "model.norm.weight" if "model.norm.weight" in tensors else next(iter(tensors))
        began = time.perf_counter()
        engine.load_weights({**tensors, norm: torch.zeros_like(tensors[norm])}, "sd-zeroed")
        first_s = time.perf_counter() - began  # the first push: every IPC handle opened
        took_effect = _greedy(engine) != state["tokens"]

        # After the first push, pushes of the same tensors (a trainer's next steps) reopen them
        # from the worker's handle cache. Each timed push follows a short generation, as in an
        # RL loop (rollouts between pushes); the worker drops the last push's tensors meanwhile.
        def generate() -> None:
            _greedy(engine)

        swaps: list[dict[str, Any]] = []
        seconds, times = _median(
            lambda: swaps.append(engine.load_weights(tensors, next(versions))), 5, generate
        )
        flat = [t.view(-1) for t in tensors.values()]
        copies = [torch.empty_like(t) for t in flat]
        d2d, d2d_times = _median(lambda: ([c.copy_(t) for c, t in zip(copies, flat)], _sync()))
        same = _greedy(engine) == state["tokens"]
        copies.clear()
        flat.clear()
        # The same weights as views of one flat buffer (how trainers with flat parameter
        # buffers hold them): one storage, so one IPC handle to export and open
        packed_sd, packed = _packed(tensors)
        tensors.clear()
        packed_swaps: list[dict[str, Any]] = []
        packed_s, packed_times = _median(
            lambda: packed_swaps.append(engine.load_weights(packed_sd, next(versions))),
            5,
            generate,
        )
        same = same and _greedy(engine) == state["tokens"]
        packed_sd.clear()
        del packed
        torch.cuda.empty_cache()
        return {
            "packed": {
                "seconds": round(packed_s, 4),
                "times": packed_times,
                "ratio_to_d2d": round(packed_s / d2d, 2),
                **_spans(packed_swaps),
            },
            "seconds": round(seconds, 4),
            "times": times,
            "d2d_s": round(d2d, 4),
            "d2d_times": d2d_times,
            "ratio_to_d2d": round(seconds / d2d, 2),
            "first_s": round(first_s, 4),
            "first_ratio_to_d2d": round(first_s / d2d, 2),
            **_spans(swaps),
            "zeroed_norm_changed_tokens": took_effect,
            "tokens_identical": same and took_effect,
        }

    def sleep_wake() -> dict[str, Any]:
        llm = engine.llm
        first = _median(
            lambda: (engine.run_sync(llm.sleep(level=1), 120), engine.run_sync(llm.wake_up(), 120)),
            1,
        )
        sleeps, wakes = [], []
        for _ in range(REPS):
            began = time.perf_counter()
            engine.run_sync(llm.sleep(level=1), 120)
            sleeps.append(time.perf_counter() - began)
            began = time.perf_counter()
            engine.run_sync(llm.wake_up(), 120)
            wakes.append(time.perf_counter() - began)
        engine.run_sync(llm.reset_prefix_cache(), 60)
        return {
            "first_cycle_s": round(first[0], 3),
            "sleep_s": round(statistics.median(sleeps), 4),
            "wake_up_s": round(statistics.median(wakes), 4),
            "tokens_identical": _greedy(engine) == state["tokens"],
        }

    if engine is not None and "num_bytes" in state and quick:
        if not smoke:
            run.phase("state_dict", 120, state_dict)
    elif engine is not None and "num_bytes" in state:
        if not smoke:
            run.phase("raw_pinned", 120, raw_pinned)
        else:
            run.results["phases"]["raw_pinned"] = {"skipped": "needs CUDA (pinned host memory)"}
        run.phase("hot_swap", t(60, 200), buffer_swap)
        run.phase("file_restore", t(60, 120), file_restore)
        run.phase("corrupted", t(60, 120), corrupted)
        if not smoke:
            run.phase("state_dict", 120, state_dict)
            run.phase("sleep_wake", 150, sleep_wake)
        else:
            run.results["phases"]["state_dict"] = {"skipped": "needs CUDA (IPC handles)"}
            run.results["phases"]["sleep_wake"] = {"skipped": "vLLM sleep mode needs CUDA"}
    if engine is not None:
        engine.close()
    if "buffer" in state:
        state["buffer"].close()

    if thaw.exists() and not args.no_cold:
        run.phase("cold_thaw", t(120, 150), lambda: cold("thaw"))
    if not args.no_cold:
        run.phase("dummy", t(120, 150), lambda: cold("dummy"))
    _goals(run.results)
    write_results(path, run.results)
    print(f"[weights] wrote {path}")
    return 0


def _goals(results: dict[str, Any]) -> None:
    """The issue's goals, computed from the phases that ran (None where a phase is missing)."""
    p = results["phases"]

    def get(phase: str, key: str) -> Any:
        return (p.get(phase) or {}).get(key)

    goals = results["goals"]
    raw, swap = get("raw_pinned", "seconds"), get("hot_swap", "seconds")
    wake = get("sleep_wake", "wake_up_s")
    goals["hot_swap_vs_raw_pinned"] = round(raw / swap, 3) if raw and swap else None
    goals["hot_swap_vs_raw_pinned_goal"] = ">= 0.95"
    goals["hot_swap_speedup_over_wake_up"] = round(wake / swap, 2) if wake and swap else None
    goals["hot_swap_speedup_over_wake_up_goal"] = ">= 1.5"
    goals["file_restore_gb_per_s"] = get("file_restore", "gb_per_s")
    goals["file_restore_goal"] = ">= 25 GB/s"
    loads = {k: get(k, "model_loading_s") for k in ("normal", "cold_thaw", "dummy")}
    if None not in loads.values():  # vLLM's own model-loading time: init + weights
        normal_w, thaw_w = loads["normal"] - loads["dummy"], loads["cold_thaw"] - loads["dummy"]
        goals["cold_start_weight_phase_s"] = {
            "normal": round(normal_w, 3),
            "thaw": round(thaw_w, 3),
            "how": "vLLM's 'Model loading took' of each start minus the dummy start's",
        }
        goals["cold_start_weight_phase_speedup"] = (
            round(normal_w / thaw_w, 2) if thaw_w > 0.05 else f">= {normal_w / 0.05:.0f}"
        )
    else:
        goals["cold_start_weight_phase_s"] = None
        goals["cold_start_weight_phase_speedup"] = (
            "not measured (no 'Model loading took' line in the engines' logs)"
        )
    goals["cold_start_goal"] = "weight phase >= 4x faster (model loading minus the dummy's)"
    goals["state_dict_vs_d2d"] = get("state_dict", "ratio_to_d2d")
    goals["state_dict_goal"] = "<= 2x the device-to-device copy"
    goals["state_dict_packed_vs_d2d"] = ((p.get("state_dict") or {}).get("packed") or {}).get(
        "ratio_to_d2d"
    )
    goals["freeze_gb_per_s"] = get("freeze", "gb_per_s")
    goals["freeze_goal"] = ">= 10 GB/s"
    flags = [
        v.get("tokens_identical")
        for v in p.values()
        if isinstance(v, dict) and "tokens_identical" in v
    ]
    goals["greedy_tokens_identical"] = all(flags) if flags else None


if __name__ == "__main__":
    sys.exit(main())
