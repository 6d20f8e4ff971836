"""Where the time of one step goes: CUDA kernel time per provider, grouped and ranked (torch.profiler).

    python bench/breakdown.py llama-train --providers compile,flashfx-loss
    python bench/breakdown.py bert-infer --providers sdpa,flashfx --top 30 --json out.json
    python bench/breakdown.py bert-infer --providers flashfx --host 25   # also where the host time goes
    python bench/breakdown.py gpt2-train --providers flashfx-loss --compile-profile 30   # where compile time goes

For each provider: compile and warm up, then profile `--steps` steps and print the wall time per step, the GPU busy
time per step (sum of kernel durations: a wall time well above it means the host, not the GPU, is the bottleneck),
the host time per step (until `step()` returns, from an idle GPU: wall ≈ host means host-bound), the time per
kernel class (matmul, attention, flashfx generated, Inductor generated, other ATen) and the top kernels.
Same process and inputs for every provider, so the rows compare. With `--host N`, the steps also run once more under
cProfile and the N functions with the most host time of their own are printed (a host-bound step shows its cost).
With `--compile-profile N`, the compiling warm-up steps run under cProfile and the N functions with the most
cumulative time are printed (passes, Triton compiles, autotune timing). With `--sync-check`, one more step runs
under `torch.cuda.set_sync_debug_mode("warn")` and the host synchronisations it makes are listed (a sync inside a
step stalls the host while the GPU drains, so the wall time becomes host + GPU instead of the larger of the two).
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import cProfile
import io
import pstats
import json
import os
import re
import sys
import time
from typing import Any, Dict, List, Sequence

if __package__ in (None, ""):  # run as a file: make `bench` importable from the repository root
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from bench import common, measure, providers  # noqa: E402
from bench.run import workloads  # noqa: E402

# Kernel name -> class, first match wins. cuBLAS / CUTLASS / nvjet names vary by version; these cover the H100 ones.
CLASSES = (
    ("flashfx matmul epilogue", re.compile(r"^fused_(mm|mm2|bmm)_", re.I)),  # with or without its matmul
    ("flashfx generated", re.compile(r"^fused_", re.I)),
    ("attention", re.compile(r"attn|flash|fmha|cudnn|_bwd_dkdv|_bwd_dq|_bwd_preprocess", re.I)),
    ("matmul", re.compile(r"gemm|cutlass|nvjet|sm90_xmma|cublas|matmul|_mm_", re.I)),
    ("cross-entropy", re.compile(r"cross_entropy|_ce_", re.I)),
    ("inductor generated", re.compile(r"^triton_", re.I)),
)


def kernel_class(name: str) -> str:
    for label, pattern in CLASSES:
        if pattern.search(name):
            return label
    return "other ATen / copies"


def host_profile(step: Any, steps: int, top: int, orders: Sequence[str] = ("tottime", "cumulative")) -> str:
    """The `top` functions by each of `orders` (own host time, cumulative time) over `steps` steps (cProfile)."""
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(steps):
        step()
    profiler.disable()
    text = io.StringIO()
    for order in orders:
        pstats.Stats(profiler, stream=text).sort_stats(order).print_stats(top)
    return text.getvalue()


def host_syncs(step: Any) -> List[str]:
    """The synchronising CUDA calls one `step()` makes (first line of each warning, with the count per line)."""
    import warnings
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()
    texts = [str(w.message).splitlines()[0] for w in caught]
    # (torch's note that the debug mode is a prototype is not a sync)
    found = collections.Counter(t for t in texts if "synchroniz" in t.lower() and "prototype" not in t)
    return [f"{n} x {text}" for text, n in found.most_common()]


def profile_provider(case: common.Case, name: str, opts: common.Options, steps: int, top: int,
                     host_top: int = 0, compile_top: int = 0, sync_check: bool = False) -> Dict[str, Any]:
    provider = providers.PROVIDERS[name]
    providers.set_attention(case.model, provider.attn)
    case.model.train(case.training)
    context = provider.context() if provider.context else contextlib.nullcontext()
    with context:
        fn = provider.wrap(case.model, case, opts) if provider.wrap else case.model
        t0 = time.perf_counter()
        compile_host = host_profile(lambda: case.step(fn), 1, compile_top, ("cumulative",)) if compile_top else ""
        for _ in range(3 - bool(compile_top)):  # compile, autotune, settle the allocator
            case.step(fn)
        measure.synchronize(opts.device)
        warmup_s = time.perf_counter() - t0
        fell_back = common.fallbacks(fn)  # generated kernels that failed and run their ATen ops: shown with the times
        counters = common._flashfx_counters(fn)
        measure.synchronize(opts.device)
        host_ms = []  # time until step() returns, from an idle GPU: the host's own cost when it never waits
        for _ in range(steps):
            t0 = time.perf_counter()
            case.step(fn)
            host_ms.append((time.perf_counter() - t0) * 1e3)
            measure.synchronize(opts.device)
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            t0 = time.perf_counter()
            for _ in range(steps):
                case.step(fn)
            measure.synchronize(opts.device)
            wall_ms = (time.perf_counter() - t0) * 1e3 / steps
        host = host_profile(lambda: case.step(fn), steps, host_top) if host_top else ""
        syncs = host_syncs(lambda: case.step(fn)) if sync_check else None
        measure.synchronize(opts.device)
        del fn
    per_kernel: Dict[str, float] = collections.defaultdict(float)
    calls: Dict[str, int] = collections.defaultdict(int)
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            per_kernel[event.name] += event.device_time / 1e3 / steps  # ms per step
            calls[event.name] += 1
    busy = sum(per_kernel.values())
    # host-side calls by own CPU time (CUDA runtime calls such as cudaLaunchKernel / cudaMalloc show up here)
    cpu_self: Dict[str, float] = collections.defaultdict(float)
    for avg in prof.key_averages():
        cpu_self[avg.key] += avg.self_cpu_time_total / 1e3 / steps
    cpu_top = sorted(cpu_self.items(), key=lambda kv: -kv[1])[:top]
    by_class: Dict[str, float] = collections.defaultdict(float)
    for kname, ms in per_kernel.items():
        by_class[kernel_class(kname)] += ms
    ranked = sorted(per_kernel.items(), key=lambda kv: -kv[1])[:top]
    case.model.zero_grad(set_to_none=True)
    measure.free_memory(opts.device)
    return {"provider": name, "counters": counters, "fallbacks": fell_back, "wall_ms": wall_ms, "gpu_busy_ms": busy,
            "launches": sum(calls.values()) // steps, "host_profile": host, "warmup_s": warmup_s,
            "host_ms": sorted(host_ms)[len(host_ms) // 2], "cpu_self_top": cpu_top,
            "compile_profile": compile_host, "syncs": syncs,
            "classes": dict(sorted(by_class.items(), key=lambda kv: -kv[1])),
            "top": [{"kernel": k, "ms": ms, "calls": calls[k] // steps, "class": kernel_class(k)} for k, ms in ranked]}


def render(workload: str, results: Sequence[Dict[str, Any]]) -> str:
    lines: List[str] = [f"## {workload}: time per step by kernel class (ms)"]
    classes = list(dict.fromkeys(c for r in results for c in r["classes"]))
    lines.append("| provider | warm-up s | host | wall | GPU busy | launches | " + " | ".join(classes) + " |")
    lines.append("|---" * (6 + len(classes)) + "|")
    for r in results:
        cells = [f"{r['classes'].get(c, 0.0):.2f}" for c in classes]
        lines.append(f"| {r['provider']} | {r['warmup_s']:.1f} | {r['host_ms']:.2f} | {r['wall_ms']:.2f} | "
                     f"{r['gpu_busy_ms']:.2f} | {r['launches']} | " + " | ".join(cells) + " |")
    for r in results:
        lines.append(f"\n### {r['provider']}: top kernels")
        if r["counters"]:
            lines.append(f"flashfx counters: {r['counters']}")
        for message in r["fallbacks"]:
            lines.append(f"FELL BACK: {message}")
        lines.append("| ms/step | calls | class | kernel |")
        lines.append("|---|---|---|---|")
        for k in r["top"]:
            lines.append(f"| {k['ms']:.3f} | {k['calls']} | {k['class']} | `{k['kernel'][:90]}` |")
        lines.append("\nhost: own CPU time per step under the profiler (ms), top calls")
        lines.append("; ".join(f"{name} {ms:.2f}" for name, ms in r["cpu_self_top"]))
        if r.get("syncs") is not None:
            lines.append(f"\nhost synchronisations in one step: {r['syncs'] or 'none'}")
        for key in ("compile_profile", "host_profile"):
            if r.get(key):
                lines.append(f"\n{key.replace('_', ' ')}:\n```\n{r[key].strip()}\n```")
    return "\n".join(lines)


def main(argv: Sequence[str] = None) -> int:
    ap = argparse.ArgumentParser(prog="bench/breakdown.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("workload", help=", ".join(workloads()))
    ap.add_argument("--providers", required=True, help="comma list of providers (see `flashfx bench --list`)")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--top", type=int, default=20)
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--host", type=int, default=0, metavar="N",
                    help="also profile the host (cProfile) and print the N functions with the most own time")
    ap.add_argument("--sync-check", action="store_true",
                    help="list the host synchronisations one step makes (torch.cuda.set_sync_debug_mode)")
    ap.add_argument("--compile-profile", type=int, default=0, metavar="N",
                    help="profile the compiling first step (cProfile) and print the N functions by cumulative time")
    args = ap.parse_args(argv)
    found = workloads()
    if args.workload not in found:
        ap.error(f"unknown workload {args.workload!r}; known: {', '.join(found)}")
    try:
        device = measure.require_device("cuda")
        names = providers.parse_providers(args.providers, ())
    except measure.BenchError as e:
        print(f"bench/breakdown.py: {e}", file=sys.stderr)
        return measure.EXIT_NO_CUDA
    opts = common.Options(device=device)
    case = found[args.workload].build(opts)
    results = []
    for name in providers.order_providers(names):
        try:
            results.append(profile_provider(case, name, opts, args.steps, args.top, args.host,
                                            args.compile_profile, args.sync_check))
        except Exception as exc:  # noqa: BLE001  (one provider failing still leaves the others' profiles)
            print(f"{name}: failed: {measure.one_line(exc)}", file=sys.stderr)
    print(render(args.workload, results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"workload": args.workload, "device": measure.device_name(device),
                       "versions": measure.versions(), "date": measure.today(), "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
