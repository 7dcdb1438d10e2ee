"""Where the host time of one public kv_gather / kv_scatter call goes (CUDA), step by step.

Each step of the public path is timed on its own from an idle GPU (median of many calls) for
Llama-8B shapes (32 layers, 65 blocks = 136 MB): the layers plan lookup, block-id validation,
staging the ids to the device, the buffer check, the Triton launch, and the whole public call.

    python benchmarks/kv_host_cost.py      # prints a table; writes benchmarks/results/kv_host_cost_<gpu>.json
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from thaw_kernels import block_ids as ids_mod  # noqa: E402
from thaw_kernels import kv_blocks as kv_mod  # noqa: E402
from thaw_kernels import kv_gather, kv_scatter, page_spec_for  # noqa: E402

LAYERS, BLOCKS, BLOCK, KV_HEADS, HEAD_DIM, N = 32, 2048, 16, 8, 128, 65


def median_us(fn, reps: int = 200) -> float:
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    torch.cuda.synchronize()
    return statistics.median(times) * 1e6


def main() -> int:
    if not torch.cuda.is_available():
        print("kv_host_cost: needs a CUDA GPU", file=sys.stderr)
        return 2
    dev = torch.device("cuda")
    layers = [torch.empty(2, BLOCKS, BLOCK, KV_HEADS, HEAD_DIM, dtype=torch.bfloat16, device=dev)
              for _ in range(LAYERS)]
    spec = page_spec_for(layers[0], "flash")
    ids = list(range(0, 2 * N, 2))
    buf = kv_gather(layers, ids, spec)
    plan, base = kv_mod._plan_for(layers, spec)
    dev_ids = ids_mod.device_ids(ids, spec, dev, unique=True)
    shape = (N, LAYERS, spec.num_halves, spec.page_elems)
    steps = {
        "plan_for (cached)": lambda: kv_mod._plan_for(layers, spec),
        "host_ids unique=False": lambda: ids_mod.host_ids(ids, spec, unique=False),
        "host_ids unique=True": lambda: ids_mod.host_ids(ids, spec, unique=True),
        "device_ids (validate + pinned slot + H2D)": lambda: ids_mod.device_ids(ids, spec, dev, unique=True),
        "check_buffer": lambda: kv_mod._check_buffer(buf, "src", base, shape),
        "launch (Triton, to cache)": lambda: kv_mod._launch(plan, base, dev_ids, buf, spec, to_buf=False),
        "launch (Triton, to buffer)": lambda: kv_mod._launch(plan, base, dev_ids, buf, spec, to_buf=True),
        "public kv_gather(out=)": lambda: kv_gather(layers, ids, spec, out=buf),
        "public kv_scatter": lambda: kv_scatter(buf, layers, ids, spec),
        "torch empty_like + copy_ (reference op)": lambda: torch.empty_like(dev_ids).copy_(dev_ids),
    }
    result = {name: round(median_us(fn), 1) for name, fn in steps.items()}
    for name, us in result.items():
        print(f"{name:<45} {us:8.1f} us")
    slug = torch.cuda.get_device_name().lower().replace("nvidia ", "").split()[0]
    out = ROOT / "benchmarks" / "results" / f"kv_host_cost_{slug}.json"
    out.write_text(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                               "blocks": N, "layers": LAYERS, "host_us_p50": result}, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
