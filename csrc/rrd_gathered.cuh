// The RRD loss against a gathered memory (rrd_kernels/gathered.py has the function and the contract):
// sample i meets its own K1 = K + 1 memory rows index[i, :], its student row against the teacher memory MT,
// its teacher row against the student memory MS. "similarity" scores only:
//   a_ik = (S_i . MT[index_ik]) log2(e) / (tau_s max(||S_i||, eps)),  b_ik likewise with T_i, MS, tau_t
// (log2 units, as the FIFO kernels). The teacher side and both memories get no gradient.
//
// Each row's bank is its own, so rows share nothing and the products are matrix-vector (no reuse for tensor
// cores): fp32 FMA, bound by the gathered bytes. Work decomposition (all three kernels: 128 threads):
//   warp  = one (row, split) work item; the split is a contiguous range of the row's K1 columns;
//   group = 8 lanes of a warp own one column per step (4 columns per warp step): lane l of the group
//           holds features (8 j + l) VEC .. + VEC - 1 of the gathered rows (VEC = 16 bytes of the memory
//           dtype: 4 fp32, 8 fp16/bf16), read with one 16-byte load where the memories are aligned;
//           the group's dot products are summed by 3 shuffles, so every lane of it holds a and b;
//   state = each group folds its columns one by one into the online state of rrd_common.cuh (merge_state
//           with a one-column state, so the counts, w, v and x keep the FIFO kernels' accuracy), and the
//           4 groups' states are merged by shuffles at the end.
// The student and teacher rows are staged once per work item in shared memory as fp32 (each warp its own
// 2 x kMaxD floats, zero past D), and their norms formed on the way.
//
// Kernels:
//   forward   grid ceil(B splits / 4): the partial state of each (split, row) into part[8][splits][B]
//             (m_a, n_a, m_b, n_b, w, v, x as float planes, then the argmax memory row as int32)
//   backward  same grid: every warp merges its row's split states itself (a few loads; no merge launch),
//             the warps of split 0 write the row's loss and argmax; with a gradient requested, each warp
//             gathers its columns again and accumulates sum_k (q - p) MT[index_k] and sum_k (q - p) into
//             gpart[split][row][D] and sigpart[split][row]
//   finish    one warp per row: sum over splits, the rounding guard (minus sigma MT[ref]), / tau_s, the
//             normalisation Jacobian -> dL/dS (fp32, upstream weight 1)
// Index values outside [0, N) are never read: such a column counts as a non-finite logit, so its row
// comes back NaN (loss and gradient), as the contract reports a clamped row. The memory dtype is a template
// parameter (no per-element dtype switch).
#pragma once

#include "rrd_common.cuh"

namespace rrd {

constexpr int kGatherThreads = 128;
constexpr int kGatherWarps = kGatherThreads / 32;
constexpr int kGroupLanes = 8;                     // lanes per gathered column
constexpr int kGroups = 32 / kGroupLanes;          // columns per warp step
constexpr int kLaneSlots = kMaxD / kGroupLanes;    // features a lane holds at most (64)
constexpr int kSmallSlots = 16;                    // the backward's instantiation for D <= 128 (registers)
constexpr int kGatheredSmemBytes = kGatherWarps * 2 * kMaxD * int(sizeof(float));  // 16 KiB
constexpr int kGatheredMinColumns = 64;            // a split's columns at least (its fixed cost is ~2 of them)

struct GatheredParams {
  const float* student;  // B x D fp32, row stride ld_s
  const float* teacher;  // B x D fp32, row stride ld_t
  const void* memory_s;  // N x D memory dtype, row stride ld_m (both memories)
  const void* memory_t;
  const long long* index;  // B x K1 int64, row stride ld_idx
  long long ld_s, ld_t, ld_m, ld_idx;
  int B, K1, D, N;
  float scale_s, scale_t;  // log2(e) / tau
  float inv_tau_s;
  int vec;                 // 1: 16-byte loads of the memories are aligned (pointers, ld_m and D multiples)
  int kl;
  int num_splits, chunk;   // split y covers columns [y chunk, min(K1, (y + 1) chunk)), none empty
  float* part;             // [8][num_splits][B]
  float* rows;             // [B] CE (or KL) per row
  int* ref;                // [B] the student's argmax memory row
  float* gpart;            // [num_splits][B][D], or null: no gradient
  float* sigpart;          // [num_splits][B]
  float* grad;             // B x D fp32, contiguous
};

// Elements of a memory of dtype MDT as fp32: one element, or VEC of them with one 16-byte load.
template <int MDT> struct GatherMem;
template <> struct GatherMem<kF32> {
  static constexpr int kVec = 4;
  static RRD_DEVICE float at(const void* m, long long i) { return static_cast<const float*>(m)[i]; }
  static RRD_DEVICE void vec(const void* m, long long i, float (&x)[kVec]) { load4_as_float(m, i, kF32, x); }
};
template <int MDT> struct GatherMem16 {
  static constexpr int kVec = 8;
  static RRD_DEVICE float cvt(uint16_t h) { return MDT == kBF16 ? bf16_bits_to_float(h) : f16_bits_to_float(h); }
  static RRD_DEVICE float at(const void* m, long long i) { return cvt(static_cast<const uint16_t*>(m)[i]); }
  static RRD_DEVICE void vec(const void* m, long long i, float (&x)[kVec]) {
    const uint16_t* p = static_cast<const uint16_t*>(m) + i;
    RRD_CHECK_ALIGNED(p, 16);
    const uint4 v = *reinterpret_cast<const uint4*>(p);
    const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      x[2 * e] = cvt(uint16_t(w[e] & 0xffffu));
      x[2 * e + 1] = cvt(uint16_t(w[e] >> 16));
    }
  }
};
template <> struct GatherMem<kF16> : GatherMem16<kF16> {};
template <> struct GatherMem<kBF16> : GatherMem16<kBF16> {};

