"""`flashfx::attention`: exact attention that never writes the L x S score matrix to memory.

    torch.ops.flashfx.attention(q, k, v, bias=None, is_causal=False, scale=None, dropout_p=0.0) -> Tensor

q: [B, Hq, L, D]; k, v: [B, Hkv, S, D] with Hq % Hkv == 0 (query head h reads kv head h // (Hq // Hkv)).
bias: None, a float tensor added to the scores (-inf allowed), or a bool tensor (True = attend, as in SDPA),
broadcastable to [B, Hq, L, S]; broadcast dimensions are read with stride 0, never expanded in memory.
is_causal: query i sees keys j <= i (top-left aligned, as SDPA). scale: default 1/sqrt(D).
dropout_p: dropout on the probabilities; the op draws its seed from torch's default generator at each call.
Rows whose every key is masked output 0 (not NaN), and their gradients are 0. A float bias value below -1e38 (the
`torch.finfo(float32 / bfloat16).min` masks Hugging Face builds) counts as -inf: a query row masked that way
everywhere outputs 0, where eager softmax would average V over the "masked" keys.

How it is built, so that it passes through Dynamo and AOTAutograd as single nodes:
- `flashfx::attention` is CompositeImplicitAutograd: Dynamo records it as one node of the torch-level graph;
  AOTAutograd decomposes it into `flashfx::attention_fwd` (returns out, log-sum-exp, dropout seed) in the forward
  graph and `flashfx::attention_bwd` in the backward graph, so the backward gets the saved LSE and seed.
- `attention_fwd` / `attention_bwd` are `torch.library` ops with fake implementations (symbolic sizes) and the
  autograd formula registered on `attention_fwd`.
- Where `flashfx._compat.triton_runs_on(device)` is False they run an ATen reference (fp32 math); otherwise the
  Triton kernels of `flashfx.codegen.attention_kernels` (on CPU through the interpreter; bf16 on CPU takes the
  reference, the interpreter gets bf16 wrong).

Environment knobs (read at each launch): FLASHFX_ATTENTION_TUNE=0 (one default config, no autotuning),
FLASHFX_ATTENTION_BWD=split|atomic, FLASHFX_ATTENTION_LOOP=split|single (kernel variants; see the kernels file),
FLASHFX_ATTENTION_FWD=pointer|tma|auto|persistent (tensor descriptors, `attention_tma`; a persistent grid; see
`_forward_variant`), FLASHFX_ATTENTION_WS=0|1 (also autotune warp-specialized configs of that kernel on sm_90+).
FLASHFX_FAST_LAUNCH=0 launches every kernel through Triton's `JITFunction.run` (default: the compiled launcher once
bound, `flashfx.codegen.launch`). Plain tensors outside tracing take `_EagerAttention` (fewer Python layers per call);
repeated calls without bias or dropout launch from a plan of bound kernels per call shape (`_PLANS`).
Limits: head dim <= 256 on the kernel path; dropout needs L * S < 2**31; a float bias that needs a gradient
materialises an fp32 [B, Hq, L, S] dS buffer (reduced to the bias's shape).
"""
from __future__ import annotations

import collections
import contextlib
import functools
import math
import os
import types
from typing import Any, List, Optional, Tuple

import torch
from torch import Tensor
from torch.utils._python_dispatch import _get_current_dispatch_mode

from flashfx import _compat
from flashfx._compat import triton_runs_on
from flashfx.codegen import launch
from flashfx.rewriter.cost import (NodeCost, arg_value, bound_arguments, numel, register_cost, size_expr,
                                   tensor_bytes)

MAX_HEAD_DIM = 256
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# ------------------------------------------------------------------------------------------------- input checks

def _check_inputs(q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], scale: Optional[float],
                  dropout_p: float) -> None:
    """User errors as ValueError / TypeError naming the bad value and the fix."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"flashfx.attention: {name} must be 4-D [batch, heads, seq, head_dim], "
                             f"got shape {tuple(t.shape)}; reshape it (e.g. x.view(B, S, H, D).transpose(1, 2))")
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"flashfx.attention: {name} has dtype {t.dtype}; use float16, bfloat16 or float32")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"flashfx.attention: q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}; "
                        f"cast them to one dtype first")
    if not (q.device == k.device == v.device):
        raise ValueError(f"flashfx.attention: q, k, v are on different devices ({q.device}, {k.device}, {v.device})")
    B, Hq, L, D = q.shape
    if k.shape != v.shape:
        raise ValueError(f"flashfx.attention: k and v must have the same shape [B, Hkv, S, D], got "
                         f"{tuple(k.shape)} and {tuple(v.shape)}")
    if k.shape[0] != B:
        raise ValueError(f"flashfx.attention: batch sizes differ: q has {B}, k/v have {k.shape[0]}")
    if k.shape[3] != D:
        raise ValueError(f"flashfx.attention: head dims differ: q has {D}, k/v have {k.shape[3]}; "
                         f"project them to one head dim")
    Hkv = k.shape[1]
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"flashfx.attention: query heads ({Hq}) must be a multiple of key/value heads ({Hkv}) "
                         f"(grouped-query attention); pick Hkv dividing Hq")
    if D > MAX_HEAD_DIM and triton_runs_on(q.device):
        raise ValueError(f"flashfx.attention: head dim {D} is above the kernel's limit of {MAX_HEAD_DIM}; "
                         f"use F.scaled_dot_product_attention for it")
    if bias is not None:
        if bias.dtype != torch.bool and not bias.is_floating_point():
            raise TypeError(f"flashfx.attention: bias has dtype {bias.dtype}; pass a float additive bias or a "
                            f"bool mask (True = attend)")
        if bias.device != q.device:
            raise ValueError(f"flashfx.attention: bias is on {bias.device}, q on {q.device}; move it to q's device")
        target = (B, Hq, L, k.shape[2])
        if bias.dim() > 4 or any(b != 1 and b != t for b, t in zip(reversed(bias.shape), reversed(target))):
            raise ValueError(f"flashfx.attention: bias of shape {tuple(bias.shape)} does not broadcast to "
                             f"[B, Hq, L, S] = {list(target)}; give it size 1 or the full size in each dim")
    if scale is not None and not math.isfinite(scale):
        raise ValueError(f"flashfx.attention: scale must be a finite float, got {scale}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"flashfx.attention: dropout_p must be in [0, 1), got {dropout_p}")


def _resolve_scale(scale: Optional[float], head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim) if scale is None else float(scale)


def _draw_seed(dropout_p: float) -> Tensor:
    """The dropout seed, from torch's default generator (so torch.manual_seed reproduces it); 0 without dropout."""
    if dropout_p == 0.0:
        return torch.zeros((), dtype=torch.int64)
    return torch.randint(0, 2**62, (), dtype=torch.int64)


