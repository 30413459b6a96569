// Host emulation of the few CUDA features the RRD kernels use, so that the kernels' own source runs on a
// CPU (tests/test_cuda_build.py builds csrc/emulate.cpp with the host C++ compiler and compares against
// the float64 reference). It is a test harness, never shipped in the extension.
//
//   * each CUDA thread of a block is a fiber (its own stack; a register switch in assembly on x86-64,
//     ucontext elsewhere or with RRD_EMU_UCONTEXT), all of a block's fibers on one OS thread; a fiber runs
//     until it waits at a barrier, then the next one runs (round robin), so blocks run one after another and
//     the scheduling is deterministic. One OS thread per CUDA thread made every barrier a futex handshake
//     among 128-256 threads on a 2-core machine, and that was most of the run;
//   * __syncthreads is a barrier over the block, __shfl_xor_sync a warp barrier plus an exchange slot;
//   * a thread runs as far as it can before it yields, so a missing barrier is exposed, not hidden: a read
//     before the write it should wait for sees the poison below, a write past a missing trailing barrier
//     overwrites data the other threads have not yet read;
//   * mma.sync is computed from the operand fragments of all 32 lanes, decoded with the element -> (row,
//     column) formulas of the PTX ISA ("Matrix Fragments for mma.m16n8k16 / mma.m16n8k8"), written here
//     in the ISA's own direction (lane, element) -> (row, column), independently of the kernels' loads;
//     the last lane to arrive at an exchange does the warp's work for all 32 (one barrier per mma, shuffle,
//     vote or ldmatrix, and the operands decoded once);
//   * dynamic shared memory starts filled with 0xff bytes (NaN as fp32, fp16 and bf16), so a read of an
//     element that was never written poisons the result.
// Not emulated: the memory model beyond barriers, timing, and anything the kernels do not use.
#pragma once

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <functional>
#include <memory>
#include <vector>

#if defined(__x86_64__) && (defined(__linux__) || defined(__APPLE__)) && !defined(RRD_EMU_UCONTEXT)
#define RRD_EMU_ASM_SWITCH 1
#else
#include <ucontext.h>
#endif

#define RRD_DEVICE inline
#define RRD_HOST_DEVICE
#define __global__
#define __launch_bounds__(...)

// CUDA's vector types, as far as the kernels use them (same size and alignment as in CUDA).
struct alignas(16) float4 {
  float x, y, z, w;
};
struct alignas(8) uint2 {
  uint32_t x, y;
};
struct alignas(16) uint4 {
  uint32_t x, y, z, w;
};
inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }
inline uint2 make_uint2(uint32_t x, uint32_t y) { return uint2{x, y}; }

// A vector access that is misaligned faults on the GPU (x86 would not notice): stop the test run.
#define RRD_CHECK_ALIGNED(ptr, bytes)                                                      \
  do {                                                                                     \
    if (reinterpret_cast<uintptr_t>(ptr) % (bytes) != 0) {                                 \
      fprintf(stderr, "rrd emulation: misaligned %d-byte access at %p (%s:%d)\n", (bytes), \
              static_cast<const void*>(ptr), __FILE__, __LINE__);                          \
      abort();                                                                             \
    }                                                                                      \
  } while (0)

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

