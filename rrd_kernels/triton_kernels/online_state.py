"""The per-row state of the one-pass dual softmax, in a cancellation-free form.

The textbook one-pass recurrences (docs/math.md) track z = sum_k 2^(x_k - m) and u = sum_k e^(b_k - m_b) a_k,
then CE = lse_a - u/z_b. When a row's softmaxes are sharp and agree (tau 0.005, say) CE is tiny while lse_a and u/z_b are ~300: fp32 keeps
no correct digit. The same recurrences are kept here as sums of non-negative terms:

    z = 1 + n            the maximum contributes the exact 1; n is the rest (ties add 1 each)
    W = sum_k 2^(b_k - m_b) (m_a - a_k)        V = sum_k 2^(b_k - m_b) (m_b - b_k)
    CE = log2(1 + n_a) + W / z_b               H = log2(1 + n_b) + V / z_b        (log2 units)

Merging two states (a new tile into the running state, or split j into the merged state) rescales by
2^(m - M) exactly as those recurrences; W and V also shift by (M - m) z when their reference maximum
moves. The student's argmax row index is carried too: the backward uses it to cancel rounding.
"""
import triton
import triton.language as tl


@triton.jit
def empty_state(BLOCK_B: tl.constexpr):
    """(m_a, n_a, m_b, n_b, W, V, argmax) of no bank row: merging anything into it gives that thing."""
    minus_inf = tl.full([BLOCK_B], float("-inf"), tl.float32)
    zero = tl.zeros([BLOCK_B], tl.float32)
    return minus_inf, zero, minus_inf, zero, zero, zero, tl.zeros([BLOCK_B], tl.int32)


@triton.jit
def tile_count(x_masked):
    """Per row of a [rows, cols] tile (-inf where masked): max m, e = 2^(x - m), and n = sum e - 1 summed
    without forming 1 + small - 1."""
    m = tl.max(x_masked, axis=1)
    e = tl.exp2(x_masked - m[:, None])
    at_max = x_masked == m[:, None]
    n = tl.sum(tl.where(at_max, 0.0, e), axis=1) + (tl.sum(at_max.to(tl.float32), axis=1) - 1.0)
    return m, e, n


@triton.jit
def merge_count(m_x, n_x, m_y, n_y):
    """(m, n) of the union of two sums 1 + n taken relative to maxima m_x, m_y. m_x may be -inf (empty)."""
    m = tl.maximum(m_x, m_y)
    # Each branch's exponent is <= 0 where that branch is taken; the clamp keeps the other one finite.
    n = tl.where(
        m_y > m_x,
        (n_x + 1.0) * tl.exp2(tl.minimum(m_x - m_y, 0.0)) + n_y,
        n_x + (n_y + 1.0) * tl.exp2(tl.minimum(m_y - m_x, 0.0)),
    )
    return m, n


@triton.jit
def _shifted(w, shift, z, r):
    # r (w + shift z), where r = 0 marks an empty state (shift is then +inf: keep it out of the product).
    return tl.where(r > 0.0, r * (w + tl.where(r > 0.0, shift, 0.0) * z), 0.0)


@triton.jit
def merge_state(m_a, n_a, m_b, n_b, w, v, idx, m_a2, n_a2, m_b2, n_b2, w2, v2, idx2):
    """Merge state 2 into state 1 (which may be the empty state: m = -inf, n = w = v = 0)."""
    new_m_a, new_n_a = merge_count(m_a, n_a, m_a2, n_a2)
    new_m_b, new_n_b = merge_count(m_b, n_b, m_b2, n_b2)
    r1 = tl.exp2(m_b - new_m_b)
    r2 = tl.exp2(m_b2 - new_m_b)
    z1 = 1.0 + n_b
    z2 = 1.0 + n_b2
    new_w = _shifted(w, new_m_a - m_a, z1, r1) + _shifted(w2, new_m_a - m_a2, z2, r2)
    new_v = _shifted(v, new_m_b - m_b, z1, r1) + _shifted(v2, new_m_b - m_b2, z2, r2)
    new_idx = tl.where(m_a2 > m_a, idx2, idx)
    return new_m_a, new_n_a, new_m_b, new_n_b, new_w, new_v, new_idx


@triton.jit
def store_state(PART, PART_IDX, rows, B, m_a, n_a, m_b, n_b, w, v, idx):
    """This program's split of the state, [N_STATE, n_splits, B] float planes and [n_splits, B] indices."""
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
