// Host-side interface of the CUDA backend, free of CUDA and torch headers: the pybind11 binding
// (binding.cpp) and the host emulation (emulate.cpp) both fill these structs from plain integers.
#pragma once

#include <cstdint>
#include <string>

namespace rrd {

// Everything a forward call needs. Pointers are device addresses (host addresses in the emulation).
struct ForwardArgs {
  uintptr_t student = 0, teacher = 0, bank = 0;  // B x D, B x D, K x D with unit feature stride
  int64_t ld_s = 0, ld_t = 0, ld_q = 0;          // row strides in elements
  int B = 0, K = 0, D = 0;
  int emb_dtype = 0, bank_dtype = 0;  // 0 float32, 1 float16, 2 bfloat16
  int mode = 0;                       // 0 SIMT fp32, 1 TF32 mma, 2 fp16 mma, 3 bf16 mma
  double tau_s = 1.0, tau_t = 1.0;
  bool kl = false;
  int num_splits = 1, chunk = 0;      // from forward_plan
  uintptr_t part = 0;                 // float32 workspace, forward_plan().workspace_floats elements
  uintptr_t rows = 0, lse_s = 0, lse_t = 0;  // float32 [B] outputs (loss per row; base 2: lse_a - lse_b, lse_b)
  uintptr_t ref = 0;                         // int32 [B] output: the student's argmax bank row per row
  int device = 0;
  uintptr_t stream = 0;  // cudaStream_t
};

struct BackwardArgs {
  uintptr_t student = 0, teacher = 0, bank = 0;
  int64_t ld_s = 0, ld_t = 0, ld_q = 0;
  int B = 0, K = 0, D = 0;
  int emb_dtype = 0, bank_dtype = 0, mode = 0;
  double tau_s = 1.0, tau_t = 1.0;
  int num_splits = 1, chunk = 0;      // from backward_plan
  uintptr_t lse_s = 0, lse_t = 0;     // float32 [B] saved by the forward (base 2: lse_a - lse_b, lse_b)
  uintptr_t ref = 0;                  // int32 [B] saved by the forward (student's argmax bank row)
  uintptr_t grad_rows = 0;            // float32, element stride grad_stride (0 for an expanded tensor)
  int64_t grad_stride = 1;
  uintptr_t gpart = 0;                // float32 workspace, backward_plan().workspace_floats elements
  uintptr_t grad_student = 0;         // B x D contiguous, dtype emb_dtype (output)
  int device = 0;
  uintptr_t stream = 0;
};

// The fields ForwardArgs and BackwardArgs share, filled the same way by the binding and the emulation.
template <class Args>
void set_common_args(Args& a, uintptr_t student, uintptr_t teacher, uintptr_t bank, int64_t ld_s, int64_t ld_t,
                     int64_t ld_q, int B, int K, int D, int emb_dtype, int bank_dtype, int mode, double tau_s,
                     double tau_t, int num_splits, int chunk) {
  a.student = student;
  a.teacher = teacher;
  a.bank = bank;
  a.ld_s = ld_s;
  a.ld_t = ld_t;
  a.ld_q = ld_q;
  a.B = B;
  a.K = K;
  a.D = D;
  a.emb_dtype = emb_dtype;
  a.bank_dtype = bank_dtype;
  a.mode = mode;
  a.tau_s = tau_s;
  a.tau_t = tau_t;
  a.num_splits = num_splits;
  a.chunk = chunk;
}

// How a call is split over the bank, and the workspace it needs.
struct Plan {
  int num_splits = 1;   // grid y
  int chunk = 0;        // bank rows per split (a multiple of the tile)
  int num_dslices = 1;  // feature slices of the backward (1 for D <= 128: the resident kernels need none)
  int64_t workspace_floats = 0;
};

// Dynamic shared memory per block (bytes) that each kernel of a precision mode is launched with. The
// kernels declare no static shared memory (csrc/resource_gate.py checks ptxas' count), so this is all a
// block asks for; every entry is <= 48 KiB, what any CUDA device gives a block without opting in through
// cudaFuncSetAttribute (static_assert in rrd_host.inl), so no launch needs the opt-in.
struct SmemUse {
  int forward = 0, merge = 0, backward = 0, finish = 0;
  int forward_resident = 0, backward_resident = 0;  // 16-bit modes, D <= 128 (0: not launched in this mode)
};
SmemUse launch_smem(int mode);

Plan forward_plan(int B, int K, int D, int num_sms);
Plan backward_plan(int B, int K, int D, int num_sms);

// "" when the arguments are consistent, else what is wrong (raised as ValueError by the binding).
std::string check_args(const ForwardArgs& a);
std::string check_args(const BackwardArgs& a);

// Launch the kernels on a.stream; "" on success, else the CUDA error (raised as RuntimeError).
std::string cuda_forward(const ForwardArgs& a);
std::string cuda_backward(const BackwardArgs& a);

// "" when the CUDA runtime linked into the module works and sees >= 1 device, else the CUDA error.
std::string cuda_runtime_status(int* device_count);

// ---- the gathered memory (csrc/rrd_gathered.cuh): each row against its own index[i, :] memory rows ----
struct GatheredArgs {
  uintptr_t student = 0, teacher = 0;      // B x D float32, unit feature stride, row strides ld_s, ld_t
  uintptr_t memory_s = 0, memory_t = 0;    // N x D, dtype mem_dtype, unit feature stride, row stride ld_m
  uintptr_t index = 0;                     // B x K1 int64, row stride ld_idx; values outside [0, N) are not
                                           // read (their rows come back NaN)
  int64_t ld_s = 0, ld_t = 0, ld_m = 0, ld_idx = 0;
  int B = 0, K1 = 0, D = 0;
  int64_t N = 0;
  int mem_dtype = 0;                       // 0 float32, 1 float16, 2 bfloat16
  double tau_s = 1.0, tau_t = 1.0;
  bool kl = false;
  int num_splits = 1, chunk = 0;           // from gathered_plan (or any cover of K1 with no empty split)
  uintptr_t workspace = 0;                 // float32, gathered_plan().workspace_floats elements
  uintptr_t rows = 0;                      // float32 [B] output: loss per row
  uintptr_t ref = 0;                       // int32 [B] output: the student's argmax memory row per row
  uintptr_t grad = 0;                      // float32 B x D contiguous output (dL/dS for upstream weight 1),
                                           // or 0: loss only
  int device = 0;
  uintptr_t stream = 0;
};

// The inputs of a gathered call, filled the same way by the binding and the emulation.
inline void set_gathered_args(GatheredArgs& a, uintptr_t student, uintptr_t teacher, uintptr_t memory_s,
                              uintptr_t memory_t, uintptr_t index, int64_t ld_s, int64_t ld_t, int64_t ld_m,
                              int64_t ld_idx, int B, int K1, int D, int64_t N, int mem_dtype, double tau_s,
                              double tau_t, bool kl, int num_splits, int chunk) {
  a.student = student;
  a.teacher = teacher;
  a.memory_s = memory_s;
  a.memory_t = memory_t;
  a.index = index;
  a.ld_s = ld_s;
  a.ld_t = ld_t;
  a.ld_m = ld_m;
  a.ld_idx = ld_idx;
  a.B = B;
  a.K1 = K1;
  a.D = D;
  a.N = N;
  a.mem_dtype = mem_dtype;
  a.tau_s = tau_s;
  a.tau_t = tau_t;
  a.kl = kl;
  a.num_splits = num_splits;
  a.chunk = chunk;
}

// Splits of each row's K1 columns (chunk columns per split) and the workspace: 8 num_splits B floats of
// partial states, then num_splits B (D + 1) for the gradient's partial sums.
Plan gathered_plan(int B, int K1, int D, int num_sms);
// Dynamic shared memory per block (bytes) of the forward, backward and finish kernels.
struct GatheredSmem {
  int forward = 0, backward = 0, finish = 0;
};
GatheredSmem gathered_smem();
std::string check_args(const GatheredArgs& a);
std::string cuda_gathered(const GatheredArgs& a);

}  // namespace rrd
