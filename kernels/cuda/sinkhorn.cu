// CUDA kernels of Sinkhorn-Knopp: the log-domain solve of csrc/include/pym4/sinkhorn.h
// (same passes, same potentials) on one GPU, launched on the caller's stream.
//
// The plan is P_ij = exp(alpha x_ij + g_j + f_i). One solve is
//   1. column log-sum-exp      LSE_i(alpha x_ij) with a running max (and the NaN/Inf probe)
//   2. first column step       g_j = log b_j - LSE_i(alpha x_ij)
//   3. n_iters - 1 times:      row step fused with the column masses of the plan
//                                f_i = log a - LSE_j(alpha x_ij + g_j),
//                                mass_j = sum_i exp(alpha x_ij + g_j + f_i),
//                              then the column step g_j += log b_j - log mass_j
//   4. the last row step, writing exp(alpha x_ij + g_j + f_i + log_out_scale) into out.
//
// Work decomposition (the same device code serves both launch paths):
// - A "part" is one thread block owning a contiguous chunk of rows. Inside the block each
//   thread owns the columns j = tid, tid + blockDim, ... for the whole solve, so the
//   block's column accumulators need neither atomics nor barriers; rows are processed in
//   tiles of kRowTile whose row log-sum-exps are block reductions (one pair of barriers per
//   tile, amortised over kRowTile * cols / blockDim elements per thread).
// - Each part writes one K-vector of partial column statistics (the (max, sum) pair of the
//   column LSE, then the column masses) into the workspace: no B x K scratch, no atomics on
//   the data path. A combine phase reduces the P partials per column (in double for the
//   masses) and updates the potentials g (double, plus a float copy read by the row passes).
// - Potentials and partial combines are double where the CPU code uses double; the
//   element-wise work is float32 (exp via the SFU), inputs are read in their own dtype.
//
// Launch paths:
// - fused (rows * cols <= kFusedMaxElements, the SwAV/SEER per-GPU shapes: 64..4096 x 3000,
//   16 x 16000): ONE launch for all iterations. With a single part it is an ordinary launch
//   of one block; with P > 1 parts it is a cooperative launch (all blocks co-resident) and
//   phases are separated by grid-wide barriers. Here the cost is launches and latency, not
//   bandwidth, so this removes 2 * n_iters launch gaps.
// - multi (larger inputs, or when a cooperative launch is unavailable or refused, e.g.
//   under MPS): one kernel per pass over the matrix (P blocks, one resident wave) and a
//   small combine kernel between them, 2 * n_iters + 1 launches in all. At these sizes a
//   pass is tens of microseconds of HBM traffic, so launch gaps are noise; the matrix is read
//   once per pass from HBM (the second read of a row tile hits L1/L2) and the partials add
//   P * K * 8 bytes, P ~ 2 blocks per SM. This path also does not hold every SM for the
//   whole solve, so NCCL kernels on other streams interleave with it.
// PYM4_SINKHORN_CUDA_PATH=fused|multi forces a path (tests use it to cover both).
//
// Column accumulators and the float copy of g live in dynamic shared memory (8 * cols
// bytes, opted in above 48 KB) when they fit the device's per-block limit (cols up to about
// 20000 on A100, 28000 on H100); above that (e.g. 65536 prototypes) they live in the
// block's own slice of the workspace instead, same code through a pointer.
//
// Determinism: for a given device (which fixes P) results are bitwise reproducible; no
// floating-point atomics are used.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <cooperative_groups.h>

#include <algorithm>
#include <cfloat>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>

#include "pym4/cuda.h"

namespace cg = cooperative_groups;

