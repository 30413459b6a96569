// The RRD kernels (docs/math.md): forward = one pass over the bank with the online dual softmax, split over
// the bank and merged; backward = recompute the logits from the saved LSEs, accumulate sum_k (q - p) Q_k,
// reduce over the splits and apply 1/tau_s and the normalisation Jacobian. No B x K tensor is ever stored.
//
// Work decomposition (forward and backward alike):
//   block  = 128 threads = 4 warps; owns BM = 64 rows of S and T and one chunk of the bank (grid y = split);
//   warp   = 16 rows; for each bank tile of BN = 64 rows it computes the 16 x 64 student and teacher logit
//            tiles in mma C-fragment layout (WarpTile), feature chunk by feature chunk (DK = 32) through
//            shared memory;
//   lane   = 4 g + t holds, per tile, rows g and g+8 and columns 8 j + 2 t + {0,1} (j < 8).
// S and T are used raw; the normalisation is a per-row scale applied to the fp32 dot products:
//   a = (S_i . Q_k) * log2(e) / (tau_s max(||S_i||, eps))    (log2 units, so exp2 gives e^(a_nat)).
#pragma once

#include "rrd_common.cuh"

namespace rrd {

struct ForwardParams {
  const void* student;  // B x D, row stride ld_s, dtype emb_dtype
  const void* teacher;  // B x D, row stride ld_t, dtype emb_dtype
  const void* bank;     // K x D, row stride ld_q, dtype bank_dtype
  long long ld_s, ld_t, ld_q;
  int B, K, D;
  int emb_dtype, bank_dtype;
  float scale_s, scale_t;  // log2(e) / tau
  int vec_s, vec_t, vec_q; // 1: 4-element vector loads are aligned (pointer, row stride, D multiples of 4)
  int vec_q16;             // 1: the bank's rows are 16-byte aligned (pointer, row stride, D; the resident
                           // kernels' cp.async)
  int num_splits, chunk;   // split y covers bank rows [y chunk, min(K, (y + 1) chunk)); chunk % BN == 0
  float* part;             // forward: [8][num_splits][B] partial states (m_a, n_a, m_b, n_b, w, v, x as
                           // float planes, then idx as an int32 plane)
  float* rows;             // merge: [B] CE (or KL) per row
  float* lse_s;            // merge: [B] lse_a - lse_b, base 2, from the counts (no cancellation; the
                           // contract's lse_s slot, read only by this backend's backward)
  float* lse_t;            // merge: [B] lse_b, the LSE of the teacher logits, base 2
  int* ref;                // merge: [B] the student's argmax bank row per row (the backward's rounding guard)
  int kl;
};

struct BackwardParams {
  const void* student;
  const void* teacher;
  const void* bank;
  long long ld_s, ld_t, ld_q;
  int B, K, D;
  int emb_dtype, bank_dtype;
  float scale_s, scale_t;  // log2(e) / tau
  int vec_s, vec_t, vec_q;
  int vec_q16;
  int num_splits, chunk;
  const float* lse_s;      // [B] from the forward: lse_a - lse_b (base 2)
  const float* lse_t;      // [B] from the forward: lse_b (base 2)
  const int* ref;          // [B] from the forward: the student's argmax bank row per row
  int mode;                // the precision mode (how the finish kernel rounds Q_ref as the products saw it)
  const float* grad_rows;  // [B] upstream gradient per row, element stride grad_stride (0 when expanded)
  long long grad_stride;
  float inv_tau_s;
  float* gpart;            // [num_splits][B][D] partial sums of sum_k (q - p) Q_k
  float* sigpart;          // [num_splits][B] partial sums of sum_k (q - p) (as rounded for the product)
  void* grad_student;      // B x D contiguous, dtype emb_dtype
};

// ---- block-level helpers -----------------------------------------------------------------------------

// scale[r] = base / max(||X_{row0 + r}||, eps) for r < BM (0 past B), for X = student and teacher.
// One warp per row; ends with __syncthreads so every warp can read both arrays.
template <class P>
RRD_DEVICE void row_scales(const P& p, int row0, float* scale_s, float* scale_t) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int r = warp; r < BM; r += kWarps) {
    const int row = row0 + r;
    float ss = 0.f, st = 0.f;
    if (row < p.B) {
      for (int d = lane; d < p.D; d += 32) {
        const float xs = load_as_float(p.student, row * p.ld_s + d, p.emb_dtype);
        const float xt = load_as_float(p.teacher, row * p.ld_t + d, p.emb_dtype);
        ss = fmaf(xs, xs, ss);
        st = fmaf(xt, xt, st);
      }
    }
#pragma unroll
    for (int off = 16; off > 0; off /= 2) {
      ss += __shfl_xor_sync(0xffffffffu, ss, off);
      st += __shfl_xor_sync(0xffffffffu, st, off);
    }
    if (lane == 0) {
      scale_s[r] = row < p.B ? p.scale_s / fmaxf(sqrtf(ss), kNormEps) : 0.f;
      scale_t[r] = row < p.B ? p.scale_t / fmaxf(sqrtf(st), kNormEps) : 0.f;
    }
  }
  __syncthreads();
}