def _bias_kind(bias: Optional[Tensor]) -> int:
    return 0 if bias is None else (2 if bias.dtype == torch.bool else 1)


# ----------------------------------------------------------------------------------------- ATen reference (fp32)

def _reference_keep(seed: int, shape: Tuple[int, ...], dropout_p: float, device: torch.device) -> Tensor:
    """The reference path's dropout mask: a pure function of (seed, shape), so the backward regenerates it."""
    gen = torch.Generator(device=device)
    gen.manual_seed(int(seed))
    return torch.rand(shape, generator=gen, device=device) >= dropout_p


def _reference_scores(q: Tensor, k: Tensor, bias: Optional[Tensor], is_causal: bool, scale: float) -> Tensor:
    """Masked, scaled scores in fp32: [B, Hq, L, S] (the reference materialises them; the kernels never do)."""
    s = torch.matmul(q.float(), _repeat_heads(k.float(), q.shape[1]).transpose(-1, -2)) * scale
    if bias is not None:
        s = s.masked_fill(~bias, float("-inf")) if bias.dtype == torch.bool else s + _finite_bias(bias)
    if is_causal:
        L, S = s.shape[-2:]
        keep = torch.ones(L, S, dtype=torch.bool, device=s.device).tril()
        s = s.masked_fill(~keep, float("-inf"))
    return s


def _finite_bias(bias: Tensor) -> Tensor:
    """The bias in fp32 with values below -1e38 (finfo.min-style masks) read as -inf, as the kernels read it."""
    b = bias.float()
    return b.masked_fill(b < -1e38, float("-inf"))


def _reference_probs(s: Tensor) -> Tuple[Tensor, Tensor]:
    """Softmax over keys that gives 0 (not NaN) on fully masked rows, and the LSE (+inf on those rows)."""
    m = s.amax(dim=-1, keepdim=True)
    m = torch.where(torch.isneginf(m), torch.zeros_like(m), m)
    e = torch.exp(s - m)
    denom = e.sum(dim=-1, keepdim=True)
    empty = denom == 0
    p = e / torch.where(empty, torch.ones_like(denom), denom)
    lse = torch.where(empty, torch.full_like(denom, float("inf")), torch.log(denom) + m)
    return p, lse.squeeze(-1)


def _reference_forward(q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], is_causal: bool, scale: float,
                       dropout_p: float, seed: Tensor) -> Tuple[Tensor, Tensor]:
    p, lse = _reference_probs(_reference_scores(q, k, bias, is_causal, scale))
    if dropout_p > 0.0:
        p = p * _reference_keep(int(seed), tuple(p.shape), dropout_p, q.device) / (1.0 - dropout_p)
    return torch.matmul(p, _repeat_heads(v.float(), q.shape[1])).to(q.dtype), lse


def _repeat_heads(x: Tensor, heads: int) -> Tensor:
    group = heads // x.shape[1]
    return x.repeat_interleave(group, dim=1) if group > 1 else x


def _sum_heads(x: Tensor, kv_heads: int) -> Tensor:
    B, H, S, D = x.shape
    return x.view(B, kv_heads, H // kv_heads, S, D).sum(dim=2)


def _reduce_to(x: Tensor, shape: Tuple[int, ...]) -> Tensor:
    """Sum a [B, Hq, L, S] gradient back over the dimensions `shape` broadcasts (size 1 or missing)."""
    lead = x.dim() - len(shape)
    dims = list(range(lead)) + [lead + i for i, n in enumerate(shape) if n == 1 and x.shape[lead + i] != 1]
    return (x.sum(dim=dims, keepdim=True) if dims else x).reshape(shape)


def _reference_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], is_causal: bool,
                        scale: float, dropout_p: float, seed: Tensor,
                        bias_grad: bool) -> Tuple[Tensor, Tensor, Tensor, Optional[Tensor]]:
    """The gradients written out in fp32 (a custom op's body runs below autograd, so no autograd.grad here)."""
    Hq, Hkv = q.shape[1], k.shape[1]
    p, _ = _reference_probs(_reference_scores(q, k, bias, is_causal, scale))
    kf, vf, do = _repeat_heads(k.float(), Hq), _repeat_heads(v.float(), Hq), dout.float()
    pd, dp = p, torch.matmul(do, vf.transpose(-1, -2))
    if dropout_p > 0.0:
        keep = _reference_keep(int(seed), tuple(p.shape), dropout_p, q.device) / (1.0 - dropout_p)
        pd, dp = p * keep, dp * keep
    out = torch.matmul(pd, vf)
    ds = p * (dp - (do * out).sum(dim=-1, keepdim=True))  # softmax backward; 0 on fully masked rows
    dq = torch.matmul(ds, kf) * scale
    dk = _sum_heads(torch.matmul(ds.transpose(-1, -2), q.float()) * scale, Hkv)
    dv = _sum_heads(torch.matmul(pd.transpose(-1, -2), do), Hkv)
    dbias = _reduce_to(ds, tuple(bias.shape)).to(bias.dtype) if bias_grad else None
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dbias


