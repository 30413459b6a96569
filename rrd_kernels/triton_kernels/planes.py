"""fp32 operands as two fp16 planes, for fp32-accurate products on fp16 tensor cores (docs/math.md section 6).

At torch's "highest" precision the resident kernels take each fp32 operand x as x 2^e = hi + lo with
hi = fp16(x 2^e) and lo = fp16(x 2^e - hi), and form a product as hi hi' + hi lo' + lo hi' (the lo lo' term
is below 2^-22 of it). fp16 and TF32 both carry 11 significant bits, so this is the 3xTF32 scheme with the
same 22-bit operands, but at the fp16 tensor-core rate (twice TF32's) and in half the shared memory, which
is what lets the planes of a 64-row block stay resident at D 256. fp16's range is what the power-of-two
scale 2^e is for: it puts the largest element of a row (for the student and teacher) or of the whole bank
between 2^14 and 2^15, so hi never overflows and lo stays a normal fp16 down to elements 2^-25 of it. The
scales are exact and are folded into the per-row logit factors; nothing here synchronises with the host.

The planes are D_PAD wide (zero-padded), so the kernels read them without feature masks.
"""
import torch
import triton
import triton.language as tl

from .common import NORM_EPS, load_rows_chunk
from .plans import interpreting

TOP = tl.constexpr(14)  # the largest |x 2^e| lies in [2^TOP, 2^(TOP + 1)): below fp16's largest, 65504
FACTOR_FLOOR = 1e-24  # LOW x FACTOR_FLOOR = -1e6 (see split_rows)
# Rows per program of the split kernels: 4096 fp32 values per 4 warps for the row kernel (its norms and
# scales per row), 8192 for the bank's (each program's addresses and scale amortised over twice the values:
# 0.070 -> 0.058 warp-instructions per pair at D 256 with EVEN, sm_90; 16384 gains nothing more).
SPLIT_ELEMENTS = 4096
BANK_SPLIT_ELEMENTS = 8192


@triton.jit
def pow2(e):
    """2^e for integer e in [-126, 127], exactly (built from the exponent bits; exp2 is an approximation)."""
    return ((e + 127) << 23).to(tl.float32, bitcast=True)


@triton.jit
def plane_exponent(amax):
    """e with amax 2^e in [2^TOP, 2^(TOP + 1)), from amax's exponent bits, within [-126, 126] so that 2^e and
    2^-e are both normal (an amax below 2^-112 is scaled less). An amax of 0 (or a subnormal) takes the
    largest e (0 stays 0); an infinite or NaN amax reads as exponent 128, so its row is scaled down by 2^-114
    and carries the inf or NaN on (inf 2^e = inf, inf - inf = NaN)."""
    biased = (amax.to(tl.uint32, bitcast=True) >> 23) & 0xFF
    e = TOP - (biased.to(tl.int32) - 127)
    return tl.minimum(tl.maximum(e, -126), 126)


@triton.jit
def _store_planes(x, e, HI, LO, rows, n_rows, D_PAD: tl.constexpr, MASKED: tl.constexpr = True):
    scaled = x * pow2(e)[:, None]
    hi = scaled.to(tl.float16)
    lo = (scaled - hi.to(tl.float32)).to(tl.float16)
    cols = tl.arange(0, D_PAD)
    offs = rows.to(tl.int64)[:, None] * D_PAD + cols[None, :]
    if MASKED:
        mask = (rows < n_rows)[:, None]
        tl.store(HI + offs, hi, mask=mask)
        tl.store(LO + offs, lo, mask=mask)
    else:
        tl.store(HI + offs, hi)
        tl.store(LO + offs, lo)
    return scaled


