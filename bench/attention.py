"""Attention kernel benchmark: flashfx::attention against SDPA (flash, cuDNN, efficient), compiled flex_attention
and eager math, forward and forward+backward, side by side in one process.

    PYTHONPATH=. python bench/attention.py --out $OUT            # correctness, then the full table
    PYTHONPATH=. python bench/attention.py --check-only          # correctness only

FLOPs: forward 4·B·H·S²·D (halved when causal), forward+backward 3.5x that (FlashAttention's convention).
Times are `triton.testing.do_bench` medians (20/80 quantiles alongside); peak memory is the forward+backward peak
above the inputs. Correctness: flashfx and SDPA (default backend) each against a float64 reference, by
‖x - ref‖ / ‖ref‖, for outputs and every gradient.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

import flashfx.codegen.attention  # noqa: F401  (registers torch.ops.flashfx.attention)

# ------------------------------------------------------------------------------------------------ correctness


def _ref64(q, k, v, bias, causal):
    """float64 attention with GQA, bias / bool mask, causal (top-left); fully masked rows give 0."""
    q, k, v = q.double(), k.double(), v.double()
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if bias is not None:
        s = s.masked_fill(~bias, float("-inf")) if bias.dtype == torch.bool else s + bias.double()
    if causal:
        L, S = s.shape[-2:]
        s = s.masked_fill(~torch.ones(L, S, dtype=torch.bool, device=s.device).tril(), float("-inf"))
    return torch.softmax(s, -1).nan_to_num(0.0) @ v


def _rel(x, ref):
    return ((x.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def check(dtype, case, tol=1e-2):
    B, Hq, Hkv, L, S, D, causal, bias_kind = case
    dev = "cuda"
    q = torch.randn(B, L, Hq, D, device=dev, dtype=dtype).transpose(1, 2).requires_grad_()  # non-contiguous
    k = torch.randn(B, Hkv, S, D, device=dev, dtype=dtype, requires_grad=True)
    v = torch.randn(B, Hkv, S, D, device=dev, dtype=dtype, requires_grad=True)
    bias = None
    if bias_kind == "float":
        bias = torch.randn(1, Hq, L, S, device=dev, dtype=dtype, requires_grad=True)
    elif bias_kind == "bool":
        bias = torch.rand(B, 1, 1, S, device=dev) > 0.2
    wrt = [q, k, v] + ([bias] if bias_kind == "float" else [])
    out = torch.ops.flashfx.attention(q, k, v, bias, causal)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, wrt, dout)
    leaves = [t.detach().double().requires_grad_() for t in wrt]
    ref_bias = leaves[3] if bias_kind == "float" else bias
    ref = _ref64(*leaves[:3], ref_bias, causal)
    ref_grads = torch.autograd.grad(ref, leaves, dout.double())
    errs = {"out": _rel(out, ref)}
    for name, g, rg in zip(["dq", "dk", "dv", "dbias"], grads, ref_grads):
        errs[name] = _rel(g, rg)
    sdpa = None
    try:  # the same inputs through SDPA's default backend, for scale
        mask, sdpa_causal = bias, causal
        if causal and bias is not None:  # SDPA takes a mask or is_causal: fold the causal mask into the mask
            tril = torch.ones(L, S, dtype=torch.bool, device=dev).tril()
            mask = bias & tril if bias.dtype == torch.bool else bias.masked_fill(~tril, float("-inf"))
            sdpa_causal = False
        kr, vr = (t.repeat_interleave(Hq // Hkv, 1) for t in (k, v))
        so = F.scaled_dot_product_attention(q, kr, vr, attn_mask=mask, is_causal=sdpa_causal)
        sdpa = _rel(so, ref)
    except RuntimeError:
        pass
    ok = all(math.isfinite(e) and e < tol for e in errs.values())
    return ok, errs, sdpa


CASES = [  # B, Hq, Hkv, L, S, D, causal, bias
    (2, 8, 8, 1024, 1024, 128, False, None),
    (2, 8, 8, 1000, 1000, 128, True, None),
    (2, 8, 2, 777, 1029, 64, False, None),
    (2, 8, 2, 513, 513, 64, True, None),
    (1, 4, 4, 300, 257, 80, False, "float"),
    (1, 4, 1, 129, 200, 96, True, "bool"),
    (1, 4, 4, 256, 256, 256, True, None),
    (1, 4, 4, 64, 300, 40, False, "float"),
]


def _check_task(task):
    # One default config per kernel: autotuning every (dtype, head dim, mask) combination would compile for minutes.
    os.environ["FLASHFX_ATTENTION_TUNE"] = "0"
    dtype_name, case, variant = task
    os.environ["FLASHFX_ATTENTION_BWD"] = variant
    torch.manual_seed(0)
    try:
        return check(getattr(torch, dtype_name), case)
    except Exception as e:  # report and go on: the timing below is still worth having
        return False, {"error": repr(e)[-400:]}, None


def _pool(n_tasks):
    import multiprocessing

    return multiprocessing.get_context("spawn").Pool(max(1, min(n_tasks, (os.cpu_count() or 2) - 2)))


def _check_dropout():
    """Dropout on the GPU: reproducible with one seed, keep rate near 1 - p (mask read back through v = I)."""
    os.environ["FLASHFX_ATTENTION_TUNE"] = "0"
    q, k = (torch.randn(2, 4, 512, 64, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    v = torch.eye(512, 64, device="cuda", dtype=torch.bfloat16).expand(2, 4, 512, 64)
    torch.manual_seed(1)
    a = torch.ops.flashfx.attention(q, k, v, None, False, None, 0.25)
    torch.manual_seed(1)
    b = torch.ops.flashfx.attention(q, k, v, None, False, None, 0.25)
    p = torch.softmax(q.float() @ k.float().transpose(-1, -2) / 8.0, -1)[..., :64]
    keep = ((a.float() / (p / 0.75)) > 0.5).float().mean().item()
    drop_ok = torch.equal(a, b) and abs(keep - 0.75) < 0.02
    print(("OK  " if drop_ok else "FAIL"), f"dropout: reproducible={torch.equal(a, b)} keep={keep:.3f} (want 0.75)")
    os.environ["FLASHFX_ATTENTION_TUNE"] = "1"
    return drop_ok, {"dropout_keep": keep, "dropout_repro": torch.equal(a, b), "ok": drop_ok}


VARIANTS = [("split", "split"), ("split", "atomic"), ("single", "split"), ("single", "atomic")]  # (loop, bwd)


def _set_variant(loop, bwd):
    os.environ["FLASHFX_ATTENTION_LOOP"] = loop  # read at each launch, so set before each call
    os.environ["FLASHFX_ATTENTION_BWD"] = bwd


def _prewarm_task(task):
    """Compile config `idx` of each kernel (forward and backward, each variant) for one shape family into
    Triton's disk cache."""
    idx, B, Hq, Hkv, S, D, causal, variants = task
    os.environ["FLASHFX_ATTENTION_CONFIG"] = str(idx)
    try:
        q = torch.randn(B, Hq, S, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        k, v = (torch.randn(B, Hkv, S, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in "kv")
        for loop, bwd in variants:
            _set_variant(loop, bwd)
            out = torch.ops.flashfx.attention(q, k, v, None, causal)
            torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
        torch.cuda.synchronize()
        return None
    except Exception as e:  # e.g. a config that does not fit in shared memory: the autotuner skips it too
        return repr(e)[-200:]


def prewarm_tasks(suites, variants_for):
    """Fill Triton's compile cache for every autotune config in parallel processes, so autotuning in this process
    only benchmarks (the specialisation is the same: all sizes here are multiples of 16, GROUP 1 or not)."""
    from flashfx.codegen.attention import _build_kernels

    kern = _build_kernels(False, True, None)
    n = max(len(kern.fwd.configs), len(kern.dkdv.configs), len(kern.dq.configs))
    families = sorted({(1, Hq, Hkv, 1024, D, causal) for _, _, Hq, Hkv, _, D, causal in suites})
    return [(i,) + f + (variants_for(f[-1]),) for f in families for i in range(n)]


def run_pool(check_tasks, warm_tasks):
    """Correctness checks and compile-cache warming side by side in one pool of processes."""
    t0 = time.time()
    with _pool(len(check_tasks) + len(warm_tasks)) as pool:
        checks = pool.map_async(_check_task, check_tasks)
        warm = pool.map_async(_prewarm_task, warm_tasks)
        checks, warm = checks.get(), warm.get()
    errors = [e for e in warm if e]
    print(f"pool: {len(check_tasks)} checks + {len(warm_tasks)} compile tasks in {time.time() - t0:.0f}s; "
          f"{len(errors)} compile tasks failed {errors[:2]}", flush=True)
    return checks


# ------------------------------------------------------------------------------------------------ providers


def _math(q, k, v, causal):
    g = q.shape[1] // k.shape[1]
    if g > 1:
        k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    s = (q @ k.transpose(-1, -2)) * (q.shape[-1] ** -0.5)
    if causal:
        L, S = s.shape[-2:]
        s = s.masked_fill(~torch.ones(L, S, dtype=torch.bool, device=s.device).tril(), float("-inf"))
    return torch.softmax(s.float(), -1).to(q.dtype) @ v


def make_provider(name, causal, S, gqa):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if name.startswith("flashfx"):  # "flashfx:<loop>:<bwd>" or "flashfx" (the variant chosen by the study)
        loop, bwd = name.split(":")[1:] if ":" in name else CHOSEN.get(causal, ("split", "split"))

        def run(q, k, v):
            _set_variant(loop, bwd)
            return torch.ops.flashfx.attention(q, k, v, None, causal)
        return run
    if name.startswith("sdpa_"):
        backend = {"sdpa_flash": SDPBackend.FLASH_ATTENTION, "sdpa_cudnn": SDPBackend.CUDNN_ATTENTION,
                   "sdpa_efficient": SDPBackend.EFFICIENT_ATTENTION}[name]

        def run(q, k, v):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa)
        return run
    if name == "flex":
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        compiled = torch.compile(flex_attention, dynamic=False)
        block_mask = (create_block_mask(lambda b, h, qi, ki: qi >= ki, None, None, S, S, device="cuda")
                      if causal else None)
        return lambda q, k, v: compiled(q, k, v, block_mask=block_mask, enable_gqa=gqa)
    if name == "math":
        return lambda q, k, v: _math(q, k, v, causal)
    raise ValueError(name)


def bench_one(fn, B, Hq, Hkv, S, D, causal, dtype):
    from triton.testing import do_bench

    q = torch.randn(B, Hq, S, D, device="cuda", dtype=dtype, requires_grad=True)
    k = torch.randn(B, Hkv, S, D, device="cuda", dtype=dtype, requires_grad=True)
    v = torch.randn(B, Hkv, S, D, device="cuda", dtype=dtype, requires_grad=True)
    dout = torch.randn(B, Hq, S, D, device="cuda", dtype=dtype)
    flops = 4 * B * Hq * S * S * D / (2 if causal else 1)
    res = {}
    with torch.no_grad():
        fn(q, k, v)  # compile / autotune outside the timing
        t = do_bench(lambda: fn(q, k, v), quantiles=[0.5, 0.2, 0.8], warmup=25, rep=100)
    res["fwd_ms"] = t
    res["fwd_tflops"] = flops / (t[0] * 1e-3) / 1e12

    def fwd_bwd():
        return torch.autograd.grad(fn(q, k, v), (q, k, v), dout)

    fwd_bwd()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fwd_bwd()
    torch.cuda.synchronize()
    res["peak_gb"] = (torch.cuda.max_memory_allocated() - base) / 1e9
    t = do_bench(fwd_bwd, quantiles=[0.5, 0.2, 0.8], warmup=25, rep=100)
    res["fwdbwd_ms"] = t
    res["fwdbwd_tflops"] = 3.5 * flops / (t[0] * 1e-3) / 1e12
    return res


CHOSEN = {}  # causal -> (loop, bwd), from the variant study


def run_suites(suites, providers, args, results):
    for label, B, Hq, Hkv, S, D, causal in suites:
        for name in providers:
            if name == "math" and S > args.math_max_seq:
                continue
            if name == "flex" and S not in args.flex_seqs:
                continue
            t0 = time.time()
            try:
                fn = make_provider(name, causal, S, Hq != Hkv)
                r = bench_one(fn, B, Hq, Hkv, S, D, causal, torch.bfloat16)
            except Exception as e:  # a provider that cannot run this shape (e.g. OOM, unsupported) is reported
                r = {"error": repr(e)[:200]}
            torch.cuda.empty_cache()
            if name == "flashfx":
                r["variant"] = ":".join(CHOSEN.get(causal, ("split", "split")))
            r.update(suite=label, B=B, Hq=Hq, Hkv=Hkv, S=S, D=D, causal=causal, provider=name,
                     seconds=round(time.time() - t0, 1))
            results.append(r)
            with open(os.path.join(args.out, "attention_partial.json"), "w") as f:
                json.dump(results, f, default=str)  # what a run cut short by its time limit still returns
            if "error" in r:
                print(f"{label} S={S} causal={causal} {name}: {r['error']}", flush=True)
            else:
                print(f"{label} S={S} causal={int(causal)} {name:20s} fwd {r['fwd_tflops']:6.1f} "
                      f"fwd+bwd {r['fwdbwd_tflops']:6.1f} TFLOP/s  peak {r['peak_gb']:.2f} GB  ({r['seconds']}s)",
                      flush=True)


def main_suites(args):
    suites = []
    for S in args.seqs:
        for causal in (False, True):
            suites.append(("D128", 4, 16, 16, S, 128, causal))
    for S in args.extra_seqs:
        for causal in (False, True):
            suites.append(("D64", 4, 16, 16, S, 64, causal))
            suites.append(("GQA32/8", 4, 32, 8, S, 128, causal))
    return suites


def autotune_choices():
    """The config each autotuned kernel picked, per autotune key."""
    from flashfx.codegen.attention import _build_kernels

    kern = _build_kernels(False, True, None)  # the same lru_cache key as the launcher's call
    out = {}
    for name in ("fwd", "dkdv", "dkdv_atomic", "dq"):
        tuner = getattr(kern, name)
        out[name] = {str(key): str(cfg) for key, cfg in tuner.cache.items()}
    return out


def markdown(results, providers):
    head = "| shape | S | causal | " + " | ".join(providers) + " |"
    lines = [head, "|" + "---|" * (3 + len(providers))]
    keys = []
    for r in results:
        key = (r["suite"], r["S"], r["causal"])
        if key not in keys:
            keys.append(key)
    for key in keys:
        cells = []
        for p in providers:
            r = next((r for r in results if (r["suite"], r["S"], r["causal"]) == key and r["provider"] == p), None)
            if r is None:
                cells.append("—")
            elif "error" in r:
                cells.append("n/a")
            else:
                cells.append(f"{r['fwd_tflops']:.0f} / {r['fwdbwd_tflops']:.0f} ({r['peak_gb']:.1f} GB)")
        lines.append(f"| {key[0]} | {key[1]} | {'yes' if key[2] else 'no'} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


REPO_IMG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "img")


def plot(results, path):
    """TFLOP/s against S (D=128, H=16), forward and forward+backward, causal and not: one line per provider."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no attention plot", flush=True)
        return
    rows = [r for r in results if r.get("suite") == "D128" and "error" not in r and "fwd_tflops" in r]
    fig, axes = plt.subplots(1, 4, figsize=(17, 3.8), sharey=True)
    panels = [(c, m) for c in (False, True) for m in ("fwd_tflops", "fwdbwd_tflops")]
    for ax, (causal, metric) in zip(axes, panels):
        for provider in dict.fromkeys(r["provider"] for r in rows):
            pts = sorted((r["S"], r[metric]) for r in rows if r["provider"] == provider and r["causal"] == causal)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=provider, linewidth=2.5 if provider == "flashfx" else 1.2)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequence length S")
        ax.set_title(f"{'causal' if causal else 'non-causal'}, {'forward' if metric == 'fwd_tflops' else 'fwd+bwd'}")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("TFLOP/s (bf16, B=4, H=16, D=128)")
    axes[-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--check-only", action="store_true")
    ap.add_argument("--plot", metavar="JSON", help="only redraw docs/img/attention_tflops.png from a saved "
                                                   "attention.json (or bench/results/attention-*.json)")
    ap.add_argument("--skip-check", action="store_true")
    ap.add_argument("--providers", default="flashfx,sdpa_flash,sdpa_cudnn,sdpa_efficient,flex,math")
    ap.add_argument("--study-seq", type=int, default=8192,
                    help="S of the loop/backward variant study, whose winners the table then runs; 0 skips the "
                         "study and the table runs the library's defaults")
    ap.add_argument("--seqs", type=lambda s: [int(x) for x in s.split(",") if x],
                    default=[1024, 2048, 4096, 8192, 16384])
    ap.add_argument("--extra-seqs", type=lambda s: [int(x) for x in s.split(",") if x], default=[2048, 8192])
    ap.add_argument("--flex-seqs", type=lambda s: [int(x) for x in s.split(",") if x], default=[1024, 4096, 8192])
    ap.add_argument("--math-max-seq", type=int, default=4096)
    args = ap.parse_args()
    if args.plot:  # no GPU needed
        with open(args.plot) as f:
            plot(json.load(f)["results"], os.path.join(REPO_IMG, "attention_tflops.png"))
        return 0
    torch._dynamo.config.recompile_limit = 64  # flex_attention compiles once per shape and grad mode
    import triton

    env = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "date": datetime.date.today().isoformat()}
    print(env, flush=True)
    report = {"env": env}
    t_start = time.time()
    check_tasks = [] if args.skip_check else [
        (d, c, "split") for d in ("bfloat16", "float16") for c in (CASES if d == "bfloat16" else CASES[:3])
    ] + [("bfloat16", c, "atomic") for c in CASES[:4]]
    study = [] if args.check_only or not args.study_seq else [("D128", 4, 16, 16, args.study_seq, 128, c)
                                                              for c in (False, True)]
    checks = run_pool(check_tasks, prewarm_tasks(study, lambda causal: VARIANTS) if study else [])
    if check_tasks:
        rows, all_ok = [], True
        for (dtype, case, variant), (ok, errs, sdpa) in zip(check_tasks, checks):
            all_ok &= ok
            rows.append({"dtype": dtype, "case": case, "bwd": variant, "ok": ok, "errors": errs, "sdpa": sdpa})
            print(("OK  " if ok else "FAIL"), dtype, variant, case,
                  {k: (f"{v:.1e}" if isinstance(v, float) else v) for k, v in errs.items()},
                  f"sdpa={sdpa:.1e}" if sdpa is not None else "", flush=True)
        try:
            drop_ok, row = _check_dropout()
        except Exception as e:
            drop_ok, row = False, {"error": repr(e)[-400:]}
        print("OK  " if drop_ok else "FAIL", "dropout", row, flush=True)
        rows.append(row)
        report["checks"] = rows
        print(f"correctness: {'all OK' if all_ok and drop_ok else 'FAILURES'}", flush=True)
    if not args.check_only:
        # 1. the variant study: every (loop, backward) variant of flashfx at one size, causal and not
        study_results = []
        run_suites(study, [f"flashfx:{lp}:{bw}" for lp, bw in VARIANTS], args, study_results)
        for causal in (False, True):
            ok = [r for r in study_results if r["causal"] == causal and "error" not in r]
            if ok:
                best = max(ok, key=lambda r: r["fwdbwd_tflops"])
                CHOSEN[causal] = tuple(best["provider"].split(":")[1:])
        print("chosen variants (causal -> loop, bwd):", CHOSEN, flush=True)
        report["study"] = study_results
        report["chosen"] = {str(k): v for k, v in CHOSEN.items()}
        # 2. the table: the chosen variant against the peers
        suites = main_suites(args)
        extra = [s_ for s_ in suites if s_[0] != "D128" or not study]  # the study compiled D128's kernels
        if extra:
            run_pool([], prewarm_tasks(extra, lambda causal: [CHOSEN.get(causal, ("split", "split"))]))
        results = []
        providers = args.providers.split(",")
        run_suites(suites, providers, args, results)
        report["results"] = results
        report["autotuned"] = autotune_choices()
        table = markdown(results, providers)
        print("\nTFLOP/s fwd / fwd+bwd (fwd+bwd peak memory above inputs), bf16, B=4\n" + table)
        with open(os.path.join(args.out, "attention.md"), "w") as f:
            f.write(table + "\n")
        for name, picks in report["autotuned"].items():
            print(name, picks)
    print(f"total {time.time() - t_start:.0f}s")
    with open(os.path.join(args.out, "attention.json"), "w") as f:
        json.dump(report, f, indent=1, default=str)
    if report.get("results"):
        plot(report["results"], os.path.join(args.out, "attention_tflops.png"))


if __name__ == "__main__":
    sys.exit(main())