# ------------------------------------------------------------------------------------------------- launchers

# The search spaces are small on purpose: each config costs seconds of compilation per (head dim, causal, mask).
# A config is (BLOCK_M, BLOCK_N, num_warps, num_stages); BLOCK_M tiles queries, BLOCK_N keys.
def _fwd_keep(bm: int, bn: int, warps: int, stages: int) -> bool:
    # query tile a multiple of the key tile (the causal diagonal is whole key blocks); 8 warps for 128 x 128
    # (its fp32 scores and accumulator overflow 4 warps' registers), 4 for 64-row tiles
    return bm % bn == 0 and (bn < 128 or warps == 8) and (bm == 128 or warps == 4) and stages in (3, 4)


def _bwd_keep(bm: int, bn: int, warps: int, stages: int) -> bool:
    # dK/dV: the key tile a multiple of the query tile (bm < bn). Its fp32 dK and dV tiles plus K and V held in
    # registers overflow 4 warps at 128 keys (ptxas: 2 KB of spills), hence 8 warps there; deep pipelines on 4.
    return (bn % bm == 0 and bm < bn and (bm == 32 or warps == 8) and (bn == 128 or warps == 4)
            and stages in ((3, 5) if warps == 4 else (2, 3)))


def _big_keep(small: int, big: int, warps: int, stages: int) -> bool:
    # head dims above 128: K/V (or Q/dO) tiles of 256 columns leave shared memory for 64 x 32/64 tiles only
    return big == 64 and small in (32, 64) and warps == 4 and stages == 2


# (keep, BLOCK_M choices, BLOCK_N choices, default) per kernel, for head dims <= 128 and above.
_SPACES = {
    ("fwd", False): (_fwd_keep, (64, 128), (64, 128), (128, 64, 4, 3)),
    ("dkdv", False): (_bwd_keep, (32, 64), (64, 128), (32, 128, 4, 3)),
    ("dq", False): (lambda m, n, w, st: _bwd_keep(n, m, w, st), (64, 128), (32, 64), (128, 32, 4, 3)),
    ("fwd", True): (lambda m, n, w, st: _big_keep(n, m, w, st), (64,), (32, 64), (64, 64, 4, 2)),
    ("dkdv", True): (_big_keep, (32, 64), (64,), (32, 64, 4, 2)),
    ("dq", True): (lambda m, n, w, st: _big_keep(n, m, w, st), (64,), (32, 64), (64, 32, 4, 2)),
}


def _tune_knobs() -> Tuple[bool, Optional[int]]:
    # FLASHFX_ATTENTION_TUNE=0: one default config per kernel (no autotuning: quick correctness runs).
    # FLASHFX_ATTENTION_CONFIG=i: only the i-th config of each kernel (to fill Triton's compile cache from
    # several processes at once before autotuning; see bench/attention.py).
    tune = os.environ.get("FLASHFX_ATTENTION_TUNE", "1")
    if tune not in ("0", "1"):
        raise ValueError(f"FLASHFX_ATTENTION_TUNE={tune!r}: use '1' (autotune) or '0' (one default config)")
    only = os.environ.get("FLASHFX_ATTENTION_CONFIG")
    if only and not only.isdigit():
        raise ValueError(f"FLASHFX_ATTENTION_CONFIG={only!r}: use a config index (0, 1, ...) or leave it unset")
    return tune == "1", int(only) if only else None


def _kernels(big_head: bool) -> Any:
    return _build_kernels(big_head, *_tune_knobs())


@functools.lru_cache(maxsize=None)
def _build_kernels(big_head: bool, tune: bool, only: Optional[int] = None) -> Any:
    """The autotuned kernels, built on first use (importing flashfx never imports Triton)."""
    import triton

    from flashfx._compat import triton_interpreting
    from flashfx.codegen import attention_kernels as K

    def configs(kernel):
        keep, ms, ns, default = _SPACES[(kernel, big_head)]
        if triton_interpreting():  # one small config: the interpreter is slow, and tiny tiles exercise the masks
            return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=1, num_stages=1)]
        if not tune:
            m, n, w, st = default
            return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=st)]
        space = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=st)
                 for m in ms for n in ns for w in (4, 8) for st in (2, 3, 4, 5) if keep(m, n, w, st)]
        return space if only is None else [space[only % len(space)]]

    key = ["D_PAD", "IS_CAUSAL", "BIAS_KIND", "DROPOUT", "SINGLE_LOOP", "L_BUCKET", "S_BUCKET"]
    extra = _compat.autotune_disk_cache_kwargs()
    return types.SimpleNamespace(
        fwd=triton.autotune(configs("fwd"), key=key + ["PERSISTENT"], **extra)(K._attn_fwd_kernel),
        dkdv=triton.autotune(configs("dkdv"), key=key + ["ATOMIC_DQ"], **extra)(K._bwd_dkdv_kernel),
        # the atomic variant accumulates into DQ: autotuning must zero it before each timed run
        dkdv_atomic=triton.autotune(configs("dkdv"), key=key + ["ATOMIC_DQ"], reset_to_zero=["DQ"],
                                    **extra)(K._bwd_dkdv_kernel),
        dq=triton.autotune(configs("dq"), key=key + ["BIAS_GRAD"], **extra)(K._bwd_dq_kernel),
        preprocess=K._bwd_preprocess,
    )