#define PYM4_CUDA_CHECK(expr)                                                                         \
  do {                                                                                                \
    const cudaError_t err_ = (expr);                                                                  \
    if (err_ != cudaSuccess)                                                                          \
      throw std::runtime_error(std::string("pym4 CUDA error in ") + #expr + ": " + cudaGetErrorString(err_)); \
  } while (0)

namespace pym4 {
namespace cuda {

void check_last_error(const char* what) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(err));
}

namespace {

// The launch geometry (threads, blocks per SM, parts, the fused-path limit) is stated once,
// in cuda.h, where scripts/cuda_resources.py reads it to check the cooperative launch.
using namespace sinkhorn_launch;
constexpr int kWarps = kThreads / 32;
constexpr int kRowTile = 8;                   // rows per block reduction in the row passes
constexpr int kColUnroll = 8;                 // rows in flight per thread in the column pass
constexpr int kSmallCombineParts = 32;        // up to this many parts a warp combines a column tile alone

struct Params {
  const void* x;
  int64_t rows;
  int64_t ld;
  int cols;
  int n_iters;
  float alpha;
  float log_a;        // row log-mass during the iterations
  float log_a_out;    // row log-mass of the written plan (log_a + log_out_scale)
  const double* log_b;  // column log-marginals, or null for uniform
  double log_b_uniform;
  void* out;
  int* non_finite;
  double* g64;        // column potential (cols)
  float* g32;         // float copy read by the row passes (cols)
  float2* part_ms;    // parts x cols (max, sum) partials of the column LSE
  float* part_mass;   // parts x cols column-mass partials (aliases part_ms: never live together)
  int parts;
  int64_t rows_per_part;
  int smem_mode;      // g32 copy and accumulators in shared memory (1) or in the workspace (0)
  double* stats;      // sinkhorn_pass only: this rank's column statistics, exported instead of updating g
};

// ----- element access -------------------------------------------------------------------
template <typename T>
__device__ __forceinline__ float load_f(const T* p);
template <>
__device__ __forceinline__ float load_f<float>(const float* p) { return __ldg(p); }
template <>
__device__ __forceinline__ float load_f<__half>(const __half* p) { return __half2float(__ldg(p)); }
template <>
__device__ __forceinline__ float load_f<__nv_bfloat16>(const __nv_bfloat16* p) {
  return __bfloat162float(__ldg(p));
}

// A coherent load, for a phase that also writes the plan over the scores (in place, out ==
// x): __ldg reads through the non-coherent read-only cache, and a const __restrict__ x there
// would promise that nothing in its scope writes x.
template <typename T>
__device__ __forceinline__ float load_coherent(const T* p);
template <>
__device__ __forceinline__ float load_coherent<float>(const float* p) { return *p; }
template <>
__device__ __forceinline__ float load_coherent<__half>(const __half* p) { return __half2float(*p); }
template <>
__device__ __forceinline__ float load_coherent<__nv_bfloat16>(const __nv_bfloat16* p) {
  return __bfloat162float(*p);
}

template <typename T, bool kWrite>
__device__ __forceinline__ float load_row(const T* p) {
  return kWrite ? load_coherent(p) : load_f(p);
}

template <typename T>
__device__ __forceinline__ T from_f(float v);
template <>
__device__ __forceinline__ float from_f<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// NaN or +-Inf, tested on the bits so that no fast-math assumption can fold it away.
__device__ __forceinline__ bool not_finite(float v) { return (__float_as_uint(v) & 0x7f800000u) == 0x7f800000u; }

// ----- log-sum-exp pairs (m, s): sum = s * exp(m) ----------------------------------------
// The empty pair is (-FLT_MAX, 0), not (-inf, 0): differences of two empty maxima are then 0,
// never -inf - (-inf) = NaN, and t = -inf (a zero-mass column) adds exp(-inf) = 0.
__device__ __forceinline__ void lse_push(float& m, float& s, float t) {
  if (t > m) {
    s = s * __expf(m - t) + 1.0f;
    m = t;
  } else {
    s += __expf(t - m);
  }
}

// Merges (m2, s2) into (m, s) with one exponential. Symmetric bit for bit (a + b == b + a),
// so both lanes of a butterfly exchange end with the same pair.
__device__ __forceinline__ void lse_merge(float& m, float& s, float m2, float s2) {
  if (m2 > m) {
    s = s * __expf(m - m2) + s2;
    m = m2;
  } else {
    s = s + s2 * __expf(m2 - m);
  }
}

__device__ __forceinline__ void warp_lse(float& m, float& s) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    const float m2 = __shfl_xor_sync(0xffffffffu, m, off);
    const float s2 = __shfl_xor_sync(0xffffffffu, s, off);
    lse_merge(m, s, m2, s2);
  }
}

// Static shared scratch of the reductions; the row tiles and the combines never overlap in
// time (barriers separate them), so they share the storage.
struct RowScratch {
  float m[kRowTile][kWarps];
  float s[kRowTile][kWarps];
  float max[kRowTile];
  float scale[kRowTile];
};
union Scratch {
  RowScratch rows;
  float2 ms[kWarps][32];
  double mass[kWarps][32];
};

__device__ __forceinline__ int64_t part_begin(const Params& p, int part) {
  return static_cast<int64_t>(part) * p.rows_per_part;
}
__device__ __forceinline__ int64_t part_end(const Params& p, int part) {
  return min(p.rows, part_begin(p, part) + p.rows_per_part);
}

