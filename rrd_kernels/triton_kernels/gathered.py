"""Kernels for a gathered bank: sample i meets its own K+1 memory rows, index[i, :] (rrd_kernels/gathered.py
has the function; docs/momentum-memory.md the module). Student i is scored against rows of the teacher
memory MT, teacher i against rows of the student memory MS.

Each row's bank is its own, so nothing is shared between rows: a program takes one row and a split of its
K+1 columns, gathers BLOCK_K memory rows of each memory per step and forms the dot products on the FMA units
(a matrix-vector product has no reuse for tensor cores). The floor is the gathered bytes: 2 (K+1) D bytes
of memory per row and pass, read from wherever the rows are (HBM or L2). The running state, its merge and
the coefficients are the resident kernels' (docs/math.md sections 3-5), on [1, BLOCK_K] tiles; the argmax
is exact per split (tl.argmax over a tile is cheap at one row per program), stored as the memory row.

The gradient is formed in the same call as the loss (a second pass over the gathered rows, then the
shared finish kernel): the module updates the memories right after the loss, so a backward that gathered
again would read the new rows.
"""
import torch
import triton
import triton.language as tl

from .common import LOG2E, NORM_EPS, split_range
from .online_state import store_state
from .resident import _coefficients, _fold

LOW = tl.constexpr(-1.0e30)


@triton.jit
def _row(X, stride, i, D, scale, D_PAD: tl.constexpr):
    """Row i as fp32 [1, D_PAD] (0 past D) and its logit factor scale / max(||x_i||, eps), shape [1]."""
    cols = tl.arange(0, D_PAD)
    x = tl.load(X + i.to(tl.int64) * stride + cols, mask=cols < D, other=0.0).to(tl.float32)[None, :]
    return x, scale / tl.maximum(tl.sqrt(tl.sum(x * x, axis=1)), NORM_EPS)


@triton.jit
def _gather_dots(s, t, MS, MT, IDX, stride_m, stride_idx, i, ks, k_end, D, D_PAD: tl.constexpr):
    """(a, b, rows_t, mem_rows, valid): raw dots of student i with its teacher-memory rows and of teacher i
    with its student-memory rows for columns ks ([BLOCK_K] each), the gathered teacher-memory rows
    [BLOCK_K, D_PAD] (fp32), their memory row numbers, and which columns exist."""
    valid = ks < k_end
    mem_rows = tl.load(IDX + i.to(tl.int64) * stride_idx + ks, mask=valid, other=0)
    cols = tl.arange(0, D_PAD)
    offs = mem_rows.to(tl.int64)[:, None] * stride_m + cols[None, :]
    mask = valid[:, None] & (cols[None, :] < D)
    rows_t = tl.load(MT + offs, mask=mask, other=0.0).to(tl.float32)
    rows_s = tl.load(MS + offs, mask=mask, other=0.0).to(tl.float32)
    a = tl.sum(rows_t * s, axis=1)
    b = tl.sum(rows_s * t, axis=1)
    return a, b, rows_t, mem_rows, valid


