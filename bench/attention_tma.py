"""On an H100 / H200: an attention forward variant (FLASHFX_ATTENTION_FWD=tma, the tensor-descriptor kernel, or
=persistent, the pointer kernel on a persistent grid) against the pointer kernel (=pointer), bf16, B=4, D=128,
S=1024..8192, causal and not, H=16 and GQA 32/8, in one process.

    PYTHONPATH=. python bench/attention_tma.py          # autotuned (both kernels): ~2-3 min with a cold cache
    PYTHONPATH=. python bench/attention_tma.py --quick  # FLASHFX_ATTENTION_TUNE=0: one default config each
    PYTHONPATH=. python bench/attention_tma.py --ws     # also warp-specialized configs (FLASHFX_ATTENTION_WS=1)
    PYTHONPATH=. python bench/attention_tma.py --variant persistent   # the persistent grid instead of TMA

(1) correctness: the variant vs pointer over the whole output (rel = |a - b| / |b|), and both against an fp32 math
reference on batch 0, query heads 0-1 (an fp32 [2, S, S] score matrix); (2) speed: triton.testing.do_bench median
of the forward op, TFLOP/s = 4·B·H·S²·D (halved when causal) / time. Adds no row after ~210 s: ends within 4 min.
"""
import argparse
import math
import os
import sys
import time

import torch
import triton
from triton.testing import do_bench

if __package__ in (None, ""):  # run as a file: make `flashfx` importable from the repository root
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flashfx.codegen.attention as A  # noqa: E402
from bench.measure import EXIT_NO_CUDA, environment_restored  # noqa: E402
from flashfx.codegen import attention_tma  # noqa: E402


