"""Bandwidth of flashfx's generated fusion kernels (pointwise, softmax, norms) against eager and torch.compile.

All three providers run in this one process on the same inputs. Bytes are the fewest the op must move (each
input read once, each output written once), so GB/s below the copy ceiling measured here is time lost. Every
flashfx result is checked against a float64 reference first (relative L2 error; bf16 passes under 1e-2).

    python bench/fusion.py                 # CUDA, large sizes, bf16; table on stdout, JSON with --out
    python bench/fusion.py --tiny --device cpu   # smoke test through the Triton interpreter (no meaningful numbers)
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
import time
from typing import Any, Callable, Dict, List, Sequence, Tuple

if "--device" in sys.argv and sys.argv[sys.argv.index("--device") + 1] == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# ----------------------------------------------------------------------------------------------- workloads

def swiglu(g, u):
    return F.silu(g) * u


def bias_gelu(x, y, b):
    return F.gelu(x * y + b, approximate="tanh")


def softmax(x):
    return torch.softmax(x, -1)


def rmsnorm(x, w):
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype) * w


def add_layernorm(x, r, w, b):
    h = x + r
    return F.layer_norm(h, (h.shape[-1],), w, b, 1e-5), h


def rmsnorm_fwd_bwd(x, w, g):
    x = x.detach().requires_grad_()
    w = w.detach().requires_grad_()
    return torch.autograd.grad(rmsnorm(x, w), (x, w), g)


def linear_gelu(x, w, b):
    return F.gelu(F.linear(x, w, b), approximate="tanh")


def swiglu_gate_up(x, wg, wu):
    return F.silu(x @ wg.t()) * (x @ wu.t())


def down_residual(h, w, r):
    return h @ w.t() + r


def matmul_workloads(tiny: bool) -> List[Tuple[str, Callable, List[Tuple[int, ...]], int]]:
    """(name, function, shapes, FLOPs) for the matmul-epilogue rows."""
    T, D, F_ = (96, 64, 160) if tiny else (16384, 4096, 11008)
    return [
        ("linear+bias+gelu(tanh)", linear_gelu, [(T, D), (D, D), (D,)], 2 * T * D * D),
        ("SwiGLU gate/up (dual GEMM)", swiglu_gate_up, [(T, D), (F_, D), (F_, D)], 2 * 2 * T * D * F_),
        ("down proj + residual", down_residual, [(T, F_), (D, F_), (T, D)], 2 * T * F_ * D),
    ]


def workloads(tiny: bool) -> List[Tuple[str, Callable, List[Tuple[Tuple[int, ...], str]]]]:
    """(name, function, [(shape, role)]): role 'w' tensors are per-feature weights."""
    M, N, V = (64, 96, 300) if tiny else (16384, 4096, 32000)
    return [
        ("softmax", softmax, [((M, N), "x")]),
        ("rmsnorm", rmsnorm, [((M, N), "x"), ((N,), "w")]),
        ("add+layernorm", add_layernorm, [((M, N), "x"), ((M, N), "x"), ((N,), "w"), ((N,), "w")]),
        ("swiglu silu(g)*u", swiglu, [((M, 11008 if not tiny else N), "x")] * 2),
        ("bias+gelu(tanh)", bias_gelu, [((M, N), "x"), ((M, N), "x"), ((N,), "w")]),
        ("softmax vocab (looped)", softmax, [((M // 4, V), "x")]),
        ("rmsnorm fwd+bwd", rmsnorm_fwd_bwd, [((M, N), "x"), ((N,), "w"), ((M, N), "x")]),
    ]


# ------------------------------------------------------------------------------------------------- helpers

def nbytes(tensors: Any) -> int:
    flat, _ = torch.utils._pytree.tree_flatten(tensors)
    return sum(t.numel() * t.element_size() for t in flat if isinstance(t, torch.Tensor))


def bench(fn: Callable, device: torch.device) -> Tuple[float, float, float]:
    """(median, p20, p80) milliseconds."""
    if device.type == "cuda":
        import triton

        return tuple(triton.testing.do_bench(fn, warmup=25, rep=100, quantiles=[0.5, 0.2, 0.8]))
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return times[1], times[0], times[-1]


def bench_graph(fn: Callable) -> float:
    """Median milliseconds of `fn` replayed from a CUDA graph: the GPU's time, without the per-call host work of
    Python launchers (a model step under CUDA graphs pays none; without, it overlaps the previous kernels)."""
    import triton

    return triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median")


def rel_error(got: Any, ref: Any) -> float:
    g, _ = torch.utils._pytree.tree_flatten(got)
    r, _ = torch.utils._pytree.tree_flatten(ref)
    worst = 0.0
    for a, b in zip(g, r):
        if a.numel() == 0:
            continue
        a, b = a.double(), b.double()
        err = (a - b).norm() / b.norm().clamp_min(1e-30)
        worst = max(worst, float("nan") if not torch.isfinite(err) else float(err))
    return worst


def copy_ceiling(device: torch.device, tiny: bool) -> float:
    """GB/s of a large device-to-device copy, counting bytes read plus bytes written."""
    n = (1 << 16) if tiny else (1 << 29)  # 1 GiB of bf16
    x = torch.randn(n, device=device, dtype=torch.float32).to(torch.bfloat16)
    y = torch.empty_like(x)
    ms = bench(lambda: y.copy_(x), device)[0]
    return 2 * x.numel() * x.element_size() / (ms * 1e-3) / 1e9


def flashfx_compile(fn: Callable, inputs: Sequence[torch.Tensor], cache_dir: str) -> Tuple[Callable, Any]:
    from torch.fx.experimental.proxy_tensor import make_fx

    from flashfx.config import Config
    from flashfx.passes.fusion import fusion
    from flashfx.rewriter.pass_manager import PassContext

    gm = make_fx(fn, tracing_mode="fake")(*inputs)
    ctx = PassContext(Config(cache_dir=cache_dir, autotune=True), stage="inference")
    gm = fusion(gm, ctx).graph_module
    return gm, ctx


class _Block(torch.nn.Module):
    """Zoo-style pieces around the matmuls, for the fwd+bwd correctness check through AOTAutograd."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(d))
        self.ln = torch.nn.LayerNorm(d)
        self.gate, self.up, self.down = (torch.nn.Linear(d, 2 * d), torch.nn.Linear(d, 2 * d),
                                         torch.nn.Linear(2 * d, d))

    def forward(self, x):
        h = rmsnorm(x, self.w)
        h = self.down(F.silu(self.gate(h)) * self.up(h)) + x
        return torch.softmax(self.ln(h), -1) + F.gelu(h, approximate="tanh")


