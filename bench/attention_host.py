"""Host time against kernel time for the attention op at short sequences (where a call can be host-bound).

    PYTHONPATH=. python bench/attention_host.py [--prewarm] [--profile] [--split]

For flashfx's attention and SDPA's flash backend (FA2), forward+backward, bf16, B=4, D=128 (and D=64 at S=2048):
TFLOP/s by `triton.testing.do_bench` (which includes host time), the host time to enqueue one call (measured while
the GPU is kept busy, so the host never waits; also with Python's garbage collector off), and for flashfx the sum of
its kernels' device times from torch.profiler.
A call whose host time exceeds its kernel time is host-bound. flashfx runs twice, with its launches bound
(`flashfx.codegen.launch`, the default) and through Triton's own `JITFunction.run` (FLASHFX_FAST_LAUNCH=0); the
two must give bitwise-equal outputs and gradients. `--profile` adds a cProfile of the flashfx call; `--split`
times the host parts of one call apart (forward, backward through the autograd engine, the backward op called
directly, each launcher function alone), with and without bound launches, FA2's forward and backward alongside.
"""
from __future__ import annotations

import argparse
import cProfile
import gc
import io
import os
import pstats
import sys
import time

import torch
import triton
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from attention import make_provider, prewarm_tasks, run_pool  # noqa: E402  (bench/attention.py)
from measure import fast_launch  # noqa: E402

import flashfx.ops  # noqa: E402,F401  (registers torch.ops.flashfx)
from flashfx.codegen import attention as A  # noqa: E402
from flashfx.codegen.attention import attention  # noqa: E402

SHAPES = [(4, 16, 16, 1024, 128), (4, 16, 16, 2048, 128), (4, 16, 4, 2048, 128), (4, 16, 16, 2048, 64)]  # B Hq Hkv S D


def fwd_bwd(fn, q, k, v, dout):
    return torch.autograd.grad(fn(q, k, v), (q, k, v), dout)


def flashfx_attention(causal):
    return lambda q, k, v: attention(q, k, v, is_causal=causal)


def sdpa_flash(causal):
    return make_provider("sdpa_flash", causal, None, gqa=True)


def host_ms(fn, calls=10, collect=True):
    """Time to enqueue one call while a long sleep kernel keeps the GPU busy (the host never waits on it);
    `collect=False` with Python's garbage collector off (does its work show up in the host time?)."""
    torch.cuda._sleep(200_000_000)
    if not collect:
        gc.disable()
    try:
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        elapsed = (time.perf_counter() - start) * 1e3 / calls
    finally:
        gc.enable()
    torch.cuda.synchronize()
    return elapsed


def kernel_ms(fn, calls=5):
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    return sum(e.device_time for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA) / 1e3 / calls