# (autotuner, its key's values, q's dtype) -> (the config it chose, its launcher). Triton's Autotuner.run re-derives
# its key from every argument at each call; the launches below skip it once a key is tuned, and `launch.Launcher`
# skips JITFunction.run's binding too (host time at short sequences).
_CHOSEN: dict = {}

# Forward launches per kernel variant ("pointer" / "persistent" / "tma"), for tests and benchmarks to see which ran.
FORWARD_LAUNCHES: collections.Counter = collections.Counter()
# Programs per SM of the persistent forward: two, so that a second program hides one's prologue and epilogue
# where registers and shared memory let two run at once (a guess until measured).
PERSISTENT_PER_SM = 2


def _tuned_launch(autotuner: Any, grid: Any, args: Tuple[Any, ...], kwargs: dict,
                  bind: bool = False) -> Optional[launch.BoundCall]:
    """`autotuner[grid](*args, **kwargs)`; a callable grid reads only the config's block sizes. With `bind`, once
    the autotuner has chosen, the launch is returned bound (`launch.BoundCall`) where it could be."""
    key = (id(autotuner), args[0].dtype, *map(kwargs.get, autotuner.keys))
    chosen = _CHOSEN.get(key)
    if chosen is None:
        autotuner[grid](*args, **kwargs)
        best = getattr(autotuner, "best_config", None)
        if best is not None:
            _CHOSEN[key] = (best, launch.launcher(autotuner.fn, **best.all_kwargs()))
        return None
    _, run = chosen
    return (run.bind if bind else run)(grid(run.fixed) if callable(grid) else grid, args, kwargs)


# Launch plans: the bound launches of one call shape (no bias, no dropout, the default kernel variants), keyed on
# everything that decides a launch's non-tensor arguments, so a repeated call passes its tensors straight to the
# compiled kernels (no argument dicts, no autotuner key, no signature): host time at short sequences.
_PLANS: collections.OrderedDict = collections.OrderedDict()
MAX_PLANS = 256  # a decode loop makes a new shape per step: the oldest plans make way
_PLAN_KNOBS = (b"FLASHFX_ATTENTION_TUNE", b"FLASHFX_ATTENTION_CONFIG", b"FLASHFX_ATTENTION_LOOP",
               b"FLASHFX_ATTENTION_FWD", b"FLASHFX_ATTENTION_BWD")


def _plans_apply(q: Tensor, bias: Optional[Tensor], dropout_p: float) -> bool:
    """Plans bind compiled kernels (CUDA only) and cover the common call: no bias, no dropout (a fresh seed)."""
    return bias is None and not dropout_p and q.is_cuda


def _find_plan(kind: str, bias: Optional[Tensor], dropout_p: float, is_causal: bool, sm_scale: float,
               *tensors: Tensor) -> Tuple[Optional[Tuple[Any, ...]], Any, Optional[Tuple[int, int]]]:
    """(the plan's key, None where plans do not apply; the plan if one was kept; the (device, stream) to launch it
    on, None where bound launches may not run now). `tensors` (q first) are every input whose shape or strides
    reach the kernels' arguments; the outputs' follow from them."""
    q = tensors[0]
    if not _plans_apply(q, bias, dropout_p):
        return None, None, None
    key = (kind, q.dtype, q.device, is_causal, sm_scale, *_compat.environment_values(_PLAN_KNOBS),
           *[(t.shape, t.stride()) for t in tensors])
    plan = _PLANS.get(key)
    return key, plan, (launch.direct_stream() if plan is not None else None)


def _loop_variant(is_causal: bool) -> str:
    """"split": unmasked key blocks in one loop, the diagonal / last blocks in a second, masked one;
    "single": one loop that tests per block whether it needs the mask. FLASHFX_ATTENTION_LOOP overrides.
    Measured on an H100 (B=4, H=16, D=128, S=8192, bf16, docs/benchmarks.md), split vs single: forward 501 vs 475
    TFLOP/s non-causal, 470 vs 476 causal; fwd+bwd 427 vs 436 (within run-to-run spread) and 413 vs 397."""
    choice = os.environ.get("FLASHFX_ATTENTION_LOOP", "split")
    if choice not in ("split", "single"):
        raise ValueError(f"FLASHFX_ATTENTION_LOOP={choice!r}: use 'split' or 'single'")
    return choice


def _forward_variant(q: Tensor, k: Tensor, v: Tensor, out: Tensor, bias: Optional[Tensor], dropout_p: float) -> str:
    """"pointer": `_attn_fwd_kernel` (any input), one program per query tile; "persistent": the same kernel on a
    grid of PERSISTENT_PER_SM programs per SM that stride over the tiles (any input; not measured yet, opt in with
    FLASHFX_ATTENTION_FWD=persistent); "tma": `attention_tma`'s kernel, which reads Q, K, V and writes
    Out through tensor descriptors (TMA on sm_90+), for no bias, no dropout, head dim 64 / 128, 16-byte aligned rows.
    FLASHFX_ATTENTION_FWD=tma runs it wherever the inputs allow (also in the CPU interpreter: the tests),
    =auto only on GPUs of compute capability >= 9, =pointer never. Inputs it cannot run keep the pointer kernel.
    The default is "pointer": measured on an H200 (2026-12-03, Triton 3.6, bf16, B=4, D=128, H=16 and GQA 32/8, both
    autotuned), the descriptor kernel ran at 0.96x the pointer kernel's TFLOP/s non-causal and 0.93x causal at
    S = 4096-8192 (geometric means; 0.91-0.99x per shape; shorter sequences are partly host time), same outputs to
    rounding."""
    choice = os.environ.get("FLASHFX_ATTENTION_FWD", "pointer")
    if choice not in ("pointer", "tma", "auto", "persistent"):
        raise ValueError(f"FLASHFX_ATTENTION_FWD={choice!r}: use 'pointer', 'tma', 'auto' or 'persistent'")
    if choice in ("pointer", "persistent"):
        return choice
    from flashfx.codegen import attention_tma

    if choice == "auto" and not attention_tma.tma_hardware(q.device):
        return "pointer"
    return "tma" if attention_tma.ineligible(q, k, v, out, bias, dropout_p) is None else "pointer"


