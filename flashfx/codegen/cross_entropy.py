"""`flashfx::linear_cross_entropy`: the loss of a linear head without the [tokens x vocab] logits in memory.

    torch.ops.flashfx.linear_cross_entropy(input, weight, bias=None, target, ignore_index=-100,
                                           label_smoothing=0.0, reduction="mean", z_loss=0.0) -> Tensor

computes ``F.cross_entropy(input @ weight.T + bias, target, ignore_index=..., label_smoothing=..., reduction=...)``
plus an optional z-loss, for input [*, H], weight [V, H], bias [V] or None, target [*] (int64/int32 class indices).
The loss is float32 whatever the input dtype (the logits are upcast, as Hugging Face causal-LM losses do).

Per non-ignored row i, with x = the row's logits and lse_i = logsumexp(x) (natural log):
    loss_i = (1 - eps) * (lse_i - x[y_i]) + eps * (lse_i - mean_j x_j)  +  z_loss * lse_i ** 2
(eps = label_smoothing, exactly PyTorch's smoothing), and loss_i = 0 for rows whose target is ignore_index.
"mean" divides the sum by the number of non-ignored rows (NaN when there are none, as PyTorch), "sum" sums,
"none" returns loss_i in target's shape. So the z-loss term is z_loss * mean(lse²) over non-ignored rows
under "mean". A target outside [0, V) that is not ignore_index gives a NaN loss (never a silent wrong number).

How it works: the rows are walked in chunks of C rows (C chosen so the chunk's logits take at most
`CHUNK_BYTES`, 1 GiB by default). For each chunk: logits = input_c @ W.T (+ b) by torch.matmul into one reused
[C, V] buffer in the input dtype (V padded with zero rows of W where cuBLAS needs it: `padded_vocab`); one
Triton program per row computes the online-softmax loss and, when gradients are wanted, overwrites the row in
place with d loss / d logits; then grad_input_c = dlogits @ W and grad_weight += dlogits.T @ input_c (in the
weight's dtype; `WGRAD_FP32` below), grad_bias += dlogits.sum(0).

When the gradients are computed (the memory / time trade):
- reduction "mean"/"sum" with autograd recording (training): in the forward, as Liger-Kernel does, so the logits
  are produced by one matmul in total (3 matmuls of 2·N·V·H FLOPs for forward + backward, like eager). The forward
  then holds grad_input [N, H], grad_weight [V, H] (weight dtype) and grad_bias until the backward, which only
  multiplies them by the incoming scalar gradient. Since the loss is the last op of a training step, these are the
  same bytes that the backward would allocate a moment later.
- reduction "none" (the incoming gradient differs per row, so it cannot be applied afterwards), or a forward
  without autograd that is later differentiated: the backward recomputes the chunk logits (one extra matmul,
  +33% of the head's FLOPs) and saves nothing but its inputs.
Without autograd (inference / eval) only the loss is computed: one matmul, no gradient buffers.

Built like `flashfx::attention`: the public op is CompositeImplicitAutograd, so Dynamo records one node and
AOTAutograd decomposes it into `flashfx::linear_cross_entropy_fwd` (forward graph) and
`flashfx::linear_cross_entropy_bwd` (backward graph, recompute path only). Where
`flashfx._compat.triton_runs_on(device)` is False the same chunk loop runs an ATen version of the row kernel.
"""
from __future__ import annotations

import math
from typing import Any, List, Optional, Tuple

import sympy
import torch
from torch import Tensor

from flashfx._compat import triton_runs_on
from flashfx.rewriter.cost import (NodeCost, arg_value, bound_arguments, numel, register_cost, size_expr,
                                   tensor_bytes)

REDUCTIONS = ("mean", "sum", "none")
# At most this many bytes of logits exist at once (one chunk buffer). Each chunk re-reads W in two matmuls and
# reads + writes dW in a third, so fewer chunks move fewer bytes: for the ANCHORS Llama head (W: 128256 x 2048
# bf16, 8192 tokens) 1 GiB is 2 chunks and ~3.7 GB of W traffic where 256 MiB (8 chunks) moved ~16 GB; the loss
# ran 1.4 ms faster at 0.5 GB more peak on the H200 (docs/benchmarks.md).
CHUNK_BYTES = 1 << 30
# Accumulate grad_weight across chunks in float32 (4·V·H bytes held during the forward, plus the final cast's
# 2·V·H: for a 128k vocab x 2048 head that is 1.5 GB at the step's memory peak, measured on the H100). False (the
# default, as Liger-Kernel): in the weight's dtype, each chunk's product accumulated in fp32 inside the GEMM and
# rounded once per chunk into the 16-bit sum (N / chunk_rows roundings instead of one).
WGRAD_FP32 = False
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# ------------------------------------------------------------------------------------------------------ launcher

