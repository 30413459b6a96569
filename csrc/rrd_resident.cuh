// The resident kernels: fp16 / bf16 embeddings with D <= kResD (128). Same results contract as the chunked
// kernels of rrd_kernels.cuh (the partial states of the forward, gpart / sigpart of the backward), built
// for issue count:
//   * S and T of the block's 64 rows are staged once (typed 16-bit loads, zero past B and D) and held in
//     registers as mma A fragments for the whole bank loop (8 k-steps x 4 registers each at D = 128);
//   * bank tiles of BN = 64 rows x D go global -> shared by 16-byte cp.async, double-buffered (the copy of
//     tile i + 1 overlaps the products of tile i); rows past K are zero-filled by the copy itself (src size
//     0), so bounds cost one predicate per 16-byte chunk and only on the last tile (its copy issued apart);
//   * B fragments come from the row-major tile by ldmatrix (x4: two n8 x k16 fragments per instruction;
//     the backward's second product reads the same tile transposed with ldmatrix.trans, no second copy);
//   * the backward accumulates the full-D gradient of its 16 rows per warp in registers (16 x 128 fp32 =
//     64 per lane) with the coefficients q - p fed to the second mma straight from the first one's
//     accumulators (the C fragment of m16n8 is the A fragment of m16n8k16): no recompute per feature slice,
//     no coefficient round trip through shared memory; sigma (the rounding guard's row sums of c as the
//     product sees it) is one more mma of the same A fragment against ones.
// Loop nesting (what tools.cost_model counts): in the forward, a loop over the tiles that raise a running
// maximum (its own body: resident_raise, the rare path) around the bank tile loop (BN = 64 rows per
// iteration: k-steps (16 features) x 4 ldmatrix x 4 mma, the maxima, a warp vote, the common update of
// 2 x 16 logits per lane); in the backward, the bank tile loop outermost, with 4 sub-blocks of 16 bank
// rows, each with k-steps x (1 ldmatrix, 4 mma), 8 coefficients per lane, 1 mma for sigma, then D / 16 x
// (1 ldmatrix.trans, 2 mma).
// Where the bank is not in the mode's dtype or not 16-byte aligned (pointer, row stride, D % 8) the tile is
// staged by plain converting loads instead: the kernels' ASYNC template argument, chosen per call on the
// host, so neither instantiation's bank loop carries the other way of staging.
#pragma once

#include "rrd_kernels.cuh"

namespace rrd {

template <int MODE> RRD_HOST_DEVICE constexpr int resident_smem_bytes() {
  // two bank-tile buffers of BN x kResLd 16-bit elements (the one-time S / T staging reuses them: BM == BN),
  // then the rows' scales
  return 2 * BN * kResLd * 2 + 2 * BM * int(sizeof(float));
}
static_assert(BM == BN, "the S / T staging reuses the two bank buffers");

// X[row0 + r][d] as the mode's 16-bit bits for r < BM, d < dpad (zero past nrows and D), into dst (row
// pitch kResLd). The embeddings are in the mode's dtype, so this is a typed copy, done once per block.
RRD_DEVICE void stage_rows16(uint16_t* dst, const void* src, long long ld, int row0, int nrows, int D, int dpad,
                             bool vec) {
  const uint16_t* x = static_cast<const uint16_t*>(src);
  for (int idx = threadIdx.x; idx < BM * (dpad / 4); idx += kThreads) {
    const int r = idx / (dpad / 4), c = (idx % (dpad / 4)) * 4, row = row0 + r;
    uint16_t v[4] = {0, 0, 0, 0};
    if (row < nrows) {
      if (vec) {  // D % 4 == 0: the 4 elements are all inside or all past D
        if (c < D) {
          RRD_CHECK_ALIGNED(x + row * ld + c, 8);
          const uint2 u = *reinterpret_cast<const uint2*>(x + row * ld + c);
          v[0] = uint16_t(u.x & 0xffffu), v[1] = uint16_t(u.x >> 16), v[2] = uint16_t(u.y & 0xffffu), v[3] = uint16_t(u.y >> 16);
        }
      } else {
#pragma unroll
        for (int i = 0; i < 4; ++i) v[i] = c + i < D ? x[row * ld + c + i] : uint16_t(0);
      }
    }
    RRD_CHECK_ALIGNED(dst + r * kResLd + c, 8);
    *reinterpret_cast<uint2*>(dst + r * kResLd + c) =
        make_uint2(uint32_t(v[0]) | (uint32_t(v[1]) << 16), uint32_t(v[2]) | (uint32_t(v[3]) << 16));
  }
}

// This warp's 16 rows of the staged block as m16n8k16 A fragments, k-step by k-step. Always kResD / 16
// k-steps, zero-padded past D: no branch per k-step and one ldmatrix address per tile (a D of 64 wastes
// half of the products' mma, at most 0.06 warp-instructions per pair of the forward).
RRD_DEVICE void load_row_fragments(uint32_t (&f)[kResD / 16][4], const uint16_t* xs) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const uint16_t* a = xs + (warp * 16 + g) * kResLd + 2 * t;
#pragma unroll
  for (int kk = 0; kk < kResD / 16; ++kk) {
    // reg0 (g, 2t..2t+1), reg1 (g+8, 2t..), reg2 (g, 2t+8..), reg3 (g+8, 2t+8..)
    f[kk][0] = ld_pair(a + 16 * kk);
    f[kk][1] = ld_pair(a + 8 * kResLd + 16 * kk);
    f[kk][2] = ld_pair(a + 16 * kk + 8);
    f[kk][3] = ld_pair(a + 8 * kResLd + 16 * kk + 8);
  }
}

