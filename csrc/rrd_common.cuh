// Shared device-side building blocks of the RRD kernels: the platform prelude, element conversions, the
// warp-level tile product (3xTF32, TF32 mma, fp16/bf16 mma), cp.async / ldmatrix wrappers and the online
// dual-softmax state.
//
// The same source compiles two ways:
//   * by nvcc for the GPU (the default), and
//   * by a plain host C++ compiler with RRD_EMULATE defined (csrc/emulate.cpp), where every CUDA thread
//     is a fiber (emulate.h), __syncthreads/__shfl_xor_sync are barriers, and mma.sync is computed from the
//     fragment layouts of the PTX ISA. That lets tests run the kernels' real indexing and masking code on a
//     machine without a GPU. Only this prelude differs between the two builds.
#pragma once

#include <stdint.h>

#ifdef RRD_EMULATE
#include "emulate.h"  // threadIdx, blockIdx, __syncthreads, __shfl_xor_sync, mma emulation, conversions
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <math.h>
#define RRD_DEVICE __device__ __forceinline__
#define RRD_HOST_DEVICE __host__ __device__
#define RRD_DECLARE_SMEM(name) extern __shared__ __align__(16) unsigned char name[]
#define RRD_CHECK_ALIGNED(ptr, bytes) ((void)0)  // checked in the host emulation
#endif

