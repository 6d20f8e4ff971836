"""The attention forward through tensor descriptors (TMA on sm_90+): a Hopper variant of `_attn_fwd_kernel`.

Same math, masks and outputs as the pointer kernel of attention_kernels (out in q's dtype, written through out's
strides; lse [B * Hq, L] fp32 natural log, +inf on fully masked rows), so the backward consumes either unchanged.
Only the common case: no bias, no dropout, head dim 64 or 128, rows 16-byte aligned (`ineligible` says why not).
`flashfx.codegen.attention._launch_forward` picks it by FLASHFX_ATTENTION_FWD; other inputs keep the pointer kernel.

Each program builds its descriptors on the device over its own (batch, head) matrix: Q and Out as [L, D], K and V
as [S, D] (kv head h // GROUP), so a tile past L or S loads zeros and stores nothing, never the next head's rows.
Device-side descriptors live in a scratch buffer that Triton asks the `triton.set_allocator` allocator for at each
launch; `ensure_allocator` installs one on torch's caching allocator unless the caller's context already has one.
Triton APIs relied on, all present in 3.6 and 3.9: `tl.make_tensor_descriptor` with descriptor `.load` / `.store`
(zero padding), `tl.range(..., warp_specialize=)` and `triton.set_allocator`. Below sm_90 Triton lowers the
descriptors to plain loads; the interpreter runs them on the CPU.
"""
from __future__ import annotations

import functools
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from flashfx import _compat
from flashfx.codegen.attention_kernels import LOG2E, _finish_rows, _fwd_program, _keep_fwd, _key_ranges

TMA_HEAD_DIMS = (64, 128)
_TMA_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# ------------------------------------------------------------------------------------------------- kernel

@triton.jit
def _tma_inner(acc, l_i, m_i, q, k_desc, v_desc, offs_m, lo, hi, S, qk_scale, MASKED: tl.constexpr,
               IS_CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
               WARP_SPECIALIZE: tl.constexpr):
    """Key blocks [lo, hi); MASKED applies the key bound and the causal mask (the diagonal and last blocks)."""
    offs_n = tl.arange(0, BLOCK_N)
    for start_n in tl.range(lo, hi, BLOCK_N, warp_specialize=WARP_SPECIALIZE):
        k = k_desc.load([start_n, 0])  # [BLOCK_N, D]; rows past S are zeros, masked below
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        if MASKED:
            s = tl.where(_keep_fwd(offs_m, start_n + offs_n, S, IS_CAUSAL), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = m_new
        if MASKED:  # a row with no visible key yet: exp2(-inf - 0) = 0, not NaN
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_use[:, None])
        alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        v = v_desc.load([start_n, 0])  # [BLOCK_N, D]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_fwd_tma_kernel(
    Q, K, V, Out, Lse,                        # Q, Out: [B, H, L, D]; K, V: [B, H // GROUP, S, D]; Lse: [B * H, L] fp32
    stride_qb, stride_qh, stride_qm,          # the last strides are 1 (checked by `ineligible`)
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_om,
    H, GROUP, L, S, sm_scale,
    L_BUCKET, S_BUCKET,                       # autotune keys only (power-of-two buckets of L and S)
    IS_CAUSAL: tl.constexpr, D: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, WARP_SPECIALIZE: tl.constexpr,
):
    pid_m, bh, off_b, off_h, off_kh = _fwd_program(H, GROUP, IS_CAUSAL)
    q_desc = tl.make_tensor_descriptor(Q + off_b.to(tl.int64) * stride_qb + off_h.to(tl.int64) * stride_qh,
                                       shape=[L, D], strides=[stride_qm, 1], block_shape=[BLOCK_M, D])
    k_desc = tl.make_tensor_descriptor(K + off_b.to(tl.int64) * stride_kb + off_kh.to(tl.int64) * stride_kh,
                                       shape=[S, D], strides=[stride_kn, 1], block_shape=[BLOCK_N, D])
    v_desc = tl.make_tensor_descriptor(V + off_b.to(tl.int64) * stride_vb + off_kh.to(tl.int64) * stride_vh,
                                       shape=[S, D], strides=[stride_vn, 1], block_shape=[BLOCK_N, D])
    o_desc = tl.make_tensor_descriptor(Out + off_b.to(tl.int64) * stride_ob + off_h.to(tl.int64) * stride_oh,
                                       shape=[L, D], strides=[stride_om, 1], block_shape=[BLOCK_M, D])

    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    q = q_desc.load([start_m, 0])  # [BLOCK_M, D]; rows past L are zeros, their results never stored
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)
    qk_scale = sm_scale * LOG2E

    full_hi, hi = _key_ranges(start_m, S, IS_CAUSAL, BLOCK_M, BLOCK_N)
    acc, l_i, m_i = _tma_inner(acc, l_i, m_i, q, k_desc, v_desc, offs_m, 0, full_hi, S, qk_scale, False,
                               IS_CAUSAL, BLOCK_N, PRECISION, WARP_SPECIALIZE)
    acc, l_i, m_i = _tma_inner(acc, l_i, m_i, q, k_desc, v_desc, offs_m, full_hi, hi, S, qk_scale, True,
                               IS_CAUSAL, BLOCK_N, PRECISION, False)

    out, lse = _finish_rows(acc, l_i, m_i)
    tl.store(Lse + bh.to(tl.int64) * L + offs_m, lse, mask=offs_m < L)
    o_desc.store([start_m, 0], out.to(Out.dtype.element_ty))  # rows past L are clipped