// Both rows' A fragments of S and T, staged once through the two (not yet used) bank buffers.
template <class P>
RRD_DEVICE void resident_rows(const P& p, uint16_t* buf, int row0, uint32_t (&fs)[kResD / 16][4],
                              uint32_t (&ft)[kResD / 16][4]) {
  stage_rows16(buf, p.student, p.ld_s, row0, p.B, p.D, kResD, p.vec_s);
  stage_rows16(buf + BN * kResLd, p.teacher, p.ld_t, row0, p.B, p.D, kResD, p.vec_t);
  __syncthreads();
  load_row_fragments(fs, buf);
  load_row_fragments(ft, buf + BN * kResLd);
  __syncthreads();  // the buffers now belong to the bank tiles
}

// How the bank tiles reach shared memory: by cp.async when the bank is in the mode's dtype and every row
// is 16-byte aligned (pointer, row stride and D multiples of 8 elements), else by converting loads. Decided
// on the host per call (the kernels' ASYNC template argument), so each instantiation's bank loop holds one
// way of staging only.
template <int MODE, class P> RRD_HOST_DEVICE bool bank_by_cp_async(const P& p) {
  return p.bank_dtype == (MODE == kMmaBF16 ? kBF16 : kF16) && p.vec_q16;
}

// Columns [D, kResD) of both buffers: zero once (the copies never write them; the products read them).
RRD_DEVICE void zero_feature_tail(uint16_t* buf, int D) {
  const int w = kResD - D;
  for (int idx = threadIdx.x; idx < 2 * BN * w; idx += kThreads) buf[(idx / w) * kResLd + D + idx % w] = 0;
}

// The cp.async copies of one bank tile, features [0, D): thread i copies the 16-byte chunk i % 16 of rows
// i / 16 + 8 s (s < 8) of every tile. A fixed chunk column per thread, so the chunk test is made once; the
// source pointer advances by a tile per call. The whole tiles' copies (issue<false>) test nothing else;
// only the last tile's (issue<true>: the split's first tile, or K's partial last one) zero-fill rows past K.
struct BankCopier {
  const uint16_t* base; // the bank (a valid address for the zero-filling copies, which read nothing)
  const uint16_t* src;  // this thread's first chunk in the next tile
  long long step;       // 8 rows, in elements
  int row;              // the bank row of that chunk
  int dst_off;          // that chunk's place in a tile buffer
  bool active;          // the thread's chunk column is inside D
  RRD_DEVICE BankCopier(const void* bank, long long ld, int n0, int D) {
    const int c = threadIdx.x % 16, r0 = threadIdx.x / 16;
    active = 8 * c < D;
    row = n0 + r0;
    step = 8 * ld;
    dst_off = r0 * kResLd + 8 * c;
    base = static_cast<const uint16_t*>(bank);
    src = base + row * ld + 8 * c;
  }
  template <bool MASKED> RRD_DEVICE void issue(uint16_t* dst, int K) {
    if (active) {
      const uint16_t* q = src;
#pragma unroll
      for (int s = 0; s < BN / 8; ++s, q += step) {
        if constexpr (MASKED) {
          const bool valid = row + 8 * s < K;
          cp_async16(dst + dst_off + 8 * s * kResLd, valid ? q : base, valid);
        } else {
          cp_async16_full(dst + dst_off + 8 * s * kResLd, q);
        }
      }
    }
    src += BN / 8 * step;
    row += BN;
  }
};

