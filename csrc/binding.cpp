// pybind11 module rrd_kernels._rrd_cuda: the CUDA backend's entry points. It takes raw device pointers
// (ints), sizes, row strides, dtype codes and the stream handle from Python, and includes no torch header,
// so one build works with any PyTorch version. Argument errors raise ValueError, CUDA errors RuntimeError
// with the CUDA error name and string. The Python side (rrd_kernels/cuda_backend.py) validates and
// allocates; this layer re-checks what a kernel relies on, so that no call can fault on bad arguments.
#include <pybind11/pybind11.h>

#include <stdexcept>
#include <string>

#include "rrd_api.h"

namespace py = pybind11;

#ifndef RRD_BUILD_INFO
#define RRD_BUILD_INFO "unknown"
#endif

namespace {

void forward(uintptr_t student, uintptr_t teacher, uintptr_t bank, int64_t ld_s, int64_t ld_t, int64_t ld_q,
             int B, int K, int D, int emb_dtype, int bank_dtype, int mode, double tau_s, double tau_t, bool kl,
             int num_splits, int chunk, uintptr_t part, uintptr_t rows, uintptr_t lse_s, uintptr_t lse_t,
             uintptr_t ref, int device, uintptr_t stream) {
  rrd::ForwardArgs a;
  rrd::set_common_args(a, student, teacher, bank, ld_s, ld_t, ld_q, B, K, D, emb_dtype, bank_dtype, mode, tau_s,
                        tau_t, num_splits, chunk);
  a.device = device;
  a.stream = stream;
  a.kl = kl;
  a.part = part;
  a.rows = rows;
  a.lse_s = lse_s;
  a.lse_t = lse_t;
  a.ref = ref;
  const std::string bad = rrd::check_args(a);
  if (!bad.empty()) throw std::invalid_argument("rrd_kernels._rrd_cuda.forward: " + bad);
  std::string err;
  {
    py::gil_scoped_release release;  // launches are asynchronous; nothing here touches Python objects
    err = rrd::cuda_forward(a);
  }
  if (!err.empty()) throw std::runtime_error("rrd_kernels CUDA forward: " + err);
}

void backward(uintptr_t student, uintptr_t teacher, uintptr_t bank, int64_t ld_s, int64_t ld_t, int64_t ld_q,
              int B, int K, int D, int emb_dtype, int bank_dtype, int mode, double tau_s, double tau_t,
              int num_splits, int chunk, uintptr_t lse_s, uintptr_t lse_t, uintptr_t ref, uintptr_t grad_rows,
              int64_t grad_stride, uintptr_t gpart, uintptr_t grad_student, int device, uintptr_t stream) {
  rrd::BackwardArgs a;
  rrd::set_common_args(a, student, teacher, bank, ld_s, ld_t, ld_q, B, K, D, emb_dtype, bank_dtype, mode, tau_s,
                        tau_t, num_splits, chunk);
  a.device = device;
  a.stream = stream;
  a.lse_s = lse_s;
  a.lse_t = lse_t;
  a.ref = ref;
  a.grad_rows = grad_rows;
  a.grad_stride = grad_stride;
  a.gpart = gpart;
  a.grad_student = grad_student;
  const std::string bad = rrd::check_args(a);
  if (!bad.empty()) throw std::invalid_argument("rrd_kernels._rrd_cuda.backward: " + bad);
  std::string err;
  {
    py::gil_scoped_release release;
    err = rrd::cuda_backward(a);
  }
  if (!err.empty()) throw std::runtime_error("rrd_kernels CUDA backward: " + err);
}

void gathered(uintptr_t student, uintptr_t teacher, uintptr_t memory_s, uintptr_t memory_t, uintptr_t index,
              int64_t ld_s, int64_t ld_t, int64_t ld_m, int64_t ld_idx, int B, int K1, int D, int64_t N,
              int mem_dtype, double tau_s, double tau_t, bool kl, int num_splits, int chunk, uintptr_t workspace,
              uintptr_t rows, uintptr_t ref, uintptr_t grad, int device, uintptr_t stream) {
  rrd::GatheredArgs a;
  rrd::set_gathered_args(a, student, teacher, memory_s, memory_t, index, ld_s, ld_t, ld_m, ld_idx, B, K1, D,
                         N, mem_dtype, tau_s, tau_t, kl, num_splits, chunk);
  a.workspace = workspace;
  a.rows = rows;
  a.ref = ref;
  a.grad = grad;
  a.device = device;
  a.stream = stream;
  const std::string bad = rrd::check_args(a);
  if (!bad.empty()) throw std::invalid_argument("rrd_kernels._rrd_cuda.gathered: " + bad);
  std::string err;
  {
    py::gil_scoped_release release;
    err = rrd::cuda_gathered(a);
  }
  if (!err.empty()) throw std::runtime_error("rrd_kernels CUDA gathered: " + err);
}

py::dict plan_dict(const rrd::Plan& p) {
  py::dict d;
  d["num_splits"] = p.num_splits;
  d["chunk"] = p.chunk;
  d["num_dslices"] = p.num_dslices;
  d["workspace_floats"] = p.workspace_floats;
  return d;
}

}  // namespace