// dst[r][c] = X[r0 + r][d0 + c] for r < nrows_tile, c < DK, zero outside the nrows x D tensor; dst row
// stride lds. Consecutive threads read consecutive features (coalesced). With vec, each thread moves 4
// features per step (D % 4 == 0 then, so a vector is entirely inside or entirely past D).
template <int MODE>
RRD_DEVICE void stage_chunk(typename ModeTraits<MODE>::T* dst, int lds, int nrows_tile, const void* src,
                            long long ld, int dtype, bool vec, int r0, int nrows, int d0, int D) {
  if (vec) {
    for (int idx = threadIdx.x; idx < nrows_tile * (DK / 4); idx += kThreads) {
      const int r = idx / (DK / 4), c = (idx % (DK / 4)) * 4;
      const int row = r0 + r, d = d0 + c;
      float x[4] = {0.f, 0.f, 0.f, 0.f};
      if (row < nrows && d < D) load4_as_float(src, row * ld + d, dtype, x);
      ModeTraits<MODE>::store4(dst + r * lds + c, x);
    }
    return;
  }
  for (int idx = threadIdx.x; idx < nrows_tile * DK; idx += kThreads) {
    const int r = idx / DK, c = idx % DK;
    const int row = r0 + r, d = d0 + c;
    const float x = (row < nrows && d < D) ? load_as_float(src, row * ld + d, dtype) : 0.f;
    dst[r * lds + c] = ModeTraits<MODE>::from_float(x);
  }
}

// The raw (unscaled) dot products of this warp's 16 rows of S and of T with bank rows n0 .. n0+63:
// acc_s[j][i] = S_r . Q_n, acc_t[j][i] = T_r . Q_n in the WarpTile layout. Zero-padded rows (past B) and
// bank rows (past K) give 0. Uses (2 BM + BN) * (DK + pad) elements of shared memory at `stage`.
template <int MODE, class P>
RRD_DEVICE void logit_tiles(const P& p, typename ModeTraits<MODE>::T* stage, int row0, int n0,
                            float (&acc_s)[8][4], float (&acc_t)[8][4]) {
  using T = typename ModeTraits<MODE>::T;
  constexpr int lds = DK + ModeTraits<MODE>::kPad;
  T* xs = stage;             // [BM][lds]
  T* xt = xs + BM * lds;     // [BM][lds]
  T* qs = xt + BM * lds;     // [BN][lds]
  const int warp = threadIdx.x / 32;
#pragma unroll
  for (int j = 0; j < 8; ++j)
#pragma unroll
    for (int i = 0; i < 4; ++i) acc_s[j][i] = acc_t[j][i] = 0.f;
  for (int d0 = 0; d0 < p.D; d0 += DK) {
    __syncthreads();  // every warp is done with the previous contents of the staging buffers
    stage_chunk<MODE>(xs, lds, BM, p.student, p.ld_s, p.emb_dtype, p.vec_s, row0, p.B, d0, p.D);
    stage_chunk<MODE>(xt, lds, BM, p.teacher, p.ld_t, p.emb_dtype, p.vec_t, row0, p.B, d0, p.D);
    stage_chunk<MODE>(qs, lds, BN, p.bank, p.ld_q, p.bank_dtype, p.vec_q, n0, p.K, d0, p.D);
    __syncthreads();
    WarpTile<MODE, DK>::run(acc_s, xs + warp * 16 * lds, lds, qs, lds);
    WarpTile<MODE, DK>::run(acc_t, xt + warp * 16 * lds, lds, qs, lds);
  }
}