# ------------------------------------------------------------------------------------------------- eligibility

def ineligible(q: Tensor, k: Tensor, v: Tensor, out: Tensor, bias: Optional[Tensor],
               dropout_p: float) -> Optional[str]:
    """Why the descriptor kernel cannot run these inputs (one line), or None when it can."""
    if bias is not None:
        return "a bias or mask"
    if dropout_p > 0.0:
        return "dropout"
    if q.dtype not in _TMA_DTYPES:
        return f"dtype {q.dtype}"
    if q.shape[-1] not in TMA_HEAD_DIMS:
        return f"head dim {q.shape[-1]} not in {TMA_HEAD_DIMS}"
    if k.shape[2] == 0:
        return "no keys"
    align = 16 // q.element_size()  # TMA: 16-byte aligned base and row strides, unit last stride
    for name, t in (("q", q), ("k", k), ("v", v), ("out", out)):
        if t.stride(3) != 1:
            return f"{name} has last-dim stride {t.stride(3)}"
        if t.data_ptr() % 16 or t.stride(2) <= 0 or t.stride(2) % align:
            return f"{name} rows are not 16-byte aligned (stride {t.stride(2)})"
        if any(t.shape[i] > 1 and t.stride(i) % align for i in (0, 1)):
            return f"{name} batch / head strides {t.stride()[:2]} are not 16-byte aligned"
    return None


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> Tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def tma_hardware(device: torch.device) -> bool:
    """A CUDA GPU of compute capability >= 9 (Hopper and later: TMA units)."""
    if device.type != "cuda":
        return False
    return _capability(device.index if device.index is not None else torch.cuda.current_device())[0] >= 9


# ------------------------------------------------------------------------------------------------- allocator

def _torch_scratch(size: int, alignment: int, stream: Optional[int]) -> Tensor:
    # on the launch's current device and stream; torch's caching allocator aligns to 512 bytes (Triton asks 128)
    return torch.empty(size, dtype=torch.int8, device="cuda")


def ensure_allocator() -> None:
    """Give Triton an allocator for the device-side descriptors' scratch, unless this context already has one
    (Triton keeps it per context: a new thread starts without one, so this runs at every launch)."""
    if _compat.triton_allocator_missing():
        triton.set_allocator(_torch_scratch)


# ------------------------------------------------------------------------------------------------- autotuning

# A config is (BLOCK_M, BLOCK_N, num_warps, num_stages), as in attention.py. The default (FLASHFX_ATTENTION_TUNE=0)
# is a guess until measured; fp32 takes the small one (its tiles take twice the shared memory).
_DEFAULT = {64: (128, 128, 8, 3), 128: (128, 128, 8, 2)}
_SMALL = (64, 64, 4, 2)
_SMEM_BYTES = 227 * 1024  # H100 / H200 per block; the autotuner also skips a config that runs out of resources
_INTERPRETER_BLOCKS = (16, 16)  # one small config on the CPU: tiny tiles exercise the masks (tests may change it)


def _tma_keep(bm: int, bn: int, warps: int, stages: int, d: int, itemsize: int) -> bool:
    # 8 warps are two warpgroups of 64 query rows each (wgmma), so only for 128-row tiles; the fp32 scores and
    # accumulator under 192 registers a thread (at 192 ptxas spills); Q and `stages` K and V buffers plus 1 KB of
    # barriers within shared memory (the output tile reuses it). Both checked against sm_90 compiles of this
    # kernel (Triton 3.6 and 3.9: shared bytes exact; spills only where regs >= 192 with 4 warps).
    regs = bm * (bn + d) // (32 * warps)
    smem = (bm + 2 * stages * bn) * d * itemsize + 1024
    return (warps == 4 or bm == 128) and regs < 192 and smem <= _SMEM_BYTES


def autotuned(d: int, itemsize: int, tune: bool, only: Optional[int], warp_specialize: bool):
    """The autotuned descriptor kernel for head dim d and element size itemsize (see `_build`)."""
    return _build(d, itemsize, tune, only, warp_specialize, _INTERPRETER_BLOCKS)


@functools.lru_cache(maxsize=None)
def _build(d: int, itemsize: int, tune: bool, only: Optional[int], warp_specialize: bool,
           interpreter_blocks: Tuple[int, int]):
    """warp_specialize adds the 8-warp configs again with a warp-specialized main loop (asked only on sm_90+;
    Triton 3.6 / 3.9's Hopper pass fails on this loop at 4 warps, see attention._warp_specialize)."""
    def config(m, n, w, st, ws=False):
        return triton.Config({"BLOCK_M": m, "BLOCK_N": n, "WARP_SPECIALIZE": ws}, num_warps=w, num_stages=st)

    if _compat.triton_interpreting():
        configs = [config(*interpreter_blocks, 1, 1)]
    elif not tune:
        configs = [config(*(_DEFAULT[d] if _tma_keep(*_DEFAULT[d], d, itemsize) else _SMALL))]
    else:
        shapes = [(m, n, w, st) for m in (64, 128) for n in (64, 128) for w in (4, 8) for st in (2, 3, 4)
                  if _tma_keep(m, n, w, st, d, itemsize)]
        configs = [config(*s) for s in shapes] + [config(*s, True) for s in shapes if warp_specialize and s[2] == 8]
        configs = configs if only is None else [configs[only % len(configs)]]
    return triton.autotune(configs, key=["D", "IS_CAUSAL", "L_BUCKET", "S_BUCKET"],
                           **_compat.autotune_disk_cache_kwargs())(_attn_fwd_tma_kernel)
