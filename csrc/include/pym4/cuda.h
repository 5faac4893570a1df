// Host-side launchers of the CUDA kernels in kernels/cuda/*.cu. Plain pointers and a
// stream handle (cudaStream_t passed as void*), so that this header and bindings.cpp
// need no CUDA headers and the CPU-only build never sees them.
#pragma once

#include <cstdint>
#include <string>

namespace pym4 {
namespace cuda {

// Throws std::runtime_error carrying the CUDA error string when a launch failed.
void check_last_error(const char* what);

// ----- Sinkhorn (kernels/cuda/sinkhorn.cu) -----------------------------------------------
// dtype codes shared by every CUDA entry point.
enum class DType : int { Float32 = 0, Float16 = 1, BFloat16 = 2 };

// The SwAV / entropic-OT solve of include/pym4/sinkhorn.h on the GPU: x (rows x cols, row
// stride ld, dtype), alpha, column log-marginals log_b (device, cols doubles, may be null
// for uniform), rows carry mass exp(log_a_scalar) each, output out (rows x cols, contiguous,
// same dtype) multiplied by exp(log_out_scale). workspace: device scratch of
// sinkhorn_workspace_bytes(rows, cols) bytes (device-independent, O(cols * min(rows, 320))).
// non_finite (device int, zero on entry) is set to 1 when some alpha * x is NaN/Inf; the
// output is then unspecified. Up to 2^25 entries every iteration runs in one launch
// (cooperative when several blocks); larger inputs take one launch per pass.
size_t sinkhorn_workspace_bytes(int64_t rows, int64_t cols);

// Launch geometry of the Sinkhorn kernels, stated once: the launcher in sinkhorn.cu and
// scripts/cuda_resources.py (which checks, from the registers and shared memory ptxas
// reports, that the cooperative launch never asks for more blocks than are co-resident on
// an H100/H200 or A100) both read it. Plain integer literals and shifts: the script parses them.
namespace sinkhorn_launch {
constexpr int kThreads = 512;                                // threads per block, every kernel
constexpr int kMinBlocksPerSm = 2;                           // __launch_bounds__(kThreads, this)
constexpr int64_t kMinRowsPerPart = 2;                       // fewer rows per block: partials cost more than rows
constexpr int64_t kMaxParts = 320;                           // >= 2 blocks x SMs of current GPUs (H100 132, B200 148)
constexpr int64_t kMaxPartialEntries = int64_t(1) << 22;     // parts * cols cap: 32 MB of partials
constexpr int64_t kFusedMaxElements = int64_t(1) << 25;      // rows * cols at most for the one-launch path
}  // namespace sinkhorn_launch
void sinkhorn_solve(const void* x, DType dtype, int64_t rows, int64_t cols, int64_t ld, double alpha,
                    const double* log_b, double log_a_scalar, int64_t n_iters, double log_out_scale,
                    void* out, void* workspace, int* non_finite, void* stream);
// One pass of the same solve, for a caller that all-reduces column statistics between passes
// (SwAV/SEER over several GPUs: the batch is split across ranks). Every pass reads this
// rank's rows of x; rows carry mass exp(log_a_scalar) each; g32 (cols floats, device) is the
// column potential. kind 0: column log-sum-exp, stats = [max (cols) | sum (cols)] doubles
// with LSE_i(alpha x_ij) = max_j + log sum_j (g32 unused); kind 1: row step, stats = the
// column masses of the plan after it (cols doubles); kind 2: writes the plan into out
// (rows x cols, contiguous, x's dtype; may be x itself). Two launches (kind 2: one) on
// `stream`, no host synchronisation; workspace as for sinkhorn_solve.
void sinkhorn_pass(int kind, const void* x, DType dtype, int64_t rows, int64_t cols, int64_t ld, double alpha,
                   const float* g32, double log_a_scalar, void* out, double* stats, void* workspace, int* non_finite,
                   void* stream);

// ----- M4 (kernels/cuda/m4.cu) -----------------------------------------------------------
// One mini-batch of M4 on the GPU: rows [row0, row0 + n) of s (rows x m) and y (rows x c)
// uint8 0/1, contiguous, and of u (rows doubles) or null; pi (m), w (p = m (c + 1)) and mu
// (one double) device pointers. Writes q[row0, row0 + n) (q: rows doubles) when non-null and,
// when stats is non-null, ADDS [sum q a (p) | sum a^2 (p) | sum q | count] into stats (2p + 2
// doubles; the caller zeroes it).
void m4_batch(const uint8_t* s, const uint8_t* y, const double* u, int64_t row0, int64_t n, int64_t m, int64_t c,
              const double* pi, double eta, const double* w, const double* mu, double* q, double* stats,
              void* stream);

}  // namespace cuda
}  // namespace pym4