def fwd(variant, q, k, v, causal):
    os.environ["FLASHFX_ATTENTION_FWD"] = variant
    with torch.no_grad():
        out, lse, _ = torch.ops.flashfx.attention_fwd(q, k, v, None, causal, None, 0.0)
    return out, lse


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def ref32(q, k, v, causal, heads=2):
    """fp32 math (out, lse) for batch 0, query heads [0, heads)."""
    g = q.shape[1] // k.shape[1]
    qs = q[0, :heads].float()
    ks = k[0, [h // g for h in range(heads)]].float()
    vs = v[0, [h // g for h in range(heads)]].float()
    s = qs @ ks.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if causal:
        L, S = s.shape[-2:]
        s = s.masked_fill(~torch.ones(L, S, dtype=torch.bool, device=s.device).tril(), float("-inf"))
    lse = torch.logsumexp(s, -1)
    return torch.softmax(s, -1) @ vs, lse


def make(B, Hq, Hkv, S, D):
    # [B, S, H, D] transposed to [B, H, S, D]: the layout a model's projections give
    q = torch.randn(B, S, Hq, D, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
    k = torch.randn(B, S, Hkv, D, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
    v = torch.randn(B, S, Hkv, D, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
    return q, k, v


KNOBS = ("FLASHFX_ATTENTION_FWD", "FLASHFX_ATTENTION_TUNE", "FLASHFX_ATTENTION_WS")


def main(argv=None) -> int:
    """The A/B; the attention knobs it sets are put back as they were when it returns."""
    with environment_restored(KNOBS):
        return _run(argv)


def _run(argv) -> int:
    ap = argparse.ArgumentParser(prog="bench/attention_tma.py", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one default config per kernel (no autotuning)")
    ap.add_argument("--ws", action="store_true", help="also the warp-specialized configs (tma)")
    ap.add_argument("--variant", choices=("tma", "persistent"), default="tma", help="the forward set against pointer")
    ap.add_argument("--budget-s", type=float, default=210.0, help="add no shape after this many seconds")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench/attention_tma.py needs a CUDA GPU (its variants are for Hopper and later)",
              file=sys.stderr)
        return EXIT_NO_CUDA
    if args.quick:
        os.environ["FLASHFX_ATTENTION_TUNE"] = "0"
    if args.ws:
        os.environ["FLASHFX_ATTENTION_WS"] = "1"
    start = time.time()
    print(f"{torch.cuda.get_device_name()} cc={torch.cuda.get_device_capability()} torch {torch.__version__} "
          f"triton {triton.__version__} tune={not args.quick} ws={args.ws} variant={args.variant}", flush=True)
    var = args.variant
    rows, failures = [], 0
    print(f"{'shape':>24} {'causal':>6} | {'out var~ptr':>11} {'lse var~ptr':>11} {'ref: var':>9} {'ptr':>9} | "
          f"{'ptr TF/s':>8} {'var TF/s':>8} {'var/ptr':>7} | {'s':>5}", flush=True)
    for Hq, Hkv in ((16, 16), (32, 8)):
        for S in (1024, 2048, 4096, 8192):
            for causal in (False, True):
                if time.time() - start > args.budget_s:
                    print(f"budget of {args.budget_s:.0f} s spent: skipping Hq={Hq} S={S} causal={causal}", flush=True)
                    continue
                B, D = 4, 128
                torch.manual_seed(0)
                q, k, v = make(B, Hq, Hkv, S, D)
                before = dict(A.FORWARD_LAUNCHES)
                o_t, l_t = fwd(var, q, k, v, causal)
                assert A.FORWARD_LAUNCHES[var] == before.get(var, 0) + 1, f"the {var} forward did not run"
                o_p, l_p = fwd("pointer", q, k, v, causal)
                r_o, r_l = ref32(q, k, v, causal)
                e_out, e_lse = rel(o_t, o_p), rel(l_t, l_p)
                e_rt, e_rp = rel(o_t[0, :2], r_o), rel(o_p[0, :2], r_o)
                e_lr = rel(l_t[0, :2], r_l)
                ok = e_out < 1e-2 and e_lse < 1e-4 and e_rt < 1e-2 and e_lr < 1e-4 and e_rt < 2 * e_rp + 1e-3
                failures += not ok
                del r_o, r_l
                flops = 4 * B * Hq * S * S * D / (2 if causal else 1)
                t_p = do_bench(lambda: fwd("pointer", q, k, v, causal))
                t_t = do_bench(lambda: fwd(var, q, k, v, causal))
                tf_p, tf_t = flops / t_p / 1e9, flops / t_t / 1e9
                print(f"{f'B{B} H{Hq}/{Hkv} S{S} D{D}':>24} {str(causal):>6} | {e_out:11.2e} {e_lse:11.2e} {e_rt:9.2e} "
                      f"{e_rp:9.2e} | {tf_p:8.1f} {tf_t:8.1f} {tf_t / tf_p:7.3f} | {time.time() - start:5.0f}"
                      f"{'' if ok else '  <-- MISMATCH'}", flush=True)
                rows.append((Hq, Hkv, S, causal, tf_p, tf_t))
                del q, k, v, o_t, o_p, l_t, l_p
                torch.cuda.empty_cache()

    # the configs the autotuners chose, per (kernel, key)
    names = {id(A._kernels(False).fwd): "pointer"}
    tune, only = A._tune_knobs()
    for ws in (False, True):
        names[id(attention_tma.autotuned(128, 2, tune, only, ws))] = "tma" + ("+ws" if ws else "")
    print("chosen configs:")
    for key, (cfg, _) in A._CHOSEN.items():
        if key[0] in names:
            print(f"  {names[key[0]]:>7} {key[1:]} -> {cfg}")
    if rows:
        for causal in (False, True):
            sel = [r for r in rows if r[3] == causal]
            if sel:
                gm = math.exp(sum(math.log(r[5] / r[4]) for r in sel) / len(sel))
                print(f"causal={causal}: {var}/pointer geometric mean {gm:.3f} over {len(sel)} shapes")
    print(f"{'ALL OK' if failures == 0 else f'{failures} MISMATCHES'} in {time.time() - start:.0f} s", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