// The fallback: bank rows n0 .. n0 + BN - 1 converted to the mode's type element by element (any dtype,
// any alignment), zero past K and in columns [D, kResD).
template <int MODE>
RRD_DEVICE void convert_bank_tile(uint16_t* dst, const void* bank, long long ld, int dtype, int n0, int K, int D) {
  for (int idx = threadIdx.x; idx < BN * kResD; idx += kThreads) {
    const int r = idx / kResD, d = idx % kResD, n = n0 + r;
    const float x = (n < K && d < D) ? load_as_float(bank, n * ld + d, dtype) : 0.f;
    dst[r * kResLd + d] = ModeTraits<MODE>::from_float(x);
  }
}

// The bank-tile pipeline shared by both resident kernels: arrive(n0, it) brings whole tile `it` (bank rows
// n0 .. n0 + BN - 1, all < K) into shared memory and makes it visible to every thread; with cp.async
// (ASYNC) the next whole tile's copy is then in flight, else the tile was converted by plain loads.
// arrive_tail(n0, it) does the same for K's partial last tile, whose copy (masked) it issues itself unless
// that tile is the split's first: so the whole tiles' copies carry no bounds test, and the last tile's
// copy does not overlap a product (once per program). The caller ends each tile with a barrier (every warp
// done with the buffer before the copy two tiles on overwrites it).
template <int MODE, bool ASYNC> struct BankPipeline {
  BankCopier copier;
  uint16_t* buf;
  const void* bank;
  long long ld;
  int K, D, dtype, k_begin, k_full;
  template <class P>
  RRD_DEVICE BankPipeline(const P& p, uint16_t* buf_, int k_begin_, int k_full_)
      : copier(p.bank, p.ld_q, k_begin_, p.D), buf(buf_), bank(p.bank), ld(p.ld_q), K(p.K), D(p.D),
        dtype(p.bank_dtype), k_begin(k_begin_), k_full(k_full_) {
    if constexpr (ASYNC) {
      zero_feature_tail(buf, D);
      copier.issue<true>(buf, K);  // the first tile: whole or K's partial one
      cp_async_commit();
    }
  }
  RRD_DEVICE const uint16_t* arrive(int n0, int it) {
    uint16_t* cur = buf + (it & 1) * BN * kResLd;
    if constexpr (ASYNC) {
      if (n0 + BN < k_full) copier.issue<false>(buf + ((it + 1) & 1) * BN * kResLd, K);
      cp_async_commit();   // (an empty group on the last whole tile keeps the wait count uniform)
      cp_async_wait<1>();  // this thread's copies of tile `it` have landed
    } else {
      convert_bank_tile<MODE>(cur, bank, ld, dtype, n0, K, D);
    }
    __syncthreads();  // every thread's part of the tile is visible
    return cur;
  }
  RRD_DEVICE const uint16_t* arrive_tail(int n0, int it) {
    uint16_t* cur = buf + (it & 1) * BN * kResLd;
    if constexpr (ASYNC) {
      if (n0 > k_begin) copier.issue<true>(cur, K);  // (its buffer's last reader, tile it - 2, is done)
      cp_async_commit();
      cp_async_wait<0>();
    } else {
      convert_bank_tile<MODE>(cur, bank, ld, dtype, n0, K, D);
    }
    __syncthreads();
    return cur;
  }
};

// Whole tiles end here: k_end, or K's last tile when that reaches past K (only the last split's, when
// K % BN != 0). That tile is peeled off the bank loops, so their bodies hold only the unmasked update.
RRD_HOST_DEVICE inline int whole_tiles_end(int k_begin, int k_end) { return k_begin + (k_end - k_begin) / BN * BN; }

