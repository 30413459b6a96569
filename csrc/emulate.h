// Host emulation of the few CUDA features the RRD kernels use, so that the kernels' own source runs on a
// CPU (tests/test_cuda_build.py builds csrc/emulate.cpp with the host C++ compiler and compares against
// the float64 reference). It is a test harness, never shipped in the extension.
//
//   * each CUDA thread of a block is a fiber (its own stack, ucontext), all of a block's fibers on one OS
//     thread; a fiber runs until it waits at a barrier, then the next one runs (round robin), so blocks run
//     one after another and the scheduling is deterministic. One OS thread per CUDA thread made every
//     barrier a futex handshake among 128-256 threads on a 2-core machine, and that was most of the run;
//   * __syncthreads is a barrier over the block, __shfl_xor_sync a warp barrier plus an exchange slot;
//   * a thread runs as far as it can before it yields, so a missing barrier is exposed, not hidden: a read
//     before the write it should wait for sees the poison below, a write past a missing trailing barrier
//     overwrites data the other threads have not yet read;
//   * mma.sync is computed from the operand fragments of all 32 lanes, decoded with the element -> (row,
//     column) formulas of the PTX ISA ("Matrix Fragments for mma.m16n8k16 / mma.m16n8k8"), written here
//     in the ISA's own direction (lane, element) -> (row, column), independently of the kernels' loads;
//     the warp's operands are decoded once per mma (by the first lane past the exchange), not per lane;
//   * dynamic shared memory starts filled with 0xff bytes (NaN as fp32, fp16 and bf16), so a read of an
//     element that was never written poisons the result.
// Not emulated: the memory model beyond barriers, timing, and anything the kernels do not use.
#pragma once

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <ucontext.h>

#include <functional>
#include <memory>
#include <vector>

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

// The fibers of one block and the round-robin switch between them. Everything a fiber reads as its CUDA
// identity (threadIdx, the block, its exchange slots) is set by the switch, so the kernels' source needs no
// change.
struct Fiber {
  ucontext_t ctx;
  std::unique_ptr<char[]> stack;
  bool done = false;
};

struct Scheduler {
  std::vector<Fiber> fibers;
  ucontext_t host;  // the launching code, resumed when every fiber has finished
  int current = 0;
  int live = 0;
  const std::function<void()>* body = nullptr;
};

inline thread_local Scheduler* t_sched = nullptr;
inline thread_local dim3 t_thread, t_blockidx;

inline void switch_to(int next) {
  Scheduler& s = *t_sched;
  const int prev = s.current;
  s.current = next;
  t_thread = dim3(unsigned(next), 0, 0);
  swapcontext(&s.fibers[prev].ctx, &s.fibers[next].ctx);
}

// Let the other fibers run; returns when this one is scheduled again. A waiter with no other live fiber
// can never be released: a barrier some threads skip (a kernel bug), reported rather than hung.
inline void yield() {
  Scheduler& s = *t_sched;
  const int n = int(s.fibers.size());
  for (int step = 1; step < n; ++step) {
    const int j = (s.current + step) % n;
    if (!s.fibers[j].done) return switch_to(j);
  }
  fprintf(stderr, "rrd emulation: thread %d waits at a barrier no other thread of its block will reach\n",
          s.current);
  abort();
}

struct Barrier {
  explicit Barrier(int n) : count(n) {}
  void arrive_and_wait() {
    const unsigned gen = generation;
    if (++arrived == count) {
      arrived = 0;
      ++generation;
      return;
    }
    while (generation == gen) yield();
  }
  int count;
  int arrived = 0;
  unsigned generation = 0;
};