namespace rrd_emu {

// ---- fibers: a context switch and the round robin of one block's threads --------------------------------

#if RRD_EMU_ASM_SWITCH
// rrd_emu_switch(&saved, next): pushes the registers the System V x86-64 ABI makes callee-saved (and the
// SSE / x87 control words), stores the stack pointer in *saved and continues on next's stack, where the same
// frame was pushed. A function call is a complete switch, since everything else is caller-saved; unlike
// swapcontext it makes no system call (the signal mask), which was a third of the emulation's time.
#if defined(__APPLE__)
#define RRD_EMU_SYM "_rrd_emu_switch"
#else
#define RRD_EMU_SYM "rrd_emu_switch"
#endif
__asm__(".text\n.globl " RRD_EMU_SYM "\n"
#if !defined(__APPLE__)
        ".hidden " RRD_EMU_SYM "\n.weak " RRD_EMU_SYM "\n"
#else
        ".weak_definition " RRD_EMU_SYM "\n.private_extern " RRD_EMU_SYM "\n"
#endif
        RRD_EMU_SYM ":\n"
        "  pushq %rbp\n  pushq %rbx\n  pushq %r12\n  pushq %r13\n  pushq %r14\n  pushq %r15\n"
        "  subq $8, %rsp\n  stmxcsr (%rsp)\n  fnstcw 4(%rsp)\n"
        "  movq %rsp, (%rdi)\n  movq %rsi, %rsp\n"
        "  ldmxcsr (%rsp)\n  fldcw 4(%rsp)\n  addq $8, %rsp\n"
        "  popq %r15\n  popq %r14\n  popq %r13\n  popq %r12\n  popq %rbx\n  popq %rbp\n  ret\n");
extern "C" void rrd_emu_switch(void** saved, void* next);

struct Context {
  void* sp = nullptr;
};
inline void swap(Context& from, Context& to) { rrd_emu_switch(&from.sp, to.sp); }
// A context that starts entry() on the stack [base, base + size): the frame rrd_emu_switch pops, returning
// into entry as if it had been called (entry never returns).
inline void make(Context& c, char* base, size_t size, void (*entry)()) {
  uint64_t* sp = reinterpret_cast<uint64_t*>((reinterpret_cast<uintptr_t>(base) + size) & ~uintptr_t(15));
  *--sp = 0;  // entry's return address: none
  *--sp = reinterpret_cast<uint64_t>(entry);
  for (int i = 0; i < 6; ++i) *--sp = 0;  // rbp, rbx, r12 .. r15
  uint32_t mxcsr;
  uint16_t fpcw;
  __asm__ volatile("stmxcsr %0" : "=m"(mxcsr));
  __asm__ volatile("fnstcw %0" : "=m"(fpcw));
  *--sp = uint64_t(mxcsr) | (uint64_t(fpcw) << 32);
  c.sp = sp;
}
#else
struct Context {
  ucontext_t uc;
};
inline void swap(Context& from, Context& to) { swapcontext(&from.uc, &to.uc); }
inline void make(Context& c, char* base, size_t size, void (*entry)()) {
  getcontext(&c.uc);
  c.uc.uc_stack.ss_sp = base;
  c.uc.uc_stack.ss_size = size;
  c.uc.uc_link = nullptr;
  makecontext(&c.uc, entry, 0);
}
#endif

// Everything a fiber reads as its CUDA identity (threadIdx, its block, its exchange slot) is set by the
// switch, so the kernels' source needs no change.
struct Fiber {
  Context ctx;
  std::unique_ptr<char[]> stack;
  bool done = false;
};

struct Scheduler {
  std::vector<Fiber> fibers;
  Context host;  // the launching code, resumed when every fiber of the block has finished
  int current = 0;
  int live = 0;
  long long idle = 0;  // switches by waiters since a thread last arrived at a barrier or finished
  const std::function<void()>* body = nullptr;
};

inline thread_local Scheduler* t_sched = nullptr;
inline thread_local dim3 t_thread, t_blockidx;

inline void switch_to(int next) {
  Scheduler& s = *t_sched;
  const int prev = s.current;
  s.current = next;
  t_thread = dim3(unsigned(next), 0, 0);
  swap(s.fibers[prev].ctx, s.fibers[next].ctx);
}

[[noreturn]] inline void deadlock() {
  fprintf(stderr, "rrd emulation: every live thread of block (%u, %u, %u) waits at a barrier that cannot "
          "complete (a barrier some threads skip: a kernel bug)\n", t_blockidx.x, t_blockidx.y, t_blockidx.z);
  abort();
}

// A waiter lets the other fibers run; returns when it is scheduled again. Round robin passes every fiber
// once before any comes back, so when more switches than twice the fibers go by with no thread arriving
// anywhere or finishing, every live one is waiting: a barrier some threads skip, reported rather than hung.
inline void yield() {
  Scheduler& s = *t_sched;
  const int n = int(s.fibers.size());
  if (++s.idle > 2LL * n) deadlock();
  for (int step = 1; step < n; ++step) {
    const int j = (s.current + step) % n;
    if (!s.fibers[j].done) return switch_to(j);
  }
  deadlock();
}

// The last thread to arrive runs complete() (the exchange's work for every participant, while all of them
// wait), then releases the others. So an exchange needs one barrier: no thread can write its next
// operands before the last one has arrived, and by then the previous results have been read.
struct Barrier {
  explicit Barrier(int n) : count(n) {}
  template <class Complete>
  void arrive_and_wait(Complete&& complete) {
    const unsigned gen = generation;
    t_sched->idle = 0;
    if (++arrived == count) {
      complete();
      arrived = 0;
      ++generation;
      return;
    }
    while (generation == gen) yield();
  }
  void arrive_and_wait() {
    arrive_and_wait([] {});
  }
  int count;
  int arrived = 0;
  unsigned generation = 0;
};

// What a thread hands to its warp's exchange.
struct Lane {
  uint32_t a[4], b[2];  // mma operand fragments
  float* d;             // mma: the thread's accumulators, written by the exchange
  const uint16_t* row;  // ldmatrix: the row address the lane gives
  uint32_t* r;          // ldmatrix: the lane's destination registers
  uint32_t in, out;     // shuffles and votes
};

struct Block {
  explicit Block(int nthreads, size_t smem_bytes)
      : bar(nthreads), warp_bars((nthreads + 31) / 32, Barrier(32)), smem(smem_bytes + 16, 0xff),
        lanes(size_t(nthreads)) {}
  Barrier bar;
  std::vector<Barrier> warp_bars;
  std::vector<unsigned char> smem;
  std::vector<Lane> lanes;
};

inline thread_local Block* t_block = nullptr;

inline void fiber_entry() {
  Scheduler& s = *t_sched;
  (*s.body)();
  s.fibers[s.current].done = true;
  s.idle = 0;
  if (--s.live == 0) swap(s.fibers[s.current].ctx, s.host);  // never resumed
  yield();
  abort();  // unreachable: a finished fiber is never scheduled
}

// Run body() as every thread of every block of the grid (blocks sequentially, a block's threads as fibers).
inline void launch(dim3 grid, dim3 block, size_t smem_bytes, const std::function<void()>& body) {
  const int nthreads = int(block.x * block.y * block.z);
  // The kernels keep their register arrays (up to a few KiB) on this stack; pages are touched on demand.
  constexpr size_t kStack = size_t(1) << 20;
  Scheduler sched;
  sched.fibers = std::vector<Fiber>(size_t(nthreads));
  for (auto& f : sched.fibers) f.stack.reset(new char[kStack]);
  sched.body = &body;
  t_sched = &sched;  // (a kernel launches no kernel: launches never nest)
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        Block blk(nthreads, smem_bytes);
        t_block = &blk;
        t_blockidx = dim3(x, y, z);
        for (auto& f : sched.fibers) {
          f.done = false;
          make(f.ctx, f.stack.get(), kStack, fiber_entry);
        }
        sched.live = nthreads;
        sched.current = 0;
        t_thread = dim3(0, 0, 0);
        swap(sched.host, sched.fibers[0].ctx);
        t_block = nullptr;
      }
  t_sched = nullptr;
}

