"""Large fan-outs on one GPU: B branches x T tokens over an 8k-token prefix already cached.

    python benchmarks/fanout_scale.py                 # H200: B in 4,16,64,256, T=256
    python benchmarks/fanout_scale.py --smoke         # CPU: the tiny model, small sizes
    python benchmarks/fanout_scale.py --profile       # H200: where one 256-branch step goes

Configurations, each in its own engine process (the model runner is chosen by environment):
    vllm_default    vLLM 0.26 as shipped (cascade attention off, V2 model runner, 16-token blocks)
    vllm_cascade    vLLM's best opt-in: cascade attention on (disable_cascade_attn=False) and the
                    V1 model runner (VLLM_USE_V2_MODEL_RUNNER=0, which 0.26's cascade path needs)
    thaw            what ChatThaw / ForkPool engines get (compat.shared_prefix_engine_defaults:
                    the opt-in above plus 64-token KV blocks)
Per (configuration, B): the best of ``--repeats`` rounds, wall time and ms per decode step,
the fewest prefix tokens any branch found cached, and a floor estimate beside it: weights and
the prefix's KV read once per step plus each branch's own KV at the measured device-copy
rate, plus the step's matmul FLOPs at the measured bf16 matmul rate.

Correctness in the same run: greedy tokens of the 8B-shaped model (16 branches x 32 tokens)
compared across configurations (top-1 agreement, max difference of the chosen tokens'
log-probabilities), and the same for the float32 tiny model (must be identical).
Writes benchmarks/results/fanout_scale_<gpu>.json (or _cpu with --smoke).

--block-sizes 16,64: ChatThaw's configuration at each KV block size, each round also run with
16 tokens so its time splits into a per-step and a fixed cost; fanout_blocks_<gpu>.json.

--profile: ChatThaw's configuration only, B=256 x 64 tokens, one round under torch's profiler
in the engine's worker (CUDA activity, through ``collective_rpc`` with a function, which needs
VLLM_ALLOW_INSECURE_SERIALIZATION=1 in that child only): the kernels by device time, grouped
(attention, matmul, sampling, other), against the round's wall time. Writes
fanout_profile_<gpu>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import device_slug, machine_info, write_results  # noqa: E402

# configuration -> (engine kwargs, environment of its child); "thaw" takes its kwargs from
# compat.shared_prefix_engine_defaults in the child (which also sets the runner's variable there).
CONFIGS: dict[str, tuple[dict, dict]] = {
    "vllm_default": ({}, {}),
    "vllm_cascade": ({"disable_cascade_attn": False}, {"VLLM_USE_V2_MODEL_RUNNER": "0"}),
    "thaw": ({}, {}),
}
RESULTS = Path(__file__).resolve().parent / "results"


def _worker_profile_start(worker: object) -> None:
    """In the engine's worker: start torch's profiler (device activity; host on the CPU)."""
    import torch

    activity = torch.profiler.ProfilerActivity
    on = activity.CUDA if torch.cuda.is_available() else activity.CPU
    prof = torch.profiler.profile(activities=[on])
    prof.start()
    worker.__dict__["_fanout_profiler"] = prof


def _worker_profile_stop(worker: object) -> list:
    """In the engine's worker: stop the profiler; [kernel name, ms, calls], largest first (the
    device's time on CUDA, the host's on the CPU)."""
    import torch

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.synchronize()
    prof = worker.__dict__.pop("_fanout_profiler")
    prof.stop()
    rows = []
    for e in prof.key_averages():
        us = (
            getattr(e, "self_device_time_total", 0) or getattr(e, "self_cuda_time_total", 0)
            if cuda
            else e.self_cpu_time_total
        )
        if us > 0:
            rows.append([e.key[:200], round(us / 1000, 3), int(e.count)])
    return sorted(rows, key=lambda r: -r[1])


PROFILE_GROUPS = (  # first match wins; kernel names of vLLM 0.26 / torch 2.11 on Hopper
    ("attention", ("flash", "fmha", "attn", "attention", "merge_attn", "cascade", "paged")),
    ("matmul", ("gemm", "cutlass", "nvjet", "sm90_xmma", "cublas", "matmul", "splitk", "onednn")),
    ("sampling", ("sampl", "topk", "top_k", "sort", "softmax", "exponential", "argmax", "gumbel")),
)


def _profile_summary(rows: list, wall_s: float, steps: int) -> dict:
    groups: dict[str, float] = {}
    for name, ms, _ in rows:
        low = name.lower()
        group = next((g for g, keys in PROFILE_GROUPS if any(k in low for k in keys)), "other")
        groups[group] = groups.get(group, 0.0) + ms
    total = sum(groups.values())
    return {
        "wall_s": round(wall_s, 4),
        "steps": steps,
        "wall_ms_per_step": round(1000 * wall_s / steps, 3),
        "device_ms_per_step": round(total / steps, 3),
        "device_busy_fraction": round(total / 1000 / wall_s, 3),
        "groups_ms_per_step": {g: round(ms / steps, 3) for g, ms in sorted(groups.items())},
        "top_kernels": [
            {"name": n, "ms_per_step": round(ms / steps, 4), "calls_per_step": round(c / steps, 2)}
            for n, ms, c in rows[:30]
        ],
    }


def _branches(prefix: list, tok: Any, batch: int, tokens: int) -> tuple[list, Any]:
    """``batch`` prompts of ``prefix`` + two branch tokens each, and their sampling (T=0.8)."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    prompts = [
        TokensPrompt(prompt_token_ids=prefix + [tok(1000 + b), tok(2000 + b)]) for b in range(batch)
    ]
    params = SamplingParams(
        max_tokens=tokens, temperature=0.8, ignore_eos=True, detokenize=False, seed=None
    )
    return prompts, params


