"""Pieces shared by the forward and backward Triton kernels (the math: docs/math.md; the design: docs/design.md).

Logits are kept in log2 units (a2 = a log2(e)) so every exponential is an exp2. The feature dimension D is
walked in chunks of BLOCK_DK inside every product, so registers and shared memory depend on the tile sizes
only, never on D: one tile plan per device serves every D.
"""
import triton
import triton.language as tl

# Globals a kernel reads must be tl.constexpr: the compiler rejects plain Python globals (the interpreter does
# not, which is how such a bug once reached a release).
LN2 = tl.constexpr(0.6931471805599453)
NORM_EPS = tl.constexpr(1e-12)  # as F.normalize
LOG2E = 1.4426950408889634  # host side only


@triton.jit
def load_rows_chunk(ptr, stride, rows, cols, n_rows, n_cols):
    """x[rows, cols] of an n_rows x n_cols row-major matrix, 0 outside it. Row offsets in int64: a bank of
    tens of millions of rows, or a padded row stride, passes 2^31 elements."""
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    return tl.load(ptr + rows.to(tl.int64)[:, None] * stride + cols[None, :], mask=mask, other=0.0)


@triton.jit
def row_norms(ptr, stride, rows, n_rows, D, BLOCK_ROWS: tl.constexpr, BLOCK_DK: tl.constexpr):
    """||x_row|| in fp32 for each of rows (0 for rows past n_rows), chunk by chunk over D."""
    ss = tl.zeros([BLOCK_ROWS], tl.float32)
    for d0 in range(0, D, BLOCK_DK):
        x = load_rows_chunk(ptr, stride, rows, d0 + tl.arange(0, BLOCK_DK), n_rows, D).to(tl.float32)
        ss += tl.sum(x * x, axis=1)
    return tl.sqrt(ss)


@triton.jit
def _round_to_bf16_rne(x):
    # fp32 -> nearest bf16 (ties to even), kept in fp32: bf16 is the top 16 bits of an fp32.
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def as_operand(x, OP_DTYPE: tl.constexpr, UPCAST: tl.constexpr):
    """x (any float dtype) as a product operand in OP_DTYPE: the embeddings' dtype for fp16/bf16 inputs
    (tensor-core products; bank tiles are cast to it), else fp32.

    UPCAST (the CPU interpreter): triton 3.6's interpreter computes bf16 dots wrongly and converts fp32 to
    bf16 by truncation, where GPUs round to nearest. There operands are fp32 tensors holding the values the
    GPU would use, rounded to nearest here, which is the same math."""
    if UPCAST:
        if OP_DTYPE == tl.bfloat16:
            return _round_to_bf16_rne(x.to(tl.float32))
        else:
            return x.to(OP_DTYPE).to(tl.float32)
    else:
        return x.to(OP_DTYPE)


@triton.jit
def dot_acc(x, y, acc, OP_DTYPE: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """acc + x @ y for operands made by as_operand, accumulated in fp32. fp32 operands use PRECISION ("ieee":
    fp32 products; "tf32" when the user allows TF32)."""
    if UPCAST:
        return tl.dot(x, y, acc, input_precision="ieee")
    elif OP_DTYPE == tl.float32:
        return tl.dot(x, y, acc, input_precision=PRECISION)
    else:
        return tl.dot(x, y, acc)


@triton.jit
def logit_tiles(
    S, T, Q, stride_s, stride_t, stride_q, rows, ks, B, K, D, scale_a, scale_b,
    OP_DTYPE: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_DK: tl.constexpr,
):
    """Student and teacher logits (log2 units) of rows against bank rows ks: [BLOCK_B, BLOCK_K] each.

    The products take the raw embeddings; the normalisation is the per-row factor scale = log2(e) /
    (tau max(||x||, eps)) applied to the fp32 dot products. For fp16/bf16 inputs this skips a rounding (the
    raw rows already are operands) and for fp32 it is the same product up to one rounding. Padded rows and
    bank rows read as 0, so their logits are 0 (finite): callers mask the padded bank columns."""
    a = tl.zeros([BLOCK_B, BLOCK_K], tl.float32)
    b = tl.zeros([BLOCK_B, BLOCK_K], tl.float32)
    for d0 in range(0, D, BLOCK_DK):
        cols = d0 + tl.arange(0, BLOCK_DK)
        s = as_operand(load_rows_chunk(S, stride_s, rows, cols, B, D), OP_DTYPE, UPCAST)
        t = as_operand(load_rows_chunk(T, stride_t, rows, cols, B, D), OP_DTYPE, UPCAST)
        q_t = tl.trans(as_operand(load_rows_chunk(Q, stride_q, ks, cols, K, D), OP_DTYPE, UPCAST))
        a = dot_acc(s, q_t, a, OP_DTYPE, PRECISION, UPCAST)
        b = dot_acc(t, q_t, b, OP_DTYPE, PRECISION, UPCAST)
    return a * scale_a[:, None], b * scale_b[:, None]


@triton.jit
def logit_scales(S, T, stride_s, stride_t, rows, B, D, scale_a, scale_b, BLOCK_B: tl.constexpr, BLOCK_DK: tl.constexpr):
    """Per-row factors turning raw dot products into log2-unit logits: log2(e) / (tau max(||x||, eps))."""
    norm_s = row_norms(S, stride_s, rows, B, D, BLOCK_B, BLOCK_DK)
    norm_t = row_norms(T, stride_t, rows, B, D, BLOCK_B, BLOCK_DK)
    return scale_a / tl.maximum(norm_s, NORM_EPS), scale_b / tl.maximum(norm_t, NORM_EPS)


@triton.jit
def split_range(K, tiles_per_split, BLOCK_K: tl.constexpr):
    """The chunk [k_begin, k_end) of the bank this program's split owns. The launcher sizes the splits so
    every chunk holds at least one valid bank row."""
    k_begin = tl.program_id(1) * tiles_per_split * BLOCK_K
    return k_begin, tl.minimum(k_begin + tiles_per_split * BLOCK_K, K)


@triton.jit
def log2_1p(n):
    """log2(1 + n) for n > -1, accurate for tiny n (the classic log1p trick: the rounding of 1 + n cancels)."""
    u = 1.0 + n
    d = u - 1.0
    return tl.where(d == 0.0, n * 1.4426950408889634, tl.log2(u) * (n / tl.where(d == 0.0, 1.0, d)))


@triton.jit
def exp2m1_small(x):
    """2^x - 1 for |x| <= 1/2 without cancellation: the Taylor series of e^y - 1, y = x ln 2 (|y| <= 0.35,
    so the terms up to y^9/9! leave a relative error below 1e-9, under fp32 rounding). Neither libdevice's
    expm1 (no CPU interpreter) nor exp2(x) - 1 (loses the digits of a small x) would do."""
    y = x * LN2
    p = 1.0 / 362880.0
    p = p * y + 1.0 / 40320.0
    p = p * y + 1.0 / 5040.0
    p = p * y + 1.0 / 720.0
    p = p * y + 1.0 / 120.0
    p = p * y + 1.0 / 24.0
    p = p * y + 1.0 / 6.0
    p = p * y + 0.5
    p = p * y + 1.0
    return p * y