// ----- phase 1: per-part column log-sum-exp ---------------------------------------------
template <typename T>
__device__ void column_lse_phase(const Params& p, int part) {
  const T* __restrict__ x = static_cast<const T*>(p.x);
  const int64_t r0 = part_begin(p, part), r1 = part_end(p, part);
  const int K = p.cols;
  const float alpha = p.alpha;
  bool bad = false;
  for (int j = threadIdx.x; j < K; j += blockDim.x) {
    float m = -FLT_MAX, s = 0.0f;
    int64_t i = r0;
    for (; i + kColUnroll <= r1; i += kColUnroll) {
      float v[kColUnroll];
#pragma unroll
      for (int u = 0; u < kColUnroll; ++u) v[u] = load_f(x + (i + u) * p.ld + j);
#pragma unroll
      for (int u = 0; u < kColUnroll; ++u) {
        const float t = alpha * v[u];
        bad |= not_finite(t);
        lse_push(m, s, t);
      }
    }
    for (; i < r1; ++i) {
      const float t = alpha * load_f(x + i * p.ld + j);
      bad |= not_finite(t);
      lse_push(m, s, t);
    }
    p.part_ms[static_cast<size_t>(part) * K + j] = make_float2(m, s);
  }
  if (bad) atomicOr(p.non_finite, 1);
}

// ----- combine phases: reduce the P partials of each column, update g --------------------
// Init/Step update the potentials (one process); ExportLse/ExportMass write this rank's
// column statistics to p.stats instead (sinkhorn_pass: the caller all-reduces them).
enum class Combine { Init, Step, ExportLse, ExportMass };

template <Combine kind>
__host__ __device__ constexpr bool combines_lse() { return kind == Combine::Init || kind == Combine::ExportLse; }

__device__ __forceinline__ double log_b_at(const Params& p, int j) {
  return p.log_b ? p.log_b[j] : p.log_b_uniform;
}

template <Combine kind>
__device__ __forceinline__ void finish_column(const Params& p, int j, float m, float s, double mass) {
  if (kind == Combine::ExportLse) {  // (max, sum) of LSE_i(alpha x_ij), as the CPU core's column_logsumexp
    p.stats[j] = static_cast<double>(m);
    p.stats[p.cols + j] = static_cast<double>(s);
    return;
  }
  if (kind == Combine::ExportMass) {
    p.stats[j] = mass;
    return;
  }
  const double lb = log_b_at(p, j);
  double g;
  if (isinf(lb)) {
    g = lb;  // a zero-mass column stays at -inf instead of becoming NaN
  } else if (kind == Combine::Init) {
    g = lb - (static_cast<double>(m) + log(static_cast<double>(s)));
  } else {
    g = p.g64[j] + lb - log(mass);
  }
  p.g64[j] = g;
  p.g32[j] = static_cast<float>(g);
}

// Column tiles of 32 columns (lane = column, coalesced). With few parts a warp reduces a
// tile alone (no barriers); with many, the warps of a block split the parts of one tile and
// merge through shared memory. `unit`/`units` enumerate the warps (small) or blocks (large)
// of whichever grid runs the phase.
template <Combine kind>
__device__ void combine_phase(const Params& p, Scratch& sc) {
  const int K = p.cols, P = p.parts;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  const int tiles = (K + 31) / 32;
  if (P <= kSmallCombineParts) {
    const int unit = blockIdx.x * nw + warp, units = gridDim.x * nw;
    for (int tile = unit; tile < tiles; tile += units) {
      const int j = tile * 32 + lane;
      if (j >= K) continue;
      if (combines_lse<kind>()) {
        float m = -FLT_MAX, s = 0.0f;
#pragma unroll 4
        for (int q = 0; q < P; ++q) {
          const float2 v = p.part_ms[static_cast<size_t>(q) * K + j];
          lse_merge(m, s, v.x, v.y);
        }
        finish_column<kind>(p, j, m, s, 0.0);
      } else {
        double mass = 0.0;
#pragma unroll 4
        for (int q = 0; q < P; ++q) mass += p.part_mass[static_cast<size_t>(q) * K + j];
        finish_column<kind>(p, j, 0.0f, 0.0f, mass);
      }
    }
    return;
  }
  // Large P: block-uniform loop (every thread of the block runs the same trip count), so the
  // barriers inside are never divergent.
  for (int tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const int j = tile * 32 + lane;
    const bool live = j < K;
    if (combines_lse<kind>()) {
      float m = -FLT_MAX, s = 0.0f;
      if (live) {
#pragma unroll 4
        for (int q = warp; q < P; q += nw) {
          const float2 v = p.part_ms[static_cast<size_t>(q) * K + j];
          lse_merge(m, s, v.x, v.y);
        }
      }
      sc.ms[warp][lane] = make_float2(m, s);
    } else {
      double mass = 0.0;
      if (live) {
#pragma unroll 4
        for (int q = warp; q < P; q += nw) mass += p.part_mass[static_cast<size_t>(q) * K + j];
      }
      sc.mass[warp][lane] = mass;
    }
    __syncthreads();
    if (warp == 0 && live) {
      if (combines_lse<kind>()) {
        float m = -FLT_MAX, s = 0.0f;
        for (int w = 0; w < nw; ++w) lse_merge(m, s, sc.ms[w][lane].x, sc.ms[w][lane].y);
        finish_column<kind>(p, j, m, s, 0.0);
      } else {
        double mass = 0.0;
        for (int w = 0; w < nw; ++w) mass += sc.mass[w][lane];
        finish_column<kind>(p, j, 0.0f, 0.0f, mass);
      }
    }
    __syncthreads();  // scratch is rewritten by the next tile
  }
}

