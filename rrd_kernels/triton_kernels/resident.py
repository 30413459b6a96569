"""Forward and backward kernels with the row block resident: S and T of BLOCK_B rows are loaded once, every bank
tile is loaded once and used by every product that needs it, and all D features go into one product (D
padded to D_PAD, a power of two). The plans use them wherever D_PAD fits the tiles (plans.py); the chunked
kernels of forward.py / backward.py walk the features otherwise.

The math is docs/math.md's: the same cancellation-free state (section 3), the same q - p (section 5); the
organisation is chosen to issue few instructions per (row, bank row) pair:

- The products take the raw rows (for fp16/bf16 inputs they are the operands as given, so no rounding is
  added) and each logit is x_raw * c_i with the per-row factor c_i = log2(e) / (tau max(||x_i||, eps)),
  folded into the exponent as one fused multiply-add, 2^(x_raw c_i - M_i).
- The running maxima are kept in raw units (m_i); the reference of the row's sums is M_i = fl(m_i c_i). An
  entry is "at the maximum" when its raw logit equals m_i (an exact comparison, whatever the compiler fuses),
  and the fused exponent of such an entry is exactly -r_i, r_i = fl(m_i c_i) - m_i c_i, the rounding of the
  reference: so the exact 1 of the maximum is counted, never summed, and the entries at the maximum add their
  true 2^-r_i - 1 per row (below 2e-5 of 1 in size, computed without cancellation), while W and V take
  the fused exponents as they are: every sum is relative to the same reference M_i, as the identity
  CE = log2 sum_k 2^(a_k - M) + sum_k p_k (M - a_k) allows for any M.
- Only the last tile of a split masks its padded bank rows (MASKED, a constexpr), and only an unaligned D
  masks features (EVEN_D).
- Non-finite logits are not tested for: they reach the sums by arithmetic (forward.py says how).
"""
import triton
import triton.language as tl

from .common import LN2, NORM_EPS, as_operand, dot_acc, load_rows_chunk, split_range
from .online_state import store_state
from .planes import plane_exponent, pow2

# The running maxima start at a finite number below any raw logit (|a_raw| <= ||S_i|| for unit bank rows).
LOW = tl.constexpr(-1.0e30)


@triton.jit
def resident_rows(X, stride, rows, B, D, scale, OP_DTYPE: tl.constexpr, UPCAST: tl.constexpr,
                  D_PAD: tl.constexpr):
    """(x, c): the raw rows as product operands [BLOCK_B, D_PAD] (0 outside), and their logit factors
    c_i = scale / max(||x_i||, eps) in fp32, the norm taken of the rows as given."""
    x = load_rows_chunk(X, stride, rows, tl.arange(0, D_PAD), B, D)
    x32 = x.to(tl.float32)
    factor = scale / tl.maximum(tl.sqrt(tl.sum(x32 * x32, axis=1)), NORM_EPS)
    return as_operand(x, OP_DTYPE, UPCAST), factor


@triton.jit
def bank_tile(Q, stride_q, ks, d0, K, D, OP_DTYPE: tl.constexpr, UPCAST: tl.constexpr, WIDTH: tl.constexpr,
              EVEN_D: tl.constexpr, MASKED: tl.constexpr):
    """Bank rows ks, features d0 .. d0 + WIDTH: [BLOCK_K, WIDTH] operands, 0 past K (MASKED tiles) and past D
    (EVEN_D: D is a multiple of WIDTH, so no feature is masked)."""
    cols = d0 + tl.arange(0, WIDTH)
    ptrs = Q + ks.to(tl.int64)[:, None] * stride_q + cols[None, :]
    if MASKED:
        q = tl.load(ptrs, mask=(ks[:, None] < K) & (cols[None, :] < D), other=0.0)
    elif EVEN_D:
        q = tl.load(ptrs)
    else:
        q = tl.load(ptrs, mask=cols[None, :] < D, other=0.0)
    return as_operand(q, OP_DTYPE, UPCAST)