def _round(llm: Any, prefix: list, tok: Any, batch: int, tokens: int, repeats: int) -> dict:
    """The best of ``repeats`` rounds of ``batch`` branches x ``tokens`` over ``prefix``."""
    prompts, params = _branches(prefix, tok, batch, tokens)
    walls, cached = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        walls.append(time.perf_counter() - t0)
        cached = min(int(o.num_cached_tokens or 0) for o in outs)
    best = min(walls)
    return {
        "batch": batch,
        "tokens": tokens,
        "wall_s": round(best, 4),
        "walls_s": [round(w, 4) for w in walls],
        "ms_per_step": round(1000 * best / tokens, 3),
        "min_cached_prefix_tokens": cached,
    }


def _child(config: str, spec: dict) -> dict:
    """One configuration in this (fresh) process: start its engine, run every size."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from thaw_agents_core.util import compat

    kwargs = compat.shared_prefix_engine_defaults({}) if config == "thaw" else CONFIGS[config][0]
    began = time.perf_counter()
    llm = LLM(
        model=spec["model"],
        load_format=spec["load_format"],
        skip_tokenizer_init=True,
        dtype=spec["dtype"],
        max_model_len=spec["prefix"] + spec["tokens"] + 64,
        enable_prefix_caching=True,
        gpu_memory_utilization=spec["gpu_memory_utilization"],
        enforce_eager=spec["eager"],
        max_num_seqs=max(spec["batches"]),
        **({"block_size": spec["block_size"]} if spec.get("block_size") else {}),
        **kwargs,
    )
    startup_s = time.perf_counter() - began
    features = compat.engine_features(llm.llm_engine.vllm_config)
    vocab = spec.get("vocab", 128256)

    def tok(x: int) -> int:
        return x % vocab

    prefix = [tok((7 * i + 11) % 30000 + 100) for i in range(spec["prefix"])]
    llm.generate(
        [TokensPrompt(prompt_token_ids=prefix + [5])],
        SamplingParams(max_tokens=1, detokenize=False),
        use_tqdm=False,
    )
    rows = []
    lengths = [spec["tokens"], *([spec["short_tokens"]] if spec.get("short_tokens") else [])]
    for batch in spec["batches"]:
        for tokens in lengths:
            rows.append(_round(llm, prefix, tok, batch, tokens, spec["repeats"]))
            print(f"RESULT-ROW {config} B={batch} T={tokens} {rows[-1]['wall_s']:.3f}s", flush=True)
    if spec.get("profile"):
        batch = max(spec["batches"])
        prompts, params = _branches(prefix, tok, batch, spec["tokens"])
        llm.collective_rpc(_worker_profile_start)
        t0 = time.perf_counter()
        llm.generate(prompts, params, use_tqdm=False)
        wall = time.perf_counter() - t0
        kernels = llm.collective_rpc(_worker_profile_stop)[0]
        return {
            "config": config,
            "engine_kwargs": kwargs,
            "features": features,
            "rows": rows,
            "profile": {"batch": batch, **_profile_summary(kernels, wall, spec["tokens"])},
        }
    # correctness sample: greedy, chosen-token logprobs
    check_prompts = [TokensPrompt(prompt_token_ids=prefix + [tok(3000 + b)]) for b in range(16)]
    greedy = llm.generate(
        check_prompts,
        SamplingParams(
            max_tokens=32, temperature=0.0, ignore_eos=True, logprobs=0, detokenize=False
        ),
        use_tqdm=False,
    )
    tokens = [list(o.outputs[0].token_ids) for o in greedy]
    logprobs = [[next(iter(d.values())).logprob for d in o.outputs[0].logprobs] for o in greedy]
    return {
        "config": config,
        "engine_kwargs": kwargs,
        "features": features,
        "startup_s": round(startup_s, 2),
        "rows": rows,
        "greedy_tokens": tokens,
        "greedy_logprobs": logprobs,
    }


def _tiny_child(config: str, model: str) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from thaw_agents_core.util import compat

    kwargs = compat.shared_prefix_engine_defaults({}) if config == "thaw" else CONFIGS[config][0]
    llm = LLM(
        model=model,
        dtype="float32",
        enforce_eager=True,
        max_model_len=2048,
        enable_prefix_caching=True,
        gpu_memory_utilization=0.2,
        skip_tokenizer_init=True,
        **kwargs,
    )
    prefix = [(5 * i + 3) % 250 + 3 for i in range(1024)]
    prompts = [TokensPrompt(prompt_token_ids=prefix + [b + 3]) for b in range(16)]
    outs = llm.generate(
        prompts,
        SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, detokenize=False),
        use_tqdm=False,
    )
    return {"config": config, "greedy_tokens": [list(o.outputs[0].token_ids) for o in outs]}


def _run_child(args: list[str], env_extra: dict, timeout_s: float) -> dict:
    env = {**os.environ, **env_extra}
    proc = subprocess.run(
        [sys.executable, __file__, *args],
        env=env,
        text=True,
        capture_output=True,
        timeout=timeout_s,
    )
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT-JSON "):
            return json.loads(line[len("RESULT-JSON ") :])
    raise RuntimeError(f"child {args} failed ({proc.returncode}): {proc.stderr[-4000:]}")


def _ceilings() -> dict:
    """Measured device-copy rate (bytes read + written per second) and bf16 matmul rate."""
    import torch

    src = torch.empty(1 << 31, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(10):
        dst.copy_(src)
    torch.cuda.synchronize()
    copy_rate = 2 * src.numel() * 10 / (time.perf_counter() - t0)
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(10):
        a @ b
    torch.cuda.synchronize()
    flops = 2 * 8192**3 * 10 / (time.perf_counter() - t0)
    del src, dst, a, b
    torch.cuda.empty_cache()
    return {"copy_bytes_per_s": copy_rate, "bf16_flops_per_s": flops}


def _floor_ms(batch: int, tokens: int, prefix: int, ceilings: dict) -> float:
    """Llama-3.1-8B decode step floor: weights + the prefix's KV once + each branch's own KV,
    read at the device-copy rate (read + written bytes per second: what HBM moves), plus the
    step's matmul FLOPs (2 * params * B for the layers, 4 * B * context * 32 layers * 4096 for
    attention with the prefix shared) at the measured bf16 matmul rate.

    (The first run of this benchmark, 2026-12-01, read at half the copy rate: its B=4 step came
    out faster than that "floor". The committed JSON's floors are recomputed with this one.)"""
    weights_bytes, params, kv_per_token = 16.06e9, 8.03e9, 128 * 1024
    own_tokens = tokens / 2 + 2
    read_bytes = weights_bytes + (prefix + batch * own_tokens) * kv_per_token
    flops = 2 * params * batch + 4 * batch * (prefix + own_tokens) * 32 * 4096
    return 1000 * (read_bytes / ceilings["copy_bytes_per_s"] + flops / ceilings["bf16_flops_per_s"])


def _compare(a: dict, b: dict) -> dict:
    ta, tb = a["greedy_tokens"], b["greedy_tokens"]
    agree = sum(x == y for ra, rb in zip(ta, tb) for x, y in zip(ra, rb))
    total = sum(len(r) for r in ta)
    first_diff = [
        next((i for i, (x, y) in enumerate(zip(ra, rb)) if x != y), None) for ra, rb in zip(ta, tb)
    ]
    out = {
        "top1_agreement": round(agree / max(1, total), 4),
        "tokens_compared": total,
        "first_difference_per_branch": first_diff,
    }
    if "greedy_logprobs" in a:
        diffs = [
            abs(x - y)
            for ra, rb, sa, sb in zip(a["greedy_logprobs"], b["greedy_logprobs"], ta, tb)
            for x, y, u, v in zip(ra, rb, sa, sb)
            if u == v
        ]
        out["max_chosen_logprob_diff"] = round(max(diffs), 5) if diffs else None
    return out


def _profile_main(spec: dict, smoke: bool) -> int:
    """One profiled round of the largest fan-out on ChatThaw's engine (see the docstring)."""
    spec = {**spec, "batches": [max(spec["batches"])], "repeats": 1, "profile": True}
    spec["tokens"] = min(spec["tokens"], 64)
    results: dict = {"spec": spec, "errors": {}}
    try:
        got = _run_child(
            ["--child", "thaw", "--spec", json.dumps(spec)],
            {"VLLM_ALLOW_INSECURE_SERIALIZATION": "1"},
            420,
        )
        results["thaw"] = got
    except Exception as exc:  # noqa: BLE001 - recorded
        results["errors"]["thaw"] = f"{type(exc).__name__}: {exc}"[-3000:]
    results["machine"] = machine_info()
    name = "fanout_profile_cpu.json" if smoke else f"fanout_profile_{device_slug()}.json"
    write_results(RESULTS / name, results)
    prof = (results.get("thaw") or {}).get("profile")
    print(json.dumps({k: v for k, v in (prof or {}).items() if k != "top_kernels"}, indent=1))
    for row in (prof or {}).get("top_kernels", [])[:15]:
        print(
            f"{row['ms_per_step']:8.3f} ms/step x{row['calls_per_step']:6.1f} {row['name'][:100]}"
        )
    return 0 if prof else 1


def _blocks_main(spec: dict, block_sizes: list[int], smoke: bool) -> int:
    """ChatThaw's engine at each KV block size: B x T rounds and B x 16 rounds, so each size's
    round splits into a per-step cost and a fixed cost (admission: vLLM hashes, looks up and
    references every prefix block of every branch); greedy tokens compared across sizes."""
    spec = {**spec, "short_tokens": 16}
    results: dict = {"spec": spec, "block_sizes": {}, "errors": {}}
    for size in block_sizes:
        try:
            got = _run_child(
                ["--child", "thaw", "--spec", json.dumps({**spec, "block_size": size})], {}, 420
            )
        except Exception as exc:  # noqa: BLE001 - recorded; the next size still runs
            results["errors"][str(size)] = f"{type(exc).__name__}: {exc}"[-3000:]
            continue
        rows = got["rows"]
        for long, short in zip(rows[::2], rows[1::2]):
            step = (long["wall_s"] - short["wall_s"]) / (long["tokens"] - short["tokens"])
            long["split"] = {
                "ms_per_decode_step": round(step * 1e3, 3),
                "fixed_s": round(short["wall_s"] - short["tokens"] * step, 3),
            }
        results["block_sizes"][str(size)] = got
    sizes = list(results["block_sizes"].values())
    if len(sizes) > 1:
        results["greedy_identical_across_sizes"] = all(
            s["greedy_tokens"] == sizes[0]["greedy_tokens"] for s in sizes[1:]
        )
    for data in sizes:
        data.pop("greedy_tokens", None)
        data.pop("greedy_logprobs", None)
    results["machine"] = machine_info()
    name = "fanout_blocks_cpu.json" if smoke else f"fanout_blocks_{device_slug()}.json"
    write_results(RESULTS / name, results)
    for size, data in results["block_sizes"].items():
        for row in data["rows"]:
            print(f"block {size:>3} B={row['batch']} T={row['tokens']} {row['wall_s']:.3f} s "
                  f"{row.get('split', '')}")  # fmt: skip
    print(json.dumps({k: results.get(k) for k in ("errors", "greedy_identical_across_sizes")}))
    return 0 if not results["errors"] else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny model, small sizes")
    parser.add_argument("--batches", default="4,16,64,256")
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--prefix", type=int, default=8192)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument(
        "--profile", action="store_true", help="ChatThaw's engine, B=256 x 64, under the profiler"
    )
    parser.add_argument(
        "--block-sizes", default=None, help="ChatThaw's engine at each KV block size (16,64)"
    )
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--tiny-child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--spec", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT-JSON " + json.dumps(_child(args.child, json.loads(args.spec))), flush=True)
        return 0
    if args.tiny_child:
        print("RESULT-JSON " + json.dumps(_tiny_child(args.tiny_child, args.spec)), flush=True)
        return 0

    from thaw_agents_core.engine.models import tiny_model_path

    if args.smoke:
        spec = {
            "model": str(tiny_model_path()),
            "load_format": "auto",
            "dtype": "float32",
            "prefix": 512,
            "tokens": 8,
            "batches": [2, 4],
            "repeats": 1,
            "eager": True,
            "gpu_memory_utilization": 0.5,
        }
    else:
        from thaw_agents_core.testing import llama_8b_shaped_path

        spec = {
            "model": str(llama_8b_shaped_path()),
            "load_format": "dummy",
            "dtype": "bfloat16",
            "prefix": args.prefix,
            "tokens": args.tokens,
            "batches": [int(b) for b in args.batches.split(",")],
            "repeats": args.repeats,
            "eager": False,
            "gpu_memory_utilization": 0.85,
        }
    spec["vocab"] = json.loads((Path(spec["model"]) / "config.json").read_text())["vocab_size"]
    if args.profile:
        return _profile_main(spec, args.smoke)
    if args.block_sizes:
        sizes = [int(b) for b in args.block_sizes.split(",")]
        return _blocks_main(spec, sizes, args.smoke)
    ceilings = None if args.smoke else _ceilings()
    results: dict = {"spec": spec, "ceilings": ceilings, "configs": {}, "errors": {}}
    for config, (_, env) in CONFIGS.items():
        try:
            results["configs"][config] = _run_child(
                ["--child", config, "--spec", json.dumps(spec)], env, 420
            )
        except Exception as exc:  # noqa: BLE001 - recorded; the other configurations still run
            results["errors"][config] = f"{type(exc).__name__}: {exc}"[-3000:]
    got = results["configs"]
    if ceilings:
        for data in got.values():
            for row in data["rows"]:
                row["floor_ms_per_step"] = round(
                    _floor_ms(row["batch"], row["tokens"], spec["prefix"], ceilings), 3
                )
                row["vs_floor"] = round(row["ms_per_step"] / row["floor_ms_per_step"], 2)
    if "vllm_default" in got:
        results["correctness_8b"] = {
            c: _compare(got["vllm_default"], got[c]) for c in got if c != "vllm_default"
        }
    if "thaw" in got:  # wall time of each other configuration / thaw's, per B (same run)
        results["thaw_speedup"] = {
            c: {
                str(a["batch"]): round(a["wall_s"] / b["wall_s"], 3)
                for a, b in zip(got[c]["rows"], got["thaw"]["rows"])
            }
            for c in got
            if c != "thaw"
        }
    if not args.smoke:
        try:
            tiny = {
                c: _run_child(["--tiny-child", c, "--spec", str(tiny_model_path())], env, 300)
                for c, (_, env) in CONFIGS.items()
            }
            results["correctness_tiny_fp32"] = {
                c: _compare(tiny["vllm_default"], tiny[c]) for c in tiny if c != "vllm_default"
            }
        except Exception as exc:  # noqa: BLE001
            results["errors"]["tiny"] = f"{type(exc).__name__}: {exc}"[-3000:]
    for data in got.values():  # keep the JSON small
        data.pop("greedy_tokens", None)
        data.pop("greedy_logprobs", None)
    results["machine"] = machine_info()
    name = "fanout_scale_cpu.json" if args.smoke else f"fanout_scale_{device_slug()}.json"
    write_results(RESULTS / name, results)
    print(
        json.dumps(
            {
                k: results.get(k)
                for k in (
                    "thaw_speedup",
                    "errors",
                    "correctness_8b",
                    "correctness_tiny_fp32",
                )
            },
            indent=1,
        )
    )
    for config, data in got.items():
        for row in data["rows"]:
            print(
                f"{config:13s} B={row['batch']:4d} {row['wall_s']:8.3f} s "
                f"{row['ms_per_step']:8.2f} ms/step floor {row.get('floor_ms_per_step')} "
                f"cached>={row['min_cached_prefix_tokens']}"
            )
    return 0 if not results["errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
