// A CPU emulation of the small part of the CUDA execution model that csrc/cuda/*.cu use, so that
// their kernels -- indexing, grid shapes, warp-group shuffles, block reductions, partial sums --
// run and are checked on machines without a GPU (tests/test_cuda_emulated.py).
//
// Each thread of a block is a fiber (ucontext); blocks run one after another. __syncthreads and
// __shfl_xor_sync are rendezvous points with the hardware's rules: a shuffle completes when every
// lane named in its mask has reached a shuffle with that mask (lanes may get there after different
// numbers of earlier shuffles); a barrier completes when every thread of the block is at it.
// Reported as errors: a barrier that some threads exited before, a deadlock, a shuffle whose
// source lane is not in the mask, a block size that is not a multiple of 32, an empty grid,
// gridDim.y/z over 65535. __shared__ becomes static (one block runs at a time), CUDA_KERNEL_ASSERT
// failures are counted (emu::g_asserts) instead of aborting, streams and guards are no-ops.
//
// It checks logic, not memory ordering or speed: fibers switch only at the rendezvous points.
#pragma once

#include <ucontext.h>

#include <cstdint>
#include <cstring>
#include <functional>
#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>

struct uint3 {
  unsigned x, y, z;
};
struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

namespace emu {

struct Fiber {
  ucontext_t ctx;
  std::vector<char> stack;
  uint3 tid;
  int linear = 0;
  bool done = false;
  bool at_barrier = false;
  bool progressed = false;
};

// A lane's side of a pending shuffle.
struct Lane {
  bool pending = false, delivered = false;
  double value = 0, result = 0;
  unsigned mask = 0;
  int lane_mask = 0, width = 32;
};

inline ucontext_t g_sched;
inline std::vector<Fiber*> g_fibers;
inline Fiber* g_cur = nullptr;
inline uint3 g_blockIdx{0, 0, 0};
inline dim3 g_blockDim, g_gridDim;
inline std::vector<Lane> g_lanes;
inline std::string g_error;  // first error of the current launch
inline int g_asserts = 0;    // failed CUDA_KERNEL_ASSERTs since last read
inline std::function<void()> g_body;

inline void fail(const std::string& what) {
  if (g_error.empty()) g_error = what;
}

inline uint3& tid() { return g_cur->tid; }

inline void yield() { swapcontext(&g_cur->ctx, &g_sched); }

inline void trampoline() {
  g_body();
  g_cur->done = true;  // returning resumes uc_link, the scheduler
}

inline void syncthreads() {
  g_cur->at_barrier = true;
  g_cur->progressed = true;
  while (g_cur->at_barrier) yield();
}

template <typename T>
T shfl_xor_sync(unsigned mask, T v, int lane_mask, int width) {
  static_assert(sizeof(T) <= sizeof(double), "emu: shuffle of a type wider than 8 bytes");
  Fiber* f = g_cur;
  const int lane = f->linear % 32, warp = f->linear / 32;
  if (!(mask >> lane & 1u)) fail("shfl: calling lane not in mask");
  if (width <= 0 || width > 32 || (width & (width - 1))) fail("shfl: bad width");
  Lane* w = &g_lanes[warp * 32];
  Lane& me = w[lane];
  std::memcpy(&me.value, &v, sizeof(T));
  me.mask = mask;
  me.lane_mask = lane_mask;
  me.width = width;
  me.pending = true;
  f->progressed = true;
  for (;;) {
    bool all = true;
    for (int l = 0; l < 32 && all; ++l) {
      if (!(mask >> l & 1u)) continue;
      if (warp * 32 + l >= int(g_fibers.size())) {
        fail("shfl: mask names a lane outside the block");
        all = false;
      } else if (!w[l].pending || w[l].mask != mask) {
        all = false;  // that lane is still on its way (maybe at its own group's shuffle)
      }
    }
    if (all) {  // the last lane to arrive hands every lane its source's value
      for (int l = 0; l < 32; ++l) {
        if (!(mask >> l & 1u)) continue;
        int src = l ^ w[l].lane_mask;
        if (src / w[l].width != l / w[l].width) src = l;
        if (!(mask >> src & 1u)) fail("shfl: source lane not in mask");
        w[l].result = w[src].value;
      }
      for (int l = 0; l < 32; ++l) {
        if (mask >> l & 1u) {
          w[l].pending = false;
          w[l].delivered = true;
        }
      }
    }
    if (me.delivered) break;
    yield();
  }
  me.delivered = false;
  T out;
  std::memcpy(&out, &me.result, sizeof(T));
  return out;
}

inline void run_block(const std::function<void()>& body) {
  const int n = int(g_blockDim.x * g_blockDim.y * g_blockDim.z);
  if (n <= 0 || n > 1024) throw std::runtime_error("emu: bad block size " + std::to_string(n));
  if (n % 32 != 0) fail("block size not a multiple of 32 (" + std::to_string(n) + ")");
  static std::vector<Fiber> pool(1024);
  g_fibers.clear();
  g_lanes.assign(size_t((n + 31) / 32) * 32, Lane{});
  g_body = body;
  for (int i = 0; i < n; ++i) {
    Fiber& f = pool[i];
    if (f.stack.empty()) f.stack.resize(256 * 1024);
    f.done = f.at_barrier = false;
    f.linear = i;
    f.tid = {unsigned(i) % g_blockDim.x, unsigned(i) / g_blockDim.x % g_blockDim.y,
             unsigned(i) / (g_blockDim.x * g_blockDim.y)};
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = f.stack.data();
    f.ctx.uc_stack.ss_size = f.stack.size();
    f.ctx.uc_link = &g_sched;
    makecontext(&f.ctx, reinterpret_cast<void (*)()>(trampoline), 0);
    g_fibers.push_back(&f);
  }
  for (int stalled = 0;;) {
    bool progress = false, all_done = true;
    for (Fiber* f : g_fibers) {
      if (f->done) continue;
      all_done = false;
      if (f->at_barrier) continue;
      g_cur = f;
      f->progressed = false;
      swapcontext(&g_sched, &f->ctx);
      g_cur = nullptr;
      progress = progress || f->progressed || f->done;
    }
    if (all_done) break;
    int waiting = 0, done = 0;
    for (Fiber* f : g_fibers) {
      if (f->done) {
        ++done;
      } else if (f->at_barrier) {
        ++waiting;
      }
    }
    if (waiting > 0 && waiting + done == n) {
      if (done > 0) fail("__syncthreads reached by only part of the block (others exited)");
      for (Fiber* f : g_fibers) f->at_barrier = false;
      progress = true;
    }
    stalled = progress ? 0 : stalled + 1;
    if (stalled > 3) {
      fail("deadlock");
      throw std::runtime_error("emu: " + g_error);
    }
  }
}

inline dim3 to_dim3(dim3 d) { return d; }
inline dim3 to_dim3(unsigned v) { return dim3(v); }
inline dim3 to_dim3(int v) { return dim3(unsigned(v)); }
inline dim3 to_dim3(int64_t v) { return dim3(unsigned(v)); }

// kernel<<<grid, block, shared, stream>>>(args...) becomes launch(kernel, grid, block, args...).
template <typename K, typename G, typename B, typename... Args>
void launch(K kernel, G grid_arg, B block_arg, Args... args) {
  const dim3 grid = to_dim3(grid_arg), block = to_dim3(block_arg);
  g_error.clear();
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) throw std::runtime_error("emu: launch with an empty grid");
  if (grid.y > 65535 || grid.z > 65535) throw std::runtime_error("emu: gridDim.y or z over 65535");
  g_gridDim = grid;
  g_blockDim = block;
  auto params = std::make_tuple(args...);  // kernel parameters are copies, as on the device
  for (unsigned z = 0; z < grid.z; ++z) {
    for (unsigned y = 0; y < grid.y; ++y) {
      for (unsigned x = 0; x < grid.x; ++x) {
        g_blockIdx = {x, y, z};
        run_block([&] { std::apply(kernel, params); });
        if (!g_error.empty()) throw std::runtime_error("emu: " + g_error);
      }
    }
  }
}

}  // namespace emu

#define threadIdx (emu::tid())
#define blockIdx (emu::g_blockIdx)
#define blockDim (emu::g_blockDim)
#define gridDim (emu::g_gridDim)
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static
#define __launch_bounds__(...)
#define __syncthreads() emu::syncthreads()
#define __shfl_xor_sync(mask, v, lane_mask, width) emu::shfl_xor_sync(mask, v, lane_mask, width)
#undef CUDA_KERNEL_ASSERT
#define CUDA_KERNEL_ASSERT(cond) \
  if (!(cond)) {                 \
    ++emu::g_asserts;            \
  }
#define C10_CUDA_KERNEL_LAUNCH_CHECK() ((void)0)
namespace at {
namespace cuda {
inline int getCurrentCUDAStream() { return 0; }
}  // namespace cuda
}  // namespace at
namespace c10 {
namespace cuda {
struct CUDAGuard {
  explicit CUDAGuard(c10::Device) {}
};
}  // namespace cuda
}  // namespace c10
