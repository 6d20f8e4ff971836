"""The Triton row kernel of `flashfx::linear_cross_entropy` (its launcher and op are in cross_entropy.py).

Imported on first use, so `import flashfx` defines no kernel (the CLI can still switch the interpreter on).
"""
import triton
import triton.language as tl


@triton.jit
def _ce_rows_kernel(
    logits_ptr,    # [C, V] chunk logits (input dtype), row stride `stride_row`; dlogits replace them if WRITE_GRAD
    stride_row,
    target_ptr,    # [C] int64 class indices
    loss_ptr,      # [C] fp32 out: the row's loss (0 for ignored rows)
    scale_ptr,     # fp32: the gradient factor, one per row (SCALE_PER_ROW) or one for every row
    V, ignore_index, smoothing, z_loss,
    BLOCK_V: tl.constexpr, WRITE_GRAD: tl.constexpr, SCALE_PER_ROW: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # int64: row * stride_row exceeds 2**31 at 16k rows x 128k vocab
    row_ptr = logits_ptr + row * stride_row
    y = tl.load(target_ptr + row)
    valid = y != ignore_index
    # pass 1: online max / sum of exp, the target logit, and the row sum for label smoothing
    m = float("-inf")
    d = 0.0
    x_sum = 0.0
    x_y = 0.0
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = cols < V
        x = tl.load(row_ptr + cols, mask=mask, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, 0))
        d = d * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), 0)
        m = m_new
        x_sum += tl.sum(tl.where(mask, x, 0.0), 0)
        x_y += tl.sum(tl.where(cols == y, x, 0.0), 0)
    lse = m + tl.log(d)
    loss = lse - (1.0 - smoothing) * x_y - smoothing * x_sum / V + z_loss * lse * lse
    in_range = (y >= 0) & (y < V)
    loss = tl.where(in_range, loss, float("nan"))  # a bad class index must not pass silently
    tl.store(loss_ptr + row, tl.where(valid, loss, 0.0))
    if WRITE_GRAD:
        if SCALE_PER_ROW:
            scale = tl.load(scale_ptr + row)
        else:
            scale = tl.load(scale_ptr)
        scale = tl.where(valid, scale, 0.0)  # ignored rows get exactly 0, also when the scale is inf
        coef = 1.0 + 2.0 * z_loss * lse  # d(z·lse²)/dx = 2·z·lse·softmax(x)
        # pass 2: d loss / d x_j = (softmax_j · coef - (1 - eps)·[j == y] - eps / V) · scale, in place
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            mask = cols < V
            x = tl.load(row_ptr + cols, mask=mask, other=0.0).to(tl.float32)
            g = tl.exp(x - lse) * coef - tl.where(cols == y, 1.0 - smoothing, 0.0) - smoothing / V
            g = tl.where(valid, g * scale, 0.0)
            tl.store(row_ptr + cols, g.to(logits_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------------- launchers