def split(B=4, H=16, S=2048, D=128, causal=True, calls=20):
    """Host microseconds per part of one flashfx call (and FA2's forward / backward), the GPU kept busy."""
    q, k, v = (torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in "qkv")
    dout = torch.randn_like(q)
    qd, kd, vd = q.detach(), k.detach(), v.detach()
    print(f"B{B} H{H} S{S} D{D} causal={causal}: host us per call")
    for name, op, bound in (("flashfx", flashfx_attention(causal), True),
                            ("flashfx, Triton's launch", flashfx_attention(causal), False),
                            ("FA2", sdpa_flash(causal), True)):
        with fast_launch(bound):
            for _ in range(3):
                fwd_bwd(op, q, k, v, dout)
            torch.cuda.synchronize()
            outs = []
            forward_ms = host_ms(lambda: outs.append(op(q, k, v)), calls)  # noqa: B023
            torch.cuda._sleep(200_000_000)
            start = time.perf_counter()
            for out in outs:
                torch.autograd.grad(out, (q, k, v), dout)
            backward_ms = (time.perf_counter() - start) * 1e3 / len(outs)
            torch.cuda.synchronize()
            whole = host_ms(lambda: fwd_bwd(op, q, k, v, dout), calls)  # noqa: B023
            parts = f"forward {forward_ms * 1e3:.0f}, backward (engine) {backward_ms * 1e3:.0f}, both {whole * 1e3:.0f}"
            if name != "FA2":
                out, lse, seed = A.attention_fwd(qd, kd, vd, None, causal, None, 0.0)
                scale = 1.0 / D ** 0.5
                direct = {
                    "attention_bwd op body": lambda: A.attention_bwd(dout, qd, kd, vd, None, out, lse, seed,  # noqa
                                                                     causal, None, 0.0, False),
                    "_launch_backward": lambda: A._launch_backward(dout, qd, kd, vd, None, out, lse, causal,  # noqa
                                                                   scale, 0.0, 0, False),
                    "_launch_forward": lambda: A._launch_forward(qd, kd, vd, None, causal, scale, 0.0, 0),
                }
                for label, fn in direct.items():
                    fn()
                    parts += f", {label} {host_ms(fn, calls) * 1e3:.0f}"
            print(f"  {name}: {parts}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--profile", action="store_true", help="also print a cProfile of the flashfx call")
    ap.add_argument("--split", action="store_true", help="only time the host parts of one call apart")
    ap.add_argument("--prewarm", action="store_true", help="first compile every autotune config of the shapes in "
                    "parallel processes (bench/attention.py's cache warming): a fresh machine autotunes faster")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/attention_host.py needs a CUDA GPU")
    if args.prewarm:
        suites = [(None, B, Hq, Hkv, S, D, causal) for B, Hq, Hkv, S, D in SHAPES for causal in (False, True)]
        run_pool([], prewarm_tasks(suites, lambda causal: [("split", "split")]))
    if args.split:
        for D, causal in ((128, True), (64, False)):
            split(D=D, causal=causal)
        return
    print("| shape | causal | flashfx TFLOP/s | flashfx, Triton's launch | flashfx kernels TFLOP/s | FA2 TFLOP/s "
          "| flashfx host ms | flashfx host ms, Triton's launch | flashfx host ms, gc off | FA2 host ms |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for B, Hq, Hkv, S, D in SHAPES:
        for causal in (False, True):
            q = torch.randn(B, Hq, S, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            k = torch.randn(B, Hkv, S, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            v = torch.randn(B, Hkv, S, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            dout = torch.randn(B, Hq, S, D, device="cuda", dtype=torch.bfloat16)
            gflop = 3.5 * 4 * B * Hq * S * S * D * (0.5 if causal else 1.0) / 1e9
            row, results = {}, {}
            for name, op, bound in (("flashfx", flashfx_attention(causal), True),
                                    ("triton", flashfx_attention(causal), False), ("fa2", sdpa_flash(causal), True)):
                call = lambda: fwd_bwd(op, q, k, v, dout)  # noqa: E731
                with fast_launch(bound):
                    for _ in range(3):
                        call()
                    torch.cuda.synchronize()
                    results[name] = (op(q, k, v), *call())
                    row[name] = (triton.testing.do_bench(call, warmup=25, rep=100), host_ms(call),
                                 host_ms(call, collect=False))
            same = all(torch.equal(a, b) for a, b in zip(results["flashfx"], results["triton"]))
            if not same:
                raise SystemExit(f"B{B} H{Hq}/{Hkv} S{S} D{D} causal={causal}: the bound launch computed something "
                                 "else than Triton's own")
            kernels = kernel_ms(lambda: fwd_bwd(flashfx_attention(causal), q, k, v, dout))
            print(f"| B{B} H{Hq}/{Hkv} S{S} D{D} | {causal} | {gflop / row['flashfx'][0]:.0f} | "
                  f"{gflop / row['triton'][0]:.0f} | {gflop / kernels:.0f} | {gflop / row['fa2'][0]:.0f} | "
                  f"{row['flashfx'][1]:.2f} | {row['triton'][1]:.2f} | {row['flashfx'][2]:.2f} | "
                  f"{row['fa2'][1]:.2f} |", flush=True)
    if args.profile:
        q = torch.randn(4, 16, 1024, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        k, v = (torch.randn_like(q, requires_grad=True) for _ in "kv")
        dout = torch.randn_like(q)
        op = flashfx_attention(True)
        for _ in range(5):
            fwd_bwd(op, q, k, v, dout)
        torch.cuda.synchronize()
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(50):
            fwd_bwd(op, q, k, v, dout)
        prof.disable()
        torch.cuda.synchronize()
        out = io.StringIO()
        pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(18)
        print(out.getvalue())


if __name__ == "__main__":
    main()
