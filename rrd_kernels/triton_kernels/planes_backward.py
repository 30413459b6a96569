"""The backward of fp32 "highest" at D 256 on wgmma: the fp16 planes (planes.py) with every product transposed.

resident.py's backward keeps a [BLOCK_B, D_PAD] accumulator per row block. With planes at D 256 that block
has to be 128 rows (wgmma's M is 64 per warpgroup, and 8 warps chained into one product tile take M = 128),
and a 128-row block's four planes do not fit shared memory beside a bank tile: they were re-read from L2 in
feature chunks for every bank tile. Here the same sums are formed transposed,

    a^T = Q S^T, b^T = Q T^T  [BLOCK_K, BLOCK_B],   acc^T += Q^T c^T  [D_PAD, BLOCK_B],

so M is the bank tile's rows (128) or the features (256) and the row block can be small: 32 rows, whose four
planes (64 KiB) stay resident for the whole bank loop. Each bank tile's two planes are loaded once and feed
all six logit products and the three c Q products (as A, and transposed as A). The math is _coefficients'
(docs/math.md section 5) and resident.c_scale_exponent's scaling of c, on the transposed tile.
"""
import triton
import triton.language as tl

from .common import as_operand, split_range
from .planes import pow2
from .resident import _coefficients, _load_plane, c_scale_exponent, dot3_acc


@triton.jit
def _side_by_side(x, y, BLOCK_B: tl.constexpr):
    """[n, 2 BLOCK_B] from two [n, BLOCK_B]: x's columns, then y's."""
    n: tl.constexpr = x.shape[0]
    return tl.reshape(tl.permute(tl.join(x, y), (0, 2, 1)), [n, 2 * BLOCK_B])


@triton.jit
def _row_planes(S, T, rows, UPCAST: tl.constexpr, BLOCK_B: tl.constexpr, D_PAD: tl.constexpr):
    """One plane of a row block, transposed, the student's rows beside the teacher's: [D_PAD, 2 BLOCK_B], so
    that one product with the bank tile forms both logit tiles. The rows are padded to whole blocks
    (planes.split_rows), so no mask."""
    offs = rows.to(tl.int64)[None, :] * D_PAD + tl.arange(0, D_PAD)[:, None]
    return as_operand(_side_by_side(tl.load(S + offs), tl.load(T + offs), BLOCK_B), tl.float16, UPCAST)


@triton.jit
def _tile(r_hi, r_lo, Q, Q_LO, ks, K, c_a, c_b, lse_b, lse_diff, acc, sigma, UPCAST: tl.constexpr,
          BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, D_PAD: tl.constexpr, MASKED: tl.constexpr):
    """(acc, sigma) after bank rows ks: everything [BLOCK_K, BLOCK_B] or [D_PAD, BLOCK_B], rows along axis 1;
    c comes out scaled per row (lse_b lowered by the row's exponent)."""
    offs = ks.to(tl.int64)[:, None] * D_PAD + tl.arange(0, D_PAD)[None, :]
    valid = (ks < K)[:, None]
    q_hi = _load_plane(Q + offs, valid, UPCAST, MASKED)
    q_lo = _load_plane(Q_LO + offs, valid, UPCAST, MASKED)
    ab = dot3_acc(q_hi, q_lo, r_hi, r_lo, tl.zeros([BLOCK_K, 2 * BLOCK_B], tl.float32), UPCAST)
    a, b = tl.split(tl.permute(tl.reshape(ab, [BLOCK_K, 2, BLOCK_B]), (0, 2, 1)))
    c = _coefficients(a, b, c_a, c_b, lse_b, lse_diff, valid, MASKED)
    sigma += c
    c_hi = as_operand(c, tl.float16, UPCAST)
    c_lo = as_operand(c - c_hi.to(tl.float32), tl.float16, UPCAST)
    acc = dot3_acc(tl.trans(q_hi), tl.trans(q_lo), c_hi, c_lo, acc, UPCAST)
    return acc, sigma


@triton.jit(do_not_specialize=["B", "K", "tiles_per_split"])
def rrd_bwd_planes_kernel(
    S, T, Q, LSE_DIFF, LSE_T, PART, PART_SIGMA, B, K, tiles_per_split,
    S_LO, T_LO, Q_LO, C_S, C_T, Q_UNSCALE,
    UPCAST: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, D_PAD: tl.constexpr,
):
    """Grid (row blocks, splits): resident.rrd_bwd_resident_kernel's outputs for planes (PART [n_splits, B,
    D_PAD], PART_SIGMA [n_splits, B]), from the hi planes S, T, Q, the lo planes S_LO, T_LO, Q_LO, the logit
    factors C_S, C_T and the bank's unscale Q_UNSCALE (launch._resident_operands); LSE_T holds lse_b, then
    the bounds on |c| per row (rrd_merge_kernel)."""
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_mask = rows < B
    r_hi = _row_planes(S, T, rows, UPCAST, BLOCK_B, D_PAD)
    r_lo = _row_planes(S_LO, T_LO, rows, UPCAST, BLOCK_B, D_PAD)
    c_a = tl.load(C_S + rows, mask=row_mask, other=0.0)[None, :]
    c_b = tl.load(C_T + rows, mask=row_mask, other=0.0)[None, :]
    lse_diff = tl.load(LSE_DIFF + rows, mask=row_mask, other=0.0)[None, :]  # lse_a - lse_b, base 2
    c_exp = c_scale_exponent(LSE_T + B, rows, row_mask)
    # Lowered by the row's exponent: p, q and c come out times 2^c_exp.
    lse_b = (tl.load(LSE_T + rows, mask=row_mask, other=0.0) - c_exp.to(tl.float32))[None, :]
    k_begin, k_end = split_range(K, tiles_per_split, BLOCK_K)
    k_full = k_begin + (k_end - k_begin) // BLOCK_K * BLOCK_K
    acc = tl.zeros([D_PAD, BLOCK_B], tl.float32)
    sigma = tl.zeros([BLOCK_K, BLOCK_B], tl.float32)  # summed over the bank rows once, at the end
    # Not hoisted: the row planes' 32 wgmma descriptors, held across the loop, overflow the uniform registers
    # and come back by R2UR and MOV shuffles each tile; formed in the loop each is one uniform add from its
    # base (889 instructions per warp and tile instead of 953, sm_90).
    for k0 in tl.range(k_begin, k_full, BLOCK_K, disable_licm=True):
        acc, sigma = _tile(r_hi, r_lo, Q, Q_LO, k0 + tl.arange(0, BLOCK_K), K, c_a, c_b, lse_b, lse_diff, acc,
                           sigma, UPCAST, BLOCK_B, BLOCK_K, D_PAD, False)
    if k_full < k_end:
        acc, sigma = _tile(r_hi, r_lo, Q, Q_LO, k_full + tl.arange(0, BLOCK_K), K, c_a, c_b, lse_b, lse_diff,
                           acc, sigma, UPCAST, BLOCK_B, BLOCK_K, D_PAD, True)
    unscale = pow2(-c_exp)
    acc = acc * (unscale * tl.load(Q_UNSCALE))[None, :]
    split = tl.program_id(1)
    out = PART + (split * B + rows.to(tl.int64)[None, :]) * D_PAD + tl.arange(0, D_PAD)[:, None]
    tl.store(out, acc, mask=row_mask[None, :])
    tl.store(PART_SIGMA + split * B + rows, tl.sum(sigma, axis=0) * unscale, mask=row_mask)
