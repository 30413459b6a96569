"""Forward kernels: one pass over the bank with the online dual softmax, split over the bank when the row
blocks alone cannot fill the GPU (flash-decoding), and the merge of the split states.

Per row the state is (m_a, n_a, m_b, n_b, W, V, argmax) of online_state.py, in log2 units; results go back
to natural units at the end.
"""
import triton
import triton.language as tl

from .common import LN2, NORM_EPS, as_operand, dot_f32acc, load_bank_tile, log2_1p, program_block
from .online_state import empty_state, merge_state, tile_count

N_STATE = 6  # float planes of the split state: m_a, n_a, m_b, n_b, W, V (the argmax has its own buffer)


@triton.jit
def _finish_rows(ROWS, LSE_S, LSE_T, REF, rows, B, m_a, n_a, m_b, n_b, w, v, idx, KL: tl.constexpr):
    log_z_a = log2_1p(n_a)
    log_z_b = log2_1p(n_b)
    z_b = 1.0 + n_b
    ce = log_z_a + w / z_b
    loss = ce
    if KL:
        loss = ce - (log_z_b + v / z_b)  # KL_i = CE_i - H_i
    mask = rows < B
    tl.store(ROWS + rows, loss * LN2, mask=mask)
    # Saved for the backward in base 2, as it uses them: no round trip through natural units.
    tl.store(LSE_S + rows, m_a + log_z_a, mask=mask)
    tl.store(LSE_T + rows, m_b + log_z_b, mask=mask)
    tl.store(REF + rows, idx, mask=mask)


@triton.jit
def rrd_fwd_kernel(
    S, T, Q, ROWS, LSE_S, LSE_T, REF, PART, PART_IDX,
    B, K, D, stride_s, stride_t, stride_q,
    scale_a, scale_b,  # log2(e) / tau
    tiles_per_split,
    KL: tl.constexpr, SPLIT: tl.constexpr,
    OP_DTYPE: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows, cols, s_hat, t_hat, k_begin, k_end = program_block(
        S, T, stride_s, stride_t, B, K, D, tiles_per_split, OP_DTYPE, UPCAST, BLOCK_B, BLOCK_K, BLOCK_D, NORM_EPS
    )
    m_a, n_a, m_b, n_b, w, v, idx = empty_state(BLOCK_B)
    for k0 in range(k_begin, k_end, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        q_t = tl.trans(as_operand(load_bank_tile(Q, stride_q, ks, cols, K, D), OP_DTYPE, UPCAST))
        a = dot_f32acc(s_hat, q_t, OP_DTYPE, PRECISION, UPCAST) * scale_a
        b = dot_f32acc(t_hat, q_t, OP_DTYPE, PRECISION, UPCAST) * scale_b
        valid = (ks < K)[None, :]
        # Padded bank rows load as 0, so a and b are 0 there (finite); the masked copies feed max and exp2,
        # so e_b is 0 on padded columns and e_b * (m - a) never meets an infinity.
        a_masked = tl.where(valid, a, float("-inf"))
        b_masked = tl.where(valid, b, float("-inf"))
        m_a_t, _, n_a_t = tile_count(a_masked)
        m_b_t, e_b, n_b_t = tile_count(b_masked)
        w_t = tl.sum(e_b * (m_a_t[:, None] - a), axis=1)
        v_t = tl.sum(e_b * (m_b_t[:, None] - b), axis=1)
        idx_t = tl.argmax(a_masked, axis=1).to(tl.int32) + k0
        m_a, n_a, m_b, n_b, w, v, idx = merge_state(
            m_a, n_a, m_b, n_b, w, v, idx, m_a_t, n_a_t, m_b_t, n_b_t, w_t, v_t, idx_t
        )

    if SPLIT:
        # Partial state, laid out [N_STATE, n_splits, B]; rrd_merge_kernel combines the splits.
        mask = rows < B
        plane = tl.num_programs(1) * B
        base = PART + tl.program_id(1) * B + rows
        tl.store(base, m_a, mask=mask)
        tl.store(base + plane, n_a, mask=mask)
        tl.store(base + 2 * plane, m_b, mask=mask)
        tl.store(base + 3 * plane, n_b, mask=mask)
        tl.store(base + 4 * plane, w, mask=mask)
        tl.store(base + 5 * plane, v, mask=mask)
        tl.store(PART_IDX + tl.program_id(1) * B + rows, idx, mask=mask)
    else:
        _finish_rows(ROWS, LSE_S, LSE_T, REF, rows, B, m_a, n_a, m_b, n_b, w, v, idx, KL)


@triton.jit
def rrd_merge_kernel(
    PART, PART_IDX, ROWS, LSE_S, LSE_T, REF, B, n_splits, KL: tl.constexpr, BLOCK_B: tl.constexpr
):
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
    _finish_rows(ROWS, LSE_S, LSE_T, REF, rows, B, m_a, n_a, m_b, n_b, w, v, idx, KL)