// Online update of one row's lane-local state with this lane's 16 logits of the tile (half h: row g + 8h).
// a = acc_s * sa and b = acc_t * sb are the logits in log2 units; column 8 j + c of the lane's slice is
// bank row col0 + 8 j + c and counts only when < K and both a and b are finite. The lane's counted columns
// form a tile state (max, the count n with the maximum's exact 1 left out, w, v, argmax), merged into the
// running state; a valid column with a non-finite a or b instead makes the row's n_a NaN.
RRD_DEVICE void online_update(RowState& s, const float (&acc_s)[8][4], const float (&acc_t)[8][4], int h,
                              float sa, float sb, int col0, int K) {
  float mx_a = -INFINITY, mx_b = -INFINITY;
  int arg = 0;
  bool bad = false;  // a valid column with a non-finite logit
#pragma unroll
  for (int j = 0; j < 8; ++j)
#pragma unroll
    for (int c = 0; c < 2; ++c)
      if (col0 + 8 * j + c < K) {
        const float a = mul_rn(acc_s[j][2 * h + c], sa), b = mul_rn(acc_t[j][2 * h + c], sb);
        if (!(is_finite(a) && is_finite(b))) {
          bad = true;
          continue;
        }
        if (a > mx_a) {
          mx_a = a;
          arg = col0 + 8 * j + c;
        }
        mx_b = fmaxf(mx_b, b);
      }
  if (mx_a == -INFINITY) {  // no counted column in this lane's slice (tail tile, or all non-finite)
    if (bad) s.n_a = NAN;   // merge_state carries it even while s is empty
    return;
  }
  float na = 0.f, nb = 0.f, ca = -1.f, cb = -1.f, w = 0.f, v = 0.f, x = 0.f;  // ca, cb: (entries at max) - 1
#pragma unroll
  for (int j = 0; j < 8; ++j)
#pragma unroll
    for (int c = 0; c < 2; ++c)
      if (col0 + 8 * j + c < K) {
        const float a = mul_rn(acc_s[j][2 * h + c], sa), b = mul_rn(acc_t[j][2 * h + c], sb);
        if (!(is_finite(a) && is_finite(b))) continue;
        const float ea = exp2f(a - mx_a), eb = exp2f(b - mx_b);
        if (a == mx_a) ca += 1.f; else na += ea;
        if (b == mx_b) cb += 1.f; else nb += eb;
        w = fmaf(eb, mx_a - a, w);
        v = fmaf(eb, mx_b - b, v);
        x += ea - eb;  // each term's rounding is ~1e-7 of 1, not of the counts
      }
  merge_state(s, RowState{mx_a, bad ? NAN : na + ca, mx_b, nb + cb, w, v, x, arg});
}

RRD_DEVICE RowState shfl_xor_state(const RowState& s, int off) {
  RowState o;
  o.m_a = __shfl_xor_sync(0xffffffffu, s.m_a, off);
  o.n_a = __shfl_xor_sync(0xffffffffu, s.n_a, off);
  o.m_b = __shfl_xor_sync(0xffffffffu, s.m_b, off);
  o.n_b = __shfl_xor_sync(0xffffffffu, s.n_b, off);
  o.w = __shfl_xor_sync(0xffffffffu, s.w, off);
  o.v = __shfl_xor_sync(0xffffffffu, s.v, off);
  o.x = __shfl_xor_sync(0xffffffffu, s.x, off);
  o.idx = __shfl_xor_sync(0xffffffffu, s.idx, off);
  return o;
}

