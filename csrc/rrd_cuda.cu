// CUDA build of the RRD kernels: instantiates the kernels of rrd_kernels.cuh for the four modes (and those of
// rrd_gathered.cuh for the three memory dtypes) and implements the launch entry points of rrd_api.h. Every launch is followed by cudaGetLastError, and the
// error string goes back to Python as an exception (binding.cpp).
#include <cuda_runtime.h>

#define RRD_STREAM_T cudaStream_t
#define RRD_LAUNCH(kernel, grid, block, smem, stream, ...)                          \
  do {                                                                              \
    kernel<<<(grid), (block), (smem), (stream)>>>(__VA_ARGS__);                     \
    const cudaError_t rrd_err_ = cudaGetLastError();                                \
    if (rrd_err_ != cudaSuccess)                                                    \
      return std::string(#kernel " launch failed: ") + cudaGetErrorName(rrd_err_) + \
             ": " + cudaGetErrorString(rrd_err_);                                   \
  } while (0)

#include "rrd_host.inl"
#include "rrd_gathered_host.inl"

namespace rrd {

static std::string cuda_error(const char* what, cudaError_t e) {
  return std::string(what) + ": " + cudaGetErrorName(e) + ": " + cudaGetErrorString(e);
}

// Make the tensors' device current for this runtime (the module links its own static cudart, whose
// current-device state is separate from PyTorch's).
static std::string set_device(int device) {
  const cudaError_t e = cudaSetDevice(device);
  return e == cudaSuccess ? std::string() : cuda_error("cudaSetDevice", e);
}

std::string cuda_forward(const ForwardArgs& a) {
  std::string e = set_device(a.device);
  return e.empty() ? run_forward(a) : e;
}

std::string cuda_backward(const BackwardArgs& a) {
  std::string e = set_device(a.device);
  return e.empty() ? run_backward(a) : e;
}

std::string cuda_gathered(const GatheredArgs& a) {
  std::string e = set_device(a.device);
  return e.empty() ? run_gathered(a) : e;
}

std::string cuda_runtime_status(int* device_count) {
  int n = 0;
  const cudaError_t e = cudaGetDeviceCount(&n);
  *device_count = e == cudaSuccess ? n : 0;
  if (e != cudaSuccess) {
    cudaGetLastError();  // clear it, so that it does not surface from a later launch check
    return cuda_error("cudaGetDeviceCount", e);
  }
  return "";
}

}  // namespace rrd
