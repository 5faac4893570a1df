// Shared helpers of the CPU kernels: ISA cloning, a vectorisable exp, OpenMP shims.
// Plain C++17; no Python or pybind11 here.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#if defined(PYM4_WITH_OPENMP)
#include <omp.h>
#endif
#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace pym4 {

// The wheel is built for the baseline ISA of its platform (no -march=native), so the hot
// loops are compiled three times on x86-64 (AVX-512, AVX2+FMA, baseline SSE2) and the
// loader picks the best clone for the running CPU (GCC/Clang ifunc dispatch).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__linux__)
#define PYM4_SIMD_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define PYM4_SIMD_CLONES
#endif

inline int max_threads() {
#if defined(PYM4_WITH_OPENMP)
  return omp_get_max_threads();
#else
  return 1;
#endif
}

// Threads worth waking for `work` element-operations: a fork/join costs about as much as
// a few hundred thousand elements of a streaming pass, so small problems stay on one thread.
inline int threads_for(int64_t work) {
  const int64_t per_thread = int64_t(1) << 15;
  const int64_t useful = work / per_thread;
  const int t = max_threads();
  return useful < 1 ? 1 : (useful < t ? static_cast<int>(useful) : t);
}

// Ask for transparent huge pages on a large output buffer that has not been touched yet.
// A fresh 50 MB result costs ~12,000 page faults with 4 KB pages (measured: 15 ms, more than
// a whole Sinkhorn pass); with 2 MB pages it costs 25. Only the 2 MB-aligned interior is
// advised; a no-op where the kernel does not offer THP or on other systems.
inline void advise_huge_pages(void* data, size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(1) << 21;
  if (bytes < 4 * kHuge) return;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(data) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(data) + bytes) & ~(kHuge - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#else
  (void)data;
  (void)bytes;
#endif
}

// Threads actually running the current parallel region (may be fewer than asked for).
inline int team_size() {
#if defined(PYM4_WITH_OPENMP)
  return omp_get_num_threads();
#else
  return 1;
#endif
}

inline int thread_id() {
#if defined(PYM4_WITH_OPENMP)
  return omp_get_thread_num();
#else
  return 0;
#endif
}

// Bitwise select: a where `take_a`, else b. Written with integer masks because GCC leaves
// std::max/std::min and float ternaries as branches (NaN semantics) in non-AVX-512 code,
// which stops a loop from vectorising.
inline float select_bits(bool take_a, float a, float b) {
  int32_t ab, bb;
  std::memcpy(&ab, &a, sizeof ab);
  std::memcpy(&bb, &b, sizeof bb);
  const int32_t mask = -static_cast<int32_t>(take_a);
  const int32_t rb = (ab & mask) | (bb & ~mask);
  float r;
  std::memcpy(&r, &rb, sizeof r);
  return r;
}

inline float max_bits(float a, float b) { return select_bits(a > b, a, b); }
inline double max_bits(double a, double b) { return a > b ? a : b; }

// exp(x) for float, branch-free so that loops calling it auto-vectorise (libm's expf does
// not). Cody-Waite range reduction x = n ln2 + r, |r| <= ln2/2, then a degree-6 polynomial
// for e^r and 2^n assembled in the exponent bits. Relative error < 2 ulp for x in [-87, 88.7];
// x < -87 (and -inf) gives 0, x > 88.7 gives exp(88.7). NaN gives 0: callers check their
// inputs for NaN before they reach an exponential.
inline float fast_expf(float x) {
  float clamped = select_bits(!(x >= -87.0f), -87.0f, x);  // NaN too: it never reaches the int conversion
  clamped = select_bits(clamped > 88.7f, 88.7f, clamped);
  const float kRound = 12582912.0f;  // 1.5 * 2^23: adding it rounds to the nearest integer
  const float n = (clamped * 1.44269504088896341f + kRound) - kRound;
  float r = n * -0.693359375f + clamped;  // ln2 split in a short high part...
  r = n * 2.12194440e-4f + r;             // ...and the low remainder
  float p = 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  int32_t bits;
  std::memcpy(&bits, &p, sizeof bits);
  bits += static_cast<int32_t>(n) * (int32_t(1) << 23);  // not n << 23: a negative n would be UB before C++20
  float result;
  std::memcpy(&result, &bits, sizeof result);
  return result * static_cast<float>(x >= -87.0f);
}

// exp for double: the float64 paths (float64 input to SwAV or general OT) ask for
// accuracy more than speed, so libm is fine there.
inline double fast_exp(double x) { return std::exp(x); }
inline float fast_exp(float x) { return fast_expf(x); }

}  // namespace pym4
