"""Forward kernels: one pass over the bank with the online dual softmax, the bank split into chunks so the
row blocks times the splits fill the GPU (flash-decoding), then a merge of the split states.

Per row the state is (m_a, n_a, m_b, n_b, W, V, argmax) of online_state.py, in log2 units; results go back
to natural units at the end. A row that meets a non-finite logit (NaN or inf anywhere in its student,
teacher or the bank) gets NaN sums, which every merge carries, so its loss and saved statistics are NaN and
so is its gradient: never an exception, never a silently finite answer.
"""
import triton
import triton.language as tl

from .common import LN2, log2_1p, logit_scales, logit_tiles, split_range
from .online_state import empty_state, merge_state, store_state, tile_count

N_STATE = 6  # float planes of the split state: m_a, n_a, m_b, n_b, W, V (the argmax has its own buffer)


@triton.jit(do_not_specialize=["B", "K", "tiles_per_split"])
def rrd_fwd_kernel(
    S, T, Q, PART, PART_IDX,
    B, K, D, stride_s, stride_t, stride_q,
    scale_a, scale_b,  # log2(e) / tau
    tiles_per_split,
    OP_DTYPE: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_DK: tl.constexpr,
):
    """Grid (row blocks, splits): the partial state of BLOCK_B rows over one chunk of the bank, written to
    PART [N_STATE, n_splits, B] and PART_IDX [n_splits, B] (the first bank row of the tile holding the
    student's maximum; rrd_argmax_kernel turns it into the row). The features are walked in chunks of
    BLOCK_DK inside every product (common.logit_tiles), for D beyond the resident kernels (resident.py).

    Non-finite logits are not tested for: a NaN (or an infinity, which meets another infinity or a zero in
    the products or the exponents) reaches n_a, n_b, W and V by plain arithmetic, so the row's loss and
    saved statistics are NaN. GPUs' max ignores NaN and the interpreter's propagates it: either way the
    sums are NaN."""
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_scale_a, row_scale_b = logit_scales(S, T, stride_s, stride_t, rows, B, D, scale_a, scale_b, BLOCK_B, BLOCK_DK)
    k_begin, k_end = split_range(K, tiles_per_split, BLOCK_K)
    m_a, n_a, m_b, n_b, w, v, idx = empty_state(BLOCK_B)
    for k0 in range(k_begin, k_end, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        a, b = logit_tiles(
            S, T, Q, stride_s, stride_t, stride_q, rows, ks, B, K, D, row_scale_a, row_scale_b,
            OP_DTYPE, PRECISION, UPCAST, BLOCK_B, BLOCK_K, BLOCK_DK,
        )
        # Padded bank rows load as 0, so a and b are finite there; -inf keeps them out of the maxima and
        # makes e_b = 0, and the where keeps e_b * (m - a) at 0 on them.
        valid = (ks < K)[None, :]
        a_counted = tl.where(valid, a, float("-inf"))
        b_counted = tl.where(valid, b, float("-inf"))
        m_a_t, _, n_a_t = tile_count(a_counted)
        m_b_t, e_b, n_b_t = tile_count(b_counted)
        w_t = tl.sum(tl.where(valid, e_b * (m_a_t[:, None] - a), 0.0), axis=1)
        v_t = tl.sum(tl.where(valid, e_b * (m_b_t[:, None] - b), 0.0), axis=1)
        # The tile that holds the student's maximum, not the row: an index reduction over every element
        # would cost more than all the rest of the count.
        idx_t = tl.full([BLOCK_B], 0, tl.int32) + k0
        m_a, n_a, m_b, n_b, w, v, idx = merge_state(
            m_a, n_a, m_b, n_b, w, v, idx, m_a_t, n_a_t, m_b_t, n_b_t, w_t, v_t, idx_t
        )

    store_state(PART, PART_IDX, rows, B, m_a, n_a, m_b, n_b, w, v, idx)


@triton.jit
def _argmax_chunk(acc, s_ptrs, q_ptrs, d0, D, cols, EVEN_D: tl.constexpr):
    """acc + s_i Q_k elementwise over features d0 + cols (rrd_argmax_kernel), in fp32."""
    if EVEN_D:
        s = tl.load(s_ptrs)
        q = tl.load(q_ptrs)
    else:
        in_d = d0 + cols < D
        s = tl.load(s_ptrs, mask=in_d, other=0.0)
        q = tl.load(q_ptrs, mask=in_d[None, :], other=0.0)
    return acc + s.to(tl.float32)[None, :] * q.to(tl.float32)


@triton.jit(do_not_specialize=["B", "K", "n_splits"])
def rrd_argmax_kernel(
    S, Q, PART, PART_IDX, B, K, D, stride_s, stride_q, n_splits,
    SPLITS: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_DK: tl.constexpr, D_PAD: tl.constexpr,
    EVEN_D: tl.constexpr,
):
    """One program per row: the split with the largest student maximum (the first such), and in the tile
    PART_IDX names there the bank row with the largest s_i . Q_k (the first such), written to PART_IDX for
    every split (so any merge of the splits, or of bank shards, carries it). The forward only recorded the
    tile: one index per row and tile instead of an index reduction over every element. SPLITS: n_splits
    rounded up to a power of two, so the splits are one vector, not a loop.

    The tile's products are accumulated elementwise over chunks of BLOCK_DK features ([BLOCK_K, BLOCK_DK]
    fp32) and summed over the features once, so each bank element costs one fused
    multiply-add. The logits here are fp32 dot products of the raw rows, not the tensor-core products of the
    forward, so two rows within rounding of each other may be ordered differently: then neither is a sharp
    maximum (each has probability <= 1/2), where the backward's guard is off (ref = -1) or helps either way.
    NaN products are never the maximum; a tile with no finite product keeps its first row.

    The tile's rows past K read row K - 1 instead (their products are masked after the sum), so only a D
    that is not a multiple of BLOCK_DK (EVEN_D false) masks loads: the features past D."""
    i = tl.program_id(0)
    splits = tl.arange(0, SPLITS)
    in_split = splits < n_splits
    m = tl.load(PART + splits * B + i, mask=in_split, other=float("-inf"))
    m = tl.where(m == m, m, float("-inf"))
    tiles = tl.load(PART_IDX + splits * B + i, mask=in_split, other=0)
    tile = tl.sum(tl.where(splits == tl.argmax(m, axis=0), tiles, 0), axis=0)
    ks = tile + tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_K, BLOCK_DK], tl.float32)
    cols = tl.arange(0, BLOCK_DK)
    s_ptrs = S + i.to(tl.int64) * stride_s + cols
    q_ptrs = Q + tl.minimum(ks, K - 1).to(tl.int64)[:, None] * stride_q + cols[None, :]
    # Past two chunks the bound is D, not D_PAD: known only at run time, it keeps this a loop (unrolled,
    # ptxas issues every chunk's loads at once); up to two, the compiler's choice is the better one.
    for d0 in range(0, D_PAD if D_PAD <= 2 * BLOCK_DK else D, BLOCK_DK):
        acc = _argmax_chunk(acc, s_ptrs, q_ptrs, d0, D, cols, EVEN_D)
        s_ptrs += BLOCK_DK
        q_ptrs += BLOCK_DK
    dot = tl.sum(acc, axis=1)
    dot = tl.where((ks < K) & (dot == dot), dot, float("-inf"))
    arg = tile + tl.argmax(dot, axis=0)
    tl.store(PART_IDX + splits * B + i, tl.zeros([SPLITS], tl.int32) + arg, mask=in_split)