// ----- row phase: row LSE per tile, then column masses (accumulate) or the plan (write) ---
// Block reduction of kRowTile (m, s) pairs; on return every thread holds, for r < nr, the
// row maximum in m[r] and the row scale exp(log_a - log s_r) in s[r], so that
// P_rj = exp(t_rj - m[r]) * s[r]. Two barriers; the scratch of tile k is read before the
// second barrier of tile k and rewritten only after the first barrier of tile k + 1.
__device__ __forceinline__ void block_row_lse(float (&m)[kRowTile], float (&s)[kRowTile], int nr, float log_a,
                                              RowScratch& rs) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
#pragma unroll
  for (int r = 0; r < kRowTile; ++r) {
    if (r < nr) {  // nr is block-uniform: the shuffles are never divergent
      warp_lse(m[r], s[r]);
      if (lane == 0) {
        rs.m[r][warp] = m[r];
        rs.s[r][warp] = s[r];
      }
    }
  }
  __syncthreads();
  if (warp == 0) {
#pragma unroll
    for (int r = 0; r < kRowTile; ++r) {
      if (r < nr) {
        float mm = lane < nw ? rs.m[r][lane] : -FLT_MAX;
        float ss = lane < nw ? rs.s[r][lane] : 0.0f;
        warp_lse(mm, ss);
        if (lane == 0) {
          rs.max[r] = mm;
          rs.scale[r] = __expf(log_a - __logf(ss));
        }
      }
    }
  }
  __syncthreads();
#pragma unroll
  for (int r = 0; r < kRowTile; ++r) {
    if (r < nr) {
      m[r] = rs.max[r];
      s[r] = rs.scale[r];
    }
  }
}

template <typename T, bool kWrite>
__device__ void row_phase(const Params& p, int part, float* smem, Scratch& sc) {
  // Not __restrict__: with kWrite the plan is written through out, which may be x itself.
  const T* x = static_cast<const T*>(p.x);
  const int K = p.cols;
  const int64_t r0 = part_begin(p, part), r1 = part_end(p, part);
  // Thread-owned columns: gs/acc entries are written and read by the same thread only.
  float* gs = p.smem_mode ? smem : p.g32;
  float* acc = p.smem_mode ? smem + K : p.part_mass + static_cast<size_t>(part) * K;
  for (int j = threadIdx.x; j < K; j += blockDim.x) {
    if (p.smem_mode) gs[j] = p.g32[j];
    if (!kWrite) acc[j] = 0.0f;
  }
  const float alpha = p.alpha;
  const float log_a = kWrite ? p.log_a_out : p.log_a;
  T* out = static_cast<T*>(p.out);
  for (int64_t i0 = r0; i0 < r1; i0 += kRowTile) {
    const int nr = static_cast<int>(min(static_cast<int64_t>(kRowTile), r1 - i0));
    const T* xt = x + i0 * p.ld;
    float m[kRowTile], s[kRowTile];
#pragma unroll
    for (int r = 0; r < kRowTile; ++r) {
      m[r] = -FLT_MAX;
      s[r] = 0.0f;
    }
    for (int j = threadIdx.x; j < K; j += blockDim.x) {
      const float gj = gs[j];
      float v[kRowTile];
#pragma unroll
      for (int r = 0; r < kRowTile; ++r) v[r] = r < nr ? load_row<T, kWrite>(xt + r * p.ld + j) : 0.0f;
#pragma unroll
      for (int r = 0; r < kRowTile; ++r)
        if (r < nr) lse_push(m[r], s[r], fmaf(alpha, v[r], gj));
    }
    block_row_lse(m, s, nr, log_a, sc.rows);
    // Second read of the tile (L1/L2 hits): the same fmaf as above, so t - m <= 0 exactly.
    for (int j = threadIdx.x; j < K; j += blockDim.x) {
      const float gj = gs[j];
      float v[kRowTile];
#pragma unroll
      for (int r = 0; r < kRowTile; ++r) v[r] = r < nr ? load_row<T, kWrite>(xt + r * p.ld + j) : 0.0f;
      float col = 0.0f;
#pragma unroll
      for (int r = 0; r < kRowTile; ++r) {
        if (r < nr) {
          const float e = __expf(fmaf(alpha, v[r], gj) - m[r]) * s[r];
          if (kWrite)
            out[(i0 + r) * K + j] = from_f<T>(e);
          else
            col += e;
        }
      }
      if (!kWrite) acc[j] += col;
    }
  }
  if (!kWrite && p.smem_mode) {
    float* dst = p.part_mass + static_cast<size_t>(part) * K;
    for (int j = threadIdx.x; j < K; j += blockDim.x) dst[j] = acc[j];
  }
}

