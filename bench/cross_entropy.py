"""Fused linear + cross-entropy benchmark: flashfx::linear_cross_entropy against eager
`F.cross_entropy(F.linear(h, W).float(), y)`, torch.compile of the same, Liger-Kernel's fused linear cross-entropy
and the flashfx pass (Dynamo -> canonicalize -> cross_entropy pass -> AOTAutograd), forward + backward, side by side.

    PYTHONPATH=. python bench/cross_entropy.py --out $OUT                     # the ANCHORS Llama head
    PYTHONPATH=. python bench/cross_entropy.py --tokens 2048 --vocab 32000     # another shape

Workload: h [T, H] bf16 (T = 8192 = 4 x 2048 tokens), W [V, H] bf16 (V = 128256, H = 2048), no bias, the last token
of each 2048-token sequence ignored (-100), reduction "mean"; one step = loss, then d loss / d (h, W).
FLOPs: the three products of 2·T·V·H each (logits, dh, dW) = 12.9 TFLOP at the anchor shape; a provider that
recomputes the logits in the backward does 4. Times are medians of CUDA-event timings (20/80 percentiles
alongside); peak = torch.cuda.max_memory_allocated during one step minus the bytes allocated before it (inputs and
weights), so it counts the step's own buffers and the gradients it returns. Correctness: loss, dh and dW of each
provider against an fp32 reference (bf16-rounded inputs, fp32 matmuls), as max|x - ref| / max|ref|.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from measure import (device_name, max_rel_error, measure_ceilings, one_line, summarize, time_ms, today,  # noqa: E402
                     versions)

from flashfx.codegen import cross_entropy as ce  # noqa: E402


def make_inputs(T, H, V, seq, device, seed=0):
    gen = torch.Generator(device=device).manual_seed(seed)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # the CPU interpreter gets bf16 wrong
    h = torch.randn(T, H, device=device, generator=gen).to(dtype).requires_grad_()
    w = (torch.randn(V, H, device=device, generator=gen) * 0.02).to(dtype).requires_grad_()
    y = torch.randint(0, V, (T,), device=device, generator=gen)
    y[seq - 1::seq] = -100  # the Hugging Face label shift leaves the last position of each sequence unlabelled
    return h, w, y


def eager_loss(h, w, y):
    return F.cross_entropy(F.linear(h, w).float(), y, ignore_index=-100)


def step(loss_fn, h, w, y):
    loss = loss_fn(h, w, y)
    dh, dw = torch.autograd.grad(loss, [h, w])
    return loss.detach(), dh, dw


def reference(h, w, y):
    """fp32 loss and gradients from the bf16 inputs (fp32 matmuls: no TF32)."""
    hf, wf = h.detach().float().requires_grad_(), w.detach().float().requires_grad_()
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        loss = F.cross_entropy(hf @ wf.T, y, ignore_index=-100)
        dh, dw = torch.autograd.grad(loss, [hf, wf])
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev
    return loss.detach(), dh, dw


def liger_loss():
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    fn = LigerFusedLinearCrossEntropyLoss(ignore_index=-100, reduction="mean")
    return lambda h, w, y: fn(w, h, y)


DEFAULTS = (ce.CHUNK_BYTES, ce.WGRAD_FP32)  # restored after each provider


def flashfx_loss(chunk_bytes=None, recompute=False, wgrad_fp32=False):
    def loss(h, w, y):
        ce.WGRAD_FP32 = wgrad_fp32
        if chunk_bytes is not None:
            ce.CHUNK_BYTES = chunk_bytes
        if recompute:  # reduction "none": the backward recomputes the logits (one more matmul)
            return ce.linear_cross_entropy(h, w, None, y, reduction="none").sum() / (y != -100).sum()
        return ce.linear_cross_entropy(h, w, None, y)
    return loss


def pass_loss():
    """The rewrite as the compiler does it: Dynamo graph -> canonicalize -> cross_entropy pass -> AOTAutograd."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    from flashfx.config import Config
    from flashfx.passes.cross_entropy import cross_entropy
    from flashfx.rewriter.canonicalize import canonicalize
    from flashfx.rewriter.capture import attach_metadata
    from flashfx.rewriter.pass_manager import PassContext

    counters = {}

    def backend(gm, example_inputs):
        attach_metadata(gm)
        ctx = PassContext(Config())
        gm = canonicalize(gm, ctx).graph_module
        gm = cross_entropy(gm, ctx).graph_module
        counters.update(ctx.counters)
        return aot_autograd(fw_compiler=lambda g, _: make_boxed_func(g.forward))(gm, example_inputs)

    fn = torch.compile(eager_loss, backend=backend, dynamic=False)
    fn.counters = counters
    return fn