def _warp_specialize(device: torch.device) -> bool:
    """FLASHFX_ATTENTION_WS=1 adds warp-specialized 8-warp configs (`tl.range(warp_specialize=True)`) to the
    descriptor kernel's autotuning, on sm_90+ only. Off by default: Triton 3.6 documents warp specialization for
    Blackwell, and sm_90 compiles of this kernel without a GPU (Triton 3.6 and 3.9) found its Hopper pass failing
    at 4 warps and emitting the same PTX as without it at 8 warps: on an H100 / H200 it should change nothing."""
    choice = os.environ.get("FLASHFX_ATTENTION_WS", "0")
    if choice not in ("0", "1"):
        raise ValueError(f"FLASHFX_ATTENTION_WS={choice!r}: use '0' or '1'")
    from flashfx.codegen import attention_tma

    return choice == "1" and attention_tma.tma_hardware(device)


def _backward_variant(bias_grad: bool) -> str:
    """"split": dK/dV kernel + dQ kernel (7 matmuls, no atomics); "atomic": one kernel adding dQ with fp32
    atomics (5 matmuls). FLASHFX_ATTENTION_BWD overrides; the bias gradient needs the dQ kernel (it writes dS).
    "split" is the default: measured faster on an H100 despite its 40% more FLOPs (fwd+bwd at S=8192, D=128:
    427 vs 382 TFLOP/s non-causal, 413 vs 332 causal; the atomics' read-modify-write traffic costs more)."""
    choice = os.environ.get("FLASHFX_ATTENTION_BWD", "split")
    if choice not in ("split", "atomic"):
        raise ValueError(f"FLASHFX_ATTENTION_BWD={choice!r}: use 'split' or 'atomic'")
    return "split" if bias_grad else choice


def _bucket(n: int) -> int:
    return min(1 << max(n - 1, 0).bit_length(), 1 << 16)


def _head_dim_pad(d: int) -> int:
    return max(16, 1 << (d - 1).bit_length())


def _strides(t: Optional[Tensor]) -> Tuple[int, ...]:
    return tuple(t.stride()) if t is not None else (0, 0, 0, 0)


def _common(q: Tensor, k: Tensor, bias: Optional[Tensor], is_causal: bool, dropout_p: float, seed: int):
    B, H, L, D = q.shape
    S = k.shape[2]
    if dropout_p > 0.0 and L * S >= 2**31:
        raise ValueError(f"flashfx.attention: dropout with L * S = {L * S} >= 2**31 is not supported "
                         f"(the dropout counter is 32-bit); use dropout_p=0.0 or shorter sequences")
    bias_t = None
    if bias is not None:
        # expand() is a view with stride 0 on broadcast dims; a bool mask is read as bytes.
        bias_t = bias.expand(B, H, L, S)
        if bias_t.dtype == torch.bool:
            bias_t = bias_t.view(torch.uint8)
    threshold = int(round(dropout_p * (1 << 24)))
    scalars = dict(H=H, GROUP=H // k.shape[1], L=L, S=S, D=D, seed=seed, drop_threshold=threshold,
                   drop_scale=1.0 / (1.0 - dropout_p), L_BUCKET=_bucket(L), S_BUCKET=_bucket(S))
    consts = dict(IS_CAUSAL=bool(is_causal), BIAS_KIND=_bias_kind(bias), DROPOUT=dropout_p > 0.0,
                  SINGLE_LOOP=_loop_variant(is_causal) == "single",
                  D_PAD=_head_dim_pad(D), EVEN_D=_head_dim_pad(D) == D,
                  PRECISION="ieee" if q.dtype == torch.float32 else "tf32")
    return bias_t, scalars, consts


def _keep_plan(key: Tuple[Any, ...], bound: Tuple[Any, ...]) -> None:
    """A forward plan is (its bound launch, the forward variant); a backward plan its three bound launches."""
    if len(_PLANS) >= MAX_PLANS:
        _PLANS.popitem(last=False)
    _PLANS[key] = bound