namespace rrd {

// ---- constants ----------------------------------------------------------------------------------------
constexpr int kThreads = 128;        // 4 warps per block
constexpr int kWarps = kThreads / 32;
constexpr int BM = 16 * kWarps;      // rows of S/T per block: each warp owns 16 rows (the mma M)
constexpr int BN = 64;               // bank rows per tile: each warp computes a 16 x 64 logit tile
constexpr int DK = 32;               // feature chunk staged in shared memory per step
constexpr int DV = 64;               // backward: features of dL/dS accumulated per block (grid z)
constexpr int kMaxD = 512;           // finishing kernel keeps kMaxD / kThreads features per thread
constexpr int kResD = 128;           // resident kernels (16-bit modes): D <= kResD, S / T fragments in registers
constexpr int kResLd = kResD + 8;    // their shared row pitch in 16-bit elements: 272 B, a multiple of 16 B (cp.async,
                                     // ldmatrix rows) whose 8 rows of an ldmatrix land on distinct bank groups
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr float kNormEps = 1e-12f;   // as F.normalize

// dtype codes passed from Python
enum DType : int { kF32 = 0, kF16 = 1, kBF16 = 2 };
// how the dot products are computed
enum Mode : int {
  kSimtF32 = 0,  // fp32 "highest": 3xTF32 mma.sync (hi / lo operands; the name is from its SIMT FMA days)
  kMmaTF32 = 1,  // mma.sync m16n8k8 tf32 (fp32 inputs, precision "high"/"medium")
  kMmaF16 = 2,   // mma.sync m16n8k16 f16 (fp16 embeddings; bank converted to fp16)
  kMmaBF16 = 3,  // mma.sync m16n8k16 bf16 (bf16 embeddings; bank converted to bf16)
};

#ifndef RRD_EMULATE
RRD_DEVICE float bits_as_float(uint32_t x) { return __uint_as_float(x); }
RRD_DEVICE uint32_t float_to_bits_of(float x) { return __float_as_uint(x); }
RRD_DEVICE float bf16_bits_to_float(uint16_t x) { return __uint_as_float(uint32_t(x) << 16); }
RRD_DEVICE float f16_bits_to_float(uint16_t x) { return __half2float(__ushort_as_half(x)); }
RRD_DEVICE uint16_t float_to_bf16_bits(float x) { return __bfloat16_as_ushort(__float2bfloat16_rn(x)); }
RRD_DEVICE uint16_t float_to_f16_bits(float x) { return __half_as_ushort(__float2half_rn(x)); }
// Two floats as one 16-bit pair (lo in the low half), rounded to nearest: one packing conversion (F2FP)
// instead of two conversions and a permute.
RRD_DEVICE uint32_t floats_to_bf16x2_bits(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}
RRD_DEVICE uint32_t floats_to_f16x2_bits(float lo, float hi) {
  const __half2 v = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}
// x * y rounded, never fused into a following add (nvcc contracts a * b + c by default).
RRD_DEVICE float mul_rn(float x, float y) { return __fmul_rn(x, y); }
RRD_DEVICE uint32_t float_to_tf32(float x) {
  uint32_t r;
  asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(x));
  return r;
}
// D = A * B + D for one m16n8k16 (f16 or bf16 inputs, fp32 accumulators); fragment layouts: PTX ISA,
// "Matrix Fragments for mma.m16n8k16 with floating point type".
RRD_DEVICE void mma_f16_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
RRD_DEVICE void mma_bf16_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
// 16 bytes global -> shared without passing through registers (sm_80+); src_bytes 0 fills the 16 bytes with
// zeros (rows past the tensor), reading nothing. Completion: cp_async_commit groups this thread's copies,
// cp_async_wait<N> waits until at most N of its groups are in flight (then a __syncthreads publishes them).
RRD_DEVICE void cp_async16(void* smem_dst, const void* gmem_src, bool valid) {
  const uint32_t dst = uint32_t(__cvta_generic_to_shared(smem_dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem_src), "r"(valid ? 16 : 0)
               : "memory");
}
RRD_DEVICE void cp_async16_full(void* smem_dst, const void* gmem_src) {  // a chunk known to be inside the bank
  const uint32_t dst = uint32_t(__cvta_generic_to_shared(smem_dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(gmem_src) : "memory");
}
RRD_DEVICE void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N> RRD_DEVICE void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory"); }
// Four 8 x 8 16-bit matrices from shared memory: lane l gives the address of row l % 8 of matrix l / 8 (16
// contiguous bytes); register r of lane l receives row l / 4, elements 2 (l % 4) and 2 (l % 4) + 1 of matrix
// r (trans: column l / 4, rows 2 (l % 4) and 2 (l % 4) + 1), low index in the low half.
RRD_DEVICE void ldsm_x4(uint32_t (&r)[4], const uint16_t* row) {
  const uint32_t a = uint32_t(__cvta_generic_to_shared(row));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(a));
}
RRD_DEVICE void ldsm_x4_trans(uint32_t (&r)[4], const uint16_t* row) {
  const uint32_t a = uint32_t(__cvta_generic_to_shared(row));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(a));
}
// 2^x in one MUFU.EX2 (results below 2^-126 flush to 0: negligible beside the terms >= 2^-126 of the sums
// and coefficients it feeds). Used by the 16-bit resident kernels only; the fp32 paths keep exp2f.
RRD_DEVICE float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}
// D = A * B + D for one m16n8k8 with tf32 inputs (registers hold cvt.rna.tf32 results).
RRD_DEVICE void mma_tf32_1688(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  asm("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
#endif

// Element of a global tensor with runtime dtype code, as fp32 (exact for all three dtypes).
RRD_DEVICE float load_as_float(const void* base, long long index, int dtype) {
  if (dtype == kF32) return static_cast<const float*>(base)[index];
  const uint16_t bits = static_cast<const uint16_t*>(base)[index];
  return dtype == kBF16 ? bf16_bits_to_float(bits) : f16_bits_to_float(bits);
}

// Elements base[index .. index + 3] as fp32 with one 16-byte (fp32) or 8-byte (16-bit) load. Only called
// where the host found the tensor 4-element aligned (data pointer, row stride and D multiples of 4).
RRD_DEVICE void load4_as_float(const void* base, long long index, int dtype, float (&x)[4]) {
  if (dtype == kF32) {
    const float* p = static_cast<const float*>(base) + index;
    RRD_CHECK_ALIGNED(p, 16);
    const float4 v = *reinterpret_cast<const float4*>(p);
    x[0] = v.x;
    x[1] = v.y;
    x[2] = v.z;
    x[3] = v.w;
    return;
  }
  const uint16_t* p = static_cast<const uint16_t*>(base) + index;
  RRD_CHECK_ALIGNED(p, 8);
  const uint2 v = *reinterpret_cast<const uint2*>(p);
  const uint16_t h[4] = {uint16_t(v.x & 0xffffu), uint16_t(v.x >> 16), uint16_t(v.y & 0xffffu), uint16_t(v.y >> 16)};
#pragma unroll
  for (int i = 0; i < 4; ++i) x[i] = dtype == kBF16 ? bf16_bits_to_float(h[i]) : f16_bits_to_float(h[i]);
}

// ---- per-mode shared-memory element type -----------------------------------------------------------
// The fp32 modes (3xTF32, TF32) stage fp32 in shared memory; the 16-bit modes stage the mma input type (raw bits).
// Row padding (in elements) keeps the fragment loads free of bank conflicts: a row stride of 36 words
// (fp32) or 20 / 36 words (16-bit, DK / BN wide) puts the 8 rows a load touches on distinct banks.
// store4 writes 4 consecutive elements with one 16-byte (fp32) or 8-byte (16-bit) store; the callers keep
// the address 4-element aligned (row strides and column offsets are multiples of 4 elements).
template <int MODE> struct ModeTraits {
  using T = float;
  static constexpr int kPad = 4;
  static RRD_DEVICE T from_float(float x) { return x; }
  static RRD_DEVICE void store4(T* dst, const float (&x)[4]) {
    RRD_CHECK_ALIGNED(dst, 16);
    *reinterpret_cast<float4*>(dst) = make_float4(x[0], x[1], x[2], x[3]);
  }
};
template <class Conv> RRD_DEVICE void store4_16bit(uint16_t* dst, const float (&x)[4], Conv conv) {
  RRD_CHECK_ALIGNED(dst, 8);
  *reinterpret_cast<uint2*>(dst) = make_uint2(uint32_t(conv(x[0])) | (uint32_t(conv(x[1])) << 16),
                                              uint32_t(conv(x[2])) | (uint32_t(conv(x[3])) << 16));
}
template <> struct ModeTraits<kMmaF16> {
  using T = uint16_t;
  static constexpr int kPad = 8;
  static RRD_DEVICE T from_float(float x) { return float_to_f16_bits(x); }
  static RRD_DEVICE void store4(T* dst, const float (&x)[4]) { store4_16bit(dst, x, float_to_f16_bits); }
};
template <> struct ModeTraits<kMmaBF16> {
  using T = uint16_t;
  static constexpr int kPad = 8;
  static RRD_DEVICE T from_float(float x) { return float_to_bf16_bits(x); }
  static RRD_DEVICE void store4(T* dst, const float (&x)[4]) { store4_16bit(dst, x, float_to_bf16_bits); }
};

RRD_DEVICE uint32_t ld_pair(const uint16_t* p) {  // two consecutive 16-bit elements, low index in low half
  return *reinterpret_cast<const uint32_t*>(p);
}

// ---- the warp tile product --------------------------------------------------------------------------
// acc[j][i] += sum_{k < KDIM} A[r][k] * B[n][k]   for the 16 x 64 tile owned by this warp, where
//   lane = 4 g + t,  r = g + 8 (i >> 1),  n = 8 j + 2 t + (i & 1)       (j < 8, i < 4)
// i.e. acc is the mma.sync C fragment of eight m16n8 tiles side by side. A is 16 rows (stride lda) and B
// is 64 rows (stride ldb), both with k contiguous ("NT"). Every mode produces exactly this layout, so the
// softmax code that consumes acc is shared.
template <int MODE, int KDIM> struct WarpTile;

// x = hi + lo as two tf32 operands (the bits the tensor core reads): hi = x rounded to tf32, lo = the
// remainder (exact in fp32) rounded to tf32, so hi + lo carries 22 significant bits of x.
RRD_DEVICE float tf32_value(float x) { return bits_as_float(float_to_tf32(x) & 0xffffe000u); }
RRD_DEVICE void split_tf32(float x, uint32_t& hi, uint32_t& lo) {
  const float h = tf32_value(x);
  hi = float_to_bits_of(h);
  lo = float_to_tf32(x - h) & 0xffffe000u;
}

// fp32 "highest": 3xTF32 on the tensor cores. A B = (A_hi + A_lo)(B_hi + B_lo) - A_lo B_lo, the last term
// (2^-22 of the product) dropped: three m16n8k8 tf32 mma per step (the small terms first), each operand
// split when its fragment is loaded.
template <int KDIM> struct WarpTile<kSimtF32, KDIM> {
  static_assert(KDIM % 8 == 0, "tf32 mma steps k by 8");
  static RRD_DEVICE void run(float (&acc)[8][4], const float* A, int lda, const float* B, int ldb) {
    const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
#pragma unroll 1
    for (int k0 = 0; k0 < KDIM; k0 += 8) {
      // A (16 x 8, row): a0 (g, t), a1 (g+8, t), a2 (g, t+4), a3 (g+8, t+4)
      const float av[4] = {A[g * lda + k0 + t], A[(g + 8) * lda + k0 + t], A[g * lda + k0 + t + 4],
                           A[(g + 8) * lda + k0 + t + 4]};
      uint32_t ah[4], al[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) split_tf32(av[i], ah[i], al[i]);
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        const float* bn = B + (8 * j + g) * ldb + k0;
        uint32_t bh[2], bl[2];
        split_tf32(bn[t], bh[0], bl[0]);
        split_tf32(bn[t + 4], bh[1], bl[1]);
        mma_tf32_1688(acc[j], al, bh);
        mma_tf32_1688(acc[j], ah, bl);
        mma_tf32_1688(acc[j], ah, bh);
      }
    }
  }
};

template <int KDIM> struct WarpTile<kMmaTF32, KDIM> {
  static_assert(KDIM % 8 == 0, "tf32 mma steps k by 8");
  static RRD_DEVICE void run(float (&acc)[8][4], const float* A, int lda, const float* B, int ldb) {
    const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    // Not unrolled: unrolling lets ptxas hoist all k-steps' operand loads ahead of the mmas, which spills
    // in the forward kernel (two 16 x 64 accumulators live).
#pragma unroll 1
    for (int k0 = 0; k0 < KDIM; k0 += 8) {
      // A (16 x 8, row): a0 (g, t), a1 (g+8, t), a2 (g, t+4), a3 (g+8, t+4)
      const uint32_t a[4] = {float_to_tf32(A[g * lda + k0 + t]), float_to_tf32(A[(g + 8) * lda + k0 + t]),
                             float_to_tf32(A[g * lda + k0 + t + 4]),
                             float_to_tf32(A[(g + 8) * lda + k0 + t + 4])};
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        // B (8 x 8, col): b0 (k = t, n = g), b1 (k = t+4, n = g); B[k][n] lives at row n of the B tile
        const float* bn = B + (8 * j + g) * ldb + k0;
        const uint32_t b[2] = {float_to_tf32(bn[t]), float_to_tf32(bn[t + 4])};
        mma_tf32_1688(acc[j], a, b);
      }
    }
  }
};