def check_block(device: torch.device, dtype: torch.dtype, cache_dir: str, tiny: bool = False) -> Dict[str, Any]:
    """Outputs and gradients of `_Block` with fusion in AOTAutograd's fw/bw compilers vs eager (float64 reference)."""
    from torch._functorch.aot_autograd import aot_module_simplified, make_boxed_func

    from flashfx.config import Config
    from flashfx.passes.fusion import fusion
    from flashfx.rewriter.pass_manager import PassContext

    groups = {}

    def compiler(stage):
        def run(gm, example_inputs):
            ctx = PassContext(Config(cache_dir=cache_dir, autotune=False), stage=stage)  # checks numerics only
            gm = fusion(gm, ctx).graph_module
            groups[stage] = ctx.counters.get("fusion.groups", 0)
            return make_boxed_func(gm)
        return run

    torch.manual_seed(0)
    d, lengths = (48, (13, 21)) if tiny else (384, (333, 517))
    block = _Block(d).to(device)
    ref_block = _Block(d).to(device).double()
    ref_block.load_state_dict(block.state_dict())
    block = block.to(dtype)
    compiled = torch.compile(block, backend=lambda gm, ex: aot_module_simplified(
        gm, ex, fw_compiler=compiler("forward"), bw_compiler=compiler("backward")), dynamic=True)
    result: Dict[str, Any] = {"check": f"block fwd+bwd {dtype}"}
    for seq in lengths:  # two lengths, one compile
        x = torch.randn(2, seq, d, device=device)
        g = torch.randn(2, seq, d, device=device)
        xc = x.detach().to(dtype).clone().requires_grad_()
        out = compiled(xc)
        out.backward(g.to(dtype))
        xr = x.detach().double().requires_grad_()
        ref = ref_block(xr)
        ref.backward(g.double())
        errs = [rel_error(out, ref), rel_error(xc.grad, xr.grad)]
        errs += [rel_error(p.grad, q.grad) for p, q in zip(block.parameters(), ref_block.parameters())]
        result[f"seq{seq}_max_rel_err"] = max(errs)
        block.zero_grad()
        ref_block.zero_grad()
    result["groups"] = groups
    return result