// The backward's bank loop: full(tile, n0) for every whole tile of the split, tail(tile, n0) after it for
// the masked last tile, each between the pipeline's barriers.
template <int MODE, bool ASYNC, class P, class Full, class Tail>
RRD_DEVICE void for_each_bank_tile(const P& p, uint16_t* buf, int k_begin, int k_end, Full full, Tail tail) {
  const int k_full = whole_tiles_end(k_begin, k_end);
  BankPipeline<MODE, ASYNC> pipe(p, buf, k_begin, k_full);
  int it = 0;
  for (int n0 = k_begin; n0 < k_full; n0 += BN, ++it) {
    full(pipe.arrive(n0, it), n0);
    __syncthreads();
  }
  if (k_full < k_end) {
    tail(pipe.arrive_tail(k_full, it), k_full);
    __syncthreads();
  }
}

// acc[j] += A B_j over the kResD / 16 k-steps for the two n8 tiles j = 2 jp, 2 jp + 1 of the tile (bank rows 16 jp ..
// 16 jp + 15): one ldmatrix.x4 gives both tiles' B fragments (matrices: rows 16 jp + 8 (l / 16) + l % 8,
// features 16 kk + 8 ((l / 8) % 2)), shared by the student and teacher products.
template <int MODE>
RRD_DEVICE void logit_pair(float (&acc_s)[2][4], float (&acc_t)[2][4], const uint32_t (&fs)[kResD / 16][4],
                           const uint32_t (&ft)[kResD / 16][4], const uint16_t* tile, int jp) {
  const int lane = threadIdx.x % 32;
  const uint16_t* row = tile + (16 * jp + 8 * (lane / 16) + lane % 8) * kResLd + 8 * ((lane / 8) % 2);
#pragma unroll
  for (int kk = 0; kk < kResD / 16; ++kk) {
    uint32_t b[4];
    ldsm_x4(b, row + 16 * kk);
    const uint32_t b0[2] = {b[0], b[1]}, b1[2] = {b[2], b[3]};
    mma16<MODE>(acc_s[0], fs[kk], b0);
    mma16<MODE>(acc_t[0], ft[kk], b0);
    mma16<MODE>(acc_s[1], fs[kk], b1);
    mma16<MODE>(acc_t[1], ft[kk], b1);
  }
}

// The rare path of resident_update: a tile maximum above the running one (or the first tile). The tile's
// own state (the count n with the maximum's exact 1 left out, w, v, x, argmax) is merged into s. A
// non-finite logit: W's terms 2^(b - m_b) (m_a - a) are NaN or inf wherever a or b is (inf - inf is NaN;
// a -inf logit meets a 0 weight or an inf distance), so 0 * W added to the count makes n_a NaN.
template <bool MASKED>
RRD_DEVICE void resident_raise(RowState& s, const float (&acc_s)[8][4], const float (&acc_t)[8][4], int h,
                               float sa, float sb, float mx_a, float mx_b, int col0, int K) {
  if (!(mx_a > -INFINITY && mx_b > -INFINITY)) {  // every counted logit NaN (fmaxf skipped them) or -inf
    s.n_a = NAN;
    return;
  }
  float na = 0.f, nb = 0.f, ca = -1.f, cb = -1.f, w = 0.f, v = 0.f, x = 0.f;  // ca, cb: (entries at max) - 1
  int arg = 0;
#pragma unroll
  for (int j = 0; j < 8; ++j)
#pragma unroll
    for (int c = 0; c < 2; ++c)
      if (!MASKED || col0 + 8 * j + c < K) {
        const float da = mul_rn(acc_s[j][2 * h + c], sa) - mx_a, db = mul_rn(acc_t[j][2 * h + c], sb) - mx_b;
        const float ea = fast_exp2(da), eb = fast_exp2(db);
        if (da == 0.f) {
          ca += 1.f;
          arg = 8 * j + c;
        } else {
          na += ea;
        }
        if (db == 0.f) cb += 1.f; else nb += eb;
        w = fmaf(eb, -da, w);
        v = fmaf(eb, -db, v);
        x += ea - eb;
      }
  merge_state(s, RowState{mx_a, fmaf(0.f, w, na + ca), mx_b, nb + cb, w, v, x, col0 + arg});
}

