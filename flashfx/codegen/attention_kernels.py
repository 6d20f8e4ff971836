"""Triton kernels of `flashfx::attention` (FlashAttention-2 style): exact attention in SRAM tiles.

Forward: one program per (query block, batch x query head); an online softmax over key blocks keeps a running
max and sum in registers, so the L x S scores never reach HBM; it saves only `out` and the log-sum-exp (LSE).
Backward: `_bwd_preprocess` (delta = rowsum(dO * O)), `_bwd_dkdv_kernel` (one program per key block and kv head,
looping over the query heads of its group, so GQA needs no atomics and no repeat) and `_bwd_dq_kernel` (one program
per query block, which also writes dS when the bias needs a gradient). Both recompute the scores from Q, K and LSE.
Variants (constexpr, chosen by the launcher): ATOMIC_DQ adds dQ from the dK/dV kernel with fp32 atomics instead of
running `_bwd_dq_kernel`; SINGLE_LOOP runs one loop over the key (query) blocks with a per-block test for the masks
instead of an unmasked loop followed by a masked one. The defaults (neither) measured faster on an H100.

Conventions: scores are kept in log2 units (x log2 e) so the exponentials are exp2; accumulation is fp32; offsets
of the (batch, head) base and of bias rows are int64; D is padded to the power of two D_PAD with masks; the
bool mask is read as uint8. Fully masked rows: l = 0, so out = 0 and LSE = +inf, which makes every recomputed
probability exp2(s - inf) = 0 in the backward, hence zero gradients.
Dropout keeps an element when philox(seed, row * S + col, batch * Hq + head) >> 8 >= threshold (24-bit uniform),
the same counters in forward and backward, so the backward regenerates the forward's mask.
"""
import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


# ------------------------------------------------------------------------------------------------- helpers

@triton.jit
def _load2d(ptrs, row_ok, col_ok, ROW_MASK: tl.constexpr, COL_MASK: tl.constexpr):
    """Load a tile, masking rows / columns only where the caller says a bound can be crossed (0 elsewhere)."""
    if ROW_MASK:
        if COL_MASK:
            x = tl.load(ptrs, mask=row_ok & col_ok, other=0.0)
        else:
            x = tl.load(ptrs, mask=row_ok, other=0.0)
    else:
        if COL_MASK:
            x = tl.load(ptrs, mask=col_ok, other=0.0)
        else:
            x = tl.load(ptrs)
    return x


@triton.jit
def _dropout_keep(seed, bh, rows, cols, S, threshold):
    """Keep mask for the tile rows x cols (any orientation: the counter is row * S + col)."""
    c0 = rows * S + cols  # int32: the launcher checks L * S < 2**31
    c1 = tl.zeros_like(c0) + bh
    r, _, _, _ = tl.philox(seed, c0, c1, c1 * 0, c1 * 0)
    return (r >> 8).to(tl.int32) >= threshold


@triton.jit
def _keep_fwd(rows, cols, S, IS_CAUSAL: tl.constexpr):
    """[rows, cols] tile of what a query may see: keys in bounds and, when causal, not after the query."""
    ok = cols[None, :] < S
    if IS_CAUSAL:
        ok = ok & (cols[None, :] <= rows[:, None])
    return ok


@triton.jit
def _scores_bias(s, bias_ptrs, row_ok, col_ok, BIAS_KIND: tl.constexpr, MASK_COLS: tl.constexpr):
    """Add a float bias (x log2 e) or apply a bool mask to the log2-domain scores s."""
    if BIAS_KIND == 1:
        b = _load2d(bias_ptrs, row_ok, col_ok, False, MASK_COLS).to(tl.float32)
        # values below -1e38 (finfo(float32 / bfloat16).min masks) are -inf on purpose: x log2 e would overflow
        # anyway, and a finite huge value would lose the row's log-sum-exp to rounding in the backward
        s = s + tl.where(b < -1e38, float("-inf"), tl.maximum(b, -1e38) * LOG2E)
    elif BIAS_KIND == 2:
        b = _load2d(bias_ptrs, row_ok, col_ok, False, MASK_COLS)
        s = tl.where(b != 0, s, float("-inf"))
    return s