// ---- warp exchanges ---------------------------------------------------------------------------------------

inline Lane& my_lane() { return t_block->lanes[t_thread.x]; }
inline Lane* warp_lanes() { return &t_block->lanes[(t_thread.x / 32) * 32]; }
template <class Complete>
inline void warp_exchange(Complete&& complete) {
  t_block->warp_bars[t_thread.x / 32].arrive_and_wait(complete);
}
inline void warp_sync() { warp_exchange([] {}); }

inline float bits_to_float(uint32_t u) {
  float f;
  memcpy(&f, &u, 4);
  return f;
}
inline uint32_t float_to_bits(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  return u;
}
inline float half_bits_to_float(uint16_t h) {
  _Float16 x;
  memcpy(&x, &h, 2);
  return float(x);
}

// One m16n8kK mma of the warp. kind 0: tf32 m16n8k8, 1: f16 m16n8k16, 2: bf16 m16n8k16. The last lane to
// arrive decodes the 32 lanes' fragments and writes every lane's accumulators.
inline void mma(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], int kind) {
  Lane& me = my_lane();
  for (int r = 0; r < 4; ++r) me.a[r] = a[r];
  me.b[0] = b[0];
  me.b[1] = b[1];
  me.d = d;
  Lane* const warp = warp_lanes();
  warp_exchange([warp, kind] {
    const int KD = kind == 0 ? 8 : 16;
    float A[16][16] = {}, B[16][8] = {};
    for (int lane = 0; lane < 32; ++lane) {
      const Lane& s = warp[lane];
      const int groupID = lane >> 2, tig = lane % 4;
      if (kind == 0) {
        // tf32: a0 (g, t), a1 (g+8, t), a2 (g, t+4), a3 (g+8, t+4); b0 (row t, col g), b1 (row t+4, col g).
        // The tensor core reads only the tf32 bits (sign, exponent, 10 mantissa bits).
        for (int i = 0; i < 4; ++i) {
          const int row = (i == 0 || i == 2) ? groupID : groupID + 8;
          const int col = (i < 2) ? tig : tig + 4;
          A[row][col] = bits_to_float(s.a[i] & 0xffffe000u);
        }
        for (int i = 0; i < 2; ++i) B[i == 0 ? tig : tig + 4][groupID] = bits_to_float(s.b[i] & 0xffffe000u);
      } else {
        // f16 / bf16: element i of A sits in register i / 2, low half first;
        //   row = groupID for a0,a1,a4,a5 and groupID+8 for a2,a3,a6,a7; col = tig*2 + (i & 1) (+8 for i >= 4)
        // element i of B: register i / 2; row = tig*2 + (i & 1) (+8 for i >= 2), col = groupID.
        auto elem = [&](uint32_t reg, int half) {
          const uint16_t h = uint16_t(half ? reg >> 16 : reg & 0xffffu);
          return kind == 2 ? bits_to_float(uint32_t(h) << 16) : half_bits_to_float(h);
        };
        for (int i = 0; i < 8; ++i) {
          const int row = (i < 2 || (i >= 4 && i < 6)) ? groupID : groupID + 8;
          const int col = tig * 2 + (i & 1) + (i >= 4 ? 8 : 0);
          A[row][col] = elem(s.a[i / 2], i & 1);
        }
        for (int i = 0; i < 4; ++i) {
          const int row = tig * 2 + (i & 1) + (i >= 2 ? 8 : 0);
          B[row][groupID] = elem(s.b[i / 2], i & 1);
        }
      }
    }
    // C/D: c0,c1 at row groupID, c2,c3 at row groupID+8; col = tig*2 + (i & 1).
    for (int lane = 0; lane < 32; ++lane) {
      const int groupID = lane >> 2, tig = lane % 4;
      float* const out = warp[lane].d;
      for (int i = 0; i < 4; ++i) {
        const int row = i < 2 ? groupID : groupID + 8, col = tig * 2 + (i & 1);
        float acc = out[i];
        for (int k = 0; k < KD; ++k) acc = fmaf(A[row][k], B[k][col], acc);
        out[i] = acc;
      }
    }
  });
}