// Stage row `row` of student and teacher into this warp's xs, xt (fp32, zero from D to kMaxD) and return
// the logit factors log2(e) / (tau max(||x||, eps)).
RRD_DEVICE void stage_rows(const GatheredParams& p, int row, float* xs, float* xt, float& sa, float& sb) {
  const int lane = threadIdx.x % 32;
  float ss = 0.f, st = 0.f;
  for (int d = lane; d < kMaxD; d += 32) {
    const float s = d < p.D ? p.student[row * p.ld_s + d] : 0.f;
    const float t = d < p.D ? p.teacher[row * p.ld_t + d] : 0.f;
    xs[d] = s;
    xt[d] = t;
    ss = fmaf(s, s, ss);
    st = fmaf(t, t, st);
  }
#pragma unroll
  for (int off = 16; off > 0; off /= 2) {
    ss += __shfl_xor_sync(0xffffffffu, ss, off);
    st += __shfl_xor_sync(0xffffffffu, st, off);
  }
  sa = p.scale_s / fmaxf(sqrtf(ss), kNormEps);
  sb = p.scale_t / fmaxf(sqrtf(st), kNormEps);
  __syncwarp();  // xs, xt are read by other lanes of the warp
}

// The logits a, b of column k of the row for this lane's group (every lane of the group gets them) and the
// column's memory row; qt receives this lane's features of the teacher-memory row (for the gradient).
// A column past the split (live = false) reads nothing and gives 0; one whose index is outside [0, N)
// reads nothing and gives NaN (its row is reported NaN). Every lane takes part in the shuffles.
// SLOTS: the features a lane holds (D <= 8 SLOTS).
template <int MDT, int SLOTS>
RRD_DEVICE void column_logits(const GatheredParams& p, const float* xs, const float* xt, int row, int k, bool live,
                              float sa, float sb, float& a, float& b, int& mrow, float (&qt)[SLOTS]) {
  using Mem = GatherMem<MDT>;
  constexpr int V = Mem::kVec;
  const int lig = threadIdx.x % kGroupLanes;
  long long n = live ? p.index[row * p.ld_idx + k] : 0;
  const bool inside = n >= 0 && n < p.N;
  const bool load = live && inside;
  n = load ? n : 0;
  const long long off = n * p.ld_m;
  float da = 0.f, db = 0.f;
#pragma unroll
  for (int j = 0; j < SLOTS / V; ++j) {
    if (j * kGroupLanes * V >= p.D) break;
    const int d0 = (j * kGroupLanes + lig) * V;
    float mt[V], ms[V];
    if (load && p.vec && d0 < p.D) {  // D % V == 0: a vector is all inside D or all past it
      Mem::vec(p.memory_t, off + d0, mt);
      Mem::vec(p.memory_s, off + d0, ms);
    } else {
#pragma unroll
      for (int e = 0; e < V; ++e) {
        const bool in = load && d0 + e < p.D;
        mt[e] = in ? Mem::at(p.memory_t, off + d0 + e) : 0.f;
        ms[e] = in ? Mem::at(p.memory_s, off + d0 + e) : 0.f;
      }
    }
#pragma unroll
    for (int e = 0; e < V; ++e) {  // xs, xt are zero past D (d0 + e < kMaxD always)
      qt[j * V + e] = mt[e];
      da = fmaf(xs[d0 + e], mt[e], da);
      db = fmaf(xt[d0 + e], ms[e], db);
    }
  }
#pragma unroll
  for (int off2 = 1; off2 < kGroupLanes; off2 *= 2) {
    da += __shfl_xor_sync(0xffffffffu, da, off2);
    db += __shfl_xor_sync(0xffffffffu, db, off2);
  }
  a = live && !inside ? NAN : da * sa;
  b = live && !inside ? NAN : db * sb;
  mrow = int(n);
}

