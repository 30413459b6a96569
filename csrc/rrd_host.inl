// Host code shared by the CUDA build (rrd_cuda.cu) and the host emulation (emulate.cpp): the split plan,
// argument checks, and the launch sequences. The includer defines
//   RRD_STREAM_T                                         the stream type
//   RRD_LAUNCH(kernel, grid, block, smem, stream, args)  launch, and `return` an error string on failure
#pragma once

#include <cmath>
#include <string>

#include "rrd_api.h"
#include "rrd_resident.cuh"

namespace rrd {

constexpr int kSmemWithoutOptIn = 48 * 1024;  // per block, on every CUDA device, without cudaFuncSetAttribute
constexpr int kFinishSmemBytes = kWarps * int(sizeof(float));  // block_sum's partial sums
constexpr int kMergeSmemBytes = 0;

template <int MODE> constexpr SmemUse smem_use() {
  SmemUse u;
  u.forward = forward_smem_bytes<MODE>();
  u.merge = kMergeSmemBytes;
  u.backward = backward_smem_bytes<MODE>();
  u.finish = kFinishSmemBytes;
  if (MODE == kMmaF16 || MODE == kMmaBF16) u.forward_resident = u.backward_resident = resident_smem_bytes<MODE>();
  return u;
}
template <int MODE> constexpr bool fits_without_opt_in() {
  return smem_use<MODE>().forward <= kSmemWithoutOptIn && smem_use<MODE>().backward <= kSmemWithoutOptIn &&
         smem_use<MODE>().finish <= kSmemWithoutOptIn && smem_use<MODE>().forward_resident <= kSmemWithoutOptIn &&
         smem_use<MODE>().backward_resident <= kSmemWithoutOptIn;
}
static_assert(fits_without_opt_in<kSimtF32>() && fits_without_opt_in<kMmaTF32>() &&
                  fits_without_opt_in<kMmaF16>() && fits_without_opt_in<kMmaBF16>(),
              "a kernel needs > 48 KiB of shared memory: launches would need cudaFuncSetAttribute opt-in and "
              "why_unusable a per-device check against shared_memory_per_block_optin");

SmemUse launch_smem(int mode) {
  switch (mode) {
    case kSimtF32: return smem_use<kSimtF32>();
    case kMmaTF32: return smem_use<kMmaTF32>();
    case kMmaF16: return smem_use<kMmaF16>();
    default: return smem_use<kMmaBF16>();
  }
}

inline long long ceil_div(long long a, long long b) { return (a + b - 1) / b; }

// Split the bank so that (row blocks x splits x feature slices) gives at most two blocks per SM: with a small
// batch (B = 64 is one row block) the bank splits alone fill the GPU (flash-decoding). Each split gets a
// whole number of tiles and at least one, so every split sees >= 1 valid bank row.
inline Plan make_plan(int B, int K, int D, int num_sms, bool backward) {
  Plan plan;
  const long long row_blocks = ceil_div(B, BM), tiles = ceil_div(K, BN);
  // The resident backward (16-bit modes, D <= kResD) needs no feature slices; the chunked one (fp32 modes,
  // D > kResD) launches ceil(D / DV) of them whatever the plan says (more blocks, same workspace).
  plan.num_dslices = backward && D > kResD ? int(ceil_div(D, DV)) : 1;
  const long long target = 2LL * (num_sms > 0 ? num_sms : 1);
  // Rounded down: the resident kernels fit 2 blocks per SM (166-239 registers x 128 threads), so more blocks
  // than 2 x SMs would start a second, mostly empty wave (B 4096: 64 row blocks x 4 splits = 256 blocks on
  // 132 SMs, where rounding up gave 320).
  long long splits = target / (row_blocks * plan.num_dslices);
  if (splits < 1) splits = 1;
  if (splits > tiles) splits = tiles;
  const long long tiles_per_split = ceil_div(tiles, splits);
  plan.num_splits = int(ceil_div(tiles, tiles_per_split));
  plan.chunk = int(tiles_per_split * BN);
  // forward: 8 planes of [num_splits][B] (7 float fields + the int32 argmax); backward: the partial
  // gradient sums [num_splits][B][D], then the partial sigma [num_splits][B].
  plan.workspace_floats =
      backward ? (long long)plan.num_splits * B * (D + 1LL) : 8LL * plan.num_splits * B;
  return plan;
}
Plan forward_plan(int B, int K, int D, int num_sms) { return make_plan(B, K, D, num_sms, false); }
Plan backward_plan(int B, int K, int D, int num_sms) { return make_plan(B, K, D, num_sms, true); }

template <class A> std::string check_common(const A& a) {
  if (a.B < 1) return "B must be >= 1";
  if ((a.K) < 1 || (a.K) > (1 << 30)) return "K must be in [1, 2^30]";
  if (a.D < 1 || a.D > kMaxD) return "D must be in [1, " + std::to_string(kMaxD) + "]";
  if (!a.student || !a.teacher || !a.bank) return "null input pointer";
  if (a.B > 1 && (a.ld_s < a.D || a.ld_t < a.D)) return "student / teacher row stride < D";
  if (a.K > 1 && a.ld_q < a.D) return "bank row stride < D";
  const auto dtype_ok = [](int code) { return code == kF32 || code == kF16 || code == kBF16; };
  if (!dtype_ok(a.emb_dtype) || !dtype_ok(a.bank_dtype)) return "dtype code must be 0, 1 or 2";
  const bool mode_ok = (a.emb_dtype == kF32 && (a.mode == kSimtF32 || a.mode == kMmaTF32)) ||
                       (a.emb_dtype == kF16 && a.mode == kMmaF16) ||
                       (a.emb_dtype == kBF16 && a.mode == kMmaBF16);
  if (!mode_ok) return "mode does not match the embedding dtype";
  if (!(a.tau_s > 0 && a.tau_t > 0 && std::isfinite(a.tau_s) && std::isfinite(a.tau_t)))
    return "temperatures must be finite and > 0";
  if (a.chunk < BN || a.chunk % BN != 0) return "chunk must be a positive multiple of the tile";
  if (a.num_splits < 1 || (long long)(a.num_splits - 1) * a.chunk >= a.K ||
      (long long)a.num_splits * a.chunk < a.K)
    return "num_splits x chunk must cover K with no empty split";
  return "";
}
std::string check_args(const ForwardArgs& a) {
  std::string e = check_common(a);
  if (e.empty() && (!a.part || !a.rows || !a.lse_s || !a.lse_t || !a.ref)) e = "null output pointer";
  return e;
}
std::string check_args(const BackwardArgs& a) {
  std::string e = check_common(a);
  if (e.empty() && (!a.lse_s || !a.lse_t || !a.ref || !a.grad_rows || !a.gpart || !a.grad_student))
    e = "null pointer";
  return e;
}

// 4-element vector loads (load4_as_float) need the data pointer 4-element aligned and the row stride and D
// multiples of 4; otherwise the kernels stage element by element.
inline int vector_loads_ok(uintptr_t ptr, long long ld, int D, int dtype) {
  const uintptr_t bytes = 4u * (dtype == kF32 ? 4u : 2u);
  return int(D % 4 == 0 && ld % 4 == 0 && ptr % bytes == 0);
}

template <class P, class A> void fill_common(P& p, const A& a) {
  p.student = reinterpret_cast<const void*>(a.student);
  p.teacher = reinterpret_cast<const void*>(a.teacher);
  p.bank = reinterpret_cast<const void*>(a.bank);
  p.ld_s = a.ld_s;
  p.ld_t = a.ld_t;
  p.ld_q = a.ld_q;
  p.B = a.B;
  p.K = a.K;
  p.D = a.D;
  p.emb_dtype = a.emb_dtype;
  p.bank_dtype = a.bank_dtype;
  p.scale_s = float(1.4426950408889634 / a.tau_s);  // log2(e) / tau, rounded once
  p.scale_t = float(1.4426950408889634 / a.tau_t);
  p.vec_s = vector_loads_ok(a.student, a.ld_s, a.D, a.emb_dtype);
  p.vec_t = vector_loads_ok(a.teacher, a.ld_t, a.D, a.emb_dtype);
  p.vec_q = vector_loads_ok(a.bank, a.ld_q, a.D, a.bank_dtype);
  p.vec_q16 = int(a.D % 8 == 0 && a.ld_q % 8 == 0 && a.bank % 16 == 0);
  p.num_splits = a.num_splits;
  p.chunk = a.chunk;
}

// The 16-bit modes with D <= kResD run the resident kernels (rrd_resident.cuh), everything else the chunked.
template <int MODE> constexpr bool has_resident() { return MODE == kMmaF16 || MODE == kMmaBF16; }
inline bool resident_d(int D) { return D <= kResD; }

template <int MODE> std::string launch_forward(const ForwardParams& p, RRD_STREAM_T stream) {
  const dim3 grid(unsigned(ceil_div(p.B, BM)), unsigned(p.num_splits), 1);
  if constexpr (has_resident<MODE>()) {
    if (resident_d(p.D)) {
      // Named pointers: a template argument list with a comma cannot be one macro argument.
      const auto forward_resident_async = rrd_forward_resident_kernel<MODE, true>;
      const auto forward_resident_convert = rrd_forward_resident_kernel<MODE, false>;
      if (bank_by_cp_async<MODE>(p)) {
        RRD_LAUNCH(forward_resident_async, grid, dim3(kThreads, 1, 1), smem_use<MODE>().forward_resident, stream, p);
      } else {
        RRD_LAUNCH(forward_resident_convert, grid, dim3(kThreads, 1, 1), smem_use<MODE>().forward_resident, stream,
                   p);
      }
    } else {
      RRD_LAUNCH(rrd_forward_kernel<MODE>, grid, dim3(kThreads, 1, 1), smem_use<MODE>().forward, stream, p);
    }
  } else {
    RRD_LAUNCH(rrd_forward_kernel<MODE>, grid, dim3(kThreads, 1, 1), smem_use<MODE>().forward, stream, p);
  }
  RRD_LAUNCH(rrd_merge_kernel, dim3(unsigned(ceil_div(p.B, kThreads)), 1, 1), dim3(kThreads, 1, 1),
             smem_use<MODE>().merge, stream, p);
  return "";
}

template <int MODE> std::string launch_backward(const BackwardParams& p, RRD_STREAM_T stream) {
  const dim3 grid(unsigned(ceil_div(p.B, BM)), unsigned(p.num_splits), unsigned(ceil_div(p.D, DV)));
  if constexpr (has_resident<MODE>()) {
    if (resident_d(p.D)) {
      const auto backward_resident_async = rrd_backward_resident_kernel<MODE, true>;
      const auto backward_resident_convert = rrd_backward_resident_kernel<MODE, false>;
      if (bank_by_cp_async<MODE>(p)) {
        RRD_LAUNCH(backward_resident_async, dim3(grid.x, grid.y, 1), dim3(kThreads, 1, 1),
                   smem_use<MODE>().backward_resident, stream, p);
      } else {
        RRD_LAUNCH(backward_resident_convert, dim3(grid.x, grid.y, 1), dim3(kThreads, 1, 1),
                   smem_use<MODE>().backward_resident, stream, p);
      }
    } else {
      RRD_LAUNCH(rrd_backward_kernel<MODE>, grid, dim3(kThreads, 1, 1), smem_use<MODE>().backward, stream, p);
    }
  } else {
    RRD_LAUNCH(rrd_backward_kernel<MODE>, grid, dim3(kThreads, 1, 1), smem_use<MODE>().backward, stream, p);
  }
  RRD_LAUNCH(rrd_finish_kernel, dim3(unsigned(p.B), 1, 1), dim3(kThreads, 1, 1), smem_use<MODE>().finish,
             stream, p);
  return "";
}

// Arguments must have passed check_args.
inline std::string run_forward(const ForwardArgs& a) {
  ForwardParams p{};
  fill_common(p, a);
  p.part = reinterpret_cast<float*>(a.part);
  p.rows = reinterpret_cast<float*>(a.rows);
  p.lse_s = reinterpret_cast<float*>(a.lse_s);
  p.lse_t = reinterpret_cast<float*>(a.lse_t);
  p.ref = reinterpret_cast<int*>(a.ref);
  p.kl = a.kl ? 1 : 0;
  const RRD_STREAM_T stream = reinterpret_cast<RRD_STREAM_T>(a.stream);
  switch (a.mode) {
    case kSimtF32: return launch_forward<kSimtF32>(p, stream);
    case kMmaTF32: return launch_forward<kMmaTF32>(p, stream);
    case kMmaF16: return launch_forward<kMmaF16>(p, stream);
    default: return launch_forward<kMmaBF16>(p, stream);
  }
}

inline std::string run_backward(const BackwardArgs& a) {
  BackwardParams p{};
  fill_common(p, a);
  p.lse_s = reinterpret_cast<const float*>(a.lse_s);
  p.lse_t = reinterpret_cast<const float*>(a.lse_t);
  p.ref = reinterpret_cast<const int*>(a.ref);
  p.mode = a.mode;
  p.grad_rows = reinterpret_cast<const float*>(a.grad_rows);
  p.grad_stride = a.grad_stride;
  p.inv_tau_s = float(1.0 / a.tau_s);
  p.gpart = reinterpret_cast<float*>(a.gpart);
  p.sigpart = p.gpart + (long long)a.num_splits * a.B * a.D;
  p.grad_student = reinterpret_cast<void*>(a.grad_student);
  const RRD_STREAM_T stream = reinterpret_cast<RRD_STREAM_T>(a.stream);
  switch (a.mode) {
    case kSimtF32: return launch_backward<kSimtF32>(p, stream);
    case kMmaTF32: return launch_backward<kMmaTF32>(p, stream);
    case kMmaF16: return launch_backward<kMmaF16>(p, stream);
    default: return launch_backward<kMmaBF16>(p, stream);
  }
}

}  // namespace rrd
