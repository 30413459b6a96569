// Host code of the gathered-memory kernels (csrc/rrd_gathered.cuh), shared by the CUDA build (rrd_cuda.cu)
// and the host emulation (emulate.cpp): split plan, argument checks, launch sequence. The includer defines
// RRD_STREAM_T and RRD_LAUNCH as for rrd_host.inl.
#pragma once

#include <cmath>
#include <string>

#include "rrd_api.h"
#include "rrd_gathered.cuh"

namespace rrd {

static_assert(kGatheredSmemBytes <= 48 * 1024, "the gathered kernels must fit without shared-memory opt-in");

GatheredSmem gathered_smem() {
  GatheredSmem u;
  u.forward = kGatheredSmemBytes;
  u.backward = kGatheredSmemBytes;
  u.finish = 0;
  return u;
}

namespace gathered_detail {
inline long long div_up(long long a, long long b) { return (a + b - 1) / b; }
}  // namespace gathered_detail

// Enough warps for about 8 blocks of 4 warps per SM (the loads in flight a memory-bound pass needs), each
// split at least kGatheredMinColumns columns: a split also stages its two rows and writes a state (and a D
// vector in the backward), ~2 columns' worth.
Plan gathered_plan(int B, int K1, int D, int num_sms) {
  using gathered_detail::div_up;
  Plan plan;
  const long long target = 8LL * kGatherWarps * (num_sms > 0 ? num_sms : 1);
  long long splits = div_up(target, B > 0 ? B : 1);
  const long long most = (K1 > 0 ? K1 : 1) / kGatheredMinColumns;  // so that every split keeps >= 64 columns
  if (splits > most) splits = most;
  if (splits < 1) splits = 1;
  plan.chunk = int(div_up(K1 > 0 ? K1 : 1, splits));
  plan.num_splits = int(div_up(K1 > 0 ? K1 : 1, plan.chunk));
  plan.workspace_floats = (long long)plan.num_splits * B * (8LL + D + 1LL);
  return plan;
}

std::string check_args(const GatheredArgs& a) {
  if (a.B < 1) return "B must be >= 1";
  if (a.K1 < 1 || a.K1 > (1 << 30)) return "K1 (columns of index) must be in [1, 2^30]";
  if (a.D < 1 || a.D > kMaxD) return "D must be in [1, " + std::to_string(kMaxD) + "]";
  if (a.N < 1 || a.N >= (1LL << 31)) return "N (memory rows) must be in [1, 2^31)";
  if (!a.student || !a.teacher || !a.memory_s || !a.memory_t || !a.index) return "null input pointer";
  if (!a.workspace || !a.rows || !a.ref) return "null output pointer";
  if (a.B > 1 && (a.ld_s < a.D || a.ld_t < a.D || a.ld_idx < a.K1))
    return "student / teacher row stride < D or index row stride < K1";
  if (a.N > 1 && a.ld_m < a.D) return "memory row stride < D";
  if (a.mem_dtype != kF32 && a.mem_dtype != kF16 && a.mem_dtype != kBF16) return "dtype code must be 0, 1 or 2";
  if (!(a.tau_s > 0 && a.tau_t > 0 && std::isfinite(a.tau_s) && std::isfinite(a.tau_t)))
    return "temperatures must be finite and > 0";
  if (a.chunk < 1 || a.num_splits < 1 || (long long)(a.num_splits - 1) * a.chunk >= a.K1 ||
      (long long)a.num_splits * a.chunk < a.K1)
    return "num_splits x chunk must cover K1 with no empty split";
  return "";
}

template <int MDT> std::string launch_gathered(const GatheredParams& p, RRD_STREAM_T stream) {
  using gathered_detail::div_up;
  const dim3 block(kGatherThreads, 1, 1);
  const dim3 grid(unsigned(div_up((long long)p.B * p.num_splits, kGatherWarps)), 1, 1);
  // Named pointers: a template argument list with a comma cannot be one macro argument.
  const auto gathered_forward_d128 = rrd_gathered_forward_kernel<MDT, kSmallSlots>;
  const auto gathered_forward_d512 = rrd_gathered_forward_kernel<MDT, kLaneSlots>;
  const auto gathered_backward_d128 = rrd_gathered_backward_kernel<MDT, kSmallSlots>;
  const auto gathered_backward_d512 = rrd_gathered_backward_kernel<MDT, kLaneSlots>;
  if (p.D <= kGroupLanes * kSmallSlots) {
    RRD_LAUNCH(gathered_forward_d128, grid, block, kGatheredSmemBytes, stream, p);
    RRD_LAUNCH(gathered_backward_d128, grid, block, kGatheredSmemBytes, stream, p);
  } else {
    RRD_LAUNCH(gathered_forward_d512, grid, block, kGatheredSmemBytes, stream, p);
    RRD_LAUNCH(gathered_backward_d512, grid, block, kGatheredSmemBytes, stream, p);
  }
  if (p.gpart != nullptr)
    RRD_LAUNCH(rrd_gathered_finish_kernel<MDT>, dim3(unsigned(div_up(p.B, kGatherWarps)), 1, 1), block, 0, stream,
               p);
  return "";
}

// Arguments must have passed check_args.
inline std::string run_gathered(const GatheredArgs& a) {
  GatheredParams p{};
  p.student = reinterpret_cast<const float*>(a.student);
  p.teacher = reinterpret_cast<const float*>(a.teacher);
  p.memory_s = reinterpret_cast<const void*>(a.memory_s);
  p.memory_t = reinterpret_cast<const void*>(a.memory_t);
  p.index = reinterpret_cast<const long long*>(a.index);
  p.ld_s = a.ld_s;
  p.ld_t = a.ld_t;
  p.ld_m = a.ld_m;
  p.ld_idx = a.ld_idx;
  p.B = a.B;
  p.K1 = a.K1;
  p.D = a.D;
  p.N = int(a.N);
  p.scale_s = float(1.4426950408889634 / a.tau_s);  // log2(e) / tau, rounded once
  p.scale_t = float(1.4426950408889634 / a.tau_t);
  p.inv_tau_s = float(1.0 / a.tau_s);
  // 16-byte loads: both memories' data pointers 16-byte aligned, the row stride and D whole vectors.
  const int vec = a.mem_dtype == kF32 ? 4 : 8;
  p.vec = int(a.D % vec == 0 && a.ld_m % vec == 0 && a.memory_s % 16 == 0 && a.memory_t % 16 == 0);
  p.kl = a.kl ? 1 : 0;
  p.num_splits = a.num_splits;
  p.chunk = a.chunk;
  float* ws = reinterpret_cast<float*>(a.workspace);
  const long long states = 8LL * a.num_splits * a.B;
  p.part = ws;
  p.rows = reinterpret_cast<float*>(a.rows);
  p.ref = reinterpret_cast<int*>(a.ref);
  p.grad = reinterpret_cast<float*>(a.grad);
  p.gpart = a.grad ? ws + states : nullptr;
  p.sigpart = a.grad ? ws + states + (long long)a.num_splits * a.B * a.D : nullptr;
  const RRD_STREAM_T stream = reinterpret_cast<RRD_STREAM_T>(a.stream);
  switch (a.mem_dtype) {
    case kF32: return launch_gathered<kF32>(p, stream);
    case kF16: return launch_gathered<kF16>(p, stream);
    default: return launch_gathered<kBF16>(p, stream);
  }
}

}  // namespace rrd