@triton.jit(do_not_specialize=["n_rows", "n_out"])
def rrd_split_rows_kernel(X, stride_x, HI, LO, FACTOR, Q_AMAX, n_rows, n_out, D, scale,
                          BLOCK_R: tl.constexpr, D_PAD: tl.constexpr):
    """Student or teacher rows: planes with a scale per row (n_out >= n_rows rows of them, the padding 0), and
    the row's logit factor
    FACTOR_i = scale / max(||x_i||, eps) 2^-e_i 2^-e_q (scale = log2(e) / tau; e_q the bank's exponent, from
    its largest |element| Q_AMAX), so that a product of planes times FACTOR_i is the logit in log2 units.
    The norm is taken of the scaled row, ||x_i 2^e_i|| (exact scaling): its squares cannot overflow, as
    those of a row with elements near 2^64 would."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    x = load_rows_chunk(X, stride_x, rows, tl.arange(0, D_PAD), n_rows, D).to(tl.float32)
    e = plane_exponent(tl.max(tl.abs(x), axis=1))
    scaled = _store_planes(x, e, HI, LO, rows, n_out, D_PAD)
    e_q = plane_exponent(tl.load(Q_AMAX))
    # scale / max(||x|| 2^e, eps 2^e) = scale / max(||x||, eps) 2^-e, both scalings exact.
    norm = tl.sqrt(tl.sum(scaled * scaled, axis=1))
    factor = scale / tl.maximum(norm, NORM_EPS * pow2(e))
    tl.store(FACTOR + rows, factor * pow2(-e_q), mask=rows < n_rows)


@triton.jit(do_not_specialize=["n_rows"])
def rrd_split_bank_kernel(Q, stride_q, HI, LO, Q_AMAX, Q_UNSCALE, n_rows, D,
                          BLOCK_R: tl.constexpr, D_PAD: tl.constexpr, EVEN: tl.constexpr):
    """Bank rows: planes with the bank's one scale 2^e_q (one scale, so that a logit needs a factor per row of
    S or T only), and Q_UNSCALE = 2^-e_q, which turns products with the bank planes back into bank units.
    EVEN: whole blocks of rows and D = D_PAD, so nothing is masked."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    if EVEN:
        x = tl.load(Q + rows.to(tl.int64)[:, None] * stride_q + tl.arange(0, D_PAD)[None, :]).to(tl.float32)
    else:
        x = load_rows_chunk(Q, stride_q, rows, tl.arange(0, D_PAD), n_rows, D).to(tl.float32)
    e_q = plane_exponent(tl.load(Q_AMAX))
    _store_planes(x, tl.zeros([BLOCK_R], tl.int32) + e_q, HI, LO, rows, n_rows, D_PAD, not EVEN)
    if tl.program_id(0) == 0:
        tl.store(Q_UNSCALE, pow2(-e_q))


def _rows_per_program(d_pad: int, elements: int = SPLIT_ELEMENTS) -> int:
    if interpreting():  # one numpy call per tile op: large tiles, few programs
        return 1024
    return max(1, min(64, elements // d_pad))


def _empty_planes(n: int, d_pad: int, device):
    return (torch.empty((n, d_pad), device=device, dtype=torch.float16),
            torch.empty((n, d_pad), device=device, dtype=torch.float16))


def split_bank(bank: torch.Tensor, d_pad: int):
    """(hi, lo, amax, unscale): the bank's planes [K, d_pad] fp16, its largest |element| and 2^-e_q, both
    [1] fp32 on the device."""
    K, D = bank.shape
    # inf-norm = max |element|, NaN if any is NaN; computed in the bank's dtype (exact), no copy of the bank.
    amax = torch.linalg.vector_norm(bank, float("inf")).to(torch.float32).reshape(1)
    hi, lo = _empty_planes(K, d_pad, bank.device)
    unscale = torch.empty(1, device=bank.device, dtype=torch.float32)
    r = _rows_per_program(d_pad, BANK_SPLIT_ELEMENTS)
    rrd_split_bank_kernel[(triton.cdiv(K, r),)](bank, bank.stride(0), hi, lo, amax, unscale, K, D,
                                                BLOCK_R=r, D_PAD=d_pad, EVEN=K % r == 0 and D == d_pad)
    return hi, lo, amax, unscale


def split_rows(x: torch.Tensor, scale: float, bank_amax: torch.Tensor, d_pad: int, pad_rows: int = 1):
    """(hi, lo, factor): the planes of student or teacher rows [B', d_pad] fp16, B' = B rounded up to a multiple
    of pad_rows (rows past B are 0, so that whole row blocks load without masks), and their logit factors
    [B]."""
    B, D = x.shape
    n_out = triton.cdiv(B, pad_rows) * pad_rows
    hi, lo = _empty_planes(n_out, d_pad, x.device)
    factor = torch.empty(B, device=x.device, dtype=torch.float32)
    r = _rows_per_program(d_pad)
    rrd_split_rows_kernel[(triton.cdiv(n_out, r),)](x, x.stride(0), hi, lo, factor, bank_amax, B, n_out, D, scale,
                                                    BLOCK_R=r, D_PAD=d_pad)
    # The kernels start the running maxima at LOW = -1e30 raw and need LOW c_i to vanish in exp2. A zero row
    # takes the largest scale 2^126, so its factor (eps-clamped) falls to ~1e-30 and LOW c_i to ~-5: its
    # logits are exactly 0 whatever c_i is, so raise such factors (on the device, no sync). Only rows with
    # every |element| below ~1e-18 (or banks that small) reach the floor.
    return hi, lo, factor.clamp_min_(FACTOR_FLOOR)