// One m16n8k16 of the 16-bit mode MODE (a compile-time choice, not a run-time switch).
template <int MODE> RRD_DEVICE void mma16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  static_assert(MODE == kMmaF16 || MODE == kMmaBF16, "16-bit modes only");
  if (MODE == kMmaBF16)
    mma_bf16_16816(d, a, b);
  else
    mma_f16_16816(d, a, b);
}
template <int MODE, int KDIM> struct WarpTile16 {
  static_assert(KDIM % 16 == 0, "f16/bf16 mma steps k by 16");
  static RRD_DEVICE void run(float (&acc)[8][4], const uint16_t* A, int lda, const uint16_t* B, int ldb) {
    const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
#pragma unroll
    for (int k0 = 0; k0 < KDIM; k0 += 16) {
      // A (16 x 16, row): reg0 (g, 2t..2t+1), reg1 (g+8, 2t..), reg2 (g, 2t+8..), reg3 (g+8, 2t+8..)
      const uint32_t a[4] = {ld_pair(A + g * lda + k0 + 2 * t), ld_pair(A + (g + 8) * lda + k0 + 2 * t),
                             ld_pair(A + g * lda + k0 + 2 * t + 8),
                             ld_pair(A + (g + 8) * lda + k0 + 2 * t + 8)};
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        // B (16 x 8, col): reg0 (k = 2t..2t+1, n = g), reg1 (k = 2t+8..2t+9, n = g)
        const uint16_t* bn = B + (8 * j + g) * ldb + k0;
        const uint32_t b[2] = {ld_pair(bn + 2 * t), ld_pair(bn + 2 * t + 8)};
        mma16<MODE>(acc[j], a, b);
      }
    }
  }
};
template <int KDIM> struct WarpTile<kMmaF16, KDIM> : WarpTile16<kMmaF16, KDIM> {};
template <int KDIM> struct WarpTile<kMmaBF16, KDIM> : WarpTile16<kMmaBF16, KDIM> {};

