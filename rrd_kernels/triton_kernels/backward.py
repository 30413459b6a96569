"""Backward kernels: recompute logit tiles from what the forward saved, accumulate sum_k (q_ik - p_ik) Q_k per
row (split over the bank like the forward, and over slices of the output features), then add the splits up
and apply 1/tau_s, the upstream weight and the normalisation Jacobian to get dL/dS (docs/math.md, "Gradient").

Forming q - p. Where q and p are far apart the plain difference is exact enough. Where they are close (both
softmaxes flat: large temperatures, or rows whose logits barely vary) it is written p (2^delta - 1) with
delta = log2(q/p) = (a - b) - (lse_a - lse_b), and 2^delta - 1 is evaluated without subtracting: the forward
saved lse_a - lse_b itself, computed from the softmax sums, so delta keeps its digits even when both LSEs
are ~log2 K.

Rounding guard: sum_k (q_ik - p_ik) = 0 exactly, so sum_k c_ik Q_k = sum_k c_ik (Q_k - Q_r) for any row r.
Where the student's softmax is sharp the computed coefficients c_ik are off mostly where q or p is near 1,
i.e. at the student's argmax r_i; so the kernel also sums the coefficients, sigma_i, and the finish
subtracts sigma_i Q_r. When both softmaxes are sharp on the same row this keeps the gradient accurate to
fp32 level instead of losing it to 1 - 1 cancellation. Where the student's softmax is flatter (top
probability below 1/2) the errors are a relative shift of every c_ik alike (the rounding of the saved
statistics), whose sum_k c_ik Q_k is small while sigma_i Q_r is not: there the forward saves ref = -1 and
the guard is off.
"""
import triton
import triton.language as tl

from .common import (
    NORM_EPS, as_operand, dot_acc, exp2m1_small, load_rows_chunk, logit_scales, logit_tiles, row_norms,
    split_range,
)