// ldmatrix .x4 of the warp: lane l gives the address of row l % 8 of matrix l / 8 (8 16-bit elements);
// register r of lane l receives row l / 4, elements 2 (l % 4), 2 (l % 4) + 1 of matrix r, low index in the
// low half, or with trans the elements (2 (l % 4), l / 4) and (2 (l % 4) + 1, l / 4) (PTX ISA, ldmatrix).
inline void ldsm(uint32_t (&r)[4], const uint16_t* row, bool trans) {
  Lane& me = my_lane();
  me.row = row;
  me.r = r;
  Lane* const warp = warp_lanes();
  warp_exchange([warp, trans] {
    for (int lane = 0; lane < 32; ++lane) {
      auto row_of = [&](int m, int i) { return warp[8 * m + i].row; };
      for (int m = 0; m < 4; ++m) {
        uint16_t lo, hi;
        if (!trans) {
          lo = row_of(m, lane / 4)[2 * (lane % 4)];
          hi = row_of(m, lane / 4)[2 * (lane % 4) + 1];
        } else {
          lo = row_of(m, 2 * (lane % 4))[lane / 4];
          hi = row_of(m, 2 * (lane % 4) + 1)[lane / 4];
        }
        warp[lane].r[m] = uint32_t(lo) | (uint32_t(hi) << 16);
      }
    }
  });
}

// A shuffle: every lane's value in, lane l ^ lane_mask's value out (read by each lane after the release, and
// before it can arrive at the next exchange, whose completion is the next to write it).
inline uint32_t shfl_xor(uint32_t v, int lane_mask) {
  Lane& me = my_lane();
  me.in = v;
  Lane* const warp = warp_lanes();
  warp_exchange([warp, lane_mask] {
    for (int lane = 0; lane < 32; ++lane) warp[lane].out = warp[lane ^ lane_mask].in;
  });
  return me.out;
}

inline int any(int predicate) {
  Lane& me = my_lane();
  me.in = uint32_t(predicate != 0);
  Lane* const warp = warp_lanes();
  warp_exchange([warp] {
    uint32_t any = 0;
    for (int lane = 0; lane < 32; ++lane) any |= warp[lane].in;
    for (int lane = 0; lane < 32; ++lane) warp[lane].out = any;
  });
  return int(me.out);
}

}  // namespace rrd_emu