def main(argv: Sequence[str] = ()) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--out", default=None, help="folder for fusion.json")
    ap.add_argument("--only", default=None, help="comma-separated workload names (prefix match)")
    args = ap.parse_args(list(argv) or None)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench/fusion.py needs a CUDA GPU (or --device cpu --tiny for a smoke test)", file=sys.stderr)
        return 2
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    import triton

    env = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu (interpreter)",
           "torch": torch.__version__, "triton": triton.__version__,
           "date": datetime.date.today().isoformat(), "dtype": str(dtype)}
    ceiling = copy_ceiling(device, args.tiny)
    env["copy_GBps"] = round(ceiling, 1)
    print(json.dumps(env), flush=True)
    cache_dir = tempfile.mkdtemp(prefix="flashfx-bench-")
    rows: List[Dict[str, Any]] = []
    for name, fn, specs in workloads(args.tiny):
        if args.only and not any(name.startswith(o) for o in args.only.split(",")):
            continue
        torch.manual_seed(0)
        inputs = [torch.randn(shape, device=device, dtype=dtype) for shape, _ in specs]
        row: Dict[str, Any] = {"workload": name, "shapes": [list(s) for s, _ in specs]}
        try:
            t0 = time.perf_counter()
            fused, ctx = flashfx_compile(fn, inputs, cache_dir)
            out = fused(*inputs)  # first call autotunes
            row["flashfx_setup_s"] = round(time.perf_counter() - t0, 1)
            ref = fn(*[t.double() for t in inputs])
            row["flashfx_rel_err"] = rel_error(out, ref)
            row["eager_rel_err"] = rel_error(fn(*inputs), ref)
            row["kernels"] = [k for k, _ in ctx.artifacts.get("kernels", [])]
            moved = nbytes(inputs) + nbytes(out)
            row["bytes"] = moved
            providers = {"eager": fn, "flashfx": fused}
            if device.type == "cuda":
                providers["torch.compile"] = torch.compile(fn)
                providers["torch.compile"](*inputs)
            for pname, f in providers.items():
                ms = bench(lambda: f(*inputs), device)
                row[f"{pname}_ms"] = [round(m, 4) for m in ms]
                row[f"{pname}_GBps"] = round(moved / (ms[0] * 1e-3) / 1e9, 1)
                if device.type == "cuda":
                    try:
                        graph_ms = bench_graph(lambda: f(*inputs))
                        row[f"{pname}_graph_ms"] = round(graph_ms, 4)
                        row[f"{pname}_graph_GBps"] = round(moved / (graph_ms * 1e-3) / 1e9, 1)
                    except Exception as e:  # a provider that cannot be captured keeps its eager-call time only
                        row[f"{pname}_graph_failed"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        except Exception as e:  # one failing workload must not hide the others
            row["failed"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
        rows.append(row)
        print(json.dumps(row), flush=True)
    checks = []
    for dt in ((torch.float32, torch.bfloat16) if device.type == "cuda" else (torch.float32,)):
        try:
            checks.append(check_block(device, dt, cache_dir, args.tiny))
        except Exception as e:
            checks.append({"check": f"block fwd+bwd {dt}", "failed": f"{type(e).__name__}: {str(e)[:500]}"})
        print(json.dumps(checks[-1]), flush=True)
    mm_rows: List[Dict[str, Any]] = []
    if device.type == "cuda":
        a = torch.randn(8192, 8192, device=device, dtype=dtype)
        mm_ms = bench(lambda: a @ a, device)[0]
        env["mm_TFLOPs"] = round(2 * 8192 ** 3 / (mm_ms * 1e-3) / 1e12, 1)
        del a
    for name, fn, shapes, flops in matmul_workloads(args.tiny):
        if args.only and not any(name.startswith(o) for o in args.only.split(",")):
            continue
        torch.manual_seed(0)
        inputs = [torch.randn(s, device=device, dtype=dtype) / (s[-1] ** 0.25) for s in shapes]
        row = {"workload": name, "shapes": [list(s) for s in shapes], "flops": flops}
        try:
            t0 = time.perf_counter()
            fused, ctx = flashfx_compile(fn, inputs, cache_dir)
            out = fused(*inputs)
            row["flashfx_setup_s"] = round(time.perf_counter() - t0, 1)
            ref = fn(*[t.double() for t in inputs])
            row["flashfx_rel_err"] = rel_error(out, ref)
            row["eager_rel_err"] = rel_error(fn(*inputs), ref)
            row["kernels"] = [k for k, _ in ctx.artifacts.get("kernels", [])]
            providers = {"eager": fn, "flashfx": fused}
            if device.type == "cuda":
                providers["torch.compile"] = torch.compile(fn)
                providers["torch.compile"](*inputs)
            for pname, f in providers.items():
                ms = bench(lambda: f(*inputs), device)
                row[f"{pname}_ms"] = [round(m, 4) for m in ms]
                row[f"{pname}_TFLOPs"] = round(flops / (ms[0] * 1e-3) / 1e12, 1)
        except Exception as e:
            row["failed"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
        mm_rows.append(row)
        print(json.dumps(row), flush=True)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "fusion.json"), "w") as f:
            json.dump({"env": env, "checks": checks, "rows": rows, "matmul_rows": mm_rows}, f, indent=1)
    print(f"\n{env['device']}, torch {env['torch']}, Triton {env['triton']}, {env['date']}, {env['dtype']}; "
          f"copy ceiling {ceiling:.0f} GB/s")
    print("GB/s per call (host launch work included) | in a CUDA graph (GPU time); % of copy from the graph time")
    print("| workload | eager GB/s | torch.compile GB/s | flashfx GB/s | flashfx % of copy | flashfx rel err | kernels |")
    print("|---|---|---|---|---|---|---|")

    def both(r: Dict[str, Any], p: str) -> str:
        return f"{r.get(p + '_GBps', '-')} \\| {r.get(p + '_graph_GBps', '-')}"
    for r in rows:
        if "failed" in r:
            print(f"| {r['workload']} | failed: {r['failed']} |")
            continue
        pct = 100 * r.get("flashfx_graph_GBps", r["flashfx_GBps"]) / ceiling
        print(f"| {r['workload']} | {both(r, 'eager')} | {both(r, 'torch.compile')} | {both(r, 'flashfx')} | "
              f"{pct:.0f}% | {r['flashfx_rel_err']:.1e} | {len(r['kernels'])} |")
    print(f"\nmatmul ceiling (bf16 8192^3 torch.mm, same run): {env.get('mm_TFLOPs', '-')} TFLOP/s")
    print("| workload | eager TFLOP/s | torch.compile TFLOP/s | flashfx TFLOP/s | flashfx rel err | kernels |")
    print("|---|---|---|---|---|---|")
    for r in mm_rows:
        if "failed" in r:
            print(f"| {r['workload']} | failed: {r['failed']} |")
            continue
        print(f"| {r['workload']} | {r['eager_TFLOPs']} | {r.get('torch.compile_TFLOPs', '-')} | "
              f"{r['flashfx_TFLOPs']} | {r['flashfx_rel_err']:.1e} | {len(r['kernels'])} |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