// ----- kernels ------------------------------------------------------------------------------
// Grid-wide barrier of the fused kernel: a cooperative-groups grid sync when it runs as a
// cooperative launch of several blocks; one block needs only its own barrier.
__device__ __forceinline__ void grid_barrier() {
  if (gridDim.x > 1)
    cg::this_grid().sync();
  else
    __syncthreads();
}

template <typename T>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm) sinkhorn_fused_kernel(Params p) {
  extern __shared__ float smem[];
  __shared__ Scratch sc;
  const int part = blockIdx.x;  // one part per block: gridDim.x == p.parts
  column_lse_phase<T>(p, part);
  grid_barrier();
  combine_phase<Combine::Init>(p, sc);
  grid_barrier();
  for (int it = 1; it < p.n_iters; ++it) {
    row_phase<T, false>(p, part, smem, sc);
    grid_barrier();
    combine_phase<Combine::Step>(p, sc);
    grid_barrier();
  }
  row_phase<T, true>(p, part, smem, sc);
}

template <typename T>
__global__ void __launch_bounds__(kThreads, 2) sinkhorn_column_lse_kernel(Params p) {
  column_lse_phase<T>(p, blockIdx.x);
}

template <Combine kind>
__global__ void __launch_bounds__(kThreads) sinkhorn_combine_kernel(Params p) {
  __shared__ Scratch sc;
  combine_phase<kind>(p, sc);
}

template <typename T, bool kWrite>
__global__ void __launch_bounds__(kThreads, 2) sinkhorn_row_kernel(Params p) {
  extern __shared__ float smem[];
  __shared__ Scratch sc;
  row_phase<T, kWrite>(p, blockIdx.x, smem, sc);
}

// ----- host side ------------------------------------------------------------------------------
size_t align_up(size_t n) { return (n + 255) / 256 * 256; }

// Upper bound on the number of parts, independent of the device so that the workspace size
// the caller allocates is always enough; the launch may use fewer (one resident wave).
int64_t max_parts(int64_t rows, int64_t cols) {
  const int64_t by_rows = (rows + kMinRowsPerPart - 1) / kMinRowsPerPart;
  const int64_t by_mem = std::max<int64_t>(1, kMaxPartialEntries / cols);
  return std::max<int64_t>(1, std::min({kMaxParts, by_rows, by_mem}));
}

struct Layout {
  size_t g64, g32, partials, total;
};

Layout workspace_layout(int64_t rows, int64_t cols) {
  const size_t k = static_cast<size_t>(cols);
  Layout l;
  l.g64 = 0;
  l.g32 = l.g64 + align_up(8 * k);
  l.partials = l.g32 + align_up(4 * k);
  l.total = l.partials + align_up(sizeof(float2) * k * static_cast<size_t>(max_parts(rows, cols)));
  return l;
}

void check_shape(int64_t rows, int64_t cols) {
  if (rows < 1 || cols < 1)
    throw std::invalid_argument("sinkhorn (CUDA): expected a non-empty matrix, got " + std::to_string(rows) + " x " +
                                std::to_string(cols));
  if (cols > INT_MAX / 2)
    throw std::invalid_argument("sinkhorn (CUDA): too many columns (" + std::to_string(cols) + ")");
}

std::string format_g(double v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%g", v);
  return buf;
}

enum class Path { Auto, Fused, Multi };

Path path_override() {
  const char* v = std::getenv("PYM4_SINKHORN_CUDA_PATH");
  if (v == nullptr || *v == '\0' || std::strcmp(v, "auto") == 0) return Path::Auto;
  if (std::strcmp(v, "fused") == 0) return Path::Fused;
  if (std::strcmp(v, "multi") == 0) return Path::Multi;
  throw std::invalid_argument(std::string("PYM4_SINKHORN_CUDA_PATH: expected auto, fused or multi, got '") + v + "'");
}