def _launch_forward(q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], is_causal: bool, sm_scale: float,
                    dropout_p: float, seed: int) -> Tuple[Tensor, Tensor]:
    B, H, L, D = q.shape
    out = _empty_out(q)
    lse = torch.empty((B, H, L), dtype=torch.float32, device=q.device)
    plan_key, plan, where = _find_plan("fwd", bias, dropout_p, is_causal, sm_scale, q, k, v)
    if where is not None and plan[0].launch((q, k, v, q, out, lse), *where):
        FORWARD_LAUNCHES[plan[1]] += 1
        return out, lse
    if L == 0 or B * H == 0:
        return out, lse
    bias_t, scalars, consts = _common(q, k, bias, is_causal, dropout_p, seed)
    variant = _forward_variant(q, k, v, out, bias, dropout_p)
    FORWARD_LAUNCHES[variant] += 1
    grid = lambda meta: (triton_cdiv(L, meta["BLOCK_M"]), B * H)  # noqa: E731
    with torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext():
        if variant == "tma":
            _launch_forward_tma(q, k, v, out, lse, is_causal, sm_scale, scalars, consts["PRECISION"], grid)
            return out, lse
        persistent = variant == "persistent"
        if persistent:
            programs = launch.sm_programs(q.device, PERSISTENT_PER_SM, 3)
            grid = lambda meta: (min(triton_cdiv(L, meta["BLOCK_M"]) * B * H, programs), 1)  # noqa: E731
        bound = _tuned_launch(_kernels(consts["D_PAD"] > 128).fwd, grid,
                              (q, k, v, bias_t if bias_t is not None else q, out, lse,
                               *q.stride(), *k.stride(), *v.stride(), *_strides(bias_t), *out.stride()),
                              dict(sm_scale=sm_scale, BH=B * H, PERSISTENT=persistent, **scalars, **consts),
                              bind=plan_key is not None)
    if bound is not None:
        _keep_plan(plan_key, (bound, variant))
    return out, lse


def _launch_forward_tma(q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, is_causal: bool, sm_scale: float,
                        scalars: dict, precision: str, grid: Any) -> None:
    from flashfx.codegen import attention_tma

    if q.is_cuda:
        attention_tma.ensure_allocator()
    kern = attention_tma.autotuned(q.shape[-1], q.element_size(), *_tune_knobs(), _warp_specialize(q.device))
    names = ("H", "GROUP", "L", "S", "L_BUCKET", "S_BUCKET")
    _tuned_launch(kern, grid, (q, k, v, out, lse, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3],
                               *out.stride()[:3]),
                  dict(sm_scale=sm_scale, IS_CAUSAL=bool(is_causal), D=q.shape[-1], PRECISION=precision,
                       **{n: scalars[n] for n in names}))


def _launch_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], out: Tensor,
                     lse: Tensor, is_causal: bool, sm_scale: float, dropout_p: float, seed: int,
                     bias_grad: bool) -> Tuple[Tensor, Tensor, Tensor, Optional[Tensor]]:
    B, H, L, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    delta = torch.empty((B, H, L), dtype=torch.float32, device=q.device)
    plan_key, plan, where = _find_plan("bwd", bias, dropout_p, is_causal, sm_scale, q, k, v, out, dout, lse)
    # every kernel of the split backward writes its outputs whole: if one declines, the general path redoes all
    if (where is not None and plan[0].launch((out, dout, delta), *where)
            and plan[1].launch((q, k, v, q, dout, lse, delta, dk, dv, dq), *where)
            and plan[2].launch((q, k, v, q, dout, lse, delta, dq, q), *where)):
        return dq, dk, dv, None
    if L == 0 or S == 0 or B * H == 0:
        return dq.zero_(), dk.zero_(), dv.zero_(), (torch.zeros_like(bias) if bias_grad else None)
    bias_t, scalars, consts = _common(q, k, bias, is_causal, dropout_p, seed)
    # dS for the bias gradient: [B, H, L, S] fp32, zero where the causal loop skips tiles; reduced below.
    ds = torch.zeros((B, H, L, S), dtype=torch.float32, device=q.device) if bias_grad else None
    kern = _kernels(consts["D_PAD"] > 128)
    bias_arg = bias_t if bias_t is not None else q
    atomic = _backward_variant(bias_grad) == "atomic"
    # the atomic variant adds dQ into a zeroed fp32 [B, H, L, D] buffer, cast to q's dtype at the end
    dq_acc = torch.zeros((B, H, L, D), dtype=torch.float32, device=q.device) if atomic else dq
    bind = plan_key is not None and not atomic
    with torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext():
        pre = launch.launcher(kern.preprocess, D_PAD=consts["D_PAD"], BLOCK_M=64)
        bound = [(pre.bind if bind else pre)((triton_cdiv(L, 64), B * H),
                                              (out, dout, delta, *out.stride(), *dout.stride(), H, L, D))]
        bound.append(_tuned_launch(
            kern.dkdv_atomic if atomic else kern.dkdv, lambda meta: (triton_cdiv(S, meta["BLOCK_N"]), B * Hkv),
            (q, k, v, bias_arg, dout, lse, delta, dk, dv, dq_acc, *q.stride(), *k.stride(), *v.stride(),
             *_strides(bias_t), *dout.stride(), *dk.stride(), *dv.stride(), *dq_acc.stride()),
            dict(sm_scale=sm_scale, ATOMIC_DQ=atomic, **scalars, **consts), bind=bind))
        if atomic:
            dq.copy_(dq_acc)
        else:
            bound.append(_tuned_launch(
                kern.dq, lambda meta: (triton_cdiv(L, meta["BLOCK_M"]), B * H),
                (q, k, v, bias_arg, dout, lse, delta, dq, ds if ds is not None else q, *q.stride(), *k.stride(),
                 *v.stride(), *_strides(bias_t), *dout.stride(), *dq.stride(), *_strides(ds)),
                dict(sm_scale=sm_scale, BIAS_GRAD=bias_grad, **scalars, **consts), bind=bind))
    if bind and None not in bound:
        _keep_plan(plan_key, tuple(bound))
    dbias = _reduce_to(ds, tuple(bias.shape)).to(bias.dtype) if bias_grad else None
    return dq, dk, dv, dbias


def triton_cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


# ------------------------------------------------------------------------------------------- forward / backward