# ------------------------------------------------------------------------------------------------- forward

@triton.jit
def _fwd_inner(acc, l_i, m_i, q, k_ptrs, v_ptrs, bias_ptrs, offs_m, offs_n, offs_d, start_m, lo, hi, S, D, qk_scale,
               seed, bh, drop_threshold, drop_scale, stride_kn, stride_vn, stride_bn,
               MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr, BIAS_KIND: tl.constexpr, DROPOUT: tl.constexpr,
               EVEN_D: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    """Key blocks [lo, hi). MASKED: 0 no masks; 1 the key bound and the causal mask on every block (the last and
    the diagonal blocks); 2 tested per block at run time (one loop for all blocks)."""
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols[None, :] < S
        k = _load2d(k_ptrs + start_n * stride_kn, offs_d[:, None] < D, col_ok, not EVEN_D, MASKED)  # [D_PAD, BN]
        s = tl.dot(q, k, input_precision=PRECISION) * qk_scale
        s = _scores_bias(s, bias_ptrs + start_n * stride_bn, None, col_ok, BIAS_KIND, MASKED)
        if MASKED == 1:
            s = tl.where(_keep_fwd(offs_m, cols, S, IS_CAUSAL), s, float("-inf"))
        elif MASKED == 2:
            edge = start_n + BLOCK_N > S
            if IS_CAUSAL:
                edge = edge | (start_n + BLOCK_N - 1 > start_m)
            if edge:
                s = tl.where(_keep_fwd(offs_m, cols, S, IS_CAUSAL), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows masked so far: exp2(-inf - 0) = 0, not NaN
        p = tl.math.exp2(s - m_use[:, None])
        alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if DROPOUT:
            keep = _dropout_keep(seed, bh, offs_m[:, None], cols[None, :], S, drop_threshold)
            p = tl.where(keep, p * drop_scale, 0.0)
        v = _load2d(v_ptrs + start_n * stride_vn, cols[:, None] < S, offs_d[None, :] < D, MASKED, not EVEN_D)
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _fwd_program(H, GROUP, IS_CAUSAL: tl.constexpr):
    """(query block, batch x head, batch, head, kv head) of this forward program; causal grids run the longest
    rows (the last query blocks) first, for a better tail balance."""
    pid_m = tl.program_id(0)
    if IS_CAUSAL:
        pid_m = tl.num_programs(0) - 1 - pid_m
    bh = tl.program_id(1)
    off_h = bh % H
    return pid_m, bh, bh // H, off_h, off_h // GROUP


@triton.jit
def _key_ranges(start_m, S, IS_CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """(full_hi, hi) for the query tile at start_m: keys [0, full_hi) need no mask; [full_hi, hi) are the diagonal
    (causal) and the last partial block. Any BLOCK_M / BLOCK_N ratio: the masked range starts at the key block
    holding the tile's first query."""
    if IS_CAUSAL:
        hi = tl.minimum(S, start_m + BLOCK_M)
        full_hi = tl.minimum((start_m // BLOCK_N) * BLOCK_N, (S // BLOCK_N) * BLOCK_N)
    else:
        hi = S
        full_hi = (S // BLOCK_N) * BLOCK_N
    return full_hi, hi


@triton.jit
def _finish_rows(acc, l_i, m_i):
    """The online softmax's end: (out = acc / l, LSE in natural log); a row whose keys were all masked gets out 0
    and LSE +inf."""
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    lse = tl.where(empty, float("inf"), (m_i + tl.math.log2(l_safe)) * LN2)
    return acc / l_safe[:, None], lse


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, Bias, Out, Lse,                  # Q: [B, H, L, D]; K, V: [B, H // GROUP, S, D]; Lse: [B * H, L] fp32
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_bb, stride_bh, stride_bm, stride_bn,  # bias broadcast to [B, H, L, S]: 0 where it broadcasts
    stride_ob, stride_oh, stride_om, stride_od,
    BH, H, GROUP, L, S, D, sm_scale, seed, drop_threshold, drop_scale,
    L_BUCKET, S_BUCKET,                       # autotune keys only (power-of-two buckets of L and S)
    IS_CAUSAL: tl.constexpr, BIAS_KIND: tl.constexpr, DROPOUT: tl.constexpr,
    SINGLE_LOOP: tl.constexpr, D_PAD: tl.constexpr, EVEN_D: tl.constexpr, PRECISION: tl.constexpr,
    PERSISTENT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One query tile per program (grid: query blocks x B * H), or, PERSISTENT, a fixed grid of programs that
    stride over every tile, query block major (each head's block m before any block m - 1; causal: the last, longest
    blocks first), so the programs of a wave do equal work and none waits for a launch slot."""
    tl.static_assert(BLOCK_M % BLOCK_N == 0)
    if PERSISTENT:
        n_m = tl.cdiv(L, BLOCK_M)
        for tile in tl.range(tl.program_id(0), n_m * BH, tl.num_programs(0)):
            pid_m = tile // BH
            if IS_CAUSAL:
                pid_m = n_m - 1 - pid_m
            _fwd_tile(pid_m, tile % BH, Q, K, V, Bias, Out, Lse,
                      stride_qb, stride_qh, stride_qm, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd,
                      stride_vb, stride_vh, stride_vn, stride_vd, stride_bb, stride_bh, stride_bm, stride_bn,
                      stride_ob, stride_oh, stride_om, stride_od, H, GROUP, L, S, D, sm_scale, seed,
                      drop_threshold, drop_scale, IS_CAUSAL, BIAS_KIND, DROPOUT, SINGLE_LOOP, D_PAD, EVEN_D,
                      PRECISION, BLOCK_M, BLOCK_N)
    else:
        pid_m, bh, _, _, _ = _fwd_program(H, GROUP, IS_CAUSAL)
        _fwd_tile(pid_m, bh, Q, K, V, Bias, Out, Lse,
                  stride_qb, stride_qh, stride_qm, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd,
                  stride_vb, stride_vh, stride_vn, stride_vd, stride_bb, stride_bh, stride_bm, stride_bn,
                  stride_ob, stride_oh, stride_om, stride_od, H, GROUP, L, S, D, sm_scale, seed,
                  drop_threshold, drop_scale, IS_CAUSAL, BIAS_KIND, DROPOUT, SINGLE_LOOP, D_PAD, EVEN_D,
                  PRECISION, BLOCK_M, BLOCK_N)


@triton.jit
def _fwd_tile(pid_m, bh, Q, K, V, Bias, Out, Lse,
              stride_qb, stride_qh, stride_qm, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd,
              stride_vb, stride_vh, stride_vn, stride_vd, stride_bb, stride_bh, stride_bm, stride_bn,
              stride_ob, stride_oh, stride_om, stride_od, H, GROUP, L, S, D, sm_scale, seed,
              drop_threshold, drop_scale, IS_CAUSAL: tl.constexpr, BIAS_KIND: tl.constexpr, DROPOUT: tl.constexpr,
              SINGLE_LOOP: tl.constexpr, D_PAD: tl.constexpr, EVEN_D: tl.constexpr, PRECISION: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Query block `pid_m` of batch x head `bh`: out and LSE of its rows."""
    off_b = bh // H
    off_h = bh % H
    off_kh = off_h // GROUP
    q_base = Q + off_b.to(tl.int64) * stride_qb + off_h.to(tl.int64) * stride_qh
    k_base = K + off_b.to(tl.int64) * stride_kb + off_kh.to(tl.int64) * stride_kh
    v_base = V + off_b.to(tl.int64) * stride_vb + off_kh.to(tl.int64) * stride_vh

    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    row_ok = offs_m[:, None] < L
    d_ok = offs_d[None, :] < D

    q = _load2d(q_base + offs_m[:, None].to(tl.int64) * stride_qm + offs_d[None, :] * stride_qd,
                row_ok, d_ok, True, not EVEN_D)
    k_ptrs = k_base + offs_n[None, :].to(tl.int64) * stride_kn + offs_d[:, None] * stride_kd
    v_ptrs = v_base + offs_n[:, None].to(tl.int64) * stride_vn + offs_d[None, :] * stride_vd
    bias_ptrs = Bias
    if BIAS_KIND != 0:
        rows = tl.minimum(offs_m, L - 1)  # clamped, so bias loads need no row mask
        bias_ptrs = (Bias + off_b.to(tl.int64) * stride_bb + off_h.to(tl.int64) * stride_bh
                     + rows[:, None].to(tl.int64) * stride_bm + offs_n[None, :] * stride_bn)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)
    qk_scale = sm_scale * LOG2E

    full_hi, hi = _key_ranges(start_m, S, IS_CAUSAL, BLOCK_M, BLOCK_N)
    if SINGLE_LOOP:
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_ptrs, v_ptrs, bias_ptrs, offs_m, offs_n, offs_d, start_m,
                                   0, hi, S, D, qk_scale, seed, bh, drop_threshold, drop_scale,
                                   stride_kn, stride_vn, stride_bn, 2, IS_CAUSAL, BIAS_KIND, DROPOUT, EVEN_D,
                                   BLOCK_N, PRECISION)
    else:
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_ptrs, v_ptrs, bias_ptrs, offs_m, offs_n, offs_d, start_m,
                                   0, full_hi, S, D, qk_scale, seed, bh, drop_threshold, drop_scale,
                                   stride_kn, stride_vn, stride_bn, 0, IS_CAUSAL, BIAS_KIND, DROPOUT, EVEN_D,
                                   BLOCK_N, PRECISION)
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_ptrs, v_ptrs, bias_ptrs, offs_m, offs_n, offs_d, start_m,
                                   full_hi, hi, S, D, qk_scale, seed, bh, drop_threshold, drop_scale,
                                   stride_kn, stride_vn, stride_bn, 1, IS_CAUSAL, BIAS_KIND, DROPOUT, EVEN_D,
                                   BLOCK_N, PRECISION)

    out, lse = _finish_rows(acc, l_i, m_i)
    tl.store(Lse + bh.to(tl.int64) * L + offs_m, lse, mask=offs_m < L)
    o_ptrs = (Out + off_b.to(tl.int64) * stride_ob + off_h.to(tl.int64) * stride_oh
              + offs_m[:, None].to(tl.int64) * stride_om + offs_d[None, :] * stride_od)
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok & d_ok)


# ------------------------------------------------------------------------------------------------- backward

@triton.jit
def _bwd_preprocess(Out, DO, Delta,       # Out, DO: [B, H, L, D]; Delta: [B * H, L] fp32
                    stride_ob, stride_oh, stride_om, stride_od,
                    stride_db, stride_dh, stride_dm, stride_dd,
                    H, L, D, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr):
    bh = tl.program_id(1)
    off_b = bh // H
    off_h = bh % H
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    ok = (offs_m[:, None] < L) & (offs_d[None, :] < D)
    o = tl.load(Out + off_b.to(tl.int64) * stride_ob + off_h.to(tl.int64) * stride_oh
                + offs_m[:, None].to(tl.int64) * stride_om + offs_d[None, :] * stride_od, mask=ok, other=0.0)
    do = tl.load(DO + off_b.to(tl.int64) * stride_db + off_h.to(tl.int64) * stride_dh
                 + offs_m[:, None].to(tl.int64) * stride_dm + offs_d[None, :] * stride_dd, mask=ok, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(Delta + bh.to(tl.int64) * L + offs_m, delta, mask=offs_m < L)


@triton.jit
def _bwd_dkdv_inner(dk, dv, k, v, q_ptrs, do_ptrs, bias_ptrs, lse_ptr, delta_ptr, dq_ptrs, offs_m, offs_n, offs_d,
                    n_last, lo, hi, L, S, D, sm_scale, qk_scale, seed, bh, drop_threshold, drop_scale, stride_qm,
                    stride_dom,
                    stride_bm, stride_dqm, MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr, BIAS_KIND: tl.constexpr,
                    DROPOUT: tl.constexpr, ATOMIC_DQ: tl.constexpr, EVEN_D: tl.constexpr, BLOCK_M: tl.constexpr,
                    PRECISION: tl.constexpr):
    """Query blocks [lo, hi) against one key block, in transposed form (keys along rows): sT = K Q^T."""
    for start_m in range(lo, hi, BLOCK_M):
        rows = start_m + offs_m                     # query indices, along the columns of the tile
        row_ok = rows[None, :] < L
        qT = _load2d(q_ptrs + start_m * stride_qm, offs_d[:, None] < D, row_ok, not EVEN_D, MASKED)  # [D_PAD, BM]
        lse = tl.load(lse_ptr + rows, mask=rows < L, other=float("inf")) * LOG2E
        sT = tl.dot(k, qT, input_precision=PRECISION) * qk_scale
        sT = _scores_bias(sT, bias_ptrs + start_m * stride_bm, None, row_ok, BIAS_KIND, MASKED)
        pT = tl.math.exp2(sT - lse[None, :])        # rows past L and fully masked rows: lse = +inf, so 0
        if IS_CAUSAL:
            if MASKED == 1:
                pT = tl.where(rows[None, :] >= offs_n[:, None], pT, 0.0)
            elif MASKED == 2:
                if start_m < n_last:  # a query of this tile comes before a key of it
                    pT = tl.where(rows[None, :] >= offs_n[:, None], pT, 0.0)
        do = _load2d(do_ptrs + start_m * stride_dom, rows[:, None] < L, offs_d[None, :] < D, MASKED, not EVEN_D)
        dpT = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        if DROPOUT:
            keep = _dropout_keep(seed, bh, rows[None, :], offs_n[:, None], S, drop_threshold)
            dv = tl.dot(tl.where(keep, pT * drop_scale, 0.0).to(do.dtype), do, dv, input_precision=PRECISION)
            dpT = tl.where(keep, dpT * drop_scale, 0.0)
        else:
            dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=PRECISION)
        delta = tl.load(delta_ptr + rows, mask=rows < L, other=0.0)
        dsT = (pT * (dpT - delta[None, :])).to(qT.dtype)
        dk = tl.dot(dsT, tl.trans(qT), dk, input_precision=PRECISION)
        if ATOMIC_DQ:  # this key block's share of dQ, added in fp32 (relaxed: only the sum matters)
            dq = tl.dot(tl.trans(dsT), k, input_precision=PRECISION) * sm_scale
            tl.atomic_add(dq_ptrs + start_m * stride_dqm, dq, mask=(rows[:, None] < L) & (offs_d[None, :] < D),
                          sem="relaxed")
    return dk, dv


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, Bias, DO, Lse, Delta, DK, DV, DQ,  # DK, DV: [B, H // GROUP, S, D]; Lse, Delta: [B * H, L];
                                                # DQ: fp32 [B, H, L, D] accumulator when ATOMIC_DQ
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_bb, stride_bh, stride_bm, stride_bn,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    H, GROUP, L, S, D, sm_scale, seed, drop_threshold, drop_scale,
    L_BUCKET, S_BUCKET,
    IS_CAUSAL: tl.constexpr, BIAS_KIND: tl.constexpr, DROPOUT: tl.constexpr, ATOMIC_DQ: tl.constexpr,
    SINGLE_LOOP: tl.constexpr, D_PAD: tl.constexpr, EVEN_D: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    tl.static_assert(BLOCK_N % BLOCK_M == 0)
    start_n = tl.program_id(0) * BLOCK_N
    bkv = tl.program_id(1)
    Hkv = H // GROUP
    off_b = bkv // Hkv
    off_kh = bkv % Hkv
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    n_ok = offs_n[:, None] < S
    d_ok = offs_d[None, :] < D
    k = _load2d(K + off_b.to(tl.int64) * stride_kb + off_kh.to(tl.int64) * stride_kh
                + offs_n[:, None].to(tl.int64) * stride_kn + offs_d[None, :] * stride_kd, n_ok, d_ok, True, not EVEN_D)
    v = _load2d(V + off_b.to(tl.int64) * stride_vb + off_kh.to(tl.int64) * stride_vh
                + offs_n[:, None].to(tl.int64) * stride_vn + offs_d[None, :] * stride_vd, n_ok, d_ok, True, not EVEN_D)
    dk = tl.zeros([BLOCK_N, D_PAD], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, D_PAD], dtype=tl.float32)
    qk_scale = sm_scale * LOG2E
    cols = tl.minimum(offs_n, S - 1)  # clamped, so bias loads need no key mask

    # Query blocks: causal ones start at the diagonal; [lo, diag_hi) need the causal mask, the last partial
    # block the row bound; the rest none.
    full_end = (L // BLOCK_M) * BLOCK_M
    if IS_CAUSAL:
        lo = start_n
        diag_hi = tl.minimum(start_n + BLOCK_N, L)
    else:
        lo = 0
        diag_hi = 0
    mid_hi = tl.maximum(full_end, diag_hi)
    for g in range(0, GROUP):
        off_h = off_kh * GROUP + g
        bh = off_b * H + off_h
        q_ptrs = (Q + off_b.to(tl.int64) * stride_qb + off_h.to(tl.int64) * stride_qh
                  + offs_m[None, :].to(tl.int64) * stride_qm + offs_d[:, None] * stride_qd)
        do_ptrs = (DO + off_b.to(tl.int64) * stride_dob + off_h.to(tl.int64) * stride_doh
                   + offs_m[:, None].to(tl.int64) * stride_dom + offs_d[None, :] * stride_dod)
        bias_ptrs = Bias
        if BIAS_KIND != 0:
            bias_ptrs = (Bias + off_b.to(tl.int64) * stride_bb + off_h.to(tl.int64) * stride_bh
                         + offs_m[None, :].to(tl.int64) * stride_bm + cols[:, None] * stride_bn)
        lse_ptr = Lse + bh.to(tl.int64) * L
        delta_ptr = Delta + bh.to(tl.int64) * L
        dq_ptrs = DQ
        if ATOMIC_DQ:
            dq_ptrs = (DQ + off_b.to(tl.int64) * stride_dqb + off_h.to(tl.int64) * stride_dqh
                       + offs_m[:, None].to(tl.int64) * stride_dqm + offs_d[None, :] * stride_dqd)
        if SINGLE_LOOP:
            dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_ptrs, do_ptrs, bias_ptrs, lse_ptr, delta_ptr, dq_ptrs, offs_m,
                                     offs_n, offs_d, start_n + BLOCK_N - 1, lo, L, L, S, D, sm_scale, qk_scale,
                                     seed, bh,
                                     drop_threshold, drop_scale, stride_qm, stride_dom, stride_bm, stride_dqm,
                                     2, IS_CAUSAL, BIAS_KIND, DROPOUT, ATOMIC_DQ, EVEN_D, BLOCK_M, PRECISION)
        else:
            for stage in tl.static_range(3):
                # stage 0: the causal diagonal (masked); 1: full query blocks; 2: the last partial block (masked)
                if stage == 0:
                    s_lo = lo
                    s_hi = diag_hi
                elif stage == 1:
                    s_lo = tl.maximum(lo, diag_hi)
                    s_hi = full_end
                else:
                    s_lo = tl.maximum(lo, mid_hi)
                    s_hi = L
                dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_ptrs, do_ptrs, bias_ptrs, lse_ptr, delta_ptr, dq_ptrs,
                                         offs_m, offs_n, offs_d, start_n + BLOCK_N - 1, s_lo, s_hi, L, S, D,
                                         sm_scale, qk_scale, seed, bh,
                                         drop_threshold, drop_scale, stride_qm, stride_dom, stride_bm, stride_dqm,
                                         0 if stage == 1 else 1, IS_CAUSAL, BIAS_KIND, DROPOUT, ATOMIC_DQ, EVEN_D,
                                         BLOCK_M, PRECISION)
    dk = dk * sm_scale
    tl.store(DK + off_b.to(tl.int64) * stride_dkb + off_kh.to(tl.int64) * stride_dkh
             + offs_n[:, None].to(tl.int64) * stride_dkn + offs_d[None, :] * stride_dkd,
             dk.to(DK.dtype.element_ty), mask=n_ok & d_ok)
    tl.store(DV + off_b.to(tl.int64) * stride_dvb + off_kh.to(tl.int64) * stride_dvh
             + offs_n[:, None].to(tl.int64) * stride_dvn + offs_d[None, :] * stride_dvd,
             dv.to(DV.dtype.element_ty), mask=n_ok & d_ok)


