// Host emulation build of the RRD kernels (see emulate.h): the same kernels, plan, checks and launch
// sequence as the CUDA module, run on host memory. Loaded by tests/test_cuda_build.py through ctypes.
//   g++ -std=c++20 -O1 -fno-strict-aliasing -pthread -shared -fPIC -DRRD_EMULATE csrc/emulate.cpp
#define RRD_EMULATE 1
#include "emulate.h"

#define RRD_STREAM_T uintptr_t
#define RRD_LAUNCH(kernel, grid, block, smem, stream, ...) \
  rrd_emu::launch((grid), (block), (smem), [&] { kernel(__VA_ARGS__); })

#include <string>
#include <vector>

#include "rrd_host.inl"
#include "rrd_gathered_host.inl"

namespace {
thread_local std::string g_error;
const char* result(const std::string& e) {
  g_error = e;
  return e.empty() ? nullptr : g_error.c_str();
}
}  // namespace

extern "C" {

// Whether the kernels use 4-element vector loads for a tensor at ptr with row stride ld (elements).
int rrd_emu_vector_loads(const void* ptr, long long ld, int D, int dtype) {
  return rrd::vector_loads_ok(uintptr_t(ptr), ld, D, dtype);
}

// Plan for B, K, D with num_sms SMs: writes {num_splits, chunk, num_dslices} and the workspace size.
void rrd_emu_plan(int backward, int B, int K, int D, int num_sms, int* out3, long long* workspace_floats) {
  const rrd::Plan p = backward ? rrd::backward_plan(B, K, D, num_sms) : rrd::forward_plan(B, K, D, num_sms);
  out3[0] = p.num_splits;
  out3[1] = p.chunk;
  out3[2] = p.num_dslices;
  *workspace_floats = p.workspace_floats;
}

// Returns nullptr on success, else the error message. Host pointers; element strides of rows.
const char* rrd_emu_forward(const void* student, const void* teacher, const void* bank, long long ld_s,
                            long long ld_t, long long ld_q, int B, int K, int D, int emb_dtype,
                            int bank_dtype, int mode, double tau_s, double tau_t, int kl, int num_sms,
                            float* rows, float* lse_s, float* lse_t, int* ref) {
  rrd::ForwardArgs a;
  const rrd::Plan plan = rrd::forward_plan(B, K, D, num_sms);
  rrd::set_common_args(a, uintptr_t(student), uintptr_t(teacher), uintptr_t(bank), ld_s, ld_t, ld_q, B, K, D,
                        emb_dtype, bank_dtype, mode, tau_s, tau_t, plan.num_splits, plan.chunk);
  a.kl = kl != 0;
  std::vector<float> part(size_t(plan.workspace_floats), NAN);  // poisoned: every entry must be written
  a.part = uintptr_t(part.data());
  a.rows = uintptr_t(rows);
  a.lse_s = uintptr_t(lse_s);
  a.lse_t = uintptr_t(lse_t);
  a.ref = uintptr_t(ref);
  std::string e = rrd::check_args(a);
  if (e.empty()) e = rrd::run_forward(a);
  return result(e);
}

const char* rrd_emu_backward(const void* student, const void* teacher, const void* bank, long long ld_s,
                             long long ld_t, long long ld_q, int B, int K, int D, int emb_dtype,
                             int bank_dtype, int mode, double tau_s, double tau_t, int num_sms,
                             const float* lse_s, const float* lse_t, const int* ref, const float* grad_rows,
                             long long grad_stride, void* grad_student) {
  rrd::BackwardArgs a;
  const rrd::Plan plan = rrd::backward_plan(B, K, D, num_sms);
  rrd::set_common_args(a, uintptr_t(student), uintptr_t(teacher), uintptr_t(bank), ld_s, ld_t, ld_q, B, K, D,
                        emb_dtype, bank_dtype, mode, tau_s, tau_t, plan.num_splits, plan.chunk);
  std::vector<float> gpart(size_t(plan.workspace_floats), NAN);  // poisoned: every entry must be written
  a.lse_s = uintptr_t(lse_s);
  a.lse_t = uintptr_t(lse_t);
  a.ref = uintptr_t(ref);
  a.grad_rows = uintptr_t(grad_rows);
  a.grad_stride = grad_stride;
  a.gpart = uintptr_t(gpart.data());
  a.grad_student = uintptr_t(grad_student);
  std::string e = rrd::check_args(a);
  if (e.empty()) e = rrd::run_backward(a);
  return result(e);
}

// The binding's forward / backward with the binding's arguments in its order (workspace and plan from the
// caller), so tests can stand this in for rrd_kernels._rrd_cuda behind rrd_kernels.cuda_backend.
const char* rrd_emu_forward_raw(uintptr_t student, uintptr_t teacher, uintptr_t bank, long long ld_s,
                                long long ld_t, long long ld_q, int B, int K, int D, int emb_dtype, int bank_dtype,
                                int mode, double tau_s, double tau_t, int kl, int num_splits, int chunk,
                                uintptr_t part, uintptr_t rows, uintptr_t lse_s, uintptr_t lse_t, uintptr_t ref) {
  rrd::ForwardArgs a;
  rrd::set_common_args(a, student, teacher, bank, ld_s, ld_t, ld_q, B, K, D, emb_dtype, bank_dtype, mode, tau_s,
                        tau_t, num_splits, chunk);
  a.kl = kl != 0;
  a.part = part;
  a.rows = rows;
  a.lse_s = lse_s;
  a.lse_t = lse_t;
  a.ref = ref;
  std::string e = rrd::check_args(a);
  if (e.empty()) e = rrd::run_forward(a);
  return result(e);
}

const char* rrd_emu_backward_raw(uintptr_t student, uintptr_t teacher, uintptr_t bank, long long ld_s,
                                 long long ld_t, long long ld_q, int B, int K, int D, int emb_dtype,
                                 int bank_dtype, int mode, double tau_s, double tau_t, int num_splits, int chunk,
                                 uintptr_t lse_s, uintptr_t lse_t, uintptr_t ref, uintptr_t grad_rows,
                                 long long grad_stride,
                                 uintptr_t gpart, uintptr_t grad_student) {
  rrd::BackwardArgs a;
  rrd::set_common_args(a, student, teacher, bank, ld_s, ld_t, ld_q, B, K, D, emb_dtype, bank_dtype, mode, tau_s,
                        tau_t, num_splits, chunk);
  a.lse_s = lse_s;
  a.lse_t = lse_t;
  a.ref = ref;
  a.grad_rows = grad_rows;
  a.grad_stride = grad_stride;
  a.gpart = gpart;
  a.grad_student = grad_student;
  std::string e = rrd::check_args(a);
  if (e.empty()) e = rrd::run_backward(a);
  return result(e);
}

// The gathered-memory kernels (rrd_gathered.cuh) with the binding's arguments; num_splits / chunk from the
// caller (rrd_emu_gathered_plan, or any cover of K1), the workspace allocated here and poisoned with NaN.
// grad may be null (loss only). Returns nullptr on success, else the error message.
void rrd_emu_gathered_plan(int B, int K1, int D, int num_sms, int* out2, long long* workspace_floats) {
  const rrd::Plan p = rrd::gathered_plan(B, K1, D, num_sms);
  out2[0] = p.num_splits;
  out2[1] = p.chunk;
  *workspace_floats = p.workspace_floats;
}

const char* rrd_emu_gathered(uintptr_t student, uintptr_t teacher, uintptr_t memory_s, uintptr_t memory_t,
                             uintptr_t index, long long ld_s, long long ld_t, long long ld_m, long long ld_idx, int B,
                             int K1, int D, long long N, int mem_dtype, double tau_s, double tau_t, int kl,
                             int num_splits, int chunk, uintptr_t rows, uintptr_t ref, uintptr_t grad) {
  rrd::GatheredArgs a;
  rrd::set_gathered_args(a, student, teacher, memory_s, memory_t, index, ld_s, ld_t, ld_m, ld_idx, B, K1, D,
                         N, mem_dtype, tau_s, tau_t, kl != 0, num_splits, chunk);
  const long long floats = (long long)(num_splits > 0 ? num_splits : 0) * (B > 0 ? B : 0) * (8LL + D + 1LL);
  std::vector<float> ws(size_t(floats > 0 ? floats : 1), NAN);  // poisoned: every entry read must be written
  a.workspace = uintptr_t(ws.data());
  a.rows = rows;
  a.ref = ref;
  a.grad = grad;
  std::string e = rrd::check_args(a);
  if (e.empty()) e = rrd::run_gathered(a);
  return result(e);
}

}  // extern "C"