def _empty_out(q: Tensor) -> Tensor:
    # Out is laid out [B, L, Hq, D] in memory and returned as [B, Hq, L, D], so the usual
    # `out.transpose(1, 2).reshape(B, L, Hq * D)` that follows attention is a view, not a copy.
    B, H, L, D = q.shape
    return q.new_empty((B, L, H, D)).transpose(1, 2)


def _use_kernels(q: Tensor) -> bool:
    # The Triton interpreter computes bf16 wrongly on the CPU (relative error ~1e9 measured): the reference runs there.
    return triton_runs_on(q.device) and not (q.device.type == "cpu" and q.dtype == torch.bfloat16)


# The ops are defined on a torch.library.Library rather than with torch.library.custom_op: custom_op wraps each
# call in Python (an aliasing check, a Dynamo-disable frame), which cost more host time than the kernels' own
# launches at S <= 2048 on the H100. Fake implementations and the autograd formula are registered the same way.
_lib = torch.library.Library("flashfx", "FRAGMENT")
_lib.define("attention_fwd(Tensor q, Tensor k, Tensor v, Tensor? bias, bool is_causal, float? scale, "
            "float dropout_p) -> (Tensor, Tensor, Tensor)",
            tags=(torch.Tag.nondeterministic_seeded, torch.Tag.pt2_compliant_tag))
_lib.define("attention_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor? bias, Tensor out, Tensor lse, "
            "Tensor seed, bool is_causal, float? scale, float dropout_p, bool bias_grad) -> (Tensor, Tensor, Tensor, "
            "Tensor)", tags=(torch.Tag.pt2_compliant_tag,))


def attention_fwd(q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], is_causal: bool, scale: Optional[float],
                  dropout_p: float) -> Tuple[Tensor, Tensor, Tensor]:
    """Forward: (out [B, Hq, L, D] in q's dtype, lse [B, Hq, L] fp32 natural log, seed int64 CPU scalar)."""
    sm_scale = _resolve_scale(scale, q.shape[-1])
    seed = _draw_seed(dropout_p)
    if _use_kernels(q):
        out, lse = _launch_forward(q, k, v, bias, is_causal, sm_scale, dropout_p, int(seed))
        return out, lse, seed
    ref, lse = _reference_forward(q, k, v, bias, is_causal, sm_scale, dropout_p, seed)
    out = _empty_out(q)
    out.copy_(ref)
    return out, lse.contiguous(), seed


_lib.impl("attention_fwd", attention_fwd, "CompositeExplicitAutograd")


@torch.library.register_fake("flashfx::attention_fwd", lib=_lib)
def _attention_fwd_fake(q, k, v, bias, is_causal, scale, dropout_p):
    B, H, L, _ = q.shape
    lse = q.new_empty((B, H, L), dtype=torch.float32)
    return _empty_out(q), lse, torch.empty((), dtype=torch.int64, device="cpu")


def attention_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], out: Tensor, lse: Tensor,
                  seed: Tensor, is_causal: bool, scale: Optional[float], dropout_p: float,
                  bias_grad: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Backward: (dq, dk, dv, dbias); dbias has bias's own shape when bias_grad, else it is an empty tensor."""
    sm_scale = _resolve_scale(scale, q.shape[-1])
    if _use_kernels(q):
        dq, dk, dv, dbias = _launch_backward(dout, q, k, v, bias, out, lse, is_causal, sm_scale, dropout_p,
                                             int(seed), bias_grad)
    else:
        dq, dk, dv, dbias = _reference_backward(dout, q, k, v, bias, is_causal, sm_scale, dropout_p, seed, bias_grad)
        dq, dk, dv = (torch.empty_like(x).copy_(g) for x, g in ((q, dq), (k, dk), (v, dv)))
    if dbias is None:
        dbias = q.new_empty((0,))
    return dq, dk, dv, dbias


_lib.impl("attention_bwd", attention_bwd, "CompositeExplicitAutograd")


@torch.library.register_fake("flashfx::attention_bwd", lib=_lib)
def _attention_bwd_fake(dout, q, k, v, bias, out, lse, seed, is_causal, scale, dropout_p, bias_grad):
    dbias = bias.new_empty(bias.shape) if bias_grad else q.new_empty((0,))
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), dbias


def _save_for_backward(ctx: Any, q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], is_causal: bool,
                       scale: Optional[float], dropout_p: float, out: Tensor, lse: Tensor, seed: Tensor) -> None:
    ctx.save_for_backward(q, k, v, bias, out, lse, seed)
    ctx.is_causal, ctx.scale, ctx.dropout_p = is_causal, scale, dropout_p


def _gradients(ctx: Any, dout: Tensor, backward: Any) -> Tuple[Any, ...]:
    """The forward inputs' gradients from what `_save_for_backward` kept, by `backward` (the op or its body)."""
    q, k, v, bias, out, lse, seed = ctx.saved_tensors
    bias_grad = bool(bias is not None and bias.is_floating_point() and ctx.needs_input_grad[3])
    dq, dk, dv, dbias = backward(dout, q, k, v, bias, out, lse, seed, ctx.is_causal, ctx.scale, ctx.dropout_p,
                                 bias_grad)
    return dq, dk, dv, (dbias if bias_grad else None), None, None, None


def _fwd_setup_context(ctx: Any, inputs: Tuple[Any, ...], output: Tuple[Tensor, Tensor, Tensor]) -> None:
    _save_for_backward(ctx, *inputs, *output)


def _fwd_backward(ctx: Any, dout: Tensor, dlse: Optional[Tensor], dseed: Optional[Tensor]):
    # The LSE and seed are internal outputs: nothing outside this file differentiates through them.
    return _gradients(ctx, dout, torch.ops.flashfx.attention_bwd)