// Opts a kernel in to `bytes` of dynamic shared memory. The default limit (48 KB) covers
// static + dynamic together, so with the 4 KB static Scratch a dynamic size of 44..48 KB
// (cols ~5600..6144) already needs the opt-in: set it whenever dynamic memory is used.
// Callers pass the device-wide budget, not this solve's size: the attribute belongs to the
// function, and concurrent solves (the GIL is released) must never lower it under another
// thread's larger launch.
template <typename Kernel>
void set_dynamic_smem(Kernel kernel, size_t bytes) {
  if (bytes > 0)
    PYM4_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
}

// Resident blocks of `kernel` on the whole device (one wave), at least 1.
template <typename Kernel>
int64_t resident_blocks(Kernel kernel, size_t smem, int sms) {
  int per_sm = 0;
  PYM4_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, smem));
  return static_cast<int64_t>(std::max(per_sm, 0)) * sms;
}

void set_parts(Params& p, int64_t parts) {
  parts = std::max<int64_t>(1, std::min(parts, p.rows));
  p.rows_per_part = (p.rows + parts - 1) / parts;
  p.parts = static_cast<int>((p.rows + p.rows_per_part - 1) / p.rows_per_part);  // no empty part
}

// The device's SM count and where the row phases keep g32 and their accumulators.
struct DevicePlan {
  int sms = 0;
  int coop = 0;
  size_t dyn_smem = 0;   // dynamic shared memory per block of the row phases
  size_t dyn_limit = 0;  // opt-in size, see set_dynamic_smem
};