// Fold one column into a running state: a one-column state merged by merge_state; a non-finite logit
// (NaN / inf input, or an index outside the memory) is left out and makes the row's n_a NaN.
RRD_DEVICE void fold_column(RowState& s, float a, float b, int mrow) {
  if (!(is_finite(a) && is_finite(b))) {
    s.n_a = NAN;
    return;
  }
  merge_state(s, RowState{a, 0.f, b, 0.f, 0.f, 0.f, 0.f, mrow});
}

RRD_DEVICE RowState state_from_lane(const RowState& s, int lane_mask) {
  float f[7] = {s.m_a, s.n_a, s.m_b, s.n_b, s.w, s.v, s.x};
#pragma unroll
  for (int i = 0; i < 7; ++i) f[i] = __shfl_xor_sync(0xffffffffu, f[i], lane_mask);
  return RowState{f[0], f[1], f[2], f[3], f[4], f[5], f[6], __shfl_xor_sync(0xffffffffu, s.idx, lane_mask)};
}

// Loss and the backward's two LSE statistics of a merged state (base 2; the FIFO merge kernel's rule):
//   CE = log2(1 + n_a) + w / z_b,  H = log2(1 + n_b) + v / z_b;  lse_a - lse_b from x where the two sums
//   are close (flat softmaxes: x keeps its own digits), else from their ratio;  lse_b = m_b + log2(1 + n_b).
// A row that met a non-finite logit (n_a NaN) gets NaN in both statistics.
RRD_DEVICE void row_statistics(const RowState& s, int kl, float& loss, float& lse_diff, float& lse_b) {
  const float log_z_b = log2_1p(s.n_b), z_b = 1.f + s.n_b;
  const float ce = log2_1p(s.n_a) + s.w / z_b;
  loss = (kl ? ce - (log_z_b + s.v / z_b) : ce) * kLn2;
  const bool bad = isnan(s.n_a);
  const float log_ratio = fabsf(s.x) <= 0.5f * z_b ? log2_1p(s.x / z_b) : log2f((1.f + s.n_a) / z_b);
  lse_diff = bad ? s.n_a : (s.m_a - s.m_b) + log_ratio;
  lse_b = bad ? s.n_a : s.m_b + log_z_b;
}

// q - p of one column (log2 units): p (2^delta - 1) with delta = log2(q / p) where q and p are close (the
// series keeps delta's digits), else q - p.
RRD_DEVICE float q_minus_p(float a, float b, float lse_diff, float lse_b) {
  const float delta = (a - b) - lse_diff, pk = exp2f(b - lse_b);
  return fabsf(delta) <= 0.5f ? pk * exp2m1_small(delta) : exp2f(a - (lse_diff + lse_b)) - pk;
}

// The (row, split) of this warp, or false past the last work item (uniform over the warp).
RRD_DEVICE bool work_item(const GatheredParams& p, int& row, int& split, int& k_begin, int& k_end) {
  const long long work = (long long)blockIdx.x * kGatherWarps + threadIdx.x / 32;
  if (work >= (long long)p.B * p.num_splits) return false;
  row = int(work % p.B);
  split = int(work / p.B);
  k_begin = split * p.chunk;
  k_end = p.K1 < k_begin + p.chunk ? p.K1 : k_begin + p.chunk;
  return true;
}