// The lane's two running row states (rows row_lo, row_lo + 8) for its columns: the 4 lanes of a quad (same
// g) saw disjoint columns of the same rows, so merge them by shuffles; lane t = 0 writes the split's partial
// state to part[field][split][row] (field 7, the argmax, as int32 bits).
RRD_DEVICE void store_partial_states(const ForwardParams& p, RowState (&st)[2], int row_lo, int split) {
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    merge_state(st[h], shfl_xor_state(st[h], 1));
    merge_state(st[h], shfl_xor_state(st[h], 2));
  }
  if (threadIdx.x % 4 != 0) return;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int row = row_lo + 8 * h;
    if (row < p.B) {
      const long long stride = (long long)p.num_splits * p.B, at = (long long)split * p.B + row;
      p.part[0 * stride + at] = st[h].m_a;
      p.part[1 * stride + at] = st[h].n_a;
      p.part[2 * stride + at] = st[h].m_b;
      p.part[3 * stride + at] = st[h].n_b;
      p.part[4 * stride + at] = st[h].w;
      p.part[5 * stride + at] = st[h].v;
      p.part[6 * stride + at] = st[h].x;
      reinterpret_cast<int*>(p.part + 7 * stride)[at] = st[h].idx;
    }
  }
}

template <int MODE> RRD_HOST_DEVICE constexpr int forward_smem_bytes() {
  return (2 * BM + BN) * (DK + ModeTraits<MODE>::kPad) * int(sizeof(typename ModeTraits<MODE>::T)) +
         2 * BM * int(sizeof(float));
}

// ---- forward: grid (ceil(B / BM), num_splits), 128 threads ------------------------------------------
// Writes the partial state of every row < B for its bank chunk to part[field][split][row] (field 7, the
// argmax, as int32 bits).
template <int MODE>
__global__ void __launch_bounds__(kThreads) rrd_forward_kernel(ForwardParams p) {
  using T = typename ModeTraits<MODE>::T;
  RRD_DECLARE_SMEM(smem);
  T* stage = reinterpret_cast<T*>(smem);
  float* scale_s = reinterpret_cast<float*>(smem + forward_smem_bytes<MODE>() - 2 * BM * sizeof(float));
  float* scale_t = scale_s + BM;

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int row0 = blockIdx.x * BM, split = blockIdx.y;
  const int k_begin = split * p.chunk;
  const int k_end = p.K < k_begin + p.chunk ? p.K : k_begin + p.chunk;

  row_scales(p, row0, scale_s, scale_t);
  const int r_lo = warp * 16 + g;  // this lane's rows within the block: r_lo and r_lo + 8
  const float sa[2] = {scale_s[r_lo], scale_s[r_lo + 8]}, sb[2] = {scale_t[r_lo], scale_t[r_lo + 8]};
  RowState st[2] = {empty_state(), empty_state()};

  for (int n0 = k_begin; n0 < k_end; n0 += BN) {
    float acc_s[8][4], acc_t[8][4];
    logit_tiles<MODE>(p, stage, row0, n0, acc_s, acc_t);
    // Columns < k_end are < K, and chunk boundaries are multiples of BN, so "< K" is the only mask.
    online_update(st[0], acc_s, acc_t, 0, sa[0], sb[0], n0 + 2 * t, p.K);
    online_update(st[1], acc_s, acc_t, 1, sa[1], sb[1], n0 + 2 * t, p.K);
  }
  store_partial_states(p, st, row0 + r_lo, split);
}