// This lane's maxima of the raw products of one row (half h: row g + 8 h) over its 16 logits of the tile.
// The maxima of the logits are fl(max(acc) s): the scales are >= 0 and rounding is monotone. MASKED (the
// last tile only): columns >= K are skipped.
template <bool MASKED>
RRD_DEVICE void tile_maxima(float& ra, float& rb, const float (&acc_s)[8][4], const float (&acc_t)[8][4], int h,
                            int col0, int K) {
  ra = -INFINITY, rb = -INFINITY;
#pragma unroll
  for (int j = 0; j < 8; ++j)
#pragma unroll
    for (int c = 0; c < 2; ++c)
      if (!MASKED || col0 + 8 * j + c < K) {
        ra = fmaxf(ra, acc_s[j][2 * h + c]);
        rb = fmaxf(rb, acc_t[j][2 * h + c]);
      }
}

// Whether this lane's logits of one row raise a running maximum (the rare path): a tile maximum above it,
// a NaN maximum (every logit NaN) or, on the first tile, anything above -inf.
RRD_DEVICE bool raises(const RowState& s, float mx_a, float mx_b) { return !(mx_a <= s.m_a && mx_b <= s.m_b); }

// The common case (after the first tiles nearly every one): neither tile maximum exceeds the running one,
// and the terms go straight into the running sums, relative to the running maxima. That is merge_state with
// equal maxima term by term: an entry at the maximum has 2^0 = 1, the 1 the count adds for it.
template <bool MASKED>
RRD_DEVICE void common_terms(RowState& s, const float (&acc_s)[8][4], const float (&acc_t)[8][4], int h,
                             float sa, float sb, int col0, int K) {
#pragma unroll
  for (int j = 0; j < 8; ++j)
#pragma unroll
    for (int c = 0; c < 2; ++c)
      if (!MASKED || col0 + 8 * j + c < K) {
        // One fused multiply-add: da = acc sa - m rounded once. An entry tied with the running maximum
        // (fl(acc sa) == m, in a later tile than the maximum's) then has |da| <= ulp(m) / 2 rather than 0, and
        // adds 1 + O(2^-24 |m|) for its 1: the same error as any logit's own rounding (each is fl(acc sa)).
        // The maximum itself is left out of the count exactly: it was found on the rare path (mul_rn).
        const float da = fmaf(acc_s[j][2 * h + c], sa, -s.m_a), db = fmaf(acc_t[j][2 * h + c], sb, -s.m_b);
        const float ea = fast_exp2(da), eb = fast_exp2(db);
        s.n_a += ea;
        s.n_b += eb;
        s.w = fmaf(eb, -da, s.w);
        s.v = fmaf(eb, -db, s.v);
        s.x += ea - eb;  // each term's rounding is ~1e-7 of 1, not of the counts
      }
}

// Online update of one row's state with this lane's 16 logits of the tile: the common terms, or a tile
// state formed and merged (resident_raise). No per-element non-finite test: a NaN logit makes its
// 2^(a - m) NaN and so the count; an inf one raises a maximum to inf (the rare path).
template <bool MASKED>
RRD_DEVICE void resident_update(RowState& s, const float (&acc_s)[8][4], const float (&acc_t)[8][4], int h,
                                float sa, float sb, int col0, int K) {
  if (MASKED && col0 >= K) return;  // none of this lane's columns is a bank row
  float ra, rb;
  tile_maxima<MASKED>(ra, rb, acc_s, acc_t, h, col0, K);
  const float mx_a = mul_rn(ra, sa), mx_b = mul_rn(rb, sb);
  if (!raises(s, mx_a, mx_b)) {
    common_terms<MASKED>(s, acc_s, acc_t, h, sa, sb, col0, K);
    return;
  }
  resident_raise<MASKED>(s, acc_s, acc_t, h, sa, sb, mx_a, mx_b, col0, K);
}