@triton.jit(do_not_specialize=["B", "n_splits", "kl"])
def rrd_merge_kernel(PART, PART_IDX, ROWS, LSE_DIFF, LSE_T, REF, B, n_splits, kl, BLOCK_B: tl.constexpr):
    """Folds the n_splits partial states of each row and finishes it: the per-row loss (CE, or KL when kl),
    and what the backward needs (base 2): lse_a - lse_b, computed without cancellation (see below), and in
    LSE_T [2 B] lse_b followed by C_TOP = 1 / (1 + min(n_a, n_b)), the row's largest probability under
    either softmax and so a bound on every |q_ik - p_ik| (the planes backward scales c by it); and the
    student's argmax row (or -1, see below)."""
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    mask = rows < B
    plane = n_splits * B
    m_a, n_a, m_b, n_b, w, v, idx = empty_state(BLOCK_B)
    for j in range(n_splits):
        # Every split saw a valid column, so its maxima are finite (and 0 on masked-off rows).
        base = PART + j * B + rows
        m_a, n_a, m_b, n_b, w, v, idx = merge_state(
            m_a, n_a, m_b, n_b, w, v, idx,
            tl.load(base, mask=mask, other=0.0),
            tl.load(base + plane, mask=mask, other=0.0),
            tl.load(base + 2 * plane, mask=mask, other=0.0),
            tl.load(base + 3 * plane, mask=mask, other=0.0),
            tl.load(base + 4 * plane, mask=mask, other=0.0),
            tl.load(base + 5 * plane, mask=mask, other=0.0),
            tl.load(PART_IDX + j * B + rows, mask=mask, other=0),
        )
    log_z_a = log2_1p(n_a)
    log_z_b = log2_1p(n_b)
    z_b = 1.0 + n_b
    ce = log_z_a + w / z_b
    h = log_z_b + v / z_b  # the teacher entropy; KL_i = CE_i - H_i
    loss = tl.where(kl != 0, ce - h, ce)
    tl.store(ROWS + rows, loss * LN2, mask=mask)
    # lse_a - lse_b = (m_a - m_b) - log2(z_b / z_a): where both softmaxes are flat (large temperatures) the
    # two LSEs are nearly equal and each is ~log2 K, so their difference taken from fp32 LSEs would keep only
    # ~1e-6 of absolute accuracy; from the counts it keeps the counts' own accuracy.
    lse_diff = (m_a - m_b) - log2_1p((n_b - n_a) / (1.0 + n_a))
    tl.store(LSE_DIFF + rows, lse_diff, mask=mask)
    tl.store(LSE_T + rows, m_b + log_z_b, mask=mask)
    tl.store(LSE_T + B + rows, 1.0 / (1.0 + tl.minimum(n_a, n_b)), mask=mask)
    # The backward's rounding guard (backward.py) helps where the student's softmax is sharp (its top
    # probability 1 / (1 + n_a) >= 1/2): errors then sit at the argmax. Where it is flatter they are spread
    # like q itself and subtracting sigma Q_ref would add error: ref = -1 switches the guard off.
    tl.store(REF + rows, tl.where(n_a <= 1.0, idx, -1), mask=mask)