// ---- scalar helpers ----------------------------------------------------------------------------------
// log2(1 + n) for n > -1, accurate for tiny |n| (the log1p trick: the rounding of 1 + n cancels).
RRD_DEVICE float log2_1p(float n) {
  const float u = 1.f + n, d = u - 1.f;
  return d == 0.f ? n * kLog2e : log2f(u) * (n / d);
}

// 2^x - 1 for |x| <= 1/2 without cancellation: the Taylor series of e^y - 1, y = x ln 2 (|y| <= 0.35, so
// the terms up to y^9 / 9! leave a relative error below 1e-9, under fp32 rounding), in Horner form.
// exp2f(x) - 1 would lose the digits of a small x; expm1f's accuracy differs between CUDA and the host.
RRD_DEVICE float exp2m1_small(float x) {
  const float y = x * kLn2;
  float p = 1.f / 362880.f;
  p = fmaf(p, y, 1.f / 40320.f);
  p = fmaf(p, y, 1.f / 5040.f);
  p = fmaf(p, y, 1.f / 720.f);
  p = fmaf(p, y, 1.f / 120.f);
  p = fmaf(p, y, 1.f / 24.f);
  p = fmaf(p, y, 1.f / 6.f);
  p = fmaf(p, y, 0.5f);
  p = fmaf(p, y, 1.f);
  return p * y;
}