#define threadIdx (rrd_emu::t_thread)
#define blockIdx (rrd_emu::t_blockidx)
#define RRD_DECLARE_SMEM(name) unsigned char* name = rrd_emu::t_block->smem.data()

inline void __syncthreads() { rrd_emu::t_block->bar.arrive_and_wait(); }
inline void __syncwarp(unsigned /*mask: the whole warp*/ = 0xffffffffu) { rrd_emu::warp_sync(); }

// (mask: all lanes take part in every call the kernels make)
inline float __shfl_xor_sync(unsigned /*mask*/, float v, int lane_mask) {
  return rrd_emu::bits_to_float(rrd_emu::shfl_xor(rrd_emu::float_to_bits(v), lane_mask));
}
inline int __shfl_xor_sync(unsigned /*mask*/, int v, int lane_mask) {
  return int(rrd_emu::shfl_xor(uint32_t(v), lane_mask));
}
inline int __any_sync(unsigned /*mask*/, int predicate) { return rrd_emu::any(predicate); }

namespace rrd {
inline float bits_as_float(uint32_t x) { return rrd_emu::bits_to_float(x); }
inline uint32_t float_to_bits_of(float x) { return rrd_emu::float_to_bits(x); }
inline float bf16_bits_to_float(uint16_t x) { return rrd_emu::bits_to_float(uint32_t(x) << 16); }
inline float f16_bits_to_float(uint16_t x) { return rrd_emu::half_bits_to_float(x); }
inline uint16_t float_to_bf16_bits(float x) {  // round to nearest even (finite inputs)
  const uint32_t u = rrd_emu::float_to_bits(x);
  return uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}
inline uint16_t float_to_f16_bits(float x) {
  const _Float16 h = _Float16(x);  // round to nearest even
  uint16_t r;
  memcpy(&r, &h, 2);
  return r;
}
inline uint32_t floats_to_bf16x2_bits(float lo, float hi) {
  return uint32_t(float_to_bf16_bits(lo)) | (uint32_t(float_to_bf16_bits(hi)) << 16);
}
inline uint32_t floats_to_f16x2_bits(float lo, float hi) {
  return uint32_t(float_to_f16_bits(lo)) | (uint32_t(float_to_f16_bits(hi)) << 16);
}
inline float mul_rn(float x, float y) { return x * y; }  // the host build does not contract
inline uint32_t float_to_tf32(float x) {  // cvt.rna.tf32.f32: nearest, ties away from zero (finite inputs)
  return (rrd_emu::float_to_bits(x) + 0x1000u) & 0xffffe000u;
}
inline void mma_tf32_1688(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  rrd_emu::mma(d, a, b, 0);
}
inline void mma_f16_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  rrd_emu::mma(d, a, b, 1);
}
inline void mma_bf16_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  rrd_emu::mma(d, a, b, 2);
}
// cp.async as a plain copy (zero-fill for invalid sources); its commit / wait are then no-ops, and the
// __syncthreads that follows every wait in the kernels publishes the data as on the GPU.
inline void cp_async16(void* smem_dst, const void* gmem_src, bool valid) {
  RRD_CHECK_ALIGNED(smem_dst, 16);
  if (valid) {
    RRD_CHECK_ALIGNED(gmem_src, 16);
    memcpy(smem_dst, gmem_src, 16);
  } else {
    memset(smem_dst, 0, 16);
  }
}
inline void cp_async16_full(void* smem_dst, const void* gmem_src) { cp_async16(smem_dst, gmem_src, true); }
inline void cp_async_commit() {}
template <int N> inline void cp_async_wait() {}
inline void ldsm_x4(uint32_t (&r)[4], const uint16_t* row) {
  RRD_CHECK_ALIGNED(row, 16);
  rrd_emu::ldsm(r, row, false);
}
inline void ldsm_x4_trans(uint32_t (&r)[4], const uint16_t* row) {
  RRD_CHECK_ALIGNED(row, 16);
  rrd_emu::ldsm(r, row, true);
}
inline float fast_exp2(float x) {  // ex2.approx.ftz: results below 2^-126 are 0
  const float y = exp2f(x);
  return y < 0x1p-126f ? 0.f : y;
}
}  // namespace rrd