// SLOTS as in the backward: kSmallSlots for D <= 128, so that the column loop holds the 16 features a lane
// uses there, not 64 behind a per-vector exit.
template <int MDT, int SLOTS>
__global__ void __launch_bounds__(kGatherThreads) rrd_gathered_forward_kernel(GatheredParams p) {
  RRD_DECLARE_SMEM(smem);
  int row, split, k_begin, k_end;
  if (!work_item(p, row, split, k_begin, k_end)) return;  // the whole warp; no block barrier follows
  float* xs = reinterpret_cast<float*>(smem) + (threadIdx.x / 32) * 2 * kMaxD;
  float* xt = xs + kMaxD;
  float sa, sb;
  stage_rows(p, row, xs, xt, sa, sb);
  const int group = (threadIdx.x % 32) / kGroupLanes;
  RowState st = empty_state();
  float qt[SLOTS];
  for (int k0 = k_begin; k0 < k_end; k0 += kGroups) {
    const int k = k0 + group;
    float a, b;
    int mrow;
    column_logits<MDT, SLOTS>(p, xs, xt, row, k, k < k_end, sa, sb, a, b, mrow, qt);
    if (k < k_end) fold_column(st, a, b, mrow);
  }
  merge_state(st, state_from_lane(st, kGroupLanes));
  merge_state(st, state_from_lane(st, 2 * kGroupLanes));
  if (threadIdx.x % 32 == 0) {
    const long long stride = (long long)p.num_splits * p.B, at = (long long)split * p.B + row;
    const float f[7] = {st.m_a, st.n_a, st.m_b, st.n_b, st.w, st.v, st.x};
#pragma unroll
    for (int i = 0; i < 7; ++i) p.part[i * stride + at] = f[i];
    reinterpret_cast<int*>(p.part + 7 * stride)[at] = st.idx;
  }
}

// Minimum 1 block per SM in the launch bounds: with the default, ptxas held the D 512 instantiation to 168
// registers and spilled 12 B for bf16 memories on sm_80 (acc and the kept row slots are 2 x 64 floats);
// with it, no spills on sm_80 / sm_86 / sm_90 (the compile gate; registers in csrc/ptxas-report.txt).
// SLOTS: features per lane, kLaneSlots (D <= 512) or kSmallSlots (D <= 128: a quarter of the registers).
template <int MDT, int SLOTS>
__global__ void __launch_bounds__(kGatherThreads, 1) rrd_gathered_backward_kernel(GatheredParams p) {
  constexpr int V = GatherMem<MDT>::kVec;
  RRD_DECLARE_SMEM(smem);
  int row, split, k_begin, k_end;
  if (!work_item(p, row, split, k_begin, k_end)) return;
  const int lane = threadIdx.x % 32, group = lane / kGroupLanes, lig = lane % kGroupLanes;
  // Every split's state of the row (each split has >= 1 column), merged in split order by every lane.
  const long long stride = (long long)p.num_splits * p.B;
  RowState m = empty_state();
  for (int y = 0; y < p.num_splits; ++y) {
    const long long at = (long long)y * p.B + row;
    merge_state(m, RowState{p.part[at], p.part[stride + at], p.part[2 * stride + at], p.part[3 * stride + at],
                            p.part[4 * stride + at], p.part[5 * stride + at], p.part[6 * stride + at],
                            reinterpret_cast<const int*>(p.part + 7 * stride)[at]});
  }
  float loss, lse_diff, lse_b;
  row_statistics(m, p.kl, loss, lse_diff, lse_b);
  if (split == 0 && lane == 0) {
    p.rows[row] = loss;
    p.ref[row] = m.idx;
  }
  if (p.gpart == nullptr) return;
  float* xs = reinterpret_cast<float*>(smem) + (threadIdx.x / 32) * 2 * kMaxD;
  float* xt = xs + kMaxD;
  float sa, sb;
  stage_rows(p, row, xs, xt, sa, sb);
  float acc[SLOTS], qt[SLOTS];
#pragma unroll
  for (int i = 0; i < SLOTS; ++i) acc[i] = 0.f;
  float sigma = 0.f;
  for (int k0 = k_begin; k0 < k_end; k0 += kGroups) {
    const int k = k0 + group;
    float a, b;
    int mrow;
    column_logits<MDT, SLOTS>(p, xs, xt, row, k, k < k_end, sa, sb, a, b, mrow, qt);
    const float c = k < k_end ? q_minus_p(a, b, lse_diff, lse_b) : 0.f;
    sigma += c;
#pragma unroll
    for (int j = 0; j < SLOTS / V; ++j) {
      if (j * kGroupLanes * V >= p.D) break;  // the slots column_logits filled
#pragma unroll
      for (int e = 0; e < V; ++e) acc[j * V + e] = fmaf(c, qt[j * V + e], acc[j * V + e]);
    }
  }
  // The 4 groups saw disjoint columns: add their sums (lanes with the same lig hold the same features).
#pragma unroll
  for (int off = kGroupLanes; off < 32; off *= 2) {
    sigma += __shfl_xor_sync(0xffffffffu, sigma, off);
#pragma unroll
    for (int j = 0; j < SLOTS / V; ++j) {
      if (j * kGroupLanes * V >= p.D) break;  // uniform over the warp
#pragma unroll
      for (int e = 0; e < V; ++e) acc[j * V + e] += __shfl_xor_sync(0xffffffffu, acc[j * V + e], off);
    }
  }
  if (group == 0) {
    float* out = p.gpart + ((long long)split * p.B + row) * p.D;
#pragma unroll
    for (int j = 0; j < SLOTS / V; ++j)
#pragma unroll
      for (int e = 0; e < V; ++e) {
        const int d = (j * kGroupLanes + lig) * V + e;
        if (d < p.D) out[d] = acc[j * V + e];
      }
    if (lig == 0) p.sigpart[(long long)split * p.B + row] = sigma;
  }
}