@triton.jit
def plane_rows(HI, LO, FACTOR, rows, B, UPCAST: tl.constexpr, D_PAD: tl.constexpr):
    """(hi, lo, c): the fp16 planes of a row block [BLOCK_B, D_PAD] (0 past B) and its logit factors (planes.py)."""
    cols = tl.arange(0, D_PAD)
    hi = load_rows_chunk(HI, D_PAD, rows, cols, B, D_PAD)
    lo = load_rows_chunk(LO, D_PAD, rows, cols, B, D_PAD)
    c = tl.load(FACTOR + rows, mask=rows < B, other=0.0)
    return as_operand(hi, tl.float16, UPCAST), as_operand(lo, tl.float16, UPCAST), c


@triton.jit
def _row_block(S, T, S_LO, T_LO, C_S, C_T, stride_s, stride_t, rows, B, D, scale_a, scale_b,
               OP_DTYPE: tl.constexpr, UPCAST: tl.constexpr, D_PAD: tl.constexpr, PLANES: tl.constexpr,
               BLOCK_DK: tl.constexpr):
    """(s, s_lo, t, t_lo, c_a, c_b): the resident operands of a row block and their logit factors; without
    PLANES the rows as given (s_lo, t_lo repeat s, t and are unused). Planes walked in chunks of BLOCK_DK <
    D_PAD (_walked_products) are not held: s, s_lo, t, t_lo are then the planes' pointers."""
    if PLANES and BLOCK_DK < D_PAD:
        s, s_lo, t, t_lo = S, S_LO, T, T_LO
        c_a = tl.load(C_S + rows, mask=rows < B, other=0.0)
        c_b = tl.load(C_T + rows, mask=rows < B, other=0.0)
    elif PLANES:
        s, s_lo, c_a = plane_rows(S, S_LO, C_S, rows, B, UPCAST, D_PAD)
        t, t_lo, c_b = plane_rows(T, T_LO, C_T, rows, B, UPCAST, D_PAD)
    else:
        s, c_a = resident_rows(S, stride_s, rows, B, D, scale_a, OP_DTYPE, UPCAST, D_PAD)
        t, c_b = resident_rows(T, stride_t, rows, B, D, scale_b, OP_DTYPE, UPCAST, D_PAD)
        s_lo = s
        t_lo = t
    return s, s_lo, t, t_lo, c_a, c_b


@triton.jit
def dot3_acc(x_hi, x_lo, y_hi, y_lo, acc, UPCAST: tl.constexpr):
    """acc + x @ y for operands held as fp16 planes (planes.py): hi hi' + hi lo' + lo hi', the two small
    products first, so they are summed before the large one meets them."""
    acc = dot_acc(x_hi, y_lo, acc, tl.float16, "ieee", UPCAST)
    acc = dot_acc(x_lo, y_hi, acc, tl.float16, "ieee", UPCAST)
    return dot_acc(x_hi, y_hi, acc, tl.float16, "ieee", UPCAST)


@triton.jit
def _load_plane(ptrs, valid, UPCAST: tl.constexpr, MASKED: tl.constexpr):
    """A chunk of fp16 plane rows as a product operand, 0 where not valid (MASKED only)."""
    if MASKED:
        x = tl.load(ptrs, mask=valid, other=0.0)
    else:
        x = tl.load(ptrs)
    return as_operand(x, tl.float16, UPCAST)


@triton.jit
def _walked_products(S, S_LO, T, T_LO, Q, Q_LO, rows, ks, B, K, UPCAST: tl.constexpr, BLOCK_B: tl.constexpr,
                     BLOCK_K: tl.constexpr, D_PAD: tl.constexpr, BLOCK_DK: tl.constexpr, MASKED: tl.constexpr):
    """(a, b) as _tile_products' with planes, the features walked in chunks of BLOCK_DK: where the row block's
    four planes and a bank tile's two do not fit shared memory at once (D 256), every bank tile reads the row
    block's chunks again (from L2) beside its own, and the loop over the chunks is what the compiler
    pipelines. Offsets are formed once and advanced (one add per vector per chunk, not an address formula); the
    row planes are padded to whole row blocks (planes.split_rows), so only a partial bank tile is masked."""
    a = tl.zeros([BLOCK_B, BLOCK_K], tl.float32)
    b = tl.zeros([BLOCK_B, BLOCK_K], tl.float32)
    cols = tl.arange(0, BLOCK_DK)
    row_offs = rows.to(tl.int64)[:, None] * D_PAD + cols[None, :]
    bank_offs = ks.to(tl.int64)[:, None] * D_PAD + cols[None, :]
    bank_valid = (ks < K)[:, None]
    for d0 in range(0, D_PAD, BLOCK_DK):
        q_t = tl.trans(_load_plane(Q + bank_offs, bank_valid, UPCAST, MASKED))
        q_lo_t = tl.trans(_load_plane(Q_LO + bank_offs, bank_valid, UPCAST, MASKED))
        a = dot3_acc(_load_plane(S + row_offs, None, UPCAST, False),
                     _load_plane(S_LO + row_offs, None, UPCAST, False), q_t, q_lo_t, a, UPCAST)
        b = dot3_acc(_load_plane(T + row_offs, None, UPCAST, False),
                     _load_plane(T_LO + row_offs, None, UPCAST, False), q_t, q_lo_t, b, UPCAST)
        row_offs += BLOCK_DK
        bank_offs += BLOCK_DK
    return a, b