def _rows_triton(logits: Tensor, target: Tensor, loss: Tensor, scale: Tensor, ignore_index: int, smoothing: float,
                 z_loss: float, write_grad: bool) -> None:
    """Per-row loss into `loss`; with write_grad, `logits` becomes d loss / d logits (times `scale`)."""
    rows, V = logits.shape
    if rows == 0:
        return
    import triton

    from flashfx.codegen.cross_entropy_kernel import _ce_rows_kernel

    block = min(triton.next_power_of_2(V), 4096 if logits.is_cuda else 256)
    _ce_rows_kernel[(rows,)](
        logits, logits.stride(0), target, loss, scale, V, ignore_index, float(smoothing), float(z_loss),
        BLOCK_V=block, WRITE_GRAD=write_grad, SCALE_PER_ROW=scale.numel() > 1, num_warps=16 if logits.is_cuda else 4,
    )


def _rows_reference(logits: Tensor, target: Tensor, loss: Tensor, scale: Tensor, ignore_index: int, smoothing: float,
                    z_loss: float, write_grad: bool) -> None:
    """The row kernel in ATen (fp32 math), for devices where Triton does not run; same contract."""
    V = logits.shape[1]
    x = logits.float()
    valid = target != ignore_index
    in_range = (target >= 0) & (target < V)
    safe_y = torch.where(in_range, target, torch.zeros_like(target))
    lse = torch.logsumexp(x, dim=1)
    x_y = x.gather(1, safe_y[:, None]).squeeze(1)
    row = lse - (1.0 - smoothing) * x_y - smoothing * x.sum(1) / V + z_loss * lse * lse
    row = torch.where(in_range, row, torch.full_like(row, float("nan")))
    loss.copy_(torch.where(valid, row, torch.zeros_like(row)))
    if write_grad:
        g = torch.exp(x - lse[:, None]) * (1.0 + 2.0 * z_loss * lse[:, None]) - smoothing / V
        g.scatter_add_(1, safe_y[:, None], torch.full_like(x_y[:, None], -(1.0 - smoothing)))
        s = scale.expand(target.shape) if scale.numel() == 1 else scale
        s = torch.where(valid, s, torch.zeros_like(s))
        logits.copy_(g * s[:, None])


def chunk_rows_for(n_rows: int, vocab: int, element_size: int, budget: Optional[int] = None) -> int:
    """Rows per chunk: as many as fit `budget` (default: the module's CHUNK_BYTES) bytes of logits, rounded down to
    a multiple of 128 (cuBLAS tile rows) when that many fit, else of 16; at least 16."""
    budget = CHUNK_BYTES if budget is None else budget
    fit = budget // max(1, vocab * element_size)
    rows = fit // 128 * 128 if fit >= 128 else max(16, fit // 16 * 16)
    return max(1, min(rows, n_rows))