struct Block {
  explicit Block(int nthreads, size_t smem_bytes)
      : bar(nthreads), warp_bars((nthreads + 31) / 32, Barrier(32)), mma_tiles((nthreads + 31) / 32),
        mma_calls(nthreads, 0), smem(smem_bytes + 16, 0xff), slots(size_t(nthreads) * 8, 0) {}
  Barrier bar;
  std::vector<Barrier> warp_bars;
  struct MmaTile {  // a warp's decoded mma operands, tagged with the number of the mma they belong to
    long long serial = -1;
    float A[16][16], B[16][8];
  };
  std::vector<MmaTile> mma_tiles;
  std::vector<long long> mma_calls;  // per thread: mma calls so far (every lane of a warp makes the same ones)
  std::vector<unsigned char> smem;
  std::vector<uint32_t> slots;  // 8 words per thread for warp exchanges
};

inline thread_local Block* t_block = nullptr;

inline void fiber_entry() {
  Scheduler& s = *t_sched;
  (*s.body)();
  s.fibers[s.current].done = true;
  if (--s.live == 0) {
    swapcontext(&s.fibers[s.current].ctx, &s.host);
    return;  // never resumed
  }
  yield();
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
  Scheduler* const outer = t_sched;
  t_sched = &sched;
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        Block blk(nthreads, smem_bytes);
        t_block = &blk;
        t_blockidx = dim3(x, y, z);
        for (int i = 0; i < nthreads; ++i) {
          Fiber& f = sched.fibers[size_t(i)];
          f.done = false;
          getcontext(&f.ctx);
          f.ctx.uc_stack.ss_sp = f.stack.get();
          f.ctx.uc_stack.ss_size = kStack;
          f.ctx.uc_link = nullptr;
          makecontext(&f.ctx, fiber_entry, 0);
        }
        sched.live = nthreads;
        sched.current = 0;
        t_thread = dim3(0, 0, 0);
        swapcontext(&sched.host, &sched.fibers[0].ctx);
        t_block = nullptr;
      }
  t_sched = outer;
}

inline void warp_sync() { t_block->warp_bars[t_thread.x / 32].arrive_and_wait(); }
inline uint32_t* my_slots() { return &t_block->slots[size_t(t_thread.x) * 8]; }
inline const uint32_t* lane_slots(int lane) {
  return &t_block->slots[size_t((t_thread.x / 32) * 32 + lane) * 8];
}

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

// One m16n8kK mma of the warp. kind 0: tf32 m16n8k8, 1: f16 m16n8k16, 2: bf16 m16n8k16.
inline void mma(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], int kind) {
  uint32_t* mine = my_slots();
  for (int r = 0; r < 4; ++r) mine[r] = a[r];
  mine[4] = b[0];
  mine[5] = b[1];
  warp_sync();
  const int KD = kind == 0 ? 8 : 16;
  // Decoded once per warp: the first lane past the exchange fills the warp's tile, the others find it tagged
  // with this mma's number (no lane can start the next mma before all have read it: the barrier below).
  Block::MmaTile& tile = t_block->mma_tiles[t_thread.x / 32];
  const long long serial = t_block->mma_calls[t_thread.x]++;
  float(&A)[16][16] = tile.A;
  float(&B)[16][8] = tile.B;
  if (tile.serial != serial) {
    tile.serial = serial;
    memset(A, 0, sizeof(A));
    memset(B, 0, sizeof(B));
    for (int lane = 0; lane < 32; ++lane) {
      const uint32_t* s = lane_slots(lane);
      const int groupID = lane >> 2, tig = lane % 4;
      if (kind == 0) {
        // tf32: a0 (g, t), a1 (g+8, t), a2 (g, t+4), a3 (g+8, t+4); b0 (row t, col g), b1 (row t+4, col g).
        // The tensor core reads only the tf32 bits (sign, exponent, 10 mantissa bits).
        for (int i = 0; i < 4; ++i) {
          const int row = (i == 0 || i == 2) ? groupID : groupID + 8;
          const int col = (i < 2) ? tig : tig + 4;
          A[row][col] = bits_to_float(s[i] & 0xffffe000u);
        }
        for (int i = 0; i < 2; ++i) B[i == 0 ? tig : tig + 4][groupID] = bits_to_float(s[4 + i] & 0xffffe000u);
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
          A[row][col] = elem(s[i / 2], i & 1);
        }
        for (int i = 0; i < 4; ++i) {
          const int row = tig * 2 + (i & 1) + (i >= 2 ? 8 : 0);
          B[row][groupID] = elem(s[4 + i / 2], i & 1);
        }
      }
    }
  }
  // C/D: c0,c1 at row groupID, c2,c3 at row groupID+8; col = tig*2 + (i & 1).
  const int lane = int(t_thread.x % 32), groupID = lane >> 2, tig = lane % 4;
  for (int i = 0; i < 4; ++i) {
    const int row = i < 2 ? groupID : groupID + 8, col = tig * 2 + (i & 1);
    float acc = d[i];
    for (int k = 0; k < KD; ++k) acc = fmaf(A[row][k], B[k][col], acc);
    d[i] = acc;
  }
  warp_sync();  // nobody overwrites the slots before every lane has read them
}

