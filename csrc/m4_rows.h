// Private helpers shared by the M4 CPU kernels (m4.cpp: stream, metrics; m4_exact.cpp: the
// exact solver's passes and the pattern table): row access and OpenMP range splitting.
#pragma once

#include <cstdint>
#include <vector>

#include "pym4/common.h"
#include "pym4/m4.h"

namespace pym4 {
namespace m4 {
namespace detail {

// Examples below which a pass stays on one thread. Waking a sleeping OpenMP team costs tens
// of microseconds (far more on a busy machine), so only passes with real work per example
// (forming a_i) go parallel, and only on large inputs; the O(1)-per-example passes of the
// budget search and line search are memory-bound loops that one thread runs at full speed.
constexpr int64_t kParallelMin = 1 << 16;

// The labels of one example: a dense 0/1 row (y != nullptr) or an index list.
struct Row {
  const uint8_t* y;
  const int32_t* idx;
  int64_t nnz;
};

inline Row row_of(const Data& d, int64_t i) {
  if (d.y) return {d.y + i * d.ld_y, nullptr, d.c};
  return {nullptr, d.y_indices + d.y_indptr[i], d.y_indptr[i + 1] - d.y_indptr[i]};
}

inline double clip01(double z) { return z < 0.0 ? 0.0 : (z > 1.0 ? 1.0 : z); }

// [begin, end) of the t-th of T contiguous ranges of n.
inline void range_of(int64_t n, int t, int T, int64_t& b, int64_t& e) {
  b = n * t / T;
  e = n * (t + 1) / T;
}

// Runs body(begin, end, acc) on contiguous ranges in parallel, each with its own zeroed
// accumulator of `width` doubles, and adds the accumulators into out in thread order.
template <typename Body>
void parallel_accumulate(int64_t n, int64_t width, double* out, Body body) {
  const int T = n >= kParallelMin ? max_threads() : 1;
  if (T == 1) {
    std::vector<double> acc(width, 0.0);
    body(int64_t(0), n, acc.data());
    for (int64_t j = 0; j < width; ++j) out[j] += acc[j];
    return;
  }
  std::vector<double> partial(static_cast<size_t>(T) * width, 0.0);
#if defined(PYM4_WITH_OPENMP)
#pragma omp parallel num_threads(T)
#endif
  {
    const int t = thread_id();
    int64_t b, e;
    range_of(n, t, T, b, e);
    body(b, e, partial.data() + static_cast<size_t>(t) * width);
  }
  for (int t = 0; t < T; ++t)
    for (int64_t j = 0; j < width; ++j) out[j] += partial[static_cast<size_t>(t) * width + j];
}

// Runs body(begin, end) on contiguous ranges in parallel (no reduction).
template <typename Body>
void parallel_ranges(int64_t n, Body body) {
  const int T = n >= kParallelMin ? max_threads() : 1;
  if (T == 1) {
    body(int64_t(0), n);
    return;
  }
#if defined(PYM4_WITH_OPENMP)
#pragma omp parallel num_threads(T)
#endif
  {
    int64_t b, e;
    range_of(n, thread_id(), T, b, e);
    body(b, e);
  }
}

}  // namespace detail
}  // namespace m4
}  // namespace pym4