// Sets p.smem_mode: g32 copy + column accumulators in shared memory when they fit next to
// the static scratch.
DevicePlan plan_device(Params& p) {
  int device = 0, smem_optin = 0;
  DevicePlan d;
  PYM4_CUDA_CHECK(cudaGetDevice(&device));
  PYM4_CUDA_CHECK(cudaDeviceGetAttribute(&d.sms, cudaDevAttrMultiProcessorCount, device));
  PYM4_CUDA_CHECK(cudaDeviceGetAttribute(&smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  PYM4_CUDA_CHECK(cudaDeviceGetAttribute(&d.coop, cudaDevAttrCooperativeLaunch, device));
  const size_t smem_needed = 2 * sizeof(float) * static_cast<size_t>(p.cols);
  const size_t smem_budget = static_cast<size_t>(std::max(smem_optin, 0)) > sizeof(Scratch) + 1024
                                 ? static_cast<size_t>(smem_optin) - sizeof(Scratch) - 1024
                                 : 0;
  p.smem_mode = smem_needed <= smem_budget ? 1 : 0;
  d.dyn_smem = p.smem_mode ? smem_needed : 0;
  d.dyn_limit = p.smem_mode ? smem_budget : 0;
  return d;
}

// The multi-launch path's set-up: shared-memory opt-ins and one resident wave of row blocks
// (the same parts for every pass: they depend only on the shape and the device). Returns the
// blocks of a combine launch.
template <typename T>
int plan_multi(Params& p, const DevicePlan& d) {
  set_dynamic_smem(sinkhorn_row_kernel<T, false>, d.dyn_limit);
  set_dynamic_smem(sinkhorn_row_kernel<T, true>, d.dyn_limit);
  set_parts(p, std::min(max_parts(p.rows, p.cols),
                        std::max<int64_t>(1, resident_blocks(sinkhorn_row_kernel<T, false>, d.dyn_smem, d.sms))));
  const int tiles = (p.cols + 31) / 32;
  return p.parts <= kSmallCombineParts ? (tiles + kWarps - 1) / kWarps : tiles;
}

template <typename T>
void solve_typed(Params p, cudaStream_t stream) {
  const DevicePlan d = plan_device(p);
  const int sms = d.sms, coop = d.coop;
  const size_t dyn_smem = d.dyn_smem, dyn_limit = d.dyn_limit;
  const int64_t parts_cap = max_parts(p.rows, p.cols);

  Path path = path_override();
  if (path == Path::Auto)
    path = p.rows * static_cast<int64_t>(p.cols) <= kFusedMaxElements ? Path::Fused : Path::Multi;

  if (path == Path::Fused) {
    auto kernel = sinkhorn_fused_kernel<T>;
    set_dynamic_smem(kernel, dyn_limit);
    Params f = p;
    set_parts(f, std::min(parts_cap, resident_blocks(kernel, dyn_smem, sms)));
    if (f.parts == 1) {  // tiny batches: one block, an ordinary launch
      kernel<<<1, kThreads, dyn_smem, stream>>>(f);
      check_last_error("sinkhorn (CUDA) fused single-block launch");
      return;
    }
    if (coop) {
      void* args[] = {&f};
      const cudaError_t err = cudaLaunchCooperativeKernel(reinterpret_cast<const void*>(kernel), dim3(f.parts),
                                                          dim3(kThreads), args, dyn_smem, stream);
      if (err == cudaSuccess) return;
      // Refused (too large under MPS or a green context, not permitted): clear the
      // non-sticky launch error and take the multi-launch path, which needs no co-residency.
      if (err != cudaErrorCooperativeLaunchTooLarge && err != cudaErrorNotSupported && err != cudaErrorNotPermitted)
        PYM4_CUDA_CHECK(err);
      cudaGetLastError();
    }
  }

  // Multi-launch path: one resident wave of row blocks per pass.
  auto lse_kernel = sinkhorn_column_lse_kernel<T>;
  auto acc_kernel = sinkhorn_row_kernel<T, false>;
  auto write_kernel = sinkhorn_row_kernel<T, true>;
  const int combine_blocks = plan_multi<T>(p, d);

  lse_kernel<<<p.parts, kThreads, 0, stream>>>(p);
  check_last_error("sinkhorn (CUDA) column log-sum-exp");
  sinkhorn_combine_kernel<Combine::Init><<<combine_blocks, kThreads, 0, stream>>>(p);
  check_last_error("sinkhorn (CUDA) first column step");
  for (int it = 1; it < p.n_iters; ++it) {
    acc_kernel<<<p.parts, kThreads, dyn_smem, stream>>>(p);
    check_last_error("sinkhorn (CUDA) row pass");
    sinkhorn_combine_kernel<Combine::Step><<<combine_blocks, kThreads, 0, stream>>>(p);
    check_last_error("sinkhorn (CUDA) column step");
  }
  write_kernel<<<p.parts, kThreads, dyn_smem, stream>>>(p);
  check_last_error("sinkhorn (CUDA) write pass");
}

// The Params both entry points share: the matrix, the row masses, the output and the
// workspace carve-up (g64, g32, partials).
Params base_params(const void* x, int64_t rows, int64_t cols, int64_t ld, float alpha, double log_a_scalar,
                   double log_out_scale, void* out, int* non_finite, void* workspace) {
  const Layout l = workspace_layout(rows, cols);
  char* ws = static_cast<char*>(workspace);
  Params p{};
  p.x = x;
  p.rows = rows;
  p.ld = rows == 1 ? cols : ld;
  p.cols = static_cast<int>(cols);
  p.n_iters = 1;
  p.alpha = alpha;
  p.log_a = static_cast<float>(log_a_scalar);
  p.log_a_out = static_cast<float>(log_a_scalar + log_out_scale);
  p.log_b_uniform = -std::log(static_cast<double>(cols));
  p.out = out;
  p.non_finite = non_finite;
  p.g64 = reinterpret_cast<double*>(ws + l.g64);
  p.g32 = reinterpret_cast<float*>(ws + l.g32);
  p.part_ms = reinterpret_cast<float2*>(ws + l.partials);
  p.part_mass = reinterpret_cast<float*>(ws + l.partials);
  return p;
}

// One pass of the multi-launch path (see sinkhorn_pass in include/pym4/cuda.h).
template <typename T>
void pass_typed(Params p, int kind, cudaStream_t stream) {
  const DevicePlan d = plan_device(p);
  const size_t dyn_smem = d.dyn_smem;
  auto acc_kernel = sinkhorn_row_kernel<T, false>;
  auto write_kernel = sinkhorn_row_kernel<T, true>;
  const int combine_blocks = plan_multi<T>(p, d);
  if (kind == 0) {
    sinkhorn_column_lse_kernel<T><<<p.parts, kThreads, 0, stream>>>(p);
    check_last_error("sinkhorn (CUDA) column log-sum-exp");
    sinkhorn_combine_kernel<Combine::ExportLse><<<combine_blocks, kThreads, 0, stream>>>(p);
    check_last_error("sinkhorn (CUDA) column statistics");
  } else if (kind == 1) {
    acc_kernel<<<p.parts, kThreads, dyn_smem, stream>>>(p);
    check_last_error("sinkhorn (CUDA) row pass");
    sinkhorn_combine_kernel<Combine::ExportMass><<<combine_blocks, kThreads, 0, stream>>>(p);
    check_last_error("sinkhorn (CUDA) column masses");
  } else {
    write_kernel<<<p.parts, kThreads, dyn_smem, stream>>>(p);
    check_last_error("sinkhorn (CUDA) write pass");
  }
}

}  // namespace

void sinkhorn_pass(int kind, const void* x, DType dtype, int64_t rows, int64_t cols, int64_t ld, double alpha,
                   const float* g32, double log_a_scalar, void* out, double* stats, void* workspace, int* non_finite,
                   void* stream) {
  check_shape(rows, cols);
  if (kind < 0 || kind > 2) throw std::invalid_argument("sinkhorn_pass (CUDA): kind must be 0, 1 or 2");
  if (x == nullptr || workspace == nullptr || non_finite == nullptr || (kind != 0 && g32 == nullptr) ||
      (kind == 2 ? out == nullptr : stats == nullptr))
    throw std::invalid_argument("sinkhorn_pass (CUDA): missing device pointer for this pass");
  if (ld < 0) throw std::invalid_argument("x: row stride must be >= 0, got " + std::to_string(ld));
  const float alpha_f = static_cast<float>(alpha);
  if (!std::isfinite(alpha) || !std::isfinite(alpha_f))
    throw std::invalid_argument("alpha (1/epsilon): must be finite in float32, got " + format_g(alpha));
  if (!std::isfinite(log_a_scalar)) throw std::invalid_argument("log_a_scalar: must be finite");
  if (reinterpret_cast<uintptr_t>(workspace) % 16 != 0) throw std::invalid_argument("workspace: misaligned");
  Params p = base_params(x, rows, cols, ld, alpha_f, log_a_scalar, 0.0, out, non_finite, workspace);
  p.g64 = nullptr;                  // never touched by the export combines
  p.g32 = const_cast<float*>(g32);  // read-only here: the row phases copy it to shared memory or read it
  p.stats = stats;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case DType::Float32: pass_typed<float>(p, kind, s); break;
    case DType::Float16: pass_typed<__half>(p, kind, s); break;
    case DType::BFloat16: pass_typed<__nv_bfloat16>(p, kind, s); break;
    default: throw std::invalid_argument("dtype: unknown dtype code " + std::to_string(static_cast<int>(dtype)));
  }
}

