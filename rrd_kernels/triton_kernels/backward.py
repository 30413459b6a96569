"""Backward kernels: recompute logit tiles from the saved LSEs, accumulate sum_k (q_ik - p_ik) Q_k per row
(split over the bank like the forward), then scale by 1/tau_s, the upstream weight and the normalisation
Jacobian to get dL/dS (rrd-math.md, "Gradient").

Rounding guard: sum_k (q_ik - p_ik) = 0 exactly, so sum_k c_ik Q_k = sum_k c_ik (Q_k - Q_r) for any row r.
The computed coefficients c_ik are off mostly where q or p is near 1 (the rounding of values near 1 and of
the saved LSE), i.e. at the student's argmax r_i; so the kernel also sums the coefficients, sigma_i, and
subtracts sigma_i Q_r. When both softmaxes are sharp on the same row this keeps the gradient accurate to
fp32 level instead of losing it to 1 - 1 cancellation; elsewhere sigma_i is ~1e-7 and changes nothing.
"""
import triton
import triton.language as tl

from .common import NORM_EPS, as_operand, dot_f32acc, load_bank_tile, load_unit_rows, program_block


@triton.jit
def _store_student_grad(
    acc, sigma, S, Q, REF, W, DS, rows, cols, B, D, stride_s, stride_q, stride_w, stride_ds, inv_tau_s,
    OP_DTYPE: tl.constexpr, UPCAST: tl.constexpr, EPS: tl.constexpr,
):
    """dL/dS_i = w_i (g_i - s_i (s_i . g_i)) / max(||S_i||, eps), g_i = (acc_i - sigma_i Q_r) / tau_s. When the
    clamp is active (||S_i|| <= eps) normalisation is a plain scaling by 1/eps and there is no projection."""
    row_mask = rows < B
    ref = tl.load(REF + rows, mask=row_mask, other=0)
    # The bank row as the products saw it (cast to the operand dtype).
    q_ref = tl.load(Q + ref.to(tl.int64)[:, None] * stride_q + cols[None, :], mask=row_mask[:, None] & (cols[None, :] < D), other=0.0)
    g = (acc - sigma[:, None] * as_operand(q_ref, OP_DTYPE, UPCAST).to(tl.float32)) * inv_tau_s
    s_hat, norm = load_unit_rows(S, stride_s, rows, cols, B, D, EPS)
    proj = tl.where(norm > EPS, tl.sum(s_hat * g, axis=1), 0.0)
    w = tl.load(W + rows * stride_w, mask=row_mask, other=0.0).to(tl.float32)
    ds = (g - s_hat * proj[:, None]) * (w / tl.maximum(norm, EPS))[:, None]
    mask = row_mask[:, None] & (cols[None, :] < D)
    # DS has the student's dtype, which OP_DTYPE is: as_operand rounds to it (to nearest, also when interpreted).
    tl.store(DS + rows[:, None] * stride_ds + cols[None, :], as_operand(ds, OP_DTYPE, UPCAST), mask=mask)


@triton.jit
def rrd_bwd_kernel(
    S, T, Q, LSE_S, LSE_T, REF, W, DS, PART, PART_SIGMA,
    B, K, D, stride_s, stride_t, stride_q, stride_w, stride_ds,
    scale_a, scale_b, inv_tau_s,
    tiles_per_split,
    SPLIT: tl.constexpr,
    OP_DTYPE: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows, cols, s_hat, t_hat, k_begin, k_end = program_block(
        S, T, stride_s, stride_t, B, K, D, tiles_per_split, OP_DTYPE, UPCAST, BLOCK_B, BLOCK_K, BLOCK_D, NORM_EPS
    )
    row_mask = rows < B
    lse_a = tl.load(LSE_S + rows, mask=row_mask, other=0.0)  # base 2, as the forward saved them
    lse_b = tl.load(LSE_T + rows, mask=row_mask, other=0.0)

    acc = tl.zeros([BLOCK_B, BLOCK_D], tl.float32)
    sigma = tl.zeros([BLOCK_B], tl.float32)
    for k0 in range(k_begin, k_end, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        q = as_operand(load_bank_tile(Q, stride_q, ks, cols, K, D), OP_DTYPE, UPCAST)
        q_t = tl.trans(q)
        a = dot_f32acc(s_hat, q_t, OP_DTYPE, PRECISION, UPCAST) * scale_a
        b = dot_f32acc(t_hat, q_t, OP_DTYPE, PRECISION, UPCAST) * scale_b
        # c = q_ik - p_ik, zero on padded bank rows; sigma sums it as the product will see it (rounded).
        valid = (ks < K)[None, :]
        c = tl.exp2(tl.where(valid, a - lse_a[:, None], float("-inf"))) - tl.exp2(
            tl.where(valid, b - lse_b[:, None], float("-inf"))
        )
        c = as_operand(c, OP_DTYPE, UPCAST)
        sigma += tl.sum(c.to(tl.float32), axis=1)
        acc += dot_f32acc(c, q, OP_DTYPE, PRECISION, UPCAST)

    if SPLIT:
        # Partial sums laid out [n_splits, B, BLOCK_D] and [n_splits, B]; rrd_bwd_finish_kernel adds them up.
        split = tl.program_id(1)
        base = PART + (split * B + rows[:, None]) * BLOCK_D + cols[None, :]
        tl.store(base, acc, mask=row_mask[:, None] & (cols[None, :] < BLOCK_D))
        tl.store(PART_SIGMA + split * B + rows, sigma, mask=row_mask)
    else:
        _store_student_grad(
            acc, sigma, S, Q, REF, W, DS, rows, cols, B, D, stride_s, stride_q, stride_w, stride_ds,
            inv_tau_s, OP_DTYPE, UPCAST, NORM_EPS,
        )


@triton.jit
def rrd_bwd_finish_kernel(
    PART, PART_SIGMA, S, Q, REF, W, DS, B, D, stride_s, stride_q, stride_w, stride_ds, inv_tau_s, n_splits,
    OP_DTYPE: tl.constexpr, UPCAST: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = tl.arange(0, BLOCK_D)
    row_mask = rows < B
    mask = row_mask[:, None] & (cols[None, :] < BLOCK_D)
    acc = tl.zeros([BLOCK_B, BLOCK_D], tl.float32)
    sigma = tl.zeros([BLOCK_B], tl.float32)
    for j in range(n_splits):
        acc += tl.load(PART + (j * B + rows[:, None]) * BLOCK_D + cols[None, :], mask=mask, other=0.0)
        sigma += tl.load(PART_SIGMA + j * B + rows, mask=row_mask, other=0.0)
    _store_student_grad(
        acc, sigma, S, Q, REF, W, DS, rows, cols, B, D, stride_s, stride_q, stride_w, stride_ds, inv_tau_s,
        OP_DTYPE, UPCAST, NORM_EPS,
    )
