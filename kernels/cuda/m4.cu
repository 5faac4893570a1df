// CUDA kernel of M4 data balancing (see csrc/include/pym4/m4.h): for one mini-batch on the
// GPU, the keep probabilities q_i = clip(eta + u_i - a_i^T w - mu, 0, 1) and the statistics
// of the stochastic dual-ascent step, stats = [sum q a (p) | sum a^2 (p) | sum q | count],
// with a_i = (s_i - pi) (x) [1; y_i], p = m (c + 1), dense uint8 s (n x m) and y (n x c).
//
// One thread per example (grid-stride). The duals and targets are staged in shared memory;
// the block accumulates its statistics in shared memory (double atomics, sm_60+) and adds
// them to the global vector once, so global atomics are p per block, not p per example.
// When 3p + m doubles do not fit the shared budget, the same code reads the duals from
// global memory and adds straight into the global statistics. mu is read from device
// memory, so a training loop never syncs with the host between mini-batches.
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "pym4/cuda.h"

namespace pym4 {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr size_t kSharedBudget = 48 * 1024;

template <bool kShared>
__global__ void m4_batch_kernel(const uint8_t* __restrict__ s, const uint8_t* __restrict__ y,
                                const double* __restrict__ u, int64_t n, int m, int c,
                                const double* __restrict__ pi_g, double eta, const double* __restrict__ w_g,
                                const double* __restrict__ mu_ptr, double* __restrict__ q_out,
                                double* __restrict__ stats) {
  extern __shared__ double smem[];
  const int L = c + 1, p = m * L;
  const double* w = w_g;
  const double* pi = pi_g;
  double* acc = stats;
  if (kShared) {
    double* sw = smem;             // p
    double* spi = smem + p;        // m
    double* sacc = smem + p + m;   // 2p + 2
    for (int j = threadIdx.x; j < p; j += blockDim.x) sw[j] = w_g[j];
    for (int j = threadIdx.x; j < m; j += blockDim.x) spi[j] = pi_g[j];
    if (stats)
      for (int j = threadIdx.x; j < 2 * p + 2; j += blockDim.x) sacc[j] = 0.0;
    __syncthreads();
    w = sw;
    pi = spi;
    acc = sacc;
  }
  const double mu = *mu_ptr;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const uint8_t* si = s + i * m;
    const uint8_t* yi = y + i * c;
    double t = 0.0;
    for (int k = 0; k < m; ++k) {
      const double* wk = w + k * L;
      double dot = wk[0];
      for (int r = 0; r < c; ++r)
        if (yi[r]) dot += wk[1 + r];
      t += (static_cast<double>(si[k]) - pi[k]) * dot;
    }
    double q = eta + (u ? u[i] : 0.0) - t - mu;
    q = q < 0.0 ? 0.0 : (q > 1.0 ? 1.0 : q);
    if (q_out) q_out[i] = q;
    if (stats) {
      for (int k = 0; k < m; ++k) {
        const double dk = static_cast<double>(si[k]) - pi[k];
        const double cq = q * dk, c2 = dk * dk;
        atomicAdd(acc + k * L, cq);
        atomicAdd(acc + p + k * L, c2);
        for (int r = 0; r < c; ++r)
          if (yi[r]) {
            if (cq != 0.0) atomicAdd(acc + k * L + 1 + r, cq);
            atomicAdd(acc + p + k * L + 1 + r, c2);
          }
      }
      atomicAdd(acc + 2 * p, q);
      atomicAdd(acc + 2 * p + 1, 1.0);
    }
  }
  if (kShared && stats) {
    __syncthreads();
    for (int j = threadIdx.x; j < 2 * p + 2; j += blockDim.x)
      if (acc[j] != 0.0) atomicAdd(stats + j, acc[j]);
  }
}

}  // namespace

void m4_batch(const uint8_t* s, const uint8_t* y, const double* u, int64_t row0, int64_t n, int64_t m, int64_t c,
              const double* pi, double eta, const double* w, const double* mu, double* q, double* stats,
              void* stream) {
  if (n <= 0) return;
  // Rows [row0, row0 + n) of the whole arrays: the offsets are computed here, once.
  s += row0 * m;
  y += row0 * c;
  if (u) u += row0;
  if (q) q += row0;
  const int64_t p = m * (c + 1);
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  int device = 0, sms = 1;
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  const int64_t want = (n + kThreads - 1) / kThreads;
  const int blocks = static_cast<int>(want < 4 * sms ? want : 4 * sms);
  const size_t shared = static_cast<size_t>(3 * p + 2 + m) * sizeof(double);
  if (shared <= kSharedBudget) {
    m4_batch_kernel<true><<<blocks, kThreads, shared, st>>>(s, y, u, n, static_cast<int>(m), static_cast<int>(c),
                                                             pi, eta, w, mu, q, stats);
  } else {
    m4_batch_kernel<false><<<blocks, kThreads, 0, st>>>(s, y, u, n, static_cast<int>(m), static_cast<int>(c), pi,
                                                         eta, w, mu, q, stats);
  }
  check_last_error("m4 batch (CUDA)");
}

}  // namespace cuda
}  // namespace pym4