@triton.jit
def _tile_products(s, s_lo, t, t_lo, Q, Q_LO, stride_q, rows, ks, B, K, D, OP_DTYPE: tl.constexpr,
                   PRECISION: tl.constexpr, UPCAST: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr,
                   D_PAD: tl.constexpr, EVEN_D: tl.constexpr, MASKED: tl.constexpr, PLANES: tl.constexpr,
                   BLOCK_DK: tl.constexpr):
    """(a, b, q, q_lo): raw student and teacher dot products with bank rows ks, and the bank tile itself (with
    PLANES, its two fp16 planes; else q_lo is q and s_lo, t_lo are unused; walked planes: the pointers)."""
    zero = tl.zeros([BLOCK_B, BLOCK_K], tl.float32)
    if PLANES and BLOCK_DK < D_PAD:
        a, b = _walked_products(s, s_lo, t, t_lo, Q, Q_LO, rows, ks, B, K, UPCAST, BLOCK_B, BLOCK_K, D_PAD,
                                BLOCK_DK, MASKED)
        q = Q  # the backward loads the whole tile for its c Q product itself, after c
        q_lo = Q_LO
    elif PLANES:
        q = bank_tile(Q, D_PAD, ks, 0, K, D_PAD, tl.float16, UPCAST, D_PAD, True, MASKED)
        q_lo = bank_tile(Q_LO, D_PAD, ks, 0, K, D_PAD, tl.float16, UPCAST, D_PAD, True, MASKED)
        q_t = tl.trans(q)
        q_lo_t = tl.trans(q_lo)
        a = dot3_acc(s, s_lo, q_t, q_lo_t, zero, UPCAST)
        b = dot3_acc(t, t_lo, q_t, q_lo_t, zero, UPCAST)
    else:
        q = bank_tile(Q, stride_q, ks, 0, K, D, OP_DTYPE, UPCAST, D_PAD, EVEN_D, MASKED)
        q_lo = q
        q_t = tl.trans(q)
        a = dot_acc(s, q_t, zero, OP_DTYPE, PRECISION, UPCAST)
        b = dot_acc(t, q_t, zero, OP_DTYPE, PRECISION, UPCAST)
    return a, b, q, q_lo


@triton.jit
def resident_halves(X, stride, rows, B, D, scale, OP_DTYPE: tl.constexpr, UPCAST: tl.constexpr,
                    HALF: tl.constexpr):
    """(x0, x1, c): resident_rows' operands as two [BLOCK_B, HALF] halves (features 0 .. HALF and HALF ..
    2 HALF), the factor from the whole row."""
    x0 = load_rows_chunk(X, stride, rows, tl.arange(0, HALF), B, D)
    x1 = load_rows_chunk(X, stride, rows, HALF + tl.arange(0, HALF), B, D)
    y0 = x0.to(tl.float32)
    y1 = x1.to(tl.float32)
    factor = scale / tl.maximum(tl.sqrt(tl.sum(y0 * y0, axis=1) + tl.sum(y1 * y1, axis=1)), NORM_EPS)
    return as_operand(x0, OP_DTYPE, UPCAST), as_operand(x1, OP_DTYPE, UPCAST), factor