// ---- merge: grid ceil(B / 128), 128 threads; one thread per row --------------------------------------
//   CE = log2(1 + n_a) + w / z_b,  H = log2(1 + n_b) + v / z_b,  KL = CE - H   (log2 units, then times ln 2)
//   lse_s slot: lse_a - lse_b = (m_a - m_b) + log2(z_a / z_b),  lse_t slot: lse_b = m_b + log2(1 + n_b)
//   (base 2), ref = the student's argmax.
// Every split holds >= 1 valid column; a split's state is empty only where all of its logits of the row
// were non-finite, and then its n_a is NaN.
__global__ void __launch_bounds__(kThreads) rrd_merge_kernel(ForwardParams p) {
  const int row = blockIdx.x * kThreads + threadIdx.x;
  if (row >= p.B) return;
  const long long stride = (long long)p.num_splits * p.B;
  RowState s = empty_state();
  for (int split = 0; split < p.num_splits; ++split) {
    const long long at = (long long)split * p.B + row;
    const RowState o{p.part[0 * stride + at], p.part[1 * stride + at], p.part[2 * stride + at],
                     p.part[3 * stride + at], p.part[4 * stride + at], p.part[5 * stride + at],
                     p.part[6 * stride + at], reinterpret_cast<const int*>(p.part + 7 * stride)[at]};
    merge_state(s, o);
  }
  const float log_z_a = log2_1p(s.n_a), log_z_b = log2_1p(s.n_b), z_b = 1.f + s.n_b;
  const float ce = log_z_a + s.w / z_b;
  const float loss = p.kl ? ce - (log_z_b + s.v / z_b) : ce;
  p.rows[row] = loss * kLn2;
  // lse_a - lse_b = (m_a - m_b) + log2(z_a / z_b). Where z_a / z_b is near 1 (both softmaxes flat: large
  // temperatures) the two LSEs are nearly equal, each ~log2 K, and their difference taken from fp32 LSEs or
  // counts keeps only ~1e-7 log2 K of absolute accuracy; log2(1 + x / z_b) with x = z_a - z_b summed as
  // such keeps x's own. Elsewhere (z_a / z_b outside [1/2, 3/2], e.g. one sharp and one flat softmax) the
  // ratio's log is far from 0 and log2(z_a / z_b) is accurate, while 1 + x / z_b could cancel.
  // A row that met a non-finite logit (n_a NaN) gets NaN in both slots (its m_b may be -inf, n_b finite).
  const bool bad = isnan(s.n_a);
  const float log_ratio = fabsf(s.x) <= 0.5f * z_b ? log2_1p(s.x / z_b) : log2f((1.f + s.n_a) / z_b);
  p.lse_s[row] = bad ? s.n_a : (s.m_a - s.m_b) + log_ratio;
  p.lse_t[row] = bad ? s.n_a : s.m_b + log_z_b;
  p.ref[row] = s.idx;
}

template <int MODE> RRD_HOST_DEVICE constexpr int backward_smem_bytes() {
  constexpr int stage = (2 * BM + BN) * (DK + ModeTraits<MODE>::kPad);
  constexpr int gemm2 = (BM + DV) * (BN + ModeTraits<MODE>::kPad);
  return (stage > gemm2 ? stage : gemm2) * int(sizeof(typename ModeTraits<MODE>::T)) +
         2 * BM * int(sizeof(float));
}

