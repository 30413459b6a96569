"""Pieces shared by the forward and backward Triton kernels (see rrd-math.md for the math).

Logits are kept in log2 units (a2 = a log2(e)) so every exponential is an exp2.
"""
import triton
import triton.language as tl

LN2 = 0.6931471805599453
LOG2E = 1.4426950408889634
NORM_EPS = 1e-12  # as F.normalize


@triton.jit
def load_unit_rows(ptr, stride, rows, cols, B, D, EPS: tl.constexpr):
    """Rows of a B x D matrix (padding rows/cols read as 0) divided by max(||row||, eps), in fp32.

    Returns (x_hat, norm): norm is the unclamped row norm (the Jacobian needs to know if the clamp was active).
    """
    mask = (rows[:, None] < B) & (cols[None, :] < D)
    x = tl.load(ptr + rows[:, None] * stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    norm = tl.sqrt(tl.sum(x * x, axis=1))
    return x / tl.maximum(norm, EPS)[:, None], norm


@triton.jit
def load_bank_tile(ptr, stride, ks, cols, K, D):
    # 64-bit row offsets: K x D may pass 2^31 elements (K in the tens of millions).
    mask = (ks[:, None] < K) & (cols[None, :] < D)
    return tl.load(ptr + ks.to(tl.int64)[:, None] * stride + cols[None, :], mask=mask, other=0.0)


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
def dot_f32acc(x, y, OP_DTYPE: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """x @ y of operands made by as_operand, accumulated in fp32. fp32 operands use PRECISION ("ieee":
    fp32 products; "tf32" when the user allows TF32)."""
    if UPCAST:
        return tl.dot(x, y, input_precision="ieee")
    elif OP_DTYPE == tl.float32:
        return tl.dot(x, y, input_precision=PRECISION)
    else:
        return tl.dot(x, y)


@triton.jit
def log2_1p(n):
    """log2(1 + n) for n >= 0, accurate for tiny n (the classic log1p trick: the rounding of 1 + n cancels)."""
    u = 1.0 + n
    d = u - 1.0
    return tl.where(d == 0.0, n * 1.4426950408889634, tl.log2(u) * (n / tl.where(d == 0.0, 1.0, d)))


@triton.jit
def program_block(
    S, T, stride_s, stride_t, B, K, D, tiles_per_split,
    OP_DTYPE: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, EPS: tl.constexpr,
):
    """What a (row block, bank split) program works on: its rows, the normalised student and teacher rows as
    product operands, and its chunk [k_begin, k_end) of the bank. The launcher sizes the splits so every
    chunk holds at least one valid bank row."""
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = tl.arange(0, BLOCK_D)
    s_hat, _ = load_unit_rows(S, stride_s, rows, cols, B, D, EPS)
    t_hat, _ = load_unit_rows(T, stride_t, rows, cols, B, D, EPS)
    k_begin = tl.program_id(1) * tiles_per_split * BLOCK_K
    k_end = tl.minimum(k_begin + tiles_per_split * BLOCK_K, K)
    return rows, cols, as_operand(s_hat, OP_DTYPE, UPCAST), as_operand(t_hat, OP_DTYPE, UPCAST), k_begin, k_end
