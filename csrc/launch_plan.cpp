// The launches of one forward + backward call, as rrd_host.inl makes them, printed instead of run: for the
// static cost model (tools/cuda_cost.py), so that its grids, blocks, shared memory, splits and workspaces
// are the host code's own and cannot drift from it. Built with the host C++ compiler against the emulation
// prelude (the kernels are then ordinary functions, so each launch can name its kernel by the symbol
// dladdr finds, the same mangled name cuobjdump prints for the device function), never run on a GPU:
//   c++ -std=c++20 -O0 -rdynamic -DRRD_EMULATE -Icsrc csrc/launch_plan.cpp -o launch_plan -ldl
//   ./launch_plan MODE B K D NUM_SMS      (contiguous, 16-byte aligned inputs, the benchmark's case)
//   ./launch_plan gathered MEM_DTYPE B K1 D NUM_SMS     (the gathered-memory kernels, loss and gradient)
// Output: one line per launch, `launch <call> <symbol> <grid x y z> <block x y z> <smem>`, and one per plan,
// `plan <call> <num_splits> <chunk> <num_dslices> <workspace_floats>`.
#define RRD_EMULATE 1
#include "emulate.h"

#include <dlfcn.h>

#include <cstdio>
#include <cstdlib>
#include <string>

static const char* g_call = "";

static void record(void* fn, dim3 grid, dim3 block, long long smem) {
  Dl_info info{};
  const char* name = dladdr(fn, &info) && info.dli_sname ? info.dli_sname : "?";
  std::printf("launch %s %s %u %u %u %u %u %u %lld\n", g_call, name, grid.x, grid.y, grid.z, block.x, block.y,
              block.z, smem);
}

#define RRD_STREAM_T uintptr_t
// The kernel's address from its name or from a pointer variable naming it (the gathered launches name
// theirs: a template argument list with a comma cannot be one macro argument).
template <class F> static void* kernel_address(F f) { return reinterpret_cast<void*>(f); }
#define RRD_LAUNCH(kernel, grid, block, smem, stream, ...) \
  record(kernel_address(kernel), (grid), (block), (long long)(smem))

#include "rrd_host.inl"
#include "rrd_gathered_host.inl"

static void print_plan(const char* call, const rrd::Plan& p) {
  std::printf("plan %s %d %d %d %lld\n", call, p.num_splits, p.chunk, p.num_dslices, (long long)p.workspace_floats);
}

// Check a call's arguments as the backend does, then print its launches; false (with the reason) if refused.
template <class Args, class Run> static bool print_call(const char* call, const Args& args, Run run) {
  std::string e = rrd::check_args(args);
  g_call = call;
  if (e.empty()) e = run(args);
  if (!e.empty()) std::fprintf(stderr, "%s: %s\n", call, e.c_str());
  return e.empty();
}

// One gathered call (forward, backward and finish kernels: the loss and the gradient in one launch sequence).
static int gathered(int mem_dtype, int B, int K1, int D, int sms) {
  const uintptr_t s = 0x100000, t = 0x200000, m = 0x300000, idx = 0x400000, out = 0x500000;
  const rrd::Plan p = rrd::gathered_plan(B, K1, D, sms);
  print_plan("gathered", p);
  rrd::GatheredArgs a;
  rrd::set_gathered_args(a, s, t, m, m, idx, D, D, D, K1, B, K1, D, 1LL << 20, mem_dtype, 0.1, 0.02, false,
                         p.num_splits, p.chunk);
  a.workspace = a.rows = a.ref = a.grad = out;
  return print_call("gathered", a, [](const rrd::GatheredArgs& x) { return rrd::run_gathered(x); }) ? 0 : 1;
}

int main(int argc, char** argv) {
  if (argc == 7 && std::string(argv[1]) == "gathered")
    return gathered(std::atoi(argv[2]), std::atoi(argv[3]), std::atoi(argv[4]), std::atoi(argv[5]),
                    std::atoi(argv[6]));
  if (argc != 6) {
    std::fprintf(stderr, "usage: %s MODE B K D NUM_SMS\n", argv[0]);
    return 2;
  }
  const int mode = std::atoi(argv[1]), B = std::atoi(argv[2]), K = std::atoi(argv[3]), D = std::atoi(argv[4]);
  const int sms = std::atoi(argv[5]);
  const int dtype = mode == rrd::kMmaBF16 ? rrd::kBF16 : mode == rrd::kMmaF16 ? rrd::kF16 : rrd::kF32;
  // Addresses are never dereferenced here; 256-byte aligned, like every allocation of the CUDA caching
  // allocator, so the host code picks the same (vector) staging as for the benchmark's tensors.
  const uintptr_t s = 0x100000, t = 0x200000, q = 0x300000, out = 0x400000;

  const rrd::Plan fp = rrd::forward_plan(B, K, D, sms);
  print_plan("forward", fp);
  rrd::ForwardArgs fa;
  rrd::set_common_args(fa, s, t, q, D, D, D, B, K, D, dtype, dtype, mode, 0.1, 0.02, fp.num_splits, fp.chunk);
  fa.part = fa.rows = fa.lse_s = fa.lse_t = fa.ref = out;
  if (!print_call("forward", fa, [](const rrd::ForwardArgs& x) { return rrd::run_forward(x); })) return 1;

  const rrd::Plan bp = rrd::backward_plan(B, K, D, sms);
  print_plan("backward", bp);
  rrd::BackwardArgs ba;
  rrd::set_common_args(ba, s, t, q, D, D, D, B, K, D, dtype, dtype, mode, 0.1, 0.02, bp.num_splits, bp.chunk);
  ba.lse_s = ba.lse_t = ba.ref = ba.grad_rows = ba.gpart = ba.grad_student = out;
  return print_call("backward", ba, [](const rrd::BackwardArgs& x) { return rrd::run_backward(x); }) ? 0 : 1;
}
