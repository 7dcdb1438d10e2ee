"""Where the host time of one public kv_gather / kv_scatter call goes (CUDA), step by step.

Each step of the public path is timed on its own from an idle GPU (median of many calls) for
Llama-8B shapes (32 layers, 65 blocks = 136 MB): the layers plan lookup, block-id validation,
staging the ids to the device, the buffer check, the Triton launch, and the whole public call;
the staging, launch and public rows once per host path (id_staging.HOST_PATHS: "torch", the
default, and "driver"), in the same run.

    python benchmarks/kv_host_cost.py   # prints a table; writes benchmarks/results/kv_host_cost_<gpu-slug>.json

``host_us_p50`` holds each step's median; ``host_us`` its p20/p50/p80 (_common.percentiles, the
one percentile method of the benchmarks); ``machine`` what ran it (_common.machine_info). The
JSON is written atomically (_common.write_results).
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from _common import (
    RESULTS,
    device_slug,
    load_average,
    machine_info,
    on_kv_host_path,
    percentiles,
    write_results,
)

from thaw_kernels import block_ids as ids_mod
from thaw_kernels import id_staging, kv_gather, kv_plans, kv_scatter, page_spec_for
from thaw_kernels import kv_blocks as kv_mod
from thaw_kernels.kv_pages import check_buffer

LAYERS, BLOCKS, BLOCK, KV_HEADS, HEAD_DIM, N = 32, 2048, 16, 8, 128, 65
REPS = 200


def host_times_us(fn, reps: int = REPS) -> list[float]:
    """Host microseconds of ``reps`` calls of ``fn``, each from an idle GPU."""
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e6)
    torch.cuda.synchronize()
    return times


def main() -> int:
    """Time every step, print the medians, write the JSON; 2 without a CUDA GPU."""
    argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    ).parse_args()
    if not torch.cuda.is_available():
        print("kv_host_cost: needs a CUDA GPU", file=sys.stderr)
        return 2
    dev = torch.device("cuda")
    layers = [
        torch.empty(2, BLOCKS, BLOCK, KV_HEADS, HEAD_DIM, dtype=torch.bfloat16, device=dev)
        for _ in range(LAYERS)
    ]
    spec = page_spec_for(layers[0], "flash")
    ids = list(range(0, 2 * N, 2))
    buf = kv_gather(layers, ids, spec)
    plan, base = kv_plans.plan_for(layers, spec)
    shape = (N, LAYERS, spec.num_halves, spec.page_elems)
    staged = ids_mod.stage_ids(ids, spec, dev, unique=True)  # the torch path's ids tensor

    def stage_release() -> None:
        ids_mod.stage_ids(ids, spec, dev, unique=True).release()

    steps = {
        "plan_for (cached)": lambda: kv_plans.plan_for(layers, spec),
        "host_ids unique=False": lambda: ids_mod.host_ids(ids, spec, unique=False),
        "host_ids unique=True": lambda: ids_mod.host_ids(ids, spec, unique=True),
        "check_buffer": lambda: check_buffer(buf, "src", base, shape),
        "torch empty_like + copy_ (reference op)": lambda: torch.empty_like(staged.tensor).copy_(
            staged.tensor
        ),
    }
    for path in id_staging.HOST_PATHS:
        steps.update(
            {
                f"[{path}] stage_ids + release (validate + slot + H2D)": on_kv_host_path(
                    path, stage_release
                ),
                f"[{path}] launch (to cache)": on_kv_host_path(
                    path,
                    lambda: kv_mod._launch(plan, base, staged.tensor, N, buf, spec, to_buf=False),
                ),
                f"[{path}] launch (to buffer)": on_kv_host_path(
                    path,
                    lambda: kv_mod._launch(plan, base, staged.tensor, N, buf, spec, to_buf=True),
                ),
                f"[{path}] public kv_gather(out=)": on_kv_host_path(
                    path, lambda: kv_gather(layers, ids, spec, out=buf)
                ),
                f"[{path}] public kv_scatter": on_kv_host_path(
                    path, lambda: kv_scatter(buf, layers, ids, spec)
                ),
            }
        )
    stats = {name: percentiles(host_times_us(fn), digits=1) for name, fn in steps.items()}
    result = {name: q["p50"] for name, q in stats.items()}
    for name, us in result.items():
        print(f"{name:<45} {us:8.1f} us")
    out = write_results(
        RESULTS / f"kv_host_cost_{device_slug()}.json",
        {
            "device": torch.cuda.get_device_name(),
            "torch": torch.__version__,
            "blocks": N,
            "layers": LAYERS,
            "host_us_p50": result,
            "host_us": stats,
            "reps": REPS,
            "machine": machine_info(),
            "load_average": load_average(),
        },
    )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