@triton.jit
def _halved_products(s0, s1, t0, t1, Q, stride_q, ks, K, D, OP_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
                     UPCAST: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, HALF: tl.constexpr,
                     EVEN_D: tl.constexpr, MASKED: tl.constexpr):
    """(a, b, q0, q1): _tile_products' logits with the row block and the bank tile held as feature halves, and
    the tile's halves, either of which is the c Q operand of an output slice (no second load)."""
    q0 = bank_tile(Q, stride_q, ks, 0, K, D, OP_DTYPE, UPCAST, HALF, EVEN_D, MASKED)
    q1 = bank_tile(Q, stride_q, ks, HALF, K, D, OP_DTYPE, UPCAST, HALF, EVEN_D, MASKED)
    zero = tl.zeros([BLOCK_B, BLOCK_K], tl.float32)
    a = dot_acc(s0, tl.trans(q0), zero, OP_DTYPE, PRECISION, UPCAST)
    a = dot_acc(s1, tl.trans(q1), a, OP_DTYPE, PRECISION, UPCAST)
    b = dot_acc(t0, tl.trans(q0), zero, OP_DTYPE, PRECISION, UPCAST)
    b = dot_acc(t1, tl.trans(q1), b, OP_DTYPE, PRECISION, UPCAST)
    return a, b, q0, q1


@triton.jit
def _count(x, valid, m_old, ref_old, n_old, c, MASKED: tl.constexpr):
    """Fold one tile of raw logits x into the row's (m, n): m the raw maximum, n = sum_k 2^(x_k c - M) - 1 with
    M = fl(m c) (ref_old = fl(m_old c)). Returns (m, M, n, e, arg): e = 2^arg, arg = x c - M (one fused
    multiply-add), arg = 0 on padded columns (MASKED tiles) so that e * arg is 0 there.

    The exactness rests on the raw comparison x < m and on the two explicit tl.fma (arg and -r), which the
    compiler cannot round differently; where it fuses other products (ref_old - ref, the shifts of W and V)
    the result moves by at most r, relative to terms that are not small (docs/math.md, section 3)."""
    if MASKED:
        x = tl.where(valid, x, LOW)
    m = tl.maximum(m_old, tl.max(x, axis=1))
    ref = m * c
    arg = tl.fma(x, c[:, None], -ref[:, None])
    e = tl.exp2(arg)
    below_max = x < m[:, None]
    below = tl.sum(tl.where(below_max, e, 0.0), axis=1)
    # Entries at the maximum: the plain sum minus the rest is their count times 2^-r, r = ref - m c, within
    # far less than 1/2 of the count (a NaN anywhere in the row makes it NaN, and with it the row's state).
    at_max = tl.floor(tl.sum(e, axis=1) - below + 0.5)
    neg_r = tl.fma(m, c, -ref)  # -r: the exponent of the entries at the maximum (|r| <= 2^-24 |ref|)
    at_max_excess = at_max * (neg_r * LN2) * (1.0 + 0.5 * LN2 * neg_r)  # at_max (2^-r - 1)
    raised = m > m_old
    rescale = tl.exp2(tl.where(raised, ref_old - ref, 0.0))
    # Raised: the old sum 1 + n_old now weighs rescale < 1 and the new maximum brings its exact 1 (one per
    # tie). Not raised: entries at the maximum tie with the old one and add 1 each.
    n = tl.where(raised, (n_old + 1.0) * rescale + (at_max - 1.0), n_old + at_max) + below + at_max_excess
    if MASKED:
        arg = tl.where(valid, arg, 0.0)
    return m, ref, n, e, arg


@triton.jit
def _sum_plain(x, m_old, ref_old, n_old, c):
    """(m, M, n, e, arg) as _count, with n = sum_k 2^(x_k c - M) - 1 formed by subtracting the 1: exact to
    2^-24 absolute, which is all the teacher's normaliser needs for the cross-entropy (it enters as
    z = 1 + n, and the backward's lse; docs/math.md section 3)."""
    m = tl.maximum(m_old, tl.max(x, axis=1))
    ref = m * c
    arg = tl.fma(x, c[:, None], -ref[:, None])
    e = tl.exp2(arg)
    z = tl.sum(e, axis=1)
    raised = m > m_old
    rescale = tl.exp2(tl.where(raised, ref_old - ref, 0.0))
    n = tl.where(raised, (n_old + 1.0) * rescale + (z - 1.0), n_old + z)
    return m, ref, n, e, arg