PROVIDERS = {
    "eager": ("eager F.cross_entropy(F.linear(h, W).float(), y)", lambda: eager_loss),
    "torch.compile": ("torch.compile of the same (default mode)", lambda: torch.compile(eager_loss, dynamic=False)),
    "liger": ("Liger-Kernel LigerFusedLinearCrossEntropyLoss (its defaults: bf16 dW accumulation)", liger_loss),
    "flashfx": ("flashfx.linear_cross_entropy, chunk buffer 1 GiB, dW in bf16 (defaults)",
                lambda: flashfx_loss()),
    "flashfx-64M": ("flashfx, chunk buffer 64 MiB", lambda: flashfx_loss(64 << 20)),
    "flashfx-256M": ("flashfx, chunk buffer 256 MiB (the default until 2026-12-03)", lambda: flashfx_loss(256 << 20)),
    "flashfx-fp32acc": ("flashfx, dW accumulated in fp32 across chunks (WGRAD_FP32 = True)",
                        lambda: flashfx_loss(wgrad_fp32=True)),
    "flashfx-recompute": ("flashfx, gradients in the backward (reduction='none' path: +1 matmul)",
                          lambda: flashfx_loss(recompute=True)),
    "flashfx-pass": ("Dynamo graph rewritten by the cross_entropy pass, then AOTAutograd (eager kernels)", pass_loss),
}


def run(args):
    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    T, H, V = args.tokens, args.hidden, args.vocab
    meta = {"device": device_name(dev), "date": today(), **versions(), "tokens": T, "hidden": H, "vocab": V}
    meta["ceilings"] = measure_ceilings(dev, quick=True)  # NaN off CUDA
    print(json.dumps(meta), flush=True)
    h, w, y = make_inputs(T, H, V, args.seq, dev)
    ref = reference(h, w, y)
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    flops = 3 * 2 * T * V * H
    rows = []
    for name in args.providers.split(","):
        what, make = PROVIDERS[name]
        row = {"provider": name, "what": what}
        try:
            fn = make()
            out = step(fn, h, w, y)  # warm-up / compile
            row["err_loss"], row["err_dh"], row["err_dw"] = (max_rel_error(o, r) for o, r in zip(out, ref))
            row["loss"] = out[0].item()
            del out
            if hasattr(fn, "counters"):
                row["counters"] = dict(fn.counters)
            gc.collect()
            row["peak_gb"] = float("nan")
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
                base = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
                out = step(fn, h, w, y)
                torch.cuda.synchronize()
                row["peak_gb"] = (torch.cuda.max_memory_allocated() - base) / 1e9
                del out
            t = summarize(time_ms(lambda: step(fn, h, w, y), dev, warmup=2, repeat=args.repeat))
            row.update(ms=t["ms"], q20=t["ms_p20"], q80=t["ms_p80"], tflops=flops / (t["ms"] / 1e3) / 1e12)
        except Exception as e:  # noqa: BLE001  (one failing provider must not end the table)
            row["failed"] = one_line(e)
        ce.CHUNK_BYTES, ce.WGRAD_FP32 = DEFAULTS
        rows.append(row)
        print(json.dumps(row), flush=True)
        torch._dynamo.reset()
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    meta["addmm_out_dtype_fp32"] = ce._ADDMM_OUT_DTYPE  # False: the 16-bit product + fp32 add fallback ran
    if args.out:
        with open(os.path.join(args.out, "cross_entropy.json"), "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
    print(table(meta, rows))


def table(meta, rows):
    lines = [f"T={meta['tokens']} H={meta['hidden']} V={meta['vocab']} bf16, {meta['device']}, torch {meta['torch']}, "
             f"triton {meta['triton']}, liger {meta['liger_kernel']}, {meta['date']}",
             "| provider | fwd+bwd ms (q20–q80) | TFLOP/s (3 matmuls) | peak GB above inputs | err loss / dh / dW |",
             "|---|---|---|---|---|"]
    for r in rows:
        if "failed" in r:
            lines.append(f"| {r['provider']} | failed: {r['failed']} | | | |")
            continue
        lines.append(f"| {r['provider']} | {r['ms']:.2f} ({r['q20']:.2f}–{r['q80']:.2f}) | {r['tflops']:.0f} | "
                     f"{r['peak_gb']:.2f} | {r['err_loss']:.1e} / {r['err_dh']:.1e} / {r['err_dw']:.1e} |")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--seq", type=int, default=2048, help="sequence length (the last position of each is ignored)")
    p.add_argument("--repeat", type=int, default=10)
    p.add_argument("--providers", default=",".join(PROVIDERS))
    p.add_argument("--out", default=None)
    p.add_argument("--device", default="cuda", help="cpu: a smoke test of the script (Triton interpreter), no numbers")
    args = p.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("bench/cross_entropy.py needs a CUDA GPU (or --device cpu for a smoke test)")
    run(args)


if __name__ == "__main__":
    main()