@triton.jit(do_not_specialize=["B", "K", "tiles_per_split"])
def rrd_bwd_kernel(
    S, T, Q, LSE_DIFF, LSE_T, PART, PART_SIGMA,
    B, K, D, D_PAD, stride_s, stride_t, stride_q,
    scale_a, scale_b,
    tiles_per_split,
    OP_DTYPE: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """Grid (row blocks, splits, feature slices): sum_k c_ik Q_k[slice] over one chunk of the bank into
    PART [n_splits, B, D_PAD], and sigma_i into PART_SIGMA [n_splits, B] (from the first slice)."""
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_mask = rows < B
    row_scale_a, row_scale_b = logit_scales(S, T, stride_s, stride_t, rows, B, D, scale_a, scale_b, BLOCK_B, BLOCK_DK)
    k_begin, k_end = split_range(K, tiles_per_split, BLOCK_K)
    lse_diff = tl.load(LSE_DIFF + rows, mask=row_mask, other=0.0)  # lse_a - lse_b, base 2
    lse_b = tl.load(LSE_T + rows, mask=row_mask, other=0.0)
    lse_a = lse_diff + lse_b
    out_cols = tl.program_id(2) * BLOCK_DV + tl.arange(0, BLOCK_DV)

    acc = tl.zeros([BLOCK_B, BLOCK_DV], tl.float32)
    sigma = tl.zeros([BLOCK_B], tl.float32)
    for k0 in range(k_begin, k_end, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        a, b = logit_tiles(
            S, T, Q, stride_s, stride_t, stride_q, rows, ks, B, K, D, row_scale_a, row_scale_b,
            OP_DTYPE, PRECISION, UPCAST, BLOCK_B, BLOCK_K, BLOCK_DK,
        )
        valid = (ks < K)[None, :]
        p = tl.exp2(tl.where(valid, b - lse_b[:, None], float("-inf")))
        q = tl.exp2(tl.where(valid, a - lse_a[:, None], float("-inf")))
        delta = (a - b) - lse_diff[:, None]
        close = tl.abs(delta) <= 0.5
        # c = q - p, zero on padded bank rows (p = q = 0 there); sigma sums it as the product sees it.
        c = tl.where(close, p * exp2m1_small(tl.where(close, delta, 0.0)), q - p)
        c = as_operand(c, OP_DTYPE, UPCAST)
        sigma += tl.sum(c.to(tl.float32), axis=1)
        q_slice = as_operand(load_rows_chunk(Q, stride_q, ks, out_cols, K, D), OP_DTYPE, UPCAST)
        acc = dot_acc(c, q_slice, acc, OP_DTYPE, PRECISION, UPCAST)

    split = tl.program_id(1)
    out = PART + (split * B + rows.to(tl.int64)[:, None]) * D_PAD + out_cols[None, :]
    tl.store(out, acc, mask=row_mask[:, None])
    if tl.program_id(2) == 0:
        tl.store(PART_SIGMA + split * B + rows, sigma, mask=row_mask)


@triton.jit
def _grad_chunk(PART, Q, q_ref_rows, sigma, rows, cols, B, K, D, D_PAD, stride_q, n_splits, inv_tau_s,
                OP_DTYPE: tl.constexpr, UPCAST: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_DK: tl.constexpr):
    """g_i[cols] = (sum over splits of PART - sigma_i Q_r[cols]) / tau_s, Q_r rounded as the products saw it."""
    row_mask = rows < B
    acc = tl.zeros([BLOCK_B, BLOCK_DK], tl.float32)
    offsets = rows.to(tl.int64)[:, None] * D_PAD + cols[None, :]
    mask = row_mask[:, None] & (cols[None, :] < D)
    for j in range(n_splits):
        acc += tl.load(PART + j * B * D_PAD + offsets, mask=mask, other=0.0)
    q_ref = as_operand(load_rows_chunk(Q, stride_q, q_ref_rows, cols, K, D), OP_DTYPE, UPCAST)
    return (acc - sigma[:, None] * q_ref.to(tl.float32)) * inv_tau_s


@triton.jit(do_not_specialize=["B", "K", "n_splits"])
def rrd_bwd_finish_kernel(
    PART, PART_SIGMA, S, Q, REF, W, DS, B, K, D, D_PAD, stride_s, stride_q, stride_w, stride_ds, inv_tau_s, n_splits,
    OP_DTYPE: tl.constexpr, UPCAST: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_DK: tl.constexpr,
):
    """dL/dS_i = w_i (g_i - s_i (s_i . g_i)) / max(||S_i||, eps), two passes over D (the projection needs all
    of g first). When the clamp is active (||S_i|| <= eps) normalisation is a plain scaling by 1/eps and there
    is no projection."""
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_mask = rows < B
    sigma = tl.zeros([BLOCK_B], tl.float32)
    for j in range(n_splits):
        sigma += tl.load(PART_SIGMA + j * B + rows, mask=row_mask, other=0.0)
    # ref = -1: no guard for this row (the forward's merge decides); rows past B are never stored.
    ref = tl.load(REF + rows, mask=row_mask, other=-1)
    sigma = tl.where(ref >= 0, sigma, 0.0)
    q_ref_rows = tl.maximum(ref, 0)
    norm = row_norms(S, stride_s, rows, B, D, BLOCK_B, BLOCK_DK)
    inv_norm = 1.0 / tl.maximum(norm, NORM_EPS)
    proj = tl.zeros([BLOCK_B], tl.float32)
    for d0 in range(0, D, BLOCK_DK):
        cols = d0 + tl.arange(0, BLOCK_DK)
        g = _grad_chunk(
            PART, Q, q_ref_rows, sigma, rows, cols, B, K, D, D_PAD, stride_q, n_splits, inv_tau_s,
            OP_DTYPE, UPCAST, BLOCK_B, BLOCK_DK,
        )
        s_hat = load_rows_chunk(S, stride_s, rows, cols, B, D).to(tl.float32) * inv_norm[:, None]
        proj += tl.sum(s_hat * g, axis=1)
    proj = tl.where(norm > NORM_EPS, proj, 0.0)
    w = tl.load(W + rows * stride_w, mask=row_mask, other=0.0).to(tl.float32)
    out_scale = w * inv_norm
    for d0 in range(0, D, BLOCK_DK):
        cols = d0 + tl.arange(0, BLOCK_DK)
        g = _grad_chunk(
            PART, Q, q_ref_rows, sigma, rows, cols, B, K, D, D_PAD, stride_q, n_splits, inv_tau_s,
            OP_DTYPE, UPCAST, BLOCK_B, BLOCK_DK,
        )
        s_hat = load_rows_chunk(S, stride_s, rows, cols, B, D).to(tl.float32) * inv_norm[:, None]
        ds = (g - s_hat * proj[:, None]) * out_scale[:, None]
        mask = row_mask[:, None] & (cols[None, :] < D)
        # DS has the student's dtype, which OP_DTYPE is: as_operand rounds to it (to nearest, also when interpreted).
        tl.store(DS + rows.to(tl.int64)[:, None] * stride_ds + cols[None, :], as_operand(ds, OP_DTYPE, UPCAST), mask=mask)