// Rows' logit scales of this lane (rows r_lo, r_lo + 8 of the block), from the block's scale arrays.
template <class P>
RRD_DEVICE void lane_scales(const P& p, unsigned char* smem, int row0, int r_lo, float (&sa)[2], float (&sb)[2]) {
  float* scale_s = reinterpret_cast<float*>(smem + 2 * BN * kResLd * 2);
  float* scale_t = scale_s + BM;
  row_scales(p, row0, scale_s, scale_t);
  sa[0] = scale_s[r_lo], sa[1] = scale_s[r_lo + 8];
  sb[0] = scale_t[r_lo], sb[1] = scale_t[r_lo + 8];
}

// ---- forward: grid (ceil(B / BM), num_splits), 128 threads, resident_smem_bytes -----------------------
// The bank loop is split in two so that its inner loop holds the common update only: per tile the products,
// the barrier that frees the tile's buffer (the update reads registers only), and a warp vote (__any_sync)
// on whether any lane raises one of its running maxima. If none does, every lane's resident_update would
// take the common path, so the inner loop adds the common terms and goes on; else the warp leaves it with
// the tile's products and the outer loop finishes that tile: every lane forms the tile's own state and
// merges it (resident_raise), whether or not its own maxima rose. That is exact for either (merge_state is
// the general fold), and the warp runs one path: a divergent warp would run the common terms and the tile
// state one after the other. Every warp still meets the same barriers in the same order (the tile's two,
// both at one place in the inner loop; the rare path has none), only the update in between differs per warp.
// How often the outer loop runs: once per tile where some lane of the warp raises one of its 4 maxima
// (2 rows x a, b over its 16 columns of a tile): for logits in random order, with 128 record sequences per
// warp, about sum_i 1 - (1 - 1/i)^128 tiles of n, i.e. ~0.8 x 128 + 128 ln(n / 128) (tools/cuda_cost.py).
template <int MODE, bool ASYNC>
__global__ void __launch_bounds__(kThreads) rrd_forward_resident_kernel(ForwardParams p) {
  RRD_DECLARE_SMEM(smem);
  uint16_t* buf = reinterpret_cast<uint16_t*>(smem);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int row0 = blockIdx.x * BM, split = blockIdx.y, r_lo = warp * 16 + g;
  const int k_begin = split * p.chunk;
  const int k_end = p.K < k_begin + p.chunk ? p.K : k_begin + p.chunk;

  float sa[2], sb[2];
  lane_scales(p, smem, row0, r_lo, sa, sb);
  uint32_t fs[kResD / 16][4], ft[kResD / 16][4];
  resident_rows(p, buf, row0, fs, ft);
  RowState st[2] = {empty_state(), empty_state()};

  float acc_s[8][4], acc_t[8][4];  // the tile's products (C layout: n8 tile j of 8)
  const auto products = [&](const uint16_t* tile) {
#pragma unroll
    for (int jp = 0; jp < 4; ++jp) {
      float ps[2][4], pt[2][4];
#pragma unroll
      for (int i = 0; i < 4; ++i) ps[0][i] = ps[1][i] = pt[0][i] = pt[1][i] = 0.f;
      logit_pair<MODE>(ps, pt, fs, ft, tile, jp);
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        acc_s[2 * jp][i] = ps[0][i], acc_s[2 * jp + 1][i] = ps[1][i];
        acc_t[2 * jp][i] = pt[0][i], acc_t[2 * jp + 1][i] = pt[1][i];
      }
    }
  };
  const int k_full = whole_tiles_end(k_begin, k_end);
  BankPipeline<MODE, ASYNC> pipe(p, buf, k_begin, k_full);
  int it = 0, n0 = k_begin;
  float mx_a[2], mx_b[2];  // the tile's maxima of this lane's logits, per row half (the vote's, kept for the rare path)
  while (n0 < k_full) {  // once per tile that raises a maximum
    bool raised;
    do {  // the common tiles
      products(pipe.arrive(n0, it));
      bool mine = false;
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        float ra, rb;
        tile_maxima<false>(ra, rb, acc_s, acc_t, h, n0 + 2 * t, p.K);
        mx_a[h] = mul_rn(ra, sa[h]), mx_b[h] = mul_rn(rb, sb[h]);
        mine |= raises(st[h], mx_a[h], mx_b[h]);
      }
      raised = __any_sync(0xffffffffu, mine) != 0;
      __syncthreads();  // every warp is done with this buffer before the copy two tiles on overwrites it
      if (!raised) {
#pragma unroll
        for (int h = 0; h < 2; ++h) common_terms<false>(st[h], acc_s, acc_t, h, sa[h], sb[h], n0 + 2 * t, p.K);
      }
      n0 += BN, ++it;
    } while (!raised && n0 < k_full);
    if (raised) {  // every lane forms the tile's state and merges it: one path for the whole warp
#pragma unroll
      for (int h = 0; h < 2; ++h)
        resident_raise<false>(st[h], acc_s, acc_t, h, sa[h], sb[h], mx_a[h], mx_b[h], n0 - BN + 2 * t, p.K);
    }
  }
  if (k_full < k_end) {  // the masked last tile
    products(pipe.arrive_tail(k_full, it));
#pragma unroll
    for (int h = 0; h < 2; ++h) resident_update<true>(st[h], acc_s, acc_t, h, sa[h], sb[h], k_full + 2 * t, p.K);
  }
  store_partial_states(p, st, row0 + r_lo, split);
}