// Whether x is finite (false for NaN and +-inf; plain comparisons, so no fast-math assumption matters).
RRD_DEVICE bool is_finite(float x) { return fabsf(x) < INFINITY; }

// ---- online dual softmax state, cancellation-free (docs/math.md, section 3; the Triton
// backend's online_state.py), log2 units -------------------------------------------------------------
// Logits a (student) and b (teacher) are in log2 units (a = a_nat log2 e). Per row:
//   m_a, n_a:  max of a, and z_a - 1 where z_a = sum_k 2^(a_k - m_a): the maximum contributes the exact 1,
//              n_a is the rest (other entries equal to the max add 1 each); likewise m_b, n_b for b;
//   w = sum_k 2^(b_k - m_b) (m_a - a_k),   v = sum_k 2^(b_k - m_b) (m_b - b_k)   (non-negative terms);
//   x = z_a - z_b = sum_k (2^(a_k - m_a) - 2^(b_k - m_b)), kept as a sum of its own (not n_a - n_b);
//   idx:       a bank row where a reaches m_a (the student's argmax; the backward's rounding guard).
// Then CE = log2(1 + n_a) + w / z_b and H = log2(1 + n_b) + v / z_b (log2 units) with z_b = 1 + n_b, and
// lse = m + log2(1 + n): no lse - u / z_b cancellation when a row's softmaxes are sharp and CE is tiny.
// And lse_a - lse_b = (m_a - m_b) + log2(1 + x / z_b): where both softmaxes are flat (large temperatures)
// z_a and z_b are both ~K and nearly equal, so n_b - n_a would carry the rounding of two sums of ~K terms
// (~1e-7 K), while x, a sum of small differences, carries ~1e-7 of itself. The backward's q - p depends on
// lse_a - lse_b to that accuracy: its rounding guard turns an error e of it into ~e ln2 |Q_r| of gradient.
// The empty state is (-inf, 0, -inf, 0, 0, 0, 0, 0); a column counts only where both a and b are finite, so a
// state is empty iff m_a == -inf. No exp2 below sees -inf - -inf, and no inf meets a 0 in a product.
// Non-finite logits (a NaN or inf in the row's student, teacher or a bank row) never enter the maxima or
// sums (GPUs' fmaxf would drop a NaN silently); instead the row's n_a becomes NaN, and every merge carries
// it, empty sides included, so the row's loss, saved statistics and gradient are NaN.
struct RowState {
  float m_a, n_a, m_b, n_b, w, v, x;
  int idx;
};