@triton.jit(do_not_specialize=["B", "K", "tiles_per_split"])
def rrd_gathered_fwd_kernel(
    S, T, MS, MT, IDX, PART, PART_IDX,
    B, K, D, stride_s, stride_t, stride_m, stride_idx, scale_a, scale_b, tiles_per_split,
    BLOCK_K: tl.constexpr, D_PAD: tl.constexpr, KL: tl.constexpr,
):
    """Grid (B, splits): row i's partial state over one chunk of its K columns into PART [N_STATE, n_splits,
    B] (as the resident forward's), and the memory row of the chunk's student argmax into PART_IDX."""
    i = tl.program_id(0)
    s, c_a = _row(S, stride_s, i, D, scale_a, D_PAD)
    t, c_b = _row(T, stride_t, i, D, scale_b, D_PAD)
    k_begin, k_end = split_range(K, tiles_per_split, BLOCK_K)
    m_a = tl.full([1], LOW, tl.float32)
    m_b = tl.full([1], LOW, tl.float32)
    n_a = tl.zeros([1], tl.float32)
    n_b = tl.zeros([1], tl.float32)
    w = tl.zeros([1], tl.float32)
    v = tl.zeros([1], tl.float32)
    best = tl.zeros([1], tl.int32)
    for k0 in range(k_begin, k_end, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        a, b, _, mem_rows, valid = _gather_dots(s, t, MS, MT, IDX, stride_m, stride_idx, i, ks, k_end, D, D_PAD)
        m_a_old = m_a
        m_a, n_a, m_b, n_b, w, v = _fold(a[None, :], b[None, :], valid[None, :], m_a, n_a, m_b, n_b, w, v, c_a,
                                         c_b, True, KL)
        at = tl.argmax(tl.where(valid, a, LOW), axis=0)
        row = tl.sum(tl.where(tl.arange(0, BLOCK_K) == at, mem_rows, 0), axis=0).to(tl.int32)  # N < 2^31
        best = tl.where(m_a > m_a_old, row, best)
    rows = tl.zeros([1], tl.int32) + i
    store_state(PART, PART_IDX, rows, B, m_a * c_a, n_a, m_b * c_b, n_b, w, v, best)


@triton.jit(do_not_specialize=["B", "K", "tiles_per_split"])
def rrd_gathered_bwd_kernel(
    S, T, MS, MT, IDX, LSE_DIFF, LSE_T, PART, PART_SIGMA,
    B, K, D, stride_s, stride_t, stride_m, stride_idx, scale_a, scale_b, tiles_per_split,
    BLOCK_K: tl.constexpr, D_PAD: tl.constexpr,
):
    """Grid (B, splits): sum_k c_ik MT[index_ik] over one chunk into PART [n_splits, B, D_PAD] and
    sigma_i = sum_k c_ik into PART_SIGMA [n_splits, B], c = q - p (docs/math.md section 5); the finish kernel
    (backward.py) turns them into the student's gradient."""
    i = tl.program_id(0)
    s, c_a = _row(S, stride_s, i, D, scale_a, D_PAD)
    t, c_b = _row(T, stride_t, i, D, scale_b, D_PAD)
    k_begin, k_end = split_range(K, tiles_per_split, BLOCK_K)
    lse_diff = tl.load(LSE_DIFF + i + tl.zeros([1], tl.int32))
    lse_b = tl.load(LSE_T + i + tl.zeros([1], tl.int32))
    acc = tl.zeros([D_PAD], tl.float32)
    sigma = tl.zeros([1], tl.float32)
    for k0 in range(k_begin, k_end, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        a, b, rows_t, _, valid = _gather_dots(s, t, MS, MT, IDX, stride_m, stride_idx, i, ks, k_end, D, D_PAD)
        c = tl.reshape(_coefficients(a[None, :], b[None, :], c_a[:, None], c_b[:, None], lse_b[:, None],
                                     lse_diff[:, None], valid[None, :], True), [BLOCK_K])
        sigma += tl.sum(c, axis=0)
        acc += tl.sum(c[:, None] * rows_t, axis=0)
    split = tl.program_id(1)
    tl.store(PART + (split * B + i).to(tl.int64) * D_PAD + tl.arange(0, D_PAD), acc)
    tl.store(PART_SIGMA + split * B + i + tl.zeros([1], tl.int32), sigma)


# Columns per step: two gathered [BLOCK_K, D_PAD] fp32 tiles per program of one warp, 64 registers each per
# lane, one pipeline stage. With 4 warps a row's [BLOCK_K] vectors were spread over 4x the lanes that hold
# them (MUFU 20 lanes per pair in the forward instead of 10); 4096 elements per warp, or 2 warps, or 3
# stages spilled on sm_80/sm_100/sm_120 (the compile gate). On sm_120 2048 still spilled 16-48 B in the
# backward with 16-bit memories at D 128, so its backward takes half (its forward at 1024 had a 64-72 B
# stack frame at D 100 instead); the passes' splits need not agree (the backward only reads the merged lse).
GATHER_ELEMENTS = 2048
GATHER_ELEMENTS_BY_FAMILY = {("sm_120", "bwd"): 1024}
WARPS = 1


def plan(B: int, K: int, D: int, limits, which: str = "fwd", n_splits: int | None = None):
    """(BLOCK_K, D_PAD, n_splits, tiles_per_split) of one pass ("fwd" or "bwd"): splits until about 4
    programs per multiprocessor, or as near n_splits as whole tiles allow when it is given."""
    from .plans import family

    d_pad = max(16, triton.next_power_of_2(D))
    elements = GATHER_ELEMENTS_BY_FAMILY.get((family(limits), which), GATHER_ELEMENTS)
    block_k = max(1, min(64, elements // d_pad))
    n_tiles = triton.cdiv(K, block_k)
    if n_splits is None:
        n_splits = (4 * max(1, limits.sm_count)) // max(B, 1)
    tiles_per_split = triton.cdiv(n_tiles, max(1, min(n_splits, n_tiles)))
    return block_k, d_pad, triton.cdiv(n_tiles, tiles_per_split), tiles_per_split


def gathered_rows_and_grad(student, teacher, memory_s, memory_t, index, tau_s, tau_t, kl, n_splits=None):
    """(rows [B] fp32, grad [B, D]): per-row losses of fp32 raw embeddings against their gathered memory rows
    ("similarity" scores), and each row's gradient with respect to its raw student row (the upstream weight
    1). index: B x (K+1) int64, every value in range (the caller clamps)."""
    from .forward import N_STATE, rrd_merge_kernel
    from .launch import LSE_T_ROWS, MERGE_BLOCK_B, _on, backward_finish, current_limits

    B, D = student.shape
    K = index.shape[1]
    student, teacher = student.contiguous(), teacher.contiguous()
    memory_s, memory_t, index = memory_s.contiguous(), memory_t.contiguous(), index.contiguous()
    with _on(student.device):
        limits = current_limits()
        block_k, d_pad, splits, tiles_per_split = plan(B, K, D, limits, "fwd", n_splits)
        f32 = dict(device=student.device, dtype=torch.float32)
        part = torch.empty((N_STATE, splits, B), **f32)
        part_idx = torch.empty((splits, B), device=student.device, dtype=torch.int32)
        common = (B, K, D, student.stride(0), teacher.stride(0), memory_s.stride(0), index.stride(0),
                  LOG2E / tau_s, LOG2E / tau_t, tiles_per_split)
        rrd_gathered_fwd_kernel[(B, splits)](student, teacher, memory_s, memory_t, index, part, part_idx, *common,
                                             BLOCK_K=block_k, D_PAD=d_pad, KL=bool(kl), num_warps=WARPS, num_stages=1)
        rows, lse_diff, lse_t = torch.empty(B, **f32), torch.empty(B, **f32), torch.empty(LSE_T_ROWS * B, **f32)
        ref = torch.empty(B, device=student.device, dtype=torch.int32)
        rrd_merge_kernel[(triton.cdiv(B, MERGE_BLOCK_B),)](part, part_idx, rows, lse_diff, lse_t, ref, B, splits,
                                                           int(bool(kl)), BLOCK_B=MERGE_BLOCK_B)
        block_k, d_pad, splits, tiles_per_split = plan(B, K, D, limits, "bwd", n_splits)
        common = common[:-1] + (tiles_per_split,)
        grad_part = torch.empty((splits, B, d_pad), **f32)
        sigma = torch.empty((splits, B), **f32)
        rrd_gathered_bwd_kernel[(B, splits)](student, teacher, memory_s, memory_t, index, lse_diff, lse_t,
                                             grad_part, sigma, *common, BLOCK_K=block_k, D_PAD=d_pad,
                                             num_warps=WARPS, num_stages=1)
        ones = torch.ones(B, **f32)
        # The guard row ref is a teacher-memory row (the forward stored memory rows): the finish kernel
        # reads it from memory_t as the plain kernels read it from the bank.
        grad = backward_finish(grad_part, sigma, memory_t, ref, student, ones, tau_s)
    return rows, grad