torch.library.register_autograd("flashfx::attention_fwd", _fwd_backward, setup_context=_fwd_setup_context, lib=_lib)


# ------------------------------------------------------------------------------------------- the public op

_lib.define("attention(Tensor q, Tensor k, Tensor v, Tensor? bias=None, bool is_causal=False, float? scale=None, "
            "float dropout_p=0.0) -> Tensor")


class _EagerAttention(torch.autograd.Function):
    """The same forward and backward as `attention_fwd`'s registered autograd, for plain tensors outside any
    tracing. torch.library's autograd wrapper binds and fills the schema's defaults in Python on every call, and the
    op then dispatches again below it: on the H200 machine's CPU a forward+backward spent ~1.5 ms of host time
    against ~0.5 ms for SDPA's FlashAttention-2 (2026-12-03), enough to make S = 2048 host-bound. Traced code
    (Dynamo, AOTAutograd, functorch, tensor subclasses) keeps the ops, which is what the compiled graphs hold."""

    @staticmethod
    def forward(ctx: Any, q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], is_causal: bool,
                scale: Optional[float], dropout_p: float) -> Tensor:
        out, lse, seed = attention_fwd(q, k, v, bias, is_causal, scale, dropout_p)
        _save_for_backward(ctx, q, k, v, bias, is_causal, scale, dropout_p, out, lse, seed)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, dout: Tensor):
        return _gradients(ctx, dout, attention_bwd)


def _untraced(*tensors: Optional[Tensor]) -> bool:
    """Plain tensors, run eagerly: no Dynamo, no dispatch mode (fake tensors, make_fx), no functorch transform."""
    return (all(t is None or type(t) is Tensor for t in tensors) and not torch.compiler.is_compiling()
            and _get_current_dispatch_mode() is None and not torch._C._are_functorch_transforms_active())


def _attention_composite(q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor] = None, is_causal: bool = False,
                         scale: Optional[float] = None, dropout_p: float = 0.0) -> Tensor:
    return _attention_body(q, k, v, bias, is_causal, scale, dropout_p, _untraced(q, k, v, bias))


def _attention_body(q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], is_causal: bool, scale: Optional[float],
                    dropout_p: float, untraced: bool) -> Tensor:
    _check_inputs(q, k, v, bias, scale, dropout_p)
    if bias is not None and bias.dim() < 4:
        bias = bias.view((1,) * (4 - bias.dim()) + tuple(bias.shape))  # a view: broadcasting stays stride 0
    if untraced:
        return _EagerAttention.apply(q, k, v, bias, is_causal, scale, dropout_p)
    out, _, _ = torch.ops.flashfx.attention_fwd(q, k, v, bias, is_causal, scale, dropout_p)
    return out


_lib.impl("attention", _attention_composite, "CompositeImplicitAutograd")


def attention(q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor] = None, is_causal: bool = False,
              scale: Optional[float] = None, dropout_p: float = 0.0) -> Tensor:
    """Exact attention; see the module docstring. The same as `torch.ops.flashfx.attention`.

    Example::

        >>> import torch
        >>> from flashfx.codegen.attention import attention
        >>> q = k = v = torch.randn(1, 2, 5, 32)
        >>> attention(q, k, v, is_causal=True).shape
        torch.Size([1, 2, 5, 32])
    """
    if _untraced(q, k, v, bias):  # the op's own body, without a round trip through the dispatcher
        return _attention_body(q, k, v, bias, is_causal, scale, dropout_p, untraced=True)
    return torch.ops.flashfx.attention(q, k, v, bias, is_causal, scale, dropout_p)


# ------------------------------------------------------------------------------------------------- cost model

def _attention_flops(q: Tensor, k: Tensor, is_causal: bool) -> Any:
    # two products of 2·L·S·D per (batch, query head); causal: half (the diagonal tiles are the approximation)
    flops = 4 * numel(q) * size_expr(k.shape[2])
    return flops / 2 if is_causal else flops


def _cost_forward(node: Any, inputs: List[Any], output: Any) -> NodeCost:
    a = bound_arguments(node)
    q, k, v, bias = (arg_value(a[n]) for n in ("q", "k", "v", "bias"))
    read = tensor_bytes(q) + tensor_bytes(k) + tensor_bytes(v)
    if isinstance(bias, Tensor):
        read = read + tensor_bytes(bias)  # its own size: broadcast dims are read with stride 0
    out = output[0] if isinstance(output, (tuple, list)) else output
    write = tensor_bytes(out)
    if isinstance(output, (tuple, list)):
        write = write + tensor_bytes(output[1])  # the LSE saved for the backward
    return NodeCost(_attention_flops(q, k, bool(a["is_causal"])), read, write)


def _cost_backward(node: Any, inputs: List[Any], output: Any) -> NodeCost:
    a = bound_arguments(node)
    names = ("dout", "q", "k", "v", "bias", "out", "lse")
    read = sum((tensor_bytes(arg_value(a[n])) for n in names if isinstance(arg_value(a[n]), Tensor)), 0)
    write = sum((tensor_bytes(t) for t in output if isinstance(t, Tensor)), 0)
    # five products (the FLOP convention of FlashAttention: backward = 2.5x forward)
    return NodeCost(_attention_flops(arg_value(a["q"]), arg_value(a["k"]), bool(a["is_causal"])) * 5 / 2, read, write)


register_cost(torch.ops.flashfx.attention.default)(_cost_forward)
register_cost(torch.ops.flashfx.attention_fwd.default)(_cost_forward)
register_cost(torch.ops.flashfx.attention_bwd.default)(_cost_backward)