// ---- backward: grid (ceil(B / BM), num_splits, ceil(D / DV)), 128 threads ---------------------------
// For its rows, bank chunk and feature slice [dv0, dv0 + DV) the block accumulates
//   G[r][d] = sum_k (q_rk - p_rk) Q_k[d],   q = 2^(a - lse_a), p = 2^(b - lse_b)   (log2 units)
// as a second warp-tile product W (16 x BN per warp, in shared memory) times Q^T (staged transposed,
// DV x BN), and writes it to gpart[split][row][d]. q - p is formed as in the Triton backward: with
// delta = log2(q / p) = (a - b) - (lse_a - lse_b), where |delta| <= 1/2 (q and p close: both softmaxes flat,
// large temperatures) it is p (2^delta - 1) with 2^delta - 1 from a series, else q - p. The forward saved
// lse_a - lse_b itself, computed from the counts, so delta keeps its digits even when both LSEs are
// ~log2 K; lse_a = (lse_a - lse_b) + lse_b serves the far q. Blocks of the first feature slice also write
//   sigma[r] = sum_k (q_rk - p_rk)   (each term as the product sees it: rounded to the mode's operand type)
// to sigpart[split][row], for the finish kernel's rounding guard. The staging buffers of the logit tiles and the W / Q^T
// buffers share the same shared memory (they are never live at the same time).
template <int MODE>
__global__ void __launch_bounds__(kThreads) rrd_backward_kernel(BackwardParams p) {
  using T = typename ModeTraits<MODE>::T;
  constexpr int ldw = BN + ModeTraits<MODE>::kPad;
  RRD_DECLARE_SMEM(smem);
  T* stage = reinterpret_cast<T*>(smem);
  T* ws = stage;           // [BM][ldw]  q - p for this block's rows and the current bank tile
  T* qt = ws + BM * ldw;   // [DV][ldw]  qt[d][k] = Q[n0 + k][dv0 + d]
  float* scale_s = reinterpret_cast<float*>(smem + backward_smem_bytes<MODE>() - 2 * BM * sizeof(float));
  float* scale_t = scale_s + BM;

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int row0 = blockIdx.x * BM, split = blockIdx.y, dv0 = blockIdx.z * DV;
  const int k_begin = split * p.chunk;
  const int k_end = p.K < k_begin + p.chunk ? p.K : k_begin + p.chunk;

  row_scales(p, row0, scale_s, scale_t);
  const int r_lo = warp * 16 + g;
  float sa[2], sb[2], la[2], lb[2], ld[2];
  bool row_ok[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int row = row0 + r_lo + 8 * h;
    row_ok[h] = row < p.B;
    sa[h] = scale_s[r_lo + 8 * h];
    sb[h] = scale_t[r_lo + 8 * h];
    ld[h] = row_ok[h] ? p.lse_s[row] : 0.f;  // lse_a - lse_b, base 2, as the forward saved it
    lb[h] = row_ok[h] ? p.lse_t[row] : 0.f;  // lse_b
    la[h] = ld[h] + lb[h];                   // lse_a (NaN rows stay NaN: delta and q are NaN)
  }
  float sig[2] = {0.f, 0.f};

  float acc_g[8][4];
#pragma unroll
  for (int j = 0; j < 8; ++j)
#pragma unroll
    for (int i = 0; i < 4; ++i) acc_g[j][i] = 0.f;

  for (int n0 = k_begin; n0 < k_end; n0 += BN) {
    float acc_s[8][4], acc_t[8][4];
    logit_tiles<MODE>(p, stage, row0, n0, acc_s, acc_t);
    __syncthreads();  // all warps are done with the staging buffers that ws / qt overwrite
    // q - p for this warp's rows into ws; zero for rows >= B and bank rows >= K, so they add nothing.
#pragma unroll
    for (int j = 0; j < 8; ++j)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int h = i >> 1, c = 8 * j + 2 * t + (i & 1);
        float w = 0.f;
        if (row_ok[h] && n0 + c < p.K) {
          const float a = acc_s[j][i] * sa[h], b = acc_t[j][i] * sb[h];
          const float delta = (a - b) - ld[h], pk = exp2f(b - lb[h]);
          w = fabsf(delta) <= 0.5f ? pk * exp2m1_small(delta) : exp2f(a - la[h]) - pk;
        }
        ws[(r_lo + 8 * h) * ldw + c] = ModeTraits<MODE>::from_float(w);
        sig[h] += as_operand(w, MODE);
      }
    // qt[d][k] = Q[n0 + k][dv0 + d]; consecutive threads read consecutive features of a bank row
    if (p.vec_q) {
      for (int idx = threadIdx.x; idx < BN * (DV / 4); idx += kThreads) {
        const int k = idx / (DV / 4), d = (idx % (DV / 4)) * 4;
        const int n = n0 + k, dd = dv0 + d;
        float x[4] = {0.f, 0.f, 0.f, 0.f};
        if (n < p.K && dd < p.D) load4_as_float(p.bank, n * p.ld_q + dd, p.bank_dtype, x);
#pragma unroll
        for (int i = 0; i < 4; ++i) qt[(d + i) * ldw + k] = ModeTraits<MODE>::from_float(x[i]);
      }
    } else {
      for (int idx = threadIdx.x; idx < BN * DV; idx += kThreads) {
        const int k = idx / DV, d = idx % DV;
        const int n = n0 + k, dd = dv0 + d;
        const float x = (n < p.K && dd < p.D) ? load_as_float(p.bank, n * p.ld_q + dd, p.bank_dtype) : 0.f;
        qt[d * ldw + k] = ModeTraits<MODE>::from_float(x);
      }
    }
    __syncthreads();
    // acc_g[r][d] += sum_k ws[r][k] qt[d][k]: the same NT warp tile, now with K = BN.
    WarpTile<MODE, BN>::run(acc_g, ws + warp * 16 * ldw, ldw, qt, ldw);
    // (the next logit_tiles starts with __syncthreads before the buffers are overwritten)
  }