@triton.jit
def _fold(a, b, valid, m_a, n_a, m_b, n_b, w, v, c_a, c_b, MASKED: tl.constexpr, KL: tl.constexpr):
    """The running state after one tile of raw student logits a and teacher logits b (docs/math.md section 3):
    raw maxima m, normalisers n and W, V relative to the references M = fl(m c). The teacher's entropy (V,
    and n_b to full relative accuracy) is only formed for the KL objective (KL, a constexpr)."""
    ref_a_old = m_a * c_a
    ref_b_old = m_b * c_b
    m_a, ref_a, n_a, e_a, arg_a = _count(a, valid, m_a, ref_a_old, n_a, c_a, MASKED)
    if KL:
        m_b2, ref_b, n_b2, e_b, arg_b = _count(b, valid, m_b, ref_b_old, n_b, c_b, MASKED)
    else:
        if MASKED:
            b = tl.where(valid, b, LOW)
        m_b2, ref_b, n_b2, e_b, arg_b = _sum_plain(b, m_b, ref_b_old, n_b, c_b)
    # W and V: teacher weights rescaled to the new teacher reference, distances shifted to the new references
    # (each shift >= 0). The first tile's old references may be -inf: its rescale is 0 and so is the product.
    r_b = tl.exp2(ref_b_old - ref_b)
    z_b = 1.0 + n_b
    first = r_b == 0.0
    w = tl.where(first, 0.0, r_b * (w + (ref_a - ref_a_old) * z_b)) - tl.sum(e_b * arg_a, axis=1)
    if KL:
        v = tl.where(first, 0.0, r_b * (v + (ref_b - ref_b_old) * z_b)) - tl.sum(e_b * arg_b, axis=1)
    return m_a, n_a, m_b2, n_b2, w, v