// One warp per row: g = (sum_splits gpart - sigma MT[ref]) / tau_s, then dL/dS = (g - s (s . g)) / n with
// n = max(||S||, eps), s = S / n. The rounding guard: sum_k (q - p) = 0 exactly, so subtracting sigma times
// one gathered row changes nothing algebraically, and at the student's argmax (where the computed q - p is
// off most) it cancels the error. ref is clamped into [0, N): any memory row is exact, none is read outside.
template <int MDT>
__global__ void __launch_bounds__(kGatherThreads) rrd_gathered_finish_kernel(GatheredParams p) {
  constexpr int kPer = kMaxD / 32;
  const int row = blockIdx.x * kGatherWarps + threadIdx.x / 32, lane = threadIdx.x % 32;
  if (row >= p.B) return;
  float sigma = 0.f;
  for (int y = 0; y < p.num_splits; ++y) sigma += p.sigpart[(long long)y * p.B + row];
  int r = p.ref[row];
  r = r < 0 ? 0 : (r >= p.N ? p.N - 1 : r);
  float x[kPer], g[kPer], ss = 0.f;
#pragma unroll
  for (int e = 0; e < kPer; ++e) {
    const int d = lane + 32 * e;
    x[e] = g[e] = 0.f;
    if (d < p.D) {
      x[e] = p.student[row * p.ld_s + d];
      float acc = 0.f;
      for (int y = 0; y < p.num_splits; ++y) acc += p.gpart[((long long)y * p.B + row) * p.D + d];
      g[e] = fmaf(-sigma, GatherMem<MDT>::at(p.memory_t, (long long)r * p.ld_m + d), acc) * p.inv_tau_s;
    }
    ss = fmaf(x[e], x[e], ss);
  }
#pragma unroll
  for (int off = 16; off > 0; off /= 2) ss += __shfl_xor_sync(0xffffffffu, ss, off);
  const float inv_n = 1.f / fmaxf(sqrtf(ss), kNormEps);
  float sg = 0.f;
#pragma unroll
  for (int e = 0; e < kPer; ++e) sg = fmaf(x[e] * inv_n, g[e], sg);
#pragma unroll
  for (int off = 16; off > 0; off /= 2) sg += __shfl_xor_sync(0xffffffffu, sg, off);
#pragma unroll
  for (int e = 0; e < kPer; ++e) {
    const int d = lane + 32 * e;
    if (d < p.D) p.grad[(long long)row * p.D + d] = (g[e] - x[e] * inv_n * sg) * inv_n;
  }
}

}  // namespace rrd