// Two fp32 values as the mode's 16-bit pair (low index in the low half), rounded to nearest.
template <int MODE> RRD_DEVICE uint32_t pack16(float lo, float hi) {
  return MODE == kMmaBF16 ? floats_to_bf16x2_bits(lo, hi) : floats_to_f16x2_bits(lo, hi);
}
// The m16n8k16 B fragment of a 16 x 8 matrix of ones in the mode's type: c times it sums c's rows.
template <int MODE> RRD_HOST_DEVICE constexpr uint32_t ones16x2() { return MODE == kMmaBF16 ? 0x3f803f80u : 0x3c003c00u; }

// One bank tile of the resident backward for this warp's 16 rows: per sub-block of 16 bank rows the two
// logit products, the coefficients c = q - p (C layout: tile jj, rows g + 8 (i >> 1), bank row
// 16 sbk + 8 jj + 2 t + (i & 1)), packed as the A fragment of one m16n8k16 over these 16 bank rows (reg0 =
// tile 0 row g, reg1 = tile 0 row g + 8, reg2 = tile 1 row g, reg3 = tile 1 row g + 8), rounded once for
// the product and sigma; then G += c Q_sub over all of D, and sigma += c 1 (one more mma against ones:
// the row sums of the operand exactly as the product sees it, in every column of the quad's C fragment,
// for 1 mma instead of 8 conversions back, 8 adds and the quad's shuffles). MASKED (the last tile): c = 0
// past K.
template <int MODE, bool MASKED>
RRD_DEVICE void backward_tile(float (&acc_g)[kResD / 8][4], float (&sig)[4], const uint32_t (&fs)[kResD / 16][4],
                              const uint32_t (&ft)[kResD / 16][4], const uint16_t* tile, int n0, int K,
                              const float (&sa)[2], const float (&sb)[2], const float (&la)[2],
                              const float (&lb)[2]) {
  const int lane = threadIdx.x % 32, t = lane % 4;
#pragma unroll 1  // unrolled, ptxas hoists the next sub-block's loads and runs out of registers
  for (int sbk = 0; sbk < BN / 16; ++sbk) {
    float ps[2][4], pt[2][4];
#pragma unroll
    for (int i = 0; i < 4; ++i) ps[0][i] = ps[1][i] = pt[0][i] = pt[1][i] = 0.f;
    logit_pair<MODE>(ps, pt, fs, ft, tile, sbk);
    float c[2][4];
#pragma unroll
    for (int jj = 0; jj < 2; ++jj)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int h = i >> 1;
        c[jj][i] = fast_exp2(fmaf(ps[jj][i], sa[h], -la[h])) - fast_exp2(fmaf(pt[jj][i], sb[h], -lb[h]));
        if (MASKED && n0 + 16 * sbk + 8 * jj + 2 * t + (i & 1) >= K) c[jj][i] = 0.f;
      }
    uint32_t a[4];
#pragma unroll
    for (int jj = 0; jj < 2; ++jj) {
      a[2 * jj] = pack16<MODE>(c[jj][0], c[jj][1]);
      a[2 * jj + 1] = pack16<MODE>(c[jj][2], c[jj][3]);
    }
    constexpr uint32_t kOnes[2] = {ones16x2<MODE>(), ones16x2<MODE>()};
    mma16<MODE>(sig, a, kOnes);
    // G += c Q_sub: B fragments (k = bank row, n = feature) by ldmatrix.trans of the row-major tile,
    // matrices rows 16 sbk + 8 ((l / 8) % 2) + l % 8, features 16 jp + 8 (l / 16).
    const uint16_t* row = tile + (16 * sbk + 8 * ((lane / 8) % 2) + lane % 8) * kResLd + 8 * (lane / 16);
#pragma unroll
    for (int jp = 0; jp < kResD / 16; ++jp) {
      uint32_t b[4];
      ldsm_x4_trans(b, row + 16 * jp);
      const uint32_t b0[2] = {b[0], b[1]}, b1[2] = {b[2], b[3]};
      mma16<MODE>(acc_g[2 * jp], a, b0);
      mma16<MODE>(acc_g[2 * jp + 1], a, b1);
    }
  }
}