size_t sinkhorn_workspace_bytes(int64_t rows, int64_t cols) {
  check_shape(rows, cols);
  return workspace_layout(rows, cols).total;
}

void sinkhorn_solve(const void* x, DType dtype, int64_t rows, int64_t cols, int64_t ld, double alpha,
                    const double* log_b, double log_a_scalar, int64_t n_iters, double log_out_scale, void* out,
                    void* workspace, int* non_finite, void* stream) {
  check_shape(rows, cols);
  if (x == nullptr || out == nullptr || workspace == nullptr || non_finite == nullptr)
    throw std::invalid_argument("sinkhorn (CUDA): x, out, workspace and non_finite must be device pointers");
  if (n_iters < 1 || n_iters > INT_MAX)
    throw std::invalid_argument("n_iters: must be in [1, 2^31), got " + std::to_string(n_iters));
  // ld = 0 (a broadcast row) and ld < cols (overlapping rows) only alias reads: allowed.
  if (ld < 0) throw std::invalid_argument("x: row stride must be >= 0, got " + std::to_string(ld));
  const float alpha_f = static_cast<float>(alpha);
  if (!std::isfinite(alpha) || !std::isfinite(alpha_f))
    throw std::invalid_argument("alpha (1/epsilon): must be finite in float32, got " + format_g(alpha));
  if (!std::isfinite(log_a_scalar) || !std::isfinite(log_out_scale))
    throw std::invalid_argument("log_a_scalar, log_out_scale: must be finite");
  size_t elem = 0;
  switch (dtype) {
    case DType::Float32: elem = 4; break;
    case DType::Float16:
    case DType::BFloat16: elem = 2; break;
    default: throw std::invalid_argument("dtype: unknown dtype code " + std::to_string(static_cast<int>(dtype)));
  }
  if (reinterpret_cast<uintptr_t>(x) % elem != 0 || reinterpret_cast<uintptr_t>(out) % elem != 0)
    throw std::invalid_argument("x, out: misaligned for their dtype");
  if (reinterpret_cast<uintptr_t>(workspace) % 16 != 0 || reinterpret_cast<uintptr_t>(non_finite) % 4 != 0)
    throw std::invalid_argument("workspace, non_finite: misaligned");

  Params p = base_params(x, rows, cols, ld, alpha_f, log_a_scalar, log_out_scale, out, non_finite, workspace);
  p.n_iters = static_cast<int>(n_iters);
  p.log_b = log_b;

  cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case DType::Float32: solve_typed<float>(p, s); break;
    case DType::Float16: solve_typed<__half>(p, s); break;
    case DType::BFloat16: solve_typed<__nv_bfloat16>(p, s); break;
  }
}

}  // namespace cuda
}  // namespace pym4