def padded_vocab(vocab: int, dtype: torch.dtype) -> int:
    """The vocab the chunk GEMMs run at: unchanged when a row of it fills whole 16-byte words, else rounded up to a
    multiple of 64. cuBLAS picks its aligned kernels only when the GEMM's extents are (a padded row stride is not
    enough): with GPT-2's odd 50257, the logits, d-input and d-weight GEMMs ran on align-1 kernels, 11.6 of the
    30.2 ms of GPU time in GPT-2-small's training step on the H100 (docs/benchmarks.md)."""
    per_16_bytes = max(1, 16 // dtype.itemsize)
    return vocab if vocab % per_16_bytes == 0 else -(-vocab // 64) * 64


def _pad_rows(t: Tensor, rows: int) -> Tensor:
    """`t` with zero rows appended up to `rows` (a zero weight row gives a zero logit column, and a zero row of W
    leaves d input = dlogits @ W unchanged whatever that column holds)."""
    if t.shape[0] == rows:
        return t
    out = t.new_zeros((rows,) + tuple(t.shape[1:]))
    out[: t.shape[0]].copy_(t)
    return out


def _accumulate_wgrad(acc: Tensor, dlogits: Tensor, x: Tensor, first: bool) -> None:
    """acc [V, H] (+)= dlogits.T @ x. With a float32 `acc` and 16-bit inputs the product is accumulated in fp32 (no
    16-bit rounding across chunks). The first chunk writes without reading (beta=0): `acc` may start uninitialised."""
    global _ADDMM_OUT_DTYPE
    beta = 0.0 if first else 1.0
    if dlogits.dtype == acc.dtype:
        torch.addmm(acc, dlogits.t(), x, beta=beta, out=acc)
        return
    if acc.is_cuda and _ADDMM_OUT_DTYPE:
        try:
            # cuBLAS with a float32 C/D and 16-bit A/B: one pass; beta=1 reads the accumulator in the epilogue
            torch.addmm(acc, dlogits.t(), x, out_dtype=torch.float32, beta=beta, out=acc)
            return
        except (RuntimeError, TypeError):  # a torch without addmm(out_dtype=) for this device / dtype
            _ADDMM_OUT_DTYPE = False
    if acc.is_cuda:
        prod = torch.mm(dlogits.t(), x)  # 16-bit product, then one fp32 add: 3 extra passes over [V, H]
        acc.copy_(prod) if first else acc.add_(prod)
    else:
        torch.addmm(acc, dlogits.t().float(), x.float(), beta=beta, out=acc)


_ADDMM_OUT_DTYPE = True  # set False once torch.addmm(..., out_dtype=float32) is found missing


def chunked_loss_and_grads(x: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor, ignore_index: int,
                           smoothing: float, z_loss: float, scale: Optional[Tensor], want_grads: bool,
                           chunk_rows: int = 0) -> Tuple[Tensor, Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """The chunk loop. x: [N, H]; target: [N] int64; scale: fp32 [1] or [N] (the gradient factor per row).

    Returns (per-row loss [N] fp32, grad_input [N, H], grad_weight [V, H], grad_bias [V]); grads None unless
    `want_grads`.
    """
    with torch.autocast(x.device.type, enabled=False):  # the matmuls run in the inputs' dtype, as the op promises
        return _chunk_loop(x, weight, bias, target, ignore_index, smoothing, z_loss, scale, want_grads, chunk_rows)


def _chunk_loop(x: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor, ignore_index: int,
                smoothing: float, z_loss: float, scale: Optional[Tensor], want_grads: bool,
                chunk_rows: int) -> Tuple[Tensor, Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    N, H = x.shape
    V = weight.shape[0]
    Vp = padded_vocab(V, x.dtype)
    use_triton = triton_runs_on(x.device)
    rows_fn = _rows_triton if use_triton else _rows_reference
    C = chunk_rows or chunk_rows_for(N, Vp, x.element_size())
    loss = torch.empty(N, dtype=torch.float32, device=x.device)
    buf = torch.empty((min(C, N), Vp), dtype=x.dtype, device=x.device)  # columns V..Vp: logits of zero rows of W
    w = _pad_rows(weight, Vp)
    b = _pad_rows(bias, Vp) if bias is not None else None
    wt = w.t()
    dx = dw = db = None
    if want_grads:
        dx = torch.empty((N, H), dtype=x.dtype, device=x.device)  # contiguous, whatever x's strides
        dw = torch.empty((Vp, H), dtype=torch.float32 if WGRAD_FP32 else weight.dtype, device=x.device)
        db = torch.zeros(V, dtype=torch.float32, device=x.device) if bias is not None else None
        if scale is None:
            raise AssertionError("gradients need a scale")
    if scale is None:
        scale = torch.ones(1, dtype=torch.float32, device=x.device)
    for start in range(0, N, C):
        end = min(start + C, N)
        xc = x[start:end]
        padded = buf[: end - start]
        if b is not None:
            torch.addmm(b, xc, wt, out=padded)
        else:
            torch.mm(xc, wt, out=padded)
        logits = padded[:, :V]
        sc = scale[start:end] if scale.numel() > 1 else scale
        rows_fn(logits, target[start:end], loss[start:end], sc, ignore_index, smoothing, z_loss, want_grads)
        if want_grads:
            torch.mm(padded, w, out=dx[start:end])
            _accumulate_wgrad(dw, padded, xc, first=start == 0)  # rows V..Vp of dw are dropped below
            if db is not None:
                db += logits.sum(0, dtype=torch.float32)
    if want_grads:
        if N == 0:
            dw.zero_()
        dw = dw[:V].to(weight.dtype, copy=Vp != V)  # a copy: the padded rows' storage is not kept
        db = db.to(bias.dtype) if db is not None else None
    return loss, dx, dw, db


# ------------------------------------------------------------------------------------------------ input checks

def _check_inputs(x: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor, ignore_index: int,
                  smoothing: float, reduction: str, z_loss: float) -> None:
    """User errors as ValueError / TypeError naming the bad value and the fix."""
    name = "flashfx.linear_cross_entropy"
    if reduction not in REDUCTIONS:
        raise ValueError(f"{name}: reduction={reduction!r} is not one of {REDUCTIONS}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name}: input has dtype {x.dtype}; use float16, bfloat16 or float32")
    if weight.dtype != x.dtype or (bias is not None and bias.dtype != x.dtype):
        raise TypeError(f"{name}: input, weight and bias must share one dtype, got {x.dtype}, {weight.dtype}"
                        f"{', ' + str(bias.dtype) if bias is not None else ''}; cast them to one dtype first")
    if target.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{name}: target has dtype {target.dtype}; pass class indices as int64 (torch.long) — "
                        f"class-probability targets are not supported, use F.cross_entropy for them")
    if x.dim() < 1 or weight.dim() != 2 or weight.shape[1] != x.shape[-1]:
        raise ValueError(f"{name}: expected input [*, H] and weight [V, H], got input {tuple(x.shape)} and weight "
                         f"{tuple(weight.shape)}; weight is the nn.Linear weight (out_features x in_features)")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"{name}: bias must have shape [V] = [{weight.shape[0]}], got {tuple(bias.shape)}")
    if tuple(target.shape) != tuple(x.shape[:-1]):
        raise ValueError(f"{name}: target shape {tuple(target.shape)} must be input's shape without its last dim, "
                         f"{tuple(x.shape[:-1])}; flatten both (input.view(-1, H), target.view(-1))")
    devices = {t.device for t in (x, weight, target) + ((bias,) if bias is not None else ())}
    if len(devices) > 1:
        raise ValueError(f"{name}: tensors are on different devices {sorted(map(str, devices))}; move them to one")
    if not 0.0 <= smoothing <= 1.0:
        raise ValueError(f"{name}: label_smoothing must be in [0, 1], got {smoothing}")
    if not (math.isfinite(z_loss) and z_loss >= 0.0):
        raise ValueError(f"{name}: z_loss must be a finite float >= 0, got {z_loss}")


def _reduce(rows: Tensor, target: Tensor, ignore_index: int, reduction: str) -> Tensor:
    if reduction == "none":
        return rows.view(target.shape)
    total = rows.sum()
    return total / (target != ignore_index).sum() if reduction == "mean" else total


def _grad_scale(target: Tensor, ignore_index: int, reduction: str) -> Tensor:
    """d(reduced loss) / d(row loss) as a float32 [1] tensor on the device (no host sync)."""
    if reduction == "mean":
        return (1.0 / (target != ignore_index).sum().to(torch.float32)).reshape(1)
    return torch.ones(1, dtype=torch.float32, device=target.device)


# ------------------------------------------------------------------------------------------------ custom ops

@torch.library.custom_op("flashfx::linear_cross_entropy_fwd", mutates_args=())
def linear_cross_entropy_fwd(input: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor, ignore_index: int,
                             label_smoothing: float, reduction: str, z_loss: float,
                             grad_in_forward: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(loss, grad_input, grad_weight, grad_bias); the grads are of the loss as returned (incoming gradient 1)
    when grad_in_forward, else (and grad_bias without a bias) empty [0] tensors."""
    x = input.reshape(-1, input.shape[-1])
    t = target.reshape(-1).long()
    scale = _grad_scale(t, ignore_index, reduction) if grad_in_forward else None
    rows, dx, dw, db = chunked_loss_and_grads(x, weight, bias, t, ignore_index, label_smoothing, z_loss, scale,
                                              grad_in_forward)
    loss = _reduce(rows, target, ignore_index, reduction)
    if not grad_in_forward:  # distinct empty tensors: outputs of a custom op may not alias each other
        return loss, input.new_empty((0,)), input.new_empty((0,)), input.new_empty((0,))
    return loss, dx.view(input.shape), dw, (db if db is not None else input.new_empty((0,)))


@linear_cross_entropy_fwd.register_fake
def _fwd_fake(input, weight, bias, target, ignore_index, label_smoothing, reduction, z_loss, grad_in_forward):
    loss_shape = target.shape if reduction == "none" else ()
    loss = input.new_empty(loss_shape, dtype=torch.float32)
    if not grad_in_forward:
        return loss, input.new_empty((0,)), input.new_empty((0,)), input.new_empty((0,))
    db = bias.new_empty(bias.shape) if bias is not None else input.new_empty((0,))
    # contiguous, as the real op returns them (a transposed weight view gets a contiguous gradient)
    return loss, input.new_empty(input.shape), weight.new_empty(weight.shape), db


@torch.library.custom_op("flashfx::linear_cross_entropy_bwd", mutates_args=())
def linear_cross_entropy_bwd(grad_loss: Tensor, input: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor,
                             ignore_index: int, label_smoothing: float, reduction: str,
                             z_loss: float) -> Tuple[Tensor, Tensor, Tensor]:
    """Recompute path: (grad_input, grad_weight, grad_bias or an empty [0] tensor) for an incoming grad_loss."""
    x = input.reshape(-1, input.shape[-1])
    t = target.reshape(-1).long()
    g = grad_loss.to(torch.float32)
    if reduction == "none":
        scale = g.reshape(-1).contiguous()
    else:
        scale = (_grad_scale(t, ignore_index, reduction) * g).reshape(1)
    _, dx, dw, db = chunked_loss_and_grads(x, weight, bias, t, ignore_index, label_smoothing, z_loss, scale, True)
    return dx.view(input.shape), dw, (db if db is not None else input.new_empty((0,)))


@linear_cross_entropy_bwd.register_fake
def _bwd_fake(grad_loss, input, weight, bias, target, ignore_index, label_smoothing, reduction, z_loss):
    db = bias.new_empty(bias.shape) if bias is not None else input.new_empty((0,))
    return input.new_empty(input.shape), weight.new_empty(weight.shape), db


def _fwd_setup_context(ctx: Any, inputs: Tuple[Any, ...], output: Tuple[Tensor, ...]) -> None:
    x, weight, bias, target, ignore_index, smoothing, reduction, z_loss, grad_in_forward = inputs
    _, dx, dw, db = output
    ctx.grad_in_forward = grad_in_forward
    ctx.has_bias = bias is not None
    ctx.args = (ignore_index, smoothing, reduction, z_loss)
    if grad_in_forward:
        ctx.save_for_backward(dx, dw, db)
    else:
        ctx.save_for_backward(x, weight, bias, target)
    ctx.set_materialize_grads(False)  # the grad outputs are never differentiated: no zero [V, H] tensors


def _fwd_backward(ctx: Any, grad_loss: Optional[Tensor], *unused: Optional[Tensor]):
    nones = (None,) * 6
    if grad_loss is None:
        return (None, None, None) + nones
    if ctx.grad_in_forward:
        dx, dw, db = ctx.saved_tensors
        g = grad_loss.to(dx.dtype)  # a 0-dim tensor: "mean"/"sum" only take this path
        return dx * g, dw * g.to(dw.dtype), (db * g.to(db.dtype) if ctx.has_bias else None), *nones
    x, weight, bias, target = ctx.saved_tensors
    dx, dw, db = torch.ops.flashfx.linear_cross_entropy_bwd(grad_loss, x, weight, bias, target, *ctx.args)
    return dx, dw, (db if ctx.has_bias else None), *nones


linear_cross_entropy_fwd.register_autograd(_fwd_backward, setup_context=_fwd_setup_context)


# ------------------------------------------------------------------------------------------------ the public op

_lib = torch.library.Library("flashfx", "FRAGMENT")
_lib.define("linear_cross_entropy(Tensor input, Tensor weight, Tensor? bias, Tensor target, int ignore_index=-100, "
            "float label_smoothing=0.0, str reduction='mean', float z_loss=0.0) -> Tensor")


def _composite(input: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor, ignore_index: int = -100,
               label_smoothing: float = 0.0, reduction: str = "mean", z_loss: float = 0.0) -> Tensor:
    _check_inputs(input, weight, bias, target, ignore_index, label_smoothing, reduction, z_loss)
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (input, weight, bias))
    loss, _, _, _ = torch.ops.flashfx.linear_cross_entropy_fwd(
        input, weight, bias, target, ignore_index, label_smoothing, reduction, z_loss,
        bool(needs_grad and reduction != "none"))
    return loss


_lib.impl("linear_cross_entropy", _composite, "CompositeImplicitAutograd")


def linear_cross_entropy(input: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor,
                         ignore_index: int = -100, label_smoothing: float = 0.0, reduction: str = "mean",
                         z_loss: float = 0.0) -> Tensor:
    """``F.cross_entropy(F.linear(input, weight, bias).float(), target, ...)`` (+ z-loss) without the logits in
    memory; see the module docstring. The same as `torch.ops.flashfx.linear_cross_entropy`.

    Example::

        >>> import torch, torch.nn.functional as F
        >>> from flashfx.codegen.cross_entropy import linear_cross_entropy
        >>> h, w, y = torch.randn(6, 8), torch.randn(11, 8), torch.randint(0, 11, (6,))
        >>> torch.allclose(linear_cross_entropy(h, w, None, y), F.cross_entropy(h @ w.T, y), atol=1e-5)
        True
    """
    return torch.ops.flashfx.linear_cross_entropy(input, weight, bias, target, ignore_index, label_smoothing,
                                                  reduction, z_loss)


# ------------------------------------------------------------------------------------------------- cost model

def _chunks(N: Any, V: Any, dtype: torch.dtype) -> Any:
    """How many chunks the loop walks for N rows (a sympy expression; approximate when N or V is symbolic)."""
    if N.is_Integer and V.is_Integer:
        n = int(N)
        return sympy.Integer(max(1, -(-n // chunk_rows_for(n, padded_vocab(int(V), dtype), dtype.itemsize))))
    return sympy.Max(1, sympy.ceiling(N * V * dtype.itemsize / CHUNK_BYTES))


def _cost(node: Any, grads: bool) -> NodeCost:
    """FLOPs: the logits product 2·N·V·H (three products with the gradients), plus ~8 per logit for the row kernel.
    Bytes: inputs once, outputs once, plus the chunk buffer's HBM traffic — written by the matmul and read by the
    kernel (2 passes over the N·V logits), and with gradients also rewritten by the kernel and read by the two
    gradient matmuls (5 passes) — plus W once more per further chunk in each matmul that reads it (the logits and,
    with gradients, d input) and dW read and written again by each further chunk's accumulation. The [N, V] logits
    are never stored whole.
    """
    a = bound_arguments(node)
    x, w, b, y = (arg_value(a[n]) for n in ("input", "weight", "bias", "target"))
    H, V = size_expr(w.shape[1]), size_expr(w.shape[0])
    N = numel(x) / H
    read = tensor_bytes(x) + tensor_bytes(w) + tensor_bytes(y) + (tensor_bytes(b) if isinstance(b, Tensor) else 0)
    write = N * 4
    if grads:
        write = write + tensor_bytes(x) + tensor_bytes(w) + (tensor_bytes(b) if isinstance(b, Tensor) else 0)
    chunk_traffic = (5 if grads else 2) * N * V * x.element_size()
    again = _chunks(N, V, x.dtype) - 1
    weight_traffic = again * tensor_bytes(w) * (4 if grads else 1)  # (W in two matmuls, dW read + write)
    return NodeCost((3 if grads else 1) * 2 * N * V * H + 8 * N * V, read + chunk_traffic + weight_traffic, write)


def _cost_public(node: Any, inputs: List[Any], output: Any) -> NodeCost:
    # The torch-level graph is costed as a forward (the linear + cross-entropy it replaces count their forward
    # only); where the gradients are made is visible in the ATen graphs, through the _fwd / _bwd costs below.
    return _cost(node, False)


def _cost_fwd(node: Any, inputs: List[Any], output: Any) -> NodeCost:
    return _cost(node, bool(bound_arguments(node)["grad_in_forward"]))


def _cost_bwd(node: Any, inputs: List[Any], output: Any) -> NodeCost:
    return _cost(node, True)


register_cost(torch.ops.flashfx.linear_cross_entropy.default)(_cost_public)
register_cost(torch.ops.flashfx.linear_cross_entropy_fwd.default)(_cost_fwd)
register_cost(torch.ops.flashfx.linear_cross_entropy_bwd.default)(_cost_bwd)