PYBIND11_MODULE(_rrd_cuda, m) {
  m.doc() = "RRD loss CUDA kernels (raw-pointer interface; use rrd_kernels.cuda_backend)";
  m.def("forward", &forward, py::arg("student"), py::arg("teacher"), py::arg("bank"), py::arg("ld_s"),
        py::arg("ld_t"), py::arg("ld_q"), py::arg("B"), py::arg("K"), py::arg("D"), py::arg("emb_dtype"),
        py::arg("bank_dtype"), py::arg("mode"), py::arg("tau_s"), py::arg("tau_t"), py::arg("kl"),
        py::arg("num_splits"), py::arg("chunk"), py::arg("part"), py::arg("rows"), py::arg("lse_s"),
        py::arg("lse_t"), py::arg("ref"), py::arg("device"), py::arg("stream"),
        "Forward + merge kernels: per-row loss into rows; base-2 lse_a - lse_b into lse_s and lse_b into "
        "lse_t (float32, for the backward); the student's argmax bank row (int32) into ref. Rows meeting a "
        "non-finite logit get NaN.");
  m.def("backward", &backward, py::arg("student"), py::arg("teacher"), py::arg("bank"), py::arg("ld_s"),
        py::arg("ld_t"), py::arg("ld_q"), py::arg("B"), py::arg("K"), py::arg("D"), py::arg("emb_dtype"),
        py::arg("bank_dtype"), py::arg("mode"), py::arg("tau_s"), py::arg("tau_t"), py::arg("num_splits"),
        py::arg("chunk"), py::arg("lse_s"), py::arg("lse_t"), py::arg("ref"), py::arg("grad_rows"),
        py::arg("grad_stride"),
        py::arg("gpart"), py::arg("grad_student"), py::arg("device"), py::arg("stream"),
        "Backward + finish kernels: dL/dS (B x D, embedding dtype) into grad_student.");
  m.def("forward_plan", [](int B, int K, int D, int num_sms) { return plan_dict(rrd::forward_plan(B, K, D, num_sms)); },
        py::arg("B"), py::arg("K"), py::arg("D"), py::arg("num_sms"));
  m.def("backward_plan", [](int B, int K, int D, int num_sms) { return plan_dict(rrd::backward_plan(B, K, D, num_sms)); },
        py::arg("B"), py::arg("K"), py::arg("D"), py::arg("num_sms"));
  m.def("launch_smem", [](int mode) {
        const rrd::SmemUse u = rrd::launch_smem(mode);
        py::dict d;
        d["forward"] = u.forward;
        d["merge"] = u.merge;
        d["backward"] = u.backward;
        d["finish"] = u.finish;
        d["forward_resident"] = u.forward_resident;
        d["backward_resident"] = u.backward_resident;
        return d;
      },
      py::arg("mode"), "Dynamic shared memory per block (bytes) of each kernel of a precision mode (0..3).");
  m.def("gathered", &gathered, py::arg("student"), py::arg("teacher"), py::arg("memory_s"), py::arg("memory_t"),
        py::arg("index"), py::arg("ld_s"), py::arg("ld_t"), py::arg("ld_m"), py::arg("ld_idx"), py::arg("B"),
        py::arg("K1"), py::arg("D"), py::arg("N"), py::arg("mem_dtype"), py::arg("tau_s"), py::arg("tau_t"),
        py::arg("kl"), py::arg("num_splits"), py::arg("chunk"), py::arg("workspace"), py::arg("rows"),
        py::arg("ref"), py::arg("grad"), py::arg("device"), py::arg("stream"),
        "Gathered-memory kernels (similarity scores): per-row loss (float32) into rows, the student's argmax "
        "memory row (int32) into ref and, unless grad is 0, dL/dS for upstream weight 1 (float32 B x D) into "
        "grad. Rows meeting a non-finite logit or an index outside [0, N) get NaN.");
  m.def("gathered_plan", [](int B, int K1, int D, int num_sms) { return plan_dict(rrd::gathered_plan(B, K1, D, num_sms)); },
        py::arg("B"), py::arg("K1"), py::arg("D"), py::arg("num_sms"));
  m.def("gathered_smem", [] {
        const rrd::GatheredSmem u = rrd::gathered_smem();
        py::dict d;
        d["forward"] = u.forward;
        d["backward"] = u.backward;
        d["finish"] = u.finish;
        return d;
      },
      "Dynamic shared memory per block (bytes) of the gathered kernels.");
  m.def("runtime_status", [] {
        int n = 0;
        const std::string err = rrd::cuda_runtime_status(&n);
        return py::make_tuple(n, err);
      },
      "(device_count, error): error is '' when the CUDA runtime in this module works.");
  m.attr("BUILD_INFO") = RRD_BUILD_INFO;
  m.attr("MAX_D") = 512;
}