#pragma unroll
  for (int j = 0; j < 8; ++j)
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int row = row0 + r_lo + 8 * (i >> 1), d = dv0 + 8 * j + 2 * t + (i & 1);
      if (row < p.B && d < p.D) p.gpart[((long long)split * p.B + row) * p.D + d] = acc_g[j][i];
    }
  // The 4 lanes of a quad hold disjoint columns of the same two rows: add their sigma up.
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    sig[h] += __shfl_xor_sync(0xffffffffu, sig[h], 1);
    sig[h] += __shfl_xor_sync(0xffffffffu, sig[h], 2);
    if (blockIdx.z == 0 && t == 0 && row_ok[h]) p.sigpart[(long long)split * p.B + row0 + r_lo + 8 * h] = sig[h];
  }
}

// Sum over the block of one float per thread (all threads get the result).
RRD_DEVICE float block_sum(float x, float* red /* [kWarps] shared */) {
#pragma unroll
  for (int off = 16; off > 0; off /= 2) x += __shfl_xor_sync(0xffffffffu, x, off);
  __syncthreads();  // red may still be read by a previous call
  if (threadIdx.x % 32 == 0) red[threadIdx.x / 32] = x;
  __syncthreads();
  float s = 0.f;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) s += red[w];
  return s;
}

// ---- finish: grid B, 128 threads; one block per row ---------------------------------------------------
//   g = (1 / tau_s) (sum_splits gpart - sigma Q_r),  sigma = sum_splits sigpart,  r = ref[row];
//   n = max(||S||, eps);  s = S / n;  dL/dS = w (g - s (s . g)) / n
// Rounding guard: sum_k (q - p) = 0 exactly, so subtracting sigma Q_r changes nothing algebraically; but
// the computed q - p is off mostly where q or p is near 1, i.e. at the student's argmax r, and there the
// subtraction cancels that error (Q_r rounded as the products saw the bank, so the cancellation is exact).
__global__ void __launch_bounds__(kThreads) rrd_finish_kernel(BackwardParams p) {
  RRD_DECLARE_SMEM(smem);  // kWarps floats (dynamic shared memory, so the host emulation can provide it)
  float* red = reinterpret_cast<float*>(smem);
  constexpr int kPer = kMaxD / kThreads;
  const int row = blockIdx.x;
  float sigma = 0.f;
  for (int split = 0; split < p.num_splits; ++split) sigma += p.sigpart[(long long)split * p.B + row];
  int r = p.ref[row];
  r = r < 0 ? 0 : (r >= p.K ? p.K - 1 : r);  // any valid row is exact; never read outside the bank
  float x[kPer], gv[kPer];
  float ss = 0.f;
#pragma unroll
  for (int e = 0; e < kPer; ++e) {
    const int d = threadIdx.x + e * kThreads;
    x[e] = 0.f;
    gv[e] = 0.f;
    if (d < p.D) {
      x[e] = load_as_float(p.student, row * p.ld_s + d, p.emb_dtype);
      float acc = 0.f;
      for (int split = 0; split < p.num_splits; ++split)
        acc += p.gpart[((long long)split * p.B + row) * p.D + d];
      const float q_r = as_operand(load_as_float(p.bank, (long long)r * p.ld_q + d, p.bank_dtype), p.mode);
      gv[e] = fmaf(-sigma, q_r, acc) * p.inv_tau_s;
    }
    ss = fmaf(x[e], x[e], ss);
  }
  const float n = fmaxf(sqrtf(block_sum(ss, red)), kNormEps);
  const float inv_n = 1.f / n;
  float sg = 0.f;
#pragma unroll
  for (int e = 0; e < kPer; ++e) sg = fmaf(x[e] * inv_n, gv[e], sg);
  sg = block_sum(sg, red);
  const float w = p.grad_rows[row * p.grad_stride];
#pragma unroll
  for (int e = 0; e < kPer; ++e) {
    const int d = threadIdx.x + e * kThreads;
    if (d < p.D) {
      const float out = w * (gv[e] - x[e] * inv_n * sg) * inv_n;
      const long long at = (long long)row * p.D + d;
      if (p.emb_dtype == kF32)
        static_cast<float*>(p.grad_student)[at] = out;
      else if (p.emb_dtype == kBF16)
        static_cast<uint16_t*>(p.grad_student)[at] = float_to_bf16_bits(out);
      else
        static_cast<uint16_t*>(p.grad_student)[at] = float_to_f16_bits(out);
    }
  }
}

}  // namespace rrd
