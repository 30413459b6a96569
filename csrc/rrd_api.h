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

}  // namespace rrd