@triton.jit(do_not_specialize=["B", "K", "tiles_per_split"])
def rrd_fwd_resident_kernel(
    S, T, Q, PART, PART_IDX,
    B, K, D, stride_s, stride_t, stride_q,
    scale_a, scale_b,  # log2(e) / tau
    tiles_per_split,
    S_LO, T_LO, Q_LO, C_S, C_T, Q_UNSCALE,  # PLANES only: the lo planes, the logit factors, the bank's 2^-e_q
    OP_DTYPE: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, D_PAD: tl.constexpr, EVEN_D: tl.constexpr, KL: tl.constexpr,
    PLANES: tl.constexpr, BLOCK_DK: tl.constexpr,
):
    """Grid (row blocks, splits): as rrd_fwd_kernel (forward.py), the partial state of BLOCK_B rows over one
    chunk of the bank into PART [N_STATE, n_splits, B], and the first bank row of the tile that raised the
    student maximum last into PART_IDX (rrd_argmax_kernel resolves it to the row). Without KL, V is 0 and
    n_b exact to 2^-24 absolute (all the cross-entropy and its gradient use of them).

    PLANES (fp32 inputs at "highest" precision): S, T and Q are the hi planes of planes.py, S_LO, T_LO and
    Q_LO the lo ones, and C_S, C_T the logit factors; every product is dot3_acc's three fp16 products."""
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    s, s_lo, t, t_lo, c_a, c_b = _row_block(S, T, S_LO, T_LO, C_S, C_T, stride_s, stride_t, rows, B, D, scale_a,
                                            scale_b, OP_DTYPE, UPCAST, D_PAD, PLANES, BLOCK_DK)
    k_begin, k_end = split_range(K, tiles_per_split, BLOCK_K)
    k_full = k_begin + (k_end - k_begin) // BLOCK_K * BLOCK_K  # end of the tiles with no padding
    m_a = tl.full([BLOCK_B], LOW, tl.float32)
    m_b = tl.full([BLOCK_B], LOW, tl.float32)
    n_a = tl.zeros([BLOCK_B], tl.float32)
    n_b = tl.zeros([BLOCK_B], tl.float32)
    w = tl.zeros([BLOCK_B], tl.float32)
    v = tl.zeros([BLOCK_B], tl.float32)
    tile = tl.zeros([BLOCK_B], tl.int32) + k_begin
    for k0 in range(k_begin, k_full, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        a, b, _, _ = _tile_products(s, s_lo, t, t_lo, Q, Q_LO, stride_q, rows, ks, B, K, D, OP_DTYPE, PRECISION,
                                    UPCAST, BLOCK_B, BLOCK_K, D_PAD, EVEN_D, False, PLANES, BLOCK_DK)
        m_a_old = m_a
        m_a, n_a, m_b, n_b, w, v = _fold(a, b, None, m_a, n_a, m_b, n_b, w, v, c_a, c_b, False, KL)
        tile = tl.where(m_a > m_a_old, k0, tile)
    if k_full < k_end:
        ks = k_full + tl.arange(0, BLOCK_K)
        a, b, _, _ = _tile_products(s, s_lo, t, t_lo, Q, Q_LO, stride_q, rows, ks, B, K, D, OP_DTYPE, PRECISION,
                                    UPCAST, BLOCK_B, BLOCK_K, D_PAD, EVEN_D, True, PLANES, BLOCK_DK)
        m_a_old = m_a
        m_a, n_a, m_b, n_b, w, v = _fold(a, b, (ks < K)[None, :], m_a, n_a, m_b, n_b, w, v, c_a, c_b, True, KL)
        tile = tl.where(m_a > m_a_old, k_full, tile)
    # The merge kernel takes the maxima in log2 units: the references M the sums are relative to.
    m_a = m_a * c_a
    m_b = m_b * c_b
    store_state(PART, PART_IDX, rows, B, m_a, n_a, m_b, n_b, w, v, tile)


@triton.jit
def exp2m1_near0(x):
    """2^x - 1 for |x| <= 1/2 without cancellation: x P(x), P the degree-5 polynomial fitted by least squares
    to (2^x - 1)/x on [-1/2, 1/2] (largest relative error 2.8e-8, below fp32 rounding; the Taylor series to
    the same degree is off by 3.9e-7). Five fused multiply-adds and one multiply."""
    p = 0.000154569915358
    p = p * x + 0.00133856554507
    p = p * x + 0.00961806831783
    p = p * x + 0.0555036742053
    p = p * x + 0.240226508648
    p = p * x + 0.693147185735
    return p * x


@triton.jit
def _coefficients(a, b, c_a, c_b, lse_b, lse_diff, valid, MASKED: tl.constexpr):
    """c = q - p for one tile of raw products (docs/math.md section 5): p (2^delta - 1) where the two are
    within 2^(1/2) of each other, the plain difference elsewhere; 0 on padded bank rows. The per-row c_a, c_b,
    lse_b, lse_diff come shaped to broadcast against the tile (rows on axis 0, or on axis 1 for the
    transposed tiles of planes_backward.py); lse_a = lse_diff + lse_b is a per-row value the compiler forms
    once. A row's lse_b lowered by e gives its c times 2^e (c_scale_exponent)."""
    a2 = a * c_a
    b2 = b * c_b
    # (a2 - b2) - lse_diff, in this order: with one bank row (or any row whose maxima are its only
    # entries) lse_diff is exactly a2 - b2, so delta and c are exactly 0. (a2 - lse_diff) - b2, two fused
    # multiply-adds, would save an instruction per element but round that 0 away (a gradient of 1e-13
    # where it is 0).
    delta = (a2 - b2) - lse_diff
    p = tl.exp2(b2 - lse_b)
    q = tl.exp2(a2 - (lse_diff + lse_b))
    c = tl.where(tl.abs(delta) <= 0.5, p * exp2m1_near0(delta), q - p)
    if MASKED:
        c = tl.where(valid, c, 0.0)
    return c


@triton.jit
def c_scale_exponent(C_TOP, rows, row_mask):
    """The planes backward's scale of c per row, as an exponent e_i: C_TOP_i (rrd_merge_kernel) bounds every
    |c_ik| of the row, so the scaled coefficients c_ik 2^e_i lie below 2^15 and split into fp16 planes as the
    operands do (planes.py), with no maximum to track along the bank. The cost of a bound instead of the
    coefficients' own maximum: a row whose c are all far below it (both softmaxes sharp and agreeing) keeps
    its tiny c to an absolute 2^-39 of the bound, not relative (docs/math.md section 6)."""
    return plane_exponent(tl.load(C_TOP + rows, mask=row_mask, other=1.0))


@triton.jit
def _accumulate(c, q, q_lo, acc, OP_DTYPE: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                PLANES: tl.constexpr):
    """acc + c @ q for one tile of coefficients; with PLANES c (scaled, c_scale_exponent) is split into planes
    as the operands are."""
    if PLANES:
        c_hi = as_operand(c, tl.float16, UPCAST)
        c_lo = as_operand(c - c_hi.to(tl.float32), tl.float16, UPCAST)
        return dot3_acc(c_hi, c_lo, q, q_lo, acc, UPCAST)
    else:
        return dot_acc(as_operand(c, OP_DTYPE, UPCAST), q, acc, OP_DTYPE, PRECISION, UPCAST)


@triton.jit
def _bwd_tile(s, s2, t, t2, Q, Q_LO, stride_q, rows, ks, B, K, D, c_a, c_b, lse_b, lse_diff, acc, sigma,
              OP_DTYPE: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr, BLOCK_B: tl.constexpr,
              BLOCK_K: tl.constexpr, D_PAD: tl.constexpr, EVEN_D: tl.constexpr, MASKED: tl.constexpr,
              PLANES: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr, SLICE: tl.constexpr,
              SIGMA_PER_TILE: tl.constexpr):
    """One bank tile of rrd_bwd_resident_kernel: (acc, sigma) after bank rows ks."""
    if BLOCK_DV < D_PAD:
        a, b, q0, q1 = _halved_products(s, s2, t, t2, Q, stride_q, ks, K, D, OP_DTYPE, PRECISION, UPCAST,
                                        BLOCK_B, BLOCK_K, BLOCK_DV, EVEN_D, MASKED)
        q = q0 if SLICE == 0 else q1
        q_lo = q
    else:
        a, b, q, q_lo = _tile_products(s, s2, t, t2, Q, Q_LO, stride_q, rows, ks, B, K, D, OP_DTYPE, PRECISION,
                                       UPCAST, BLOCK_B, BLOCK_K, D_PAD, EVEN_D, MASKED, PLANES, BLOCK_DK)
    c = _coefficients(a, b, c_a[:, None], c_b[:, None], lse_b[:, None], lse_diff[:, None], (ks < K)[None, :],
                      MASKED)
    sigma += tl.sum(c, axis=1, keep_dims=True) if SIGMA_PER_TILE else c
    if PLANES and BLOCK_DK < D_PAD:
        q = bank_tile(Q, D_PAD, ks, 0, K, D_PAD, tl.float16, UPCAST, D_PAD, True, MASKED)
        q_lo = bank_tile(Q_LO, D_PAD, ks, 0, K, D_PAD, tl.float16, UPCAST, D_PAD, True, MASKED)
    acc = _accumulate(c, q, q_lo, acc, OP_DTYPE, PRECISION, UPCAST, PLANES)
    return acc, sigma


@triton.jit(do_not_specialize=["B", "K", "tiles_per_split"])
def rrd_bwd_resident_kernel(
    S, T, Q, LSE_DIFF, LSE_T, PART, PART_SIGMA,
    B, K, D, stride_s, stride_t, stride_q,
    scale_a, scale_b,
    tiles_per_split,
    S_LO, T_LO, Q_LO, C_S, C_T, Q_UNSCALE,  # PLANES only, as the forward's
    OP_DTYPE: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, D_PAD: tl.constexpr, EVEN_D: tl.constexpr,
    PLANES: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr, SLICE: tl.constexpr,
):
    """Grid (row blocks, splits): sum_k c_ik Q_k over one chunk of the bank into PART [n_splits, B, D_PAD],
    and sigma_i = sum_k c_ik into PART_SIGMA [n_splits, B]; the finish kernel (backward.py) is shared with the
    chunked path. Each bank tile is loaded once and feeds the two logit products and the c Q product.

    BLOCK_DV < D_PAD (D 512, whose [BLOCK_B, 512] fp32 accumulator would not fit one warpgroup's registers):
    D_PAD = 2 BLOCK_DV, and a launch sums the features of output slice SLICE (0 or 1) only, so each slice
    forms c from the two full-width logit products again. The row block and each bank tile are held as two
    feature halves (resident_halves, _halved_products), the c Q operand being the slice's half: no second
    load, and no [BLOCK_K, D_PAD] tile staged beside a sliced copy (what spilled). Slice 0 stores sigma.

    sigma sums c in fp32, before c is rounded to a 16-bit product operand (as TF32 products round their fp32
    operands inside the MMA): where the guard matters (both softmaxes sharp on one row) every c_ik is tiny or
    the row's, whose own rounding the guard removes whatever its value; elsewhere the difference is the
    operands' rounding, which the product carries anyway.

    PLANES: as the forward's; c is split into planes too, scaled per row by 2^e_i (c_scale_exponent, from
    the second half of LSE_T), and the sums are scaled back to bank units (exactly: powers of two) before
    they are stored."""
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_mask = rows < B
    # s2, t2: the lo planes (PLANES), the upper feature halves (BLOCK_DV < D_PAD), else unused.
    if BLOCK_DV < D_PAD:
        s, s2, c_a = resident_halves(S, stride_s, rows, B, D, scale_a, OP_DTYPE, UPCAST, BLOCK_DV)
        t, t2, c_b = resident_halves(T, stride_t, rows, B, D, scale_b, OP_DTYPE, UPCAST, BLOCK_DV)
    else:
        s, s2, t, t2, c_a, c_b = _row_block(S, T, S_LO, T_LO, C_S, C_T, stride_s, stride_t, rows, B, D, scale_a,
                                            scale_b, OP_DTYPE, UPCAST, D_PAD, PLANES, BLOCK_DK)
    k_begin, k_end = split_range(K, tiles_per_split, BLOCK_K)
    k_full = k_begin + (k_end - k_begin) // BLOCK_K * BLOCK_K
    lse_diff = tl.load(LSE_DIFF + rows, mask=row_mask, other=0.0)  # lse_a - lse_b, base 2
    lse_b = tl.load(LSE_T + rows, mask=row_mask, other=0.0)
    if PLANES:
        c_exp = c_scale_exponent(LSE_T + B, rows, row_mask)
        lse_b -= c_exp.to(tl.float32)  # so that p, q and c come out times 2^c_exp
    acc = tl.zeros([BLOCK_B, BLOCK_DV], tl.float32)
    # sigma summed over the tiles' columns once, at the end; where the accumulator and operands fill the
    # registers (PLANES at D 256, the sliced D 512) per tile, one register per row.
    SIGMA_PER_TILE: tl.constexpr = PLANES or BLOCK_DV < D_PAD
    sigma = tl.zeros([BLOCK_B, 1 if SIGMA_PER_TILE else BLOCK_K], tl.float32)
    for k0 in range(k_begin, k_full, BLOCK_K):
        acc, sigma = _bwd_tile(s, s2, t, t2, Q, Q_LO, stride_q, rows, k0 + tl.arange(0, BLOCK_K), B, K, D, c_a,
                               c_b, lse_b, lse_diff, acc, sigma, OP_DTYPE, PRECISION, UPCAST, BLOCK_B, BLOCK_K,
                               D_PAD, EVEN_D, False, PLANES, BLOCK_DK, BLOCK_DV, SLICE, SIGMA_PER_TILE)
    if k_full < k_end:
        acc, sigma = _bwd_tile(s, s2, t, t2, Q, Q_LO, stride_q, rows, k_full + tl.arange(0, BLOCK_K), B, K, D,
                               c_a, c_b, lse_b, lse_diff, acc, sigma, OP_DTYPE, PRECISION, UPCAST, BLOCK_B, BLOCK_K,
                               D_PAD, EVEN_D, True, PLANES, BLOCK_DK, BLOCK_DV, SLICE, SIGMA_PER_TILE)
    if PLANES:
        unscale = pow2(-c_exp)
        acc = acc * (unscale * tl.load(Q_UNSCALE))[:, None]
        sigma = sigma * unscale[:, None]

    split = tl.program_id(1)
    cols = SLICE * BLOCK_DV + tl.arange(0, BLOCK_DV)
    out = PART + (split * B + rows.to(tl.int64)[:, None]) * D_PAD + cols[None, :]
    tl.store(out, acc, mask=row_mask[:, None])
    if SLICE == 0:
        tl.store(PART_SIGMA + split * B + rows, tl.sum(sigma, axis=1), mask=row_mask)