// ---- backward: grid (ceil(B / BM), num_splits), 128 threads, resident_smem_bytes ----------------------
// Per tile and sub-block of 16 bank rows: the two logit products (16 x 16 per warp), the coefficients
//   c = q - p = 2^(a - lse_a) - 2^(b - lse_b)
// formed directly (the series form of the fp32 kernels is not needed here: c is rounded to the 16-bit
// operand type, 2^-9 or 2^-12 of itself, far above the 2^-24 absolute error of the difference), rounded
// once for both the product and sigma, and G[r][:] += c Q for all of D. Rows past B compute garbage c
// that only ever reaches their own accumulators, which are never stored; columns past K get c = 0.
template <int MODE, bool ASYNC>
__global__ void __launch_bounds__(kThreads) rrd_backward_resident_kernel(BackwardParams p) {
  RRD_DECLARE_SMEM(smem);
  uint16_t* buf = reinterpret_cast<uint16_t*>(smem);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int row0 = blockIdx.x * BM, split = blockIdx.y, r_lo = warp * 16 + g;
  const int k_begin = split * p.chunk;
  const int k_end = p.K < k_begin + p.chunk ? p.K : k_begin + p.chunk;

  float sa[2], sb[2], la[2], lb[2];
  lane_scales(p, smem, row0, r_lo, sa, sb);
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int row = row0 + r_lo + 8 * h;
    lb[h] = row < p.B ? p.lse_t[row] : 0.f;
    la[h] = row < p.B ? p.lse_s[row] + lb[h] : 0.f;  // lse_a; NaN rows stay NaN
  }
  uint32_t fs[kResD / 16][4], ft[kResD / 16][4];
  resident_rows(p, buf, row0, fs, ft);
  float acc_g[kResD / 8][4];
#pragma unroll
  for (int j = 0; j < kResD / 8; ++j)
#pragma unroll
    for (int i = 0; i < 4; ++i) acc_g[j][i] = 0.f;
  float sig[4] = {0.f, 0.f, 0.f, 0.f};  // C fragment of c 1: rows g (sig[0], sig[1]), g + 8 (sig[2], sig[3])

  for_each_bank_tile<MODE, ASYNC>(
      p, buf, k_begin, k_end,
      [&](const uint16_t* tile, int n0) { backward_tile<MODE, false>(acc_g, sig, fs, ft, tile, n0, p.K, sa, sb, la, lb); },
      [&](const uint16_t* tile, int n0) { backward_tile<MODE, true>(acc_g, sig, fs, ft, tile, n0, p.K, sa, sb, la, lb); });
#pragma unroll
  for (int j = 0; j < kResD / 8; ++j)
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int row = row0 + r_lo + 8 * (i >> 1), d = 8 * j + 2 * t + (i & 1);
      if (row < p.B && d < p.D) p.gpart[((long long)split * p.B + row) * p.D + d] = acc_g[j][i];
    }
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int row = row0 + r_lo + 8 * h;  // (every lane of the quad holds the row's whole sum)
    if (t == 0 && row < p.B) p.sigpart[(long long)split * p.B + row] = sig[2 * h];
  }
}

}  // namespace rrd