@triton.jit
def _bwd_dq_inner(dq, q, do, lse, delta, k_ptrs, v_ptrs, bias_ptrs, ds_ptrs, offs_m, offs_n, offs_d, start_m, lo, hi,
                  L, S, D,
                  qk_scale, seed, bh, drop_threshold, drop_scale, stride_kn, stride_vn, stride_bn, stride_dsn,
                  MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr, BIAS_KIND: tl.constexpr, DROPOUT: tl.constexpr,
                  BIAS_GRAD: tl.constexpr, EVEN_D: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols[None, :] < S
        d_ok = offs_d[:, None] < D
        kT = _load2d(k_ptrs + start_n * stride_kn, d_ok, col_ok, not EVEN_D, MASKED)  # [D_PAD, BLOCK_N]
        vT = _load2d(v_ptrs + start_n * stride_vn, d_ok, col_ok, not EVEN_D, MASKED)
        s = tl.dot(q, kT, input_precision=PRECISION) * qk_scale
        s = _scores_bias(s, bias_ptrs + start_n * stride_bn, None, col_ok, BIAS_KIND, MASKED)
        p = tl.math.exp2(s - lse[:, None])
        if MASKED == 1:
            p = tl.where(_keep_fwd(offs_m, cols, S, IS_CAUSAL), p, 0.0)
        elif MASKED == 2:
            edge = start_n + BLOCK_N > S
            if IS_CAUSAL:
                edge = edge | (start_n + BLOCK_N - 1 > start_m)
            if edge:
                p = tl.where(_keep_fwd(offs_m, cols, S, IS_CAUSAL), p, 0.0)
        dp = tl.dot(do, vT, input_precision=PRECISION)
        if DROPOUT:
            keep = _dropout_keep(seed, bh, offs_m[:, None], cols[None, :], S, drop_threshold)
            dp = tl.where(keep, dp * drop_scale, 0.0)
        ds = p * (dp - delta[:, None])
        if BIAS_GRAD:
            tl.store(ds_ptrs + start_n * stride_dsn, ds, mask=(offs_m[:, None] < L) & col_ok)
        dq = tl.dot(ds.to(kT.dtype), tl.trans(kT), dq, input_precision=PRECISION)
    return dq


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, Bias, DO, Lse, Delta, DQ, DS,   # DQ like Q; DS: dscores, fp32 [B, H, L, S] when BIAS_GRAD
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_bb, stride_bh, stride_bm, stride_bn,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    stride_dsb, stride_dsh, stride_dsm, stride_dsn,
    H, GROUP, L, S, D, sm_scale, seed, drop_threshold, drop_scale,
    L_BUCKET, S_BUCKET,
    IS_CAUSAL: tl.constexpr, BIAS_KIND: tl.constexpr, DROPOUT: tl.constexpr, BIAS_GRAD: tl.constexpr,
    SINGLE_LOOP: tl.constexpr, D_PAD: tl.constexpr, EVEN_D: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    tl.static_assert(BLOCK_M % BLOCK_N == 0)
    pid_m = tl.program_id(0)
    if IS_CAUSAL:
        pid_m = tl.num_programs(0) - 1 - pid_m
    bh = tl.program_id(1)
    off_b = bh // H
    off_h = bh % H
    off_kh = off_h // GROUP
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    row_ok = offs_m[:, None] < L
    d_ok = offs_d[None, :] < D
    q = _load2d(Q + off_b.to(tl.int64) * stride_qb + off_h.to(tl.int64) * stride_qh
                + offs_m[:, None].to(tl.int64) * stride_qm + offs_d[None, :] * stride_qd, row_ok, d_ok, True,
                not EVEN_D)
    do = _load2d(DO + off_b.to(tl.int64) * stride_dob + off_h.to(tl.int64) * stride_doh
                 + offs_m[:, None].to(tl.int64) * stride_dom + offs_d[None, :] * stride_dod, row_ok, d_ok, True,
                 not EVEN_D)
    lse = tl.load(Lse + bh.to(tl.int64) * L + offs_m, mask=offs_m < L, other=float("inf")) * LOG2E
    delta = tl.load(Delta + bh.to(tl.int64) * L + offs_m, mask=offs_m < L, other=0.0)
    k_ptrs = (K + off_b.to(tl.int64) * stride_kb + off_kh.to(tl.int64) * stride_kh
              + offs_n[None, :].to(tl.int64) * stride_kn + offs_d[:, None] * stride_kd)
    v_ptrs = (V + off_b.to(tl.int64) * stride_vb + off_kh.to(tl.int64) * stride_vh
              + offs_n[None, :].to(tl.int64) * stride_vn + offs_d[:, None] * stride_vd)
    bias_ptrs = Bias
    if BIAS_KIND != 0:
        rows = tl.minimum(offs_m, L - 1)
        bias_ptrs = (Bias + off_b.to(tl.int64) * stride_bb + off_h.to(tl.int64) * stride_bh
                     + rows[:, None].to(tl.int64) * stride_bm + offs_n[None, :] * stride_bn)
    ds_ptrs = DS
    if BIAS_GRAD:
        ds_ptrs = (DS + off_b.to(tl.int64) * stride_dsb + off_h.to(tl.int64) * stride_dsh
                   + offs_m[:, None].to(tl.int64) * stride_dsm + offs_n[None, :] * stride_dsn)
    dq = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)
    qk_scale = sm_scale * LOG2E
    if IS_CAUSAL:
        hi = tl.minimum(S, start_m + BLOCK_M)
        full_hi = tl.minimum(start_m, (S // BLOCK_N) * BLOCK_N)
    else:
        hi = S
        full_hi = (S // BLOCK_N) * BLOCK_N
    if SINGLE_LOOP:
        dq = _bwd_dq_inner(dq, q, do, lse, delta, k_ptrs, v_ptrs, bias_ptrs, ds_ptrs, offs_m, offs_n, offs_d,
                           start_m, 0, hi, L, S, D, qk_scale, seed, bh, drop_threshold, drop_scale, stride_kn,
                           stride_vn, stride_bn, stride_dsn, 2, IS_CAUSAL, BIAS_KIND, DROPOUT, BIAS_GRAD, EVEN_D,
                           BLOCK_N, PRECISION)
    else:
        dq = _bwd_dq_inner(dq, q, do, lse, delta, k_ptrs, v_ptrs, bias_ptrs, ds_ptrs, offs_m, offs_n, offs_d,
                           start_m, 0, full_hi, L, S, D, qk_scale, seed, bh, drop_threshold, drop_scale, stride_kn,
                           stride_vn, stride_bn, stride_dsn, 0, IS_CAUSAL, BIAS_KIND, DROPOUT, BIAS_GRAD, EVEN_D,
                           BLOCK_N, PRECISION)
        dq = _bwd_dq_inner(dq, q, do, lse, delta, k_ptrs, v_ptrs, bias_ptrs, ds_ptrs, offs_m, offs_n, offs_d,
                           start_m, full_hi, hi, L, S, D, qk_scale, seed, bh, drop_threshold, drop_scale, stride_kn,
                           stride_vn, stride_bn, stride_dsn, 1, IS_CAUSAL, BIAS_KIND, DROPOUT, BIAS_GRAD, EVEN_D,
                           BLOCK_N, PRECISION)
    dq = dq * sm_scale
    tl.store(DQ + off_b.to(tl.int64) * stride_dqb + off_h.to(tl.int64) * stride_dqh
             + offs_m[:, None].to(tl.int64) * stride_dqm + offs_d[None, :] * stride_dqd,
             dq.to(DQ.dtype.element_ty), mask=row_ok & d_ok)