RRD_DEVICE RowState empty_state() { return RowState{-INFINITY, 0.f, -INFINITY, 0.f, 0.f, 0.f, 0.f, 0}; }

// n of the union of two sums 1 + n_x (relative to max m_x) and 1 + n_y (relative to m_y), maxima finite.
// Both branches use both counts (an fma with a NaN operand is NaN even when the scale underflows to 0), so
// a NaN count on either side survives.
RRD_DEVICE float merge_count(float m_x, float n_x, float m_y, float n_y) {
  return m_y > m_x ? fmaf(n_x + 1.f, exp2f(m_x - m_y), n_y) : fmaf(n_y + 1.f, exp2f(m_y - m_x), n_x);
}

// x = z_a - z_b of a side after its maxima move by d_a = m_a - M_a <= 0 and d_b = m_b - M_b <= 0:
//   z_a 2^d_a - z_b 2^d_b = 2^d_b (x + z_a (2^e - 1)),  e = d_a - d_b.
// Where |e| <= 1/2 (equal or close moves: always in the flat case) 2^e - 1 comes from the series and x keeps
// its digits; else the two terms are at least 2^(1/2) apart in scale and are formed directly (no 2^e that
// could overflow).
RRD_DEVICE float rescaled_diff(float x, float z_a, float z_b, float d_a, float d_b) {
  const float e = d_a - d_b, r_b = exp2f(d_b);
  return fabsf(e) <= 0.5f ? r_b * fmaf(z_a, exp2m1_small(e), x) : fmaf(z_a, exp2f(d_a), -z_b * r_b);
}

// Fold another partial state into s (a tile into the running state, lanes of a row, bank splits).
// w and v are rescaled by 2^(m_b - M_b) like z_b and shifted by (M - m) z_b when their reference max moves.
// An empty side (m_a = -inf) adds only its n_a: 0, or NaN when its columns met a non-finite logit.
RRD_DEVICE void merge_state(RowState& s, const RowState& o) {
  if (o.m_a == -INFINITY) {  // o is empty
    s.n_a += o.n_a;
    return;
  }
  if (s.m_a == -INFINITY) {  // s is empty
    const float n_a = s.n_a;
    s = o;
    s.n_a += n_a;
    return;
  }
  const float ma = fmaxf(s.m_a, o.m_a), mb = fmaxf(s.m_b, o.m_b);
  const float rs = exp2f(s.m_b - mb), ro = exp2f(o.m_b - mb);
  const float zs = 1.f + s.n_b, zo = 1.f + o.n_b;
  const float w = rs * fmaf(ma - s.m_a, zs, s.w) + ro * fmaf(ma - o.m_a, zo, o.w);
  const float v = rs * fmaf(mb - s.m_b, zs, s.v) + ro * fmaf(mb - o.m_b, zo, o.v);
  const float x = rescaled_diff(s.x, 1.f + s.n_a, zs, s.m_a - ma, s.m_b - mb) +
                  rescaled_diff(o.x, 1.f + o.n_a, zo, o.m_a - ma, o.m_b - mb);
  s.n_a = merge_count(s.m_a, s.n_a, o.m_a, o.n_a);
  s.n_b = merge_count(s.m_b, s.n_b, o.m_b, o.n_b);
  if (o.m_a > s.m_a) s.idx = o.idx;
  s.m_a = ma;
  s.m_b = mb;
  s.w = w;
  s.v = v;
  s.x = x;
}

// x as the mma of mode MODE sees it as an operand (3xTF32: hi + lo).
RRD_DEVICE float as_operand(float x, int mode) {
  switch (mode) {
    case kMmaTF32: return tf32_value(x);  // the bits the tensor core reads
    case kSimtF32: {  // 3xTF32: hi + lo, as the products see it (exact in fp32)
      const float h = tf32_value(x);
      return h + tf32_value(x - h);
    }
    case kMmaF16: return f16_bits_to_float(float_to_f16_bits(x));
    case kMmaBF16: return bf16_bits_to_float(float_to_bf16_bits(x));
    default: return x;
  }
}

}  // namespace rrd