// ldmatrix .x4 of the warp: lane l gives the address of row l % 8 of matrix l / 8 (8 16-bit elements);
// register r of lane l receives row l / 4, elements 2 (l % 4), 2 (l % 4) + 1 of matrix r, low index in the
// low half, or with trans the elements (2 (l % 4), l / 4) and (2 (l % 4) + 1, l / 4) (PTX ISA, ldmatrix).
inline void ldsm(uint32_t (&r)[4], const uint16_t* row, bool trans) {
  uint32_t* mine = my_slots();
  memcpy(mine + 6, &row, sizeof(row));  // words 6, 7 (mma uses 0..5)
  warp_sync();
  const int lane = int(t_thread.x % 32);
  auto row_of = [&](int m, int i) {
    const uint16_t* q;
    memcpy(&q, lane_slots(8 * m + i) + 6, sizeof(q));
    return q;
  };
  for (int m = 0; m < 4; ++m) {
    uint16_t lo, hi;
    if (!trans) {
      lo = row_of(m, lane / 4)[2 * (lane % 4)];
      hi = row_of(m, lane / 4)[2 * (lane % 4) + 1];
    } else {
      lo = row_of(m, 2 * (lane % 4))[lane / 4];
      hi = row_of(m, 2 * (lane % 4) + 1)[lane / 4];
    }
    r[m] = uint32_t(lo) | (uint32_t(hi) << 16);
  }
  warp_sync();
}

}  // namespace rrd_emu

#define threadIdx (rrd_emu::t_thread)
#define blockIdx (rrd_emu::t_blockidx)
#define RRD_DECLARE_SMEM(name) unsigned char* name = rrd_emu::t_block->smem.data()

inline void __syncthreads() { rrd_emu::t_block->bar.arrive_and_wait(); }
inline void __syncwarp(unsigned /*mask: the whole warp*/ = 0xffffffffu) { rrd_emu::warp_sync(); }

inline float __shfl_xor_sync(unsigned /*mask: all lanes take part in every call*/, float v, int lane_mask) {
  rrd_emu::my_slots()[0] = rrd_emu::float_to_bits(v);
  rrd_emu::warp_sync();
  const float r = rrd_emu::bits_to_float(rrd_emu::lane_slots(int(threadIdx.x % 32) ^ lane_mask)[0]);
  rrd_emu::warp_sync();
  return r;
}

inline int __shfl_xor_sync(unsigned /*mask*/, int v, int lane_mask) {
  rrd_emu::my_slots()[0] = uint32_t(v);
  rrd_emu::warp_sync();
  const int r = int(rrd_emu::lane_slots(int(threadIdx.x % 32) ^ lane_mask)[0]);
  rrd_emu::warp_sync();
  return r;
}

inline int __any_sync(unsigned /*mask: the whole warp*/, int predicate) {
  rrd_emu::my_slots()[0] = uint32_t(predicate != 0);
  rrd_emu::warp_sync();
  int any = 0;
  for (int l = 0; l < 32; ++l) any |= int(rrd_emu::lane_slots(l)[0]);
  rrd_emu::warp_sync();
  return any;
}

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
