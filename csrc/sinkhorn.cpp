// CPU kernels of Sinkhorn-Knopp (see include/pym4/sinkhorn.h for the math).
//
// Every pass is parallel over rows with OpenMP; each thread keeps its own column
// accumulators (a block of rows in float, flushed to double) that are summed at the end,
// so no atomics and a deterministic result for a given thread count.
#include "pym4/sinkhorn.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "pym4/common.h"
#include "pym4/interrupt.h"

namespace pym4 {
namespace sinkhorn {
namespace {

constexpr int64_t kFlushRows = 64;  // rows accumulated in float before adding into double

// Threads for one pass over a rows x cols matrix. Every pass ends in a join (its column sums
// feed the next step); a pass of the kernel form costs about 0.3 ns per entry on one core
// (its first pass, with the exponential, 1.5 ns), and a join on an idle machine a few
// microseconds, so from 64K entries per thread (a pass of ~20 us) the second core pays:
// SwAV's 256 x 3000 solve 2.1 -> 1.05 ms, SEER's 16 x 16000 1.26 -> 0.80 ms (the column-tile
// form; best of 41 on two Zen 1 cores). The price is paid on a loaded machine, where a join
// can wait a scheduler slice for a descheduled thread (at load 3 on two cores the median of
// the 256 x 3000 solve went from 2.1 to 29 ms in one run of 41; at load 13, SEER's solve
// 5 ms on one thread, 120 ms on two): OMP_NUM_THREADS=1 is the remedy there.
int pass_threads(int64_t rows, int64_t cols) {
  constexpr int64_t kPerThread = int64_t(1) << 16;
  const int64_t useful = rows * cols / kPerThread;
  const int t = max_threads();
  return useful < 1 ? 1 : (useful < t ? static_cast<int>(useful) : t);
}

// The team that runs a kernel-form pass of `shares` over `entries` entries. A pass ends in a
// join, and on a machine with more runnable threads than cores a thread of the team can start
// its share a scheduler slice late, which the join waits for: milliseconds, for passes of
// tens of microseconds (SEER's solve at load 2.5 on two cores: best 0.8 ms, median 36-100 ms
// on two threads, 1.3 ms on one). So every share notes when it started; a pass whose last
// share started over 1 ms after the pass (a pool thread wakes in microseconds; a descheduled
// one waits a slice) marks the process contended, and while it is, passes under 4M entries
// (~2 ms) run all their shares on one thread. The back-off starts at 0.25 s and doubles, up to
// 2 s, with each late pass within 4 s of the previous one: a loaded machine soon pays at most
// one late pass per 2 s (with a fixed 0.2 s, a solve after each of torch's 2-thread ops at
// load 6 still paid one: median 13 ms for SwAV's 256 x 3000, 4.4 ms with 2 s, 2.4 ms with no
// torch op in between), while an idle VM whose vCPU the hypervisor takes for a burst (25%
// steal here: 0 to 2 late passes in a benchmark run of 1536) loses a quarter of a second of
// its second core, not two seconds (a fixed 2 s doubled the small shapes' medians in one
// benchmark run in three). The shares, and so the result, stay the same: only who runs them
// changes.
class Team {
 public:
  Team(int shares, int64_t entries)
      : size_(shares > 1 && entries < kShortPass && now_ns() < contended_until_.load(std::memory_order_relaxed)
                  ? 1
                  : shares),
        start_(size_ > 1 ? now_ns() : 0) {}
  ~Team() {
    if (size_ > 1 && latest_.load(std::memory_order_relaxed) - start_ > kLateNs) {
      const int64_t now = now_ns();
      const bool again = now - last_late_.exchange(now, std::memory_order_relaxed) < kRecentNs;
      const int64_t backoff = again ? std::min(2 * backoff_ns_.load(std::memory_order_relaxed), kMaxBackoffNs)
                                    : kMinBackoffNs;
      backoff_ns_.store(backoff, std::memory_order_relaxed);
      contended_until_.store(now + backoff, std::memory_order_relaxed);
    }
  }
  int size() const { return size_; }
  void arrive() {  // at the start of each share
    if (size_ < 2) return;
    const int64_t t = now_ns();
    int64_t seen = latest_.load(std::memory_order_relaxed);
    while (t > seen && !latest_.compare_exchange_weak(seen, t, std::memory_order_relaxed)) {
    }
  }

 private:
  static constexpr int64_t kLateNs = 1000000;
  static constexpr int64_t kMinBackoffNs = 250000000;
  static constexpr int64_t kMaxBackoffNs = 2000000000;
  static constexpr int64_t kRecentNs = 4000000000;
  static constexpr int64_t kShortPass = int64_t(1) << 22;
  static inline std::atomic<int64_t> contended_until_{0};
  static inline std::atomic<int64_t> backoff_ns_{kMinBackoffNs};
  static inline std::atomic<int64_t> last_late_{-kRecentNs};  // (steady clock: 0 is long past)
  static int64_t now_ns() {
    return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
        .count();
  }
  const int size_;
  const int64_t start_;
  std::atomic<int64_t> latest_{0};
};

// Per-thread column accumulators, merged after the parallel region.
struct ColumnPartials {
  std::vector<double> sums;  // threads x cols
  int64_t cols;
  ColumnPartials(int threads, int64_t cols_) : sums(static_cast<size_t>(threads) * cols_, 0.0), cols(cols_) {}
  double* of(int t) { return sums.data() + static_cast<size_t>(t) * cols; }
  void reduce_into(double* out, int threads) const {
    std::copy(sums.data(), sums.data() + cols, out);
    for (int t = 1; t < threads; ++t) {
      const double* p = sums.data() + static_cast<size_t>(t) * cols;
      for (int64_t j = 0; j < cols; ++j) out[j] += p[j];
    }
  }
};

// Column marginals b_j and log b_j (uniform 1/K when log_b is null).
struct ColumnMarginals {
  std::vector<double> log_b, b, zero;  // zero_j = 1 where b_j = 0 exactly (log b_j = -inf), else 0
  ColumnMarginals(const double* log_b_in, int64_t K) : log_b(K), b(K), zero(K) {
    if (!log_b_in) {  // uniform (SwAV): one log, not an exp and a log per column (K = 16000 for SEER)
      std::fill(log_b.begin(), log_b.end(), -std::log(static_cast<double>(K)));
      std::fill(b.begin(), b.end(), 1.0 / static_cast<double>(K));
      return;
    }
    for (int64_t j = 0; j < K; ++j) {
      log_b[j] = log_b_in ? log_b_in[j] : -std::log(static_cast<double>(K));
      b[j] = std::exp(log_b[j]);
      zero[j] = std::isinf(log_b[j]) ? 1.0 : 0.0;
    }
  }
};

// t_j = alpha * x_j + g_j for one row, into buf; returns the row maximum.
template <typename T>
PYM4_SIMD_CLONES T shifted_row(const T* __restrict x, const T* __restrict g, T alpha, T* __restrict buf,
                               int64_t n) {
  T mx = -std::numeric_limits<T>::infinity();
#pragma omp simd reduction(max : mx)
  for (int64_t j = 0; j < n; ++j) {
    const T t = alpha * x[j] + g[j];
    buf[j] = t;
    mx = max_bits(mx, t);
  }
  return mx;
}

// buf_j <- exp(buf_j - mx); returns the sum.
template <typename T>
PYM4_SIMD_CLONES T exp_row(T* __restrict buf, T mx, int64_t n) {
  T s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t j = 0; j < n; ++j) {
    const T e = fast_exp(buf[j] - mx);
    buf[j] = e;
    s += e;
  }
  return s;
}

// e_j = exp(alpha * x_j + g_j - shift) into out; returns the sum. One loop instead of the
// max, then exp, of shifted_row + exp_row, for when a safe shift is known in advance.
template <typename T>
PYM4_SIMD_CLONES T exp_shifted_row(const T* __restrict x, const T* __restrict g, T alpha, T shift,
                                   T* __restrict out, int64_t n) {
  T s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t j = 0; j < n; ++j) {
    const T e = fast_exp(alpha * x[j] + g[j] - shift);
    out[j] = e;
    s += e;
  }
  return s;
}

// acc_j += c * e_j
template <typename T>
PYM4_SIMD_CLONES void axpy_row(T c, const T* __restrict e, T* __restrict acc, int64_t n) {
  for (int64_t j = 0; j < n; ++j) acc[j] += c * e[j];
}

// e_j *= c
template <typename T>
PYM4_SIMD_CLONES void scale_row(T c, T* __restrict e, int64_t n) {
  for (int64_t j = 0; j < n; ++j) e[j] *= c;
}

// One block of rows [i0, i1) of the first column step, optimistically: exponentiate against
// the running column maxima as they stand, in one loop, and fold the block in afterwards
// (shifting a column's maximum up by how much the block exceeded it). Returns false, having
// changed only the probe, when some entry exceeded its column's maximum by more than 60
// (exp would lose accuracy), and always for a thread's first block (maxima still -inf).
template <typename T>
PYM4_SIMD_CLONES bool column_block_optimistic(const T* __restrict x, int64_t ld, T alpha, int64_t i0, int64_t i1,
                                              int64_t K, T* __restrict run_max, T* __restrict run_sum,
                                              T* __restrict blk_over, T* __restrict blk_sum, T* __restrict probe) {
  for (int64_t j = 0; j < K; ++j) {
    blk_over[j] = -std::numeric_limits<T>::infinity();
    blk_sum[j] = T(0);
  }
  for (int64_t i = i0; i < i1; ++i) {
    const T* row = x + i * ld;
    for (int64_t j = 0; j < K; ++j) {
      const T t = alpha * row[j];
      const T d = t - run_max[j];
      blk_over[j] = max_bits(blk_over[j], d);
      blk_sum[j] += fast_exp(d);
      probe[j] += t * T(0);
    }
  }
  T worst = -std::numeric_limits<T>::infinity();
#pragma omp simd reduction(max : worst)
  for (int64_t j = 0; j < K; ++j) worst = max_bits(worst, blk_over[j]);
  if (!(worst <= T(60))) return false;
  for (int64_t j = 0; j < K; ++j) {
    const T up = max_bits(blk_over[j], T(0));
    run_sum[j] = (run_sum[j] + blk_sum[j]) * fast_exp(-up);
    run_max[j] += up;
  }
  return true;
}

// The same block exactly: the block's column maxima first, then the sums against them.
template <typename T>
PYM4_SIMD_CLONES void column_block_update(const T* __restrict x, int64_t ld, T alpha, int64_t i0, int64_t i1,
                                          int64_t K, T* __restrict run_max, T* __restrict run_sum,
                                          T* __restrict blk_max, T* __restrict probe) {
  for (int64_t j = 0; j < K; ++j) blk_max[j] = -std::numeric_limits<T>::infinity();
  for (int64_t i = i0; i < i1; ++i) {
    const T* row = x + i * ld;
    for (int64_t j = 0; j < K; ++j) {
      const T t = alpha * row[j];
      blk_max[j] = max_bits(blk_max[j], t);
      probe[j] += t * T(0);
    }
  }
  for (int64_t j = 0; j < K; ++j) {
    const T new_max = max_bits(run_max[j], blk_max[j]);
    run_sum[j] *= fast_exp(run_max[j] - new_max);
    run_max[j] = new_max;
  }
  for (int64_t i = i0; i < i1; ++i) {
    const T* row = x + i * ld;
    for (int64_t j = 0; j < K; ++j) run_sum[j] += fast_exp(alpha * row[j] - run_max[j]);
  }
}

// exp(x) for x in [-87, 88] (the kernel form's exponents: alpha x_ij minus a shift at most
// 80 from them): the one exponential per entry of the whole solve, and most of its time on
// cores where a 256-bit op is two (measured on Zen 1: 1.4 ns per entry with fast_expf, 0.8
// with this). Cheaper than fast_expf by what the domain allows: no clamping and no zeroing
// below -87 (the callers reach this only for rows whose spread they then check: an entry
// beyond 80 from the shift makes the kernel form decline, and its value is never used; NaN
// or infinite inputs are flagged by the probe), 2^n added to the exponent bits straight from
// the rounding constant's mantissa (bit operations only: no float-to-int conversion, so no
// undefined behaviour for any input, just an unspecified value outside the domain), and a
// degree-5 polynomial fitted for relative error on |r| <= ln2/2 (1.0e-7; max relative error
// 1.9e-7 over [-87, 0] against double exp of the same float argument, checked in float32
// arithmetic without FMA, the baseline clone's). Degree 6 (0.9e-7) costs one more 256-bit
// multiply-add per 8 entries (6% of SEER's first pass) for an error below what the argument
// already carries: alpha x_ij - shift is rounded to float, an error of |t| * 6e-8 in exp(t),
// 1.9e-7 from |t| = 3 up (SwAV's t span 0 .. -66 at epsilon 0.03).
inline float exp_unchecked(float x) {
  const float kRound = 12582912.0f;  // 1.5 * 2^23: n = round(x / ln2) lands in the low mantissa bits
  const float shifted = x * 1.44269504088896341f + kRound;
  const float n = shifted - kRound;
  float r = n * -0.693359375f + x;  // Cody-Waite: ln2 in a short high part...
  r = n * 2.12194440e-4f + r;       // ...and the low remainder
  float p = 8.31785736752292e-3f;
  p = p * r + 4.189817655583761e-2f;
  p = p * r + 1.666718298166187e-1f;
  p = p * r + 4.9999147716839815e-1f;
  p = p * r + 9.999998714219284e-1f;
  p = p * r + 1.0f;
  uint32_t p_bits, n_bits;
  std::memcpy(&p_bits, &p, sizeof p_bits);
  std::memcpy(&n_bits, &shifted, sizeof n_bits);
  // shifted's bits are 0x4B400000 + n (|n| < 2^22): shifted left by 23 they are n * 2^23 mod 2^32.
  p_bits += n_bits << 23;
  float result;
  std::memcpy(&result, &p_bits, sizeof result);
  return result;
}
inline double exp_unchecked(double x) { return std::exp(x); }

// max_j alpha x_j, and min_j in *mn. *probe gets the sum of alpha x_j * 0, which is NaN when
// some alpha x_j is NaN or infinite. Read-only: the exponentials are then taken from x again
// (exp_accumulate_row) instead of storing alpha x and reading it back.
template <typename T>
PYM4_SIMD_CLONES T scaled_row_stats(const T* __restrict x, T alpha, int64_t n, T* mn, T* probe) {
  T mx = -std::numeric_limits<T>::infinity(), lo = std::numeric_limits<T>::infinity(), pr = 0;
#pragma omp simd reduction(max : mx) reduction(min : lo) reduction(+ : pr)
  for (int64_t j = 0; j < n; ++j) {
    const T t = alpha * x[j];
    mx = max_bits(mx, t);
    lo = t < lo ? t : lo;
    pr += t * T(0);
  }
  *mn = lo;
  *probe += pr;
  return mx;
}

// e_j = exp(alpha x_j - mx) into out, and acc_j += c * e_j: the first pass of the kernel form
// in one loop. out may be x itself (an in-place solve): each entry is read before it is
// written, in the same iteration, so no __restrict on them.
template <typename T>
PYM4_SIMD_CLONES void exp_accumulate_row(const T* x, T alpha, T mx, T c, T* out, T* __restrict acc, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    const T e = exp_unchecked(alpha * x[j] - mx);
    out[j] = e;
    acc[j] += c * e;
  }
}

// The same with the shift known before the row (the running maximum of alpha x over the rows
// before it) instead of the row's own maximum, so the row's extremes of d_j = alpha x_j - shift
// (returned: the maximum; *mn: the minimum) and the NaN/Inf probe (*probe += sum d_j * 0) are
// taken in this loop rather than in a read of their own (scaled_row_stats: 0.2 of the 1.6 ns
// per entry of the first pass). e_j = exp(d_j) may then exceed 1 (by e^80 at most where the
// kernel form accepts the matrix); the caller rescales such a row.
template <typename T>
PYM4_SIMD_CLONES T exp_accumulate_row_stats(const T* x, T alpha, T shift, T c, T* out, T* __restrict acc, int64_t n,
                                            T* mn, T* probe) {
  T mx = -std::numeric_limits<T>::infinity(), lo = std::numeric_limits<T>::infinity(), pr = 0;
#pragma omp simd reduction(max : mx) reduction(min : lo) reduction(+ : pr)
  for (int64_t j = 0; j < n; ++j) {
    const T d = alpha * x[j] - shift;
    mx = max_bits(mx, d);
    lo = d < lo ? d : lo;
    pr += d * T(0);
    const T e = exp_unchecked(d);
    out[j] = e;
    acc[j] += c * e;
  }
  *mn = lo;
  *probe += pr;
  return mx;
}

// sum_j e_j w_j, in kLanes independent partial sums: a single vector of sums would chain
// every multiply-add on the one before (4-5 cycles of latency each) and leave the loop
// latency-bound at a third of its throughput (SEER's 16 x 16000: half of every pass).
template <typename T>
PYM4_SIMD_CLONES T dot_row(const T* __restrict e, const T* __restrict w, int64_t n) {
  constexpr int64_t kLanes = 32;  // 4 AVX2 vectors of float
  T acc[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
#pragma omp simd
    for (int64_t l = 0; l < kLanes; ++l) acc[l] += e[j + l] * w[j + l];
  }
  T s = 0;
  for (; j < n; ++j) s += e[j] * w[j];
#pragma omp simd reduction(+ : s)
  for (int64_t l = 0; l < kLanes; ++l) s += acc[l];
  return s;
}

// Four rows at once, so that the operand shared by the rows (the column sums, or w) is
// loaded (and stored) once per four entries instead of once per entry: the passes after the
// first are bound by loads and stores, not arithmetic (Zen 1 does one 256-bit load per cycle
// and a 256-bit store every two: one row at a time, acc_j += c e_j and r += e_j w_j cost four
// loads and a store per vector of entries, four rows at a time 2.3 loads and a quarter store).
// acc_j += c0 e0_j + c1 e1_j + c2 e2_j + c3 e3_j
template <typename T>
PYM4_SIMD_CLONES void axpy_rows4(const T* __restrict c, const T* __restrict e0, const T* __restrict e1,
                                 const T* __restrict e2, const T* __restrict e3, T* __restrict acc, int64_t n) {
  const T c0 = c[0], c1 = c[1], c2 = c[2], c3 = c[3];
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) acc[j] += (c0 * e0[j] + c1 * e1[j]) + (c2 * e2[j] + c3 * e3[j]);
}

// r[k] = sum_j ek_j w_j for the four rows k, each in 16 independent partial sums (as dot_row).
template <typename T>
PYM4_SIMD_CLONES void dot_rows4(const T* __restrict e0, const T* __restrict e1, const T* __restrict e2,
                                const T* __restrict e3, const T* __restrict w, int64_t n, T* __restrict r) {
  constexpr int64_t kLanes = 16;
  T a0[kLanes] = {}, a1[kLanes] = {}, a2[kLanes] = {}, a3[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
#pragma omp simd
    for (int64_t l = 0; l < kLanes; ++l) {
      const T wl = w[j + l];
      a0[l] += e0[j + l] * wl;
      a1[l] += e1[j + l] * wl;
      a2[l] += e2[j + l] * wl;
      a3[l] += e3[j + l] * wl;
    }
  }
  T s0 = 0, s1 = 0, s2 = 0, s3 = 0;
  for (; j < n; ++j) {
    s0 += e0[j] * w[j];
    s1 += e1[j] * w[j];
    s2 += e2[j] * w[j];
    s3 += e3[j] * w[j];
  }
#pragma omp simd reduction(+ : s0, s1, s2, s3)
  for (int64_t l = 0; l < kLanes; ++l) {
    s0 += a0[l];
    s1 += a1[l];
    s2 += a2[l];
    s3 += a3[l];
  }
  r[0] = s0;
  r[1] = s1;
  r[2] = s2;
  r[3] = s3;
}

// The column step of the wide kernel form in T (sums and w in T, the divisions vectorised
// eight to a 256-bit op instead of four in double: at SEER's K = 16000 the double step was a
// seventh of every pass): w_j = b_j / s_j, and 0 for a column of zero mass (zero_j = 1).
// Returns false as column_step does.
template <typename T>
PYM4_SIMD_CLONES bool column_step_t(const T* __restrict zero, const T* __restrict b, const T* __restrict sums,
                                    T* __restrict w, int64_t n) {
  T lo = std::numeric_limits<T>::infinity(), probe = 0;
#pragma omp simd reduction(min : lo) reduction(+ : probe)
  for (int64_t j = 0; j < n; ++j) {
    const T v = b[j] / (sums[j] + zero[j]);
    w[j] = v;
    const T shifted = v + zero[j];
    lo = shifted < lo ? shifted : lo;
    probe += v * T(0);
  }
  return lo > T(0) && probe == T(0);
}

// e_j <- c * e_j * w_j
template <typename T>
PYM4_SIMD_CLONES void scale_row_by(T c, const T* __restrict w, T* __restrict e, int64_t n) {
  for (int64_t j = 0; j < n; ++j) e[j] = c * e[j] * w[j];
}

// The column step of the kernel form: w_j <- b_j / s_j, where s_j = sum_i c_i E_ij are the
// column sums of the row-scaled kernel (the plan's column mass is w_j s_j, so this is
// w_j b_j / mass_j); columns of zero target mass (zero_j = 1, where log b_j = -inf) get
// w_j = 0 (adding zero_j to the divisor keeps 0 / 0 out without a branch). Returns false
// when some other w_j is not a positive, finite float. Written to vectorise: at SEER's
// K = 16000 a scalar loop of divisions was a sixth of the solve.
template <typename T>
PYM4_SIMD_CLONES bool column_step(const double* __restrict zero, const double* __restrict b,
                                  const double* __restrict sums, T* __restrict w, int64_t n) {
  // Checked without a branch per column: lo = min_j (w_j + zero_j) > 0 unless some column
  // with mass got w_j <= 0; the sum of w_j * 0 is 0 unless some w_j is infinite or NaN.
  T lo = std::numeric_limits<T>::infinity(), probe = 0;
#pragma omp simd reduction(min : lo) reduction(+ : probe)
  for (int64_t j = 0; j < n; ++j) {
    const T v = static_cast<T>(b[j] / (sums[j] + zero[j]));
    w[j] = v;
    const T shifted = v + static_cast<T>(zero[j]);
    lo = shifted < lo ? shifted : lo;
    probe += v * T(0);
  }
  return lo > T(0) && probe == T(0);
}

template <typename T>
PYM4_SIMD_CLONES void flush(T* __restrict block, double* __restrict acc, int64_t n) {
  for (int64_t j = 0; j < n; ++j) {
    acc[j] += static_cast<double>(block[j]);
    block[j] = 0;
  }
}

// flush into accumulators not yet holding anything: acc_j = block_j (saves zeroing acc first).
template <typename T>
PYM4_SIMD_CLONES void flush_first(T* __restrict block, double* __restrict acc, int64_t n) {
  for (int64_t j = 0; j < n; ++j) {
    acc[j] = static_cast<double>(block[j]);
    block[j] = 0;
  }
}

// The row step shared by row_pass and write_plan: for every row computes e_ij (into
// `dest(i)`, a buffer or the output row), the row scale c_i = exp(log a_i) / sum_j e_ij,
// applies `finish(i, c_i, e)`, and accumulates c_i * e_ij into the column masses.
//
// e_ij = exp(alpha x_ij + g_j - shift_i) needs a shift that keeps the exponents <= ~0 and
// the row sum away from underflow. The row maximum is always safe but costs a separate
// loop; `shift` (may be null) gives an upper bound known from the previous pass instead
// (see solve), and a row whose sum then falls outside [1e-20, 1e30] is redone with its max.
template <typename T, typename Dest, typename Finish>
void for_each_row(const Matrix<T>& m, const double* g, RowMarginal a, const double* shift, double* col_mass,
                  Dest dest, Finish finish) {
  const int64_t K = m.cols;
  std::vector<T> g_t(K);
  for (int64_t j = 0; j < K; ++j) g_t[j] = static_cast<T>(g[j]);
  const T alpha = static_cast<T>(m.alpha);
  const int threads = pass_threads(m.rows, m.cols);
  ColumnPartials partials(col_mass ? threads : 0, K);

#if defined(PYM4_WITH_OPENMP)
#pragma omp parallel num_threads(threads)
#endif
  {
    const int tid = thread_id();
    std::vector<T> buf(K);
    std::vector<T> block(col_mass ? K : 0, T(0));
    int64_t in_block = 0;
#if defined(PYM4_WITH_OPENMP)
#pragma omp for schedule(static)
#endif
    for (int64_t i = 0; i < m.rows; ++i) {
      T* e = dest(i, buf.data());
      const T* xi = m.data + i * m.ld;
      T mx, s;
      if (shift) {
        mx = static_cast<T>(shift[i]);
        s = exp_shifted_row(xi, g_t.data(), alpha, mx, e, K);
      }
      if (!shift || !(s >= T(1e-20) && s <= T(1e30))) {  // also catches a NaN shift
        mx = shifted_row(xi, g_t.data(), alpha, e, K);
        s = exp_row(e, mx, K);
      }
      // Row i of the plan is exp(log a_i) * e_ij / s: the row maximum cancels out.
      const double log_c = a.at(i) - std::log(static_cast<double>(s));
      const T c = static_cast<T>(std::exp(log_c));
      if (col_mass) {
        axpy_row(c, e, block.data(), K);
        if (++in_block == kFlushRows) {
          flush(block.data(), partials.of(tid), K);
          in_block = 0;
        }
      }
      finish(i, c, e, log_c - static_cast<double>(mx));
    }
    if (col_mass) flush(block.data(), partials.of(tid), K);
  }
  if (col_mass) partials.reduce_into(col_mass, threads);
}

}  // namespace

template <typename T>
bool column_logsumexp(const Matrix<T>& m, double* col_max, double* col_sum) {
  const int64_t K = m.cols;
  const T alpha = static_cast<T>(m.alpha);
  const int threads = pass_threads(m.rows, m.cols);
  std::vector<double> part_max(static_cast<size_t>(threads) * K, -std::numeric_limits<double>::infinity());
  std::vector<double> part_sum(static_cast<size_t>(threads) * K, 0.0);
  std::vector<int> part_finite(threads, 1);
  constexpr int64_t kBlock = 16;  // rows per running-max update
  const int64_t n_blocks = (m.rows + kBlock - 1) / kBlock;
  const bool by_columns = n_blocks < 2 * threads;

#if defined(PYM4_WITH_OPENMP)
#pragma omp parallel num_threads(threads)
#endif
  {
    const int tid = thread_id();
    std::vector<T> run_max(K, -std::numeric_limits<T>::infinity());
    std::vector<T> run_sum(K, T(0));
    std::vector<T> blk_max(K), blk_sum(K);
    std::vector<T> probe(K, T(0));  // sums alpha*x*0: NaN iff some entry is NaN or infinite
    // Each thread takes a share of the row blocks, or, when there are too few rows for that
    // (SEER: 16 x 16000), a slice of the columns over all rows. Unused entries of a thread's
    // partials stay (-inf, 0) and drop out of the merge below.
    auto run_blocks = [&](int64_t b0, int64_t b1, int64_t j0, int64_t j1) {
      bool primed = false;  // a thread's first block sets its maxima exactly
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t i0 = b * kBlock, i1 = std::min(m.rows, i0 + kBlock);
        const T* x = m.data + j0;
        const int64_t w = j1 - j0;
        if (!primed || !column_block_optimistic(x, m.ld, alpha, i0, i1, w, run_max.data() + j0, run_sum.data() + j0,
                                                blk_max.data(), blk_sum.data(), probe.data() + j0))
          column_block_update(x, m.ld, alpha, i0, i1, w, run_max.data() + j0, run_sum.data() + j0, blk_max.data(),
                              probe.data() + j0);
        primed = true;
      }
    };
    if (by_columns) {
      const int team = team_size();
      const int64_t j0 = K * tid / team, j1 = K * (tid + 1) / team;
      if (j1 > j0) run_blocks(0, n_blocks, j0, j1);
    } else {
#if defined(PYM4_WITH_OPENMP)
#pragma omp for schedule(static)
#endif
      for (int t = 0; t < threads; ++t) run_blocks(n_blocks * t / threads, n_blocks * (t + 1) / threads, 0, K);
    }
    bool finite = true;
    for (int64_t j = 0; j < K; ++j) finite = finite && (probe[j] == T(0));
    part_finite[tid] = finite;
    for (int64_t j = 0; j < K; ++j) {
      part_max[static_cast<size_t>(tid) * K + j] = run_max[j];
      part_sum[static_cast<size_t>(tid) * K + j] = run_sum[j];
    }
  }
  for (int t = 0; t < threads; ++t)
    if (!part_finite[t]) return false;
  for (int64_t j = 0; j < K; ++j) {
    double mx = -std::numeric_limits<double>::infinity();
    for (int t = 0; t < threads; ++t) mx = std::max(mx, part_max[static_cast<size_t>(t) * K + j]);
    double s = 0.0;
    for (int t = 0; t < threads; ++t) {
      const double pm = part_max[static_cast<size_t>(t) * K + j];
      if (pm > -std::numeric_limits<double>::infinity()) s += part_sum[static_cast<size_t>(t) * K + j] * std::exp(pm - mx);
    }
    col_max[j] = mx;
    col_sum[j] = s;
  }
  return true;
}

template <typename T>
void row_pass(const Matrix<T>& m, const double* g, RowMarginal a, const double* shift, double* f_out,
              double* col_mass) {
  for_each_row(
      m, g, a, shift, col_mass, [](int64_t, T* buf) { return buf; },
      [f_out](int64_t i, T, T*, double f_i) {
        // f_i = log a_i - LSE_j(alpha x_ij + g_j) = log c_i - (row maximum)
        if (f_out) f_out[i] = f_i;
      });
}

template <typename T>
void write_plan(const Matrix<T>& m, const double* g, RowMarginal a, const double* shift, T* out, int64_t ld_out,
                double* col_mass) {
  // Written in place: the output row is the scratch buffer, then scaled by c_i.
  advise_huge_pages(out, static_cast<size_t>(m.rows) * static_cast<size_t>(ld_out) * sizeof(T));
  for_each_row(
      m, g, a, shift, col_mass, [out, ld_out](int64_t i, T*) { return out + i * ld_out; },
      [K = m.cols](int64_t, T c, T* e, double) { scale_row(c, e, K); });
}

namespace {

// The log-domain solve: three kinds of streaming pass, an exponential per entry per pass.
// When the marginal error is measured (see Options::check_every), and what follows from it.
struct Schedule {
  int64_t every;
  double tol;
  Schedule(const Options& opt, double tol_) : every(opt.check_every > 0 ? opt.check_every : (tol_ > 0 ? 1 : 0)),
                                              tol(tol_) {}
  bool measures() const { return every > 0; }
  bool at(int64_t it) const { return every > 0 && (it - 1) % every == 0; }
  // Records the error of iteration `it`; true when it stops the solve.
  bool record(Result& r, double err) const {
    r.marginal_error = err;
    r.errors.push_back(err);
    r.converged = tol > 0 && err < tol;
    return r.converged;
  }
};

template <typename T>
Result solve_log_domain(const Matrix<T>& m, const double* log_b, RowMarginal a, int64_t n_iters, double tol,
                        double log_out_scale, T* out, int64_t ld_out, double* g_out, const Options& opt) {
  const int64_t K = m.cols;
  Result result;
  const Schedule sched(opt, tol);
  std::vector<double> g(K), col_max(K), col_sum(K), col_mass(K);
  // The column marginals, in log and linear form, computed once (not per column per iteration).
  const ColumnMarginals marg(log_b, K);
  auto lb = [&](int64_t j) { return marg.log_b[j]; };
  if (opt.g_init) {
    std::copy(opt.g_init, opt.g_init + K, g.begin());
  } else {
    if (!column_logsumexp(m, col_max.data(), col_sum.data())) {
      result.finite = false;
      return result;
    }
    // First column step from f = 0: g_j = log b_j - LSE_i(alpha x_ij).
    for (int64_t j = 0; j < K; ++j) g[j] = lb(j) - (col_max[j] + std::log(col_sum[j]));
  }
  // Row shifts for the fused exp loop. After a column step every entry of the plan is at
  // most its column's mass, so alpha x_ij + g_j <= max_j log b_j for every row.
  double max_lb = -std::numeric_limits<double>::infinity();
  for (int64_t j = 0; j < K; ++j) max_lb = std::max(max_lb, lb(j));
  std::vector<double> f(m.rows), shift(m.rows, max_lb);

  auto marginal_error = [&]() {
    double e2 = 0.0;
    for (int64_t j = 0; j < K; ++j) {
      const double d = col_mass[j] - marg.b[j];
      e2 += d * d;
    }
    return std::sqrt(e2);
  };

  RowMarginal out_rows = a;  // the write step scales rows by exp(log_out_scale) as well
  std::vector<double> scaled_log_a;
  if (a.log_a) {
    scaled_log_a.assign(a.log_a, a.log_a + m.rows);
    for (double& v : scaled_log_a) v += log_out_scale;
    out_rows.log_a = scaled_log_a.data();
  } else {
    out_rows.log_a_scalar += log_out_scale;
  }

  for (int64_t it = 1; it <= n_iters; ++it) {
    interrupt::check();
    result.iterations = it;
    if (it == n_iters) break;  // the last row step is the write below
    row_pass(m, g.data(), a, shift.data(), f.data(), col_mass.data());
    if (sched.at(it) && sched.record(result, marginal_error())) break;
    // Column step: rescale every column to its marginal b_j (a zero-mass column stays at
    // -inf rather than becoming -inf - (-inf) = NaN).
    double max_step = -std::numeric_limits<double>::infinity();
    for (int64_t j = 0; j < K; ++j) {
      if (std::isinf(lb(j))) {
        g[j] = lb(j);
        continue;
      }
      const double step = lb(j) - std::log(col_mass[j]);
      g[j] += step;
      max_step = std::max(max_step, step);
    }
    // The row step left alpha x_ij + g_j + f_i <= log a_i, so with the new g the exponents
    // of row i are at most log a_i - f_i + max_j step_j.
    for (int64_t i = 0; i < m.rows; ++i) shift[i] = a.at(i) - f[i] + max_step;
  }
  // The write pass also measures the column marginals (they have a scale of exp(log_out_scale)).
  const bool measure = sched.measures();
  write_plan(m, g.data(), out_rows, shift.data(), out, ld_out, measure ? col_mass.data() : nullptr);
  if (measure) {
    const double inv_scale = std::exp(-log_out_scale);
    for (int64_t j = 0; j < K; ++j) col_mass[j] *= inv_scale;
    // A solve that stopped on tol wrote the plan of the iteration it measured: not again.
    if (!result.converged && sched.at(result.iterations))
      sched.record(result, marginal_error());
    else
      result.marginal_error = marginal_error();
  }
  if (g_out) std::copy(g.begin(), g.end(), g_out);
  return result;
}

// Largest spread of alpha * x for which the kernel form is exact: every entry of
// exp(alpha x - max) then stays a normal number (float: e^-80 > 1.2e-38).
template <typename T>
constexpr double kernel_form_range() { return sizeof(T) == 4 ? 80.0 : 650.0; }

// The kernel (scaling) form, used when the spread of alpha * x allows it: the first pass
// stores E_ij = exp(alpha x_ij - m_i) (m_i the row maximum) in `out` and takes the first
// column sums; every later iteration is then one read of E with two multiply-adds per entry
// (r_i = E_i . w, then column sums of (a_i / r_i) E_i) and no exponential, and the last
// pass scales E into the plan in place: P_ij = E_ij w_j a_i / r_i, w_j = exp(g_j + M) with
// M = max_ij alpha x_ij. Returns false, with nothing written that the caller keeps, when the
// spread is too large or a scaling factor leaves the float range; the caller then runs the
// log-domain solve, which is exact for any spread.
template <typename T>
bool solve_kernel_form(const Matrix<T>& m, const double* log_b, RowMarginal a, int64_t n_iters, double tol,
                       double log_out_scale, T* out, int64_t ld_out, double* g_out, const Options& opt,
                       Result& result) {
  const Schedule sched(opt, tol);
  const int64_t K = m.cols, B = m.rows;
  const T alpha = static_cast<T>(m.alpha);
  // Rows are cut into `shares` contiguous ranges, one per thread; partial sums are kept per
  // share, so the result does not depend on which thread ran which share.
  const int shares = pass_threads(B, K);
  auto share_rows = [&](int t) { return std::make_pair(B * t / shares, B * (t + 1) / shares); };
  // The column marginals, in log and linear form, computed once (not per column per iteration).
  const ColumnMarginals marg(log_b, K);
  auto lb = [&](int64_t j) { return marg.log_b[j]; };

  advise_huge_pages(out, static_cast<size_t>(B) * static_cast<size_t>(ld_out) * sizeof(T));
  // Pass 1: E into out; per share, column sums of E_ij exp(m_i - R_t) with R_t the share's
  // first row maximum, the share's extremes of alpha x, and the NaN/Inf probe.
  ColumnPartials first(shares, K);
  std::vector<double> ref(shares), hi(shares), lo(shares), probe(shares);
  {
  Team team(shares, B * K);
#if defined(PYM4_WITH_OPENMP)
#pragma omp parallel for schedule(static) num_threads(team.size())
#endif
  for (int t = 0; t < shares; ++t) {
    team.arrive();
    const auto [r0, r1] = share_rows(t);
    std::vector<T> block(K, T(0));
    T t_probe = 0, t_lo = std::numeric_limits<T>::infinity(), t_hi = -std::numeric_limits<T>::infinity(), r_t = 0;
    for (int64_t i = r0; i < r1; ++i) {
      T* e = out + i * ld_out;
      const T* xi = m.data + i * m.ld;
      if (i == r0) {  // the share's first row: its maximum first (R_t), then the exponentials
        T row_lo;
        r_t = t_hi = scaled_row_stats(xi, alpha, K, &row_lo, &t_probe);
        t_lo = row_lo;
        exp_accumulate_row(xi, alpha, r_t, T(1), e, block.data(), K);
      } else {
        // Shifted by the running maximum t_hi: E_ij = exp(alpha x_ij - t_hi) <= 1 unless the
        // row sets a new maximum (rare after the first rows), whose E row is then rescaled to
        // it. The column sums take exp(alpha x_ij - R_t) whatever the shift.
        T d_lo;
        const T d_hi = exp_accumulate_row_stats(xi, alpha, t_hi, static_cast<T>(fast_exp(t_hi - r_t)), e,
                                                block.data(), K, &d_lo, &t_probe);
        t_lo = std::min(t_lo, t_hi + d_lo);
        if (d_hi > T(0)) {
          scale_row(static_cast<T>(fast_exp(-d_hi)), e, K);
          t_hi += d_hi;
        }
      }
      if ((i - r0 + 1) % kFlushRows == 0) flush(block.data(), first.of(t), K);
    }
    flush(block.data(), first.of(t), K);
    ref[t] = r_t;
    hi[t] = t_hi;
    lo[t] = t_lo;
    probe[t] = t_probe;
  }
  }
  double global_hi = -std::numeric_limits<double>::infinity(), global_lo = std::numeric_limits<double>::infinity();
  for (int t = 0; t < shares; ++t) {
    if (!(probe[t] == 0.0)) {  // NaN or Inf somewhere in alpha * x
      result.finite = false;
      return true;
    }
    global_hi = std::max(global_hi, hi[t]);
    global_lo = std::min(global_lo, lo[t]);
  }
  if (!(global_hi - global_lo <= kernel_form_range<T>())) return false;
  result.max_abs_exponent = std::max(std::abs(global_hi), std::abs(global_lo));

  // First column step: w_j = b_j / sum_i exp(alpha x_ij - M), the sums rebased from R_t to M.
  std::vector<double> col(K, 0.0);
  for (int t = 0; t < shares; ++t) {
    const double rebase = std::exp(ref[t] - global_hi);
    const double* p = first.of(t);
    for (int64_t j = 0; j < K; ++j) col[j] += p[j] * rebase;
  }
  std::vector<T> w(K, T(1));  // g_j = log w_j - M (see g_out below)
  if (opt.g_init) {
    for (int64_t j = 0; j < K; ++j) {
      w[j] = static_cast<T>(std::exp(opt.g_init[j] + global_hi));
      if (!(std::isfinite(static_cast<double>(w[j])) && (w[j] > T(0) || std::isinf(lb(j))))) return false;
    }
  } else if (!column_step(marg.zero.data(), marg.b.data(), col.data(), w.data(), K)) {
    return false;
  }

  auto marginal_error = [&](const std::vector<double>& mass) {
    double e2 = 0.0;
    for (int64_t j = 0; j < K; ++j) {
      const double d = mass[j] - marg.b[j];
      e2 += d * d;
    }
    return std::sqrt(e2);
  };
  // One read of E: the row sums r_i = E_i . w, the row scales c_i = a_i / r_i, and (with
  // want_sums) the column sums s_j = sum_i c_i E_ij, into `sums`. With `write`, the plan
  // times exp(log_out_scale) replaces E, and s_j are its column sums. Returns false when some
  // r_i is not a positive float (before any write, every row of E still holds only positive
  // entries, so this cannot happen mid-write).
  // Scratch shared by every pass (allocated once: at SEER's 16 x 16000 a pass is only tens of
  // microseconds, as long as allocating and zeroing these): per share, the column sums in
  // double and a float block of rows not yet flushed into them (flush leaves it zeroed).
  ColumnPartials acc(shares, K);
  std::vector<T> blocks(static_cast<size_t>(shares) * K, T(0));
  std::vector<double> sums_buf(shares > 1 ? K : 0);
  const double* sums = shares > 1 ? sums_buf.data() : acc.of(0);  // one share: its own sums
  auto pass = [&](bool write, bool want_sums) {
    int bad = 0;
    const double extra = write ? log_out_scale : 0.0;
    Team team(shares, B * K);
#if defined(PYM4_WITH_OPENMP)
#pragma omp parallel for schedule(static) num_threads(team.size()) reduction(| : bad)
#endif
    for (int t = 0; t < shares; ++t) {
      team.arrive();
      const auto [r0, r1] = share_rows(t);
      T* block = blocks.data() + static_cast<size_t>(t) * K;
      bool flushed = false;
      int64_t in_block = 0;  // rows added into `block` since its last flush
      auto scale_of = [&](int64_t i, T r) {
        if (!(r > T(0)) || !(r < std::numeric_limits<T>::infinity())) bad = 1;
        return static_cast<T>(std::exp(a.at(i) + extra) / static_cast<double>(r));
      };
      // Four rows at a time (see axpy_rows4), the rest one by one; `block` is flushed into
      // double every kFlushRows rows (a multiple of 4) as before. The four rows are a quarter
      // of the share apart (rows r0 + g + k q, q = a quarter of the share's rows), not
      // adjacent: each of the four then reads one long sequential run of E through the pass,
      // instead of four runs that restart at the next group every 12 KB (K = 3000). Measured
      // on one Zen 4 core (two cores were shared with other runs), solves 8% faster at
      // 4096 x 3000 and 5-13% at 16384 x 3000 (E from DRAM), the same at 256 x 3000 (E in
      // cache), in A/B runs alternating in one process. Only the order of the column sums'
      // additions changes (the plan moves by a few float32 ulps).
      const int64_t quarter = (r1 - r0) / 4;
      const int64_t groups = quarter + (r1 - r0 - 4 * quarter);  // then the last rows one by one
      for (int64_t g = 0; g < groups; ++g) {
        const int64_t rows = g < quarter ? 4 : 1;
        int64_t row[4] = {g < quarter ? r0 + g : r0 + 3 * quarter + g, 0, 0, 0};
        T* e[4] = {out + row[0] * ld_out, nullptr, nullptr, nullptr};
        T c[4];
        if (rows == 4) {
          for (int k = 1; k < 4; ++k) {
            row[k] = row[0] + k * quarter;
            e[k] = out + row[k] * ld_out;
          }
          T r4[4];
          dot_rows4(e[0], e[1], e[2], e[3], w.data(), K, r4);
          for (int k = 0; k < 4; ++k) c[k] = scale_of(row[k], r4[k]);
        } else {
          c[0] = scale_of(row[0], dot_row(e[0], w.data(), K));
        }
        if (bad) break;  // the pass is discarded (see above)
        if (write)
          for (int k = 0; k < rows; ++k) {
            scale_row_by(c[k], w.data(), e[k], K);
            c[k] = T(1);  // the sums are of the plan just written
          }
        if (want_sums) {
          if (rows == 4)
            axpy_rows4(c, e[0], e[1], e[2], e[3], block, K);
          else
            axpy_row(c[0], e[0], block, K);
          in_block += rows;
          if (in_block >= kFlushRows) {
            flushed ? flush(block, acc.of(t), K) : flush_first(block, acc.of(t), K);
            flushed = true;
            in_block = 0;
          }
        }
      }
      if (want_sums) flushed ? flush(block, acc.of(t), K) : flush_first(block, acc.of(t), K);
    }
    if (want_sums && shares > 1) acc.reduce_into(sums_buf.data(), shares);
    return bad == 0;
  };

  std::vector<double> col_mass(K);  // the plan's column masses, when measured
  for (int64_t it = 1; it <= n_iters; ++it) {
    interrupt::check();
    result.iterations = it;
    if (it == n_iters) break;  // the last row step is the write below
    if (!pass(false, true)) return false;
    if (sched.at(it)) {
      for (int64_t j = 0; j < K; ++j) col_mass[j] = sums[j] * static_cast<double>(w[j]);
      if (sched.record(result, marginal_error(col_mass))) break;
    }
    if (!column_step(marg.zero.data(), marg.b.data(), sums, w.data(), K)) return false;
  }
  // Every E_ij >= e^-range > 0 and every w_j is a positive float (or 0 for a zero-mass
  // column, which every row still has others beside), so the row sums of the write are positive.
  const bool measure = sched.measures();
  pass(true, measure);
  if (measure) {
    const double inv_scale = std::exp(-log_out_scale);  // the write's sums are of the plan times the scale
    for (int64_t j = 0; j < K; ++j) col_mass[j] = sums[j] * inv_scale;
    const double err = marginal_error(col_mass);
    if (!result.converged && sched.at(result.iterations))
      sched.record(result, err);
    else
      result.marginal_error = err;
  }
  if (g_out)
    for (int64_t j = 0; j < K; ++j) g_out[j] = std::log(static_cast<double>(w[j])) - global_hi;
  return true;
}

// The kernel form for a wide matrix (few rows, SEER's 16 x 16000), with each iteration's
// column step and the next row step fused into one pass. E is taken in column tiles of all
// rows (a tile stays in L2): the column sums s_j = sum_i c_i E_ij of the tile, its column
// step w_j, and the tile's part of the next row sums r_i = sum_j E_ij w_j are done while it
// is there, so every per-column quantity stays in the tile, and threads take contiguous
// ranges of tiles, adding their partial row sums (B values) after the pass. Split by rows
// instead, few rows give each thread a whole K-vector of column sums to flush and merge per
// pass (SEER's solve on two threads: 1.41 ms by rows, 0.80 ms by tiles; on one thread both
// 1.26 ms, measured best of 41 on two Zen 1 cores). Same iterates as solve_kernel_form (the
// sums are grouped differently); without a tolerance or a warm start only (the caller
// checks), as SwAV and SEER run. Returns false like it.
template <typename T>
bool solve_kernel_form_wide(const Matrix<T>& m, const double* log_b, RowMarginal a, int64_t n_iters,
                            double log_out_scale, T* out, int64_t ld_out, double* g_out, Result& result) {
  const int64_t K = m.cols, B = m.rows;
  const T alpha = static_cast<T>(m.alpha);
  advise_huge_pages(out, static_cast<size_t>(B) * static_cast<size_t>(ld_out) * sizeof(T));

  // Tiles of about 128 KB (a multiple of 64 columns), so that a tile read for the column sums
  // is still in L2 for the row sums, while each row's part of it is long enough (8 KB at
  // SEER's shape) for the prefetcher to stream it (16 KB tiles of 1 KB pieces: 30% slower);
  // at least one tile per thread.
  const int threads = pass_threads(B, K);
  const int64_t by_cache = (int64_t(1) << 17) / (B * static_cast<int64_t>(sizeof(T)));
  const int64_t by_threads = (K + threads - 1) / threads;
  const int64_t tile = std::max<int64_t>(64, (std::min(by_cache, by_threads) + 63) & ~int64_t(63));
  const int64_t n_tiles = (K + tile - 1) / tile;
  const int shares = static_cast<int>(std::min<int64_t>(threads, n_tiles));
  auto share_tiles = [&](int t) { return std::make_pair(n_tiles * t / shares, n_tiles * (t + 1) / shares); };

  // Each row's maximum (its shift), the extremes of alpha x, and the NaN/Inf probe, first:
  // the column sums of the first pass weigh row i by exp(m_i - M), M the global maximum.
  // Read by the same team and tile ranges as the passes (one thread: 8% of SEER's solve).
  std::vector<T> part_max(static_cast<size_t>(shares) * B), part_lo(static_cast<size_t>(shares) * B);
  std::vector<T> part_probe(shares);
  {
    Team team(shares, B * K);
#if defined(PYM4_WITH_OPENMP)
#pragma omp parallel for schedule(static) num_threads(team.size())
#endif
    for (int t = 0; t < shares; ++t) {
      team.arrive();
      const auto [b0, b1] = share_tiles(t);
      const int64_t j0 = b0 * tile, n = std::min(b1 * tile, K) - j0;
      T pr = 0;
      for (int64_t i = 0; i < B; ++i)
        part_max[static_cast<size_t>(t) * B + i] =
            scaled_row_stats(m.data + i * m.ld + j0, alpha, n, &part_lo[static_cast<size_t>(t) * B + i], &pr);
      part_probe[t] = pr;
    }
  }
  std::vector<T> row_max(B, -std::numeric_limits<T>::infinity());
  T probe = 0, lo = std::numeric_limits<T>::infinity(), hi = -std::numeric_limits<T>::infinity();
  for (int t = 0; t < shares; ++t) {
    probe += part_probe[t];
    for (int64_t i = 0; i < B; ++i) {
      row_max[i] = std::max(row_max[i], part_max[static_cast<size_t>(t) * B + i]);
      lo = std::min(lo, part_lo[static_cast<size_t>(t) * B + i]);
    }
  }
  for (int64_t i = 0; i < B; ++i) hi = std::max(hi, row_max[i]);
  if (!(probe == T(0))) {
    result.finite = false;
    return true;
  }
  if (!(static_cast<double>(hi) - static_cast<double>(lo) <= kernel_form_range<T>())) return false;
  result.max_abs_exponent = std::max(std::abs(static_cast<double>(hi)), std::abs(static_cast<double>(lo)));

  // The column marginals in T for column_step_t (zero_t_j = 1 where b_j = 0 exactly).
  std::vector<T> c(B), w(K), b_t(K, static_cast<T>(1.0 / static_cast<double>(K))), zero_t(K, T(0));
  if (log_b)
    for (int64_t j = 0; j < K; ++j) {
      b_t[j] = static_cast<T>(std::exp(log_b[j]));
      zero_t[j] = std::isinf(log_b[j]) ? T(1) : T(0);
    }
  std::vector<double> r_part(static_cast<size_t>(shares) * B), row_sum(B);
  for (int64_t i = 0; i < B; ++i) c[i] = static_cast<T>(std::exp(static_cast<double>(row_max[i]) - hi));

  // One fused pass: (first) E_ij = exp(alpha x_ij - m_i) into out; the column sums with the
  // row scales c, the column step into w, and the row sums r_i = E_i . w; then c_i = a_i / r_i.
  auto pass = [&](bool first) {
    int bad = 0;
    Team team(shares, B * K);
#if defined(PYM4_WITH_OPENMP)
#pragma omp parallel for schedule(static) num_threads(team.size()) reduction(| : bad)
#endif
    for (int t = 0; t < shares; ++t) {
      team.arrive();
      double* r = r_part.data() + static_cast<size_t>(t) * B;
      std::fill(r, r + B, 0.0);
      std::vector<T> s(tile);
      for (int64_t b = share_tiles(t).first; b < share_tiles(t).second; ++b) {
        const int64_t j0 = b * tile, n = std::min(tile, K - j0);
        std::fill(s.begin(), s.begin() + n, T(0));
        auto e = [&](int64_t i) { return out + i * ld_out + j0; };
        int64_t i = 0;
        if (first) {
          for (; i < B; ++i) exp_accumulate_row(m.data + i * m.ld + j0, alpha, row_max[i], c[i], e(i), s.data(), n);
        } else {
          for (; i + 4 <= B; i += 4) axpy_rows4(c.data() + i, e(i), e(i + 1), e(i + 2), e(i + 3), s.data(), n);
          for (; i < B; ++i) axpy_row(c[i], e(i), s.data(), n);
        }
        if (!column_step_t(zero_t.data() + j0, b_t.data() + j0, s.data(), w.data() + j0, n)) bad = 1;
        i = 0;
        for (; i + 4 <= B; i += 4) {
          T r4[4];
          dot_rows4(e(i), e(i + 1), e(i + 2), e(i + 3), w.data() + j0, n, r4);
          for (int k = 0; k < 4; ++k) r[i + k] += static_cast<double>(r4[k]);
        }
        for (; i < B; ++i) r[i] += static_cast<double>(dot_row(e(i), w.data() + j0, n));
      }
    }
    for (int64_t i = 0; i < B; ++i) {
      double r = 0.0;
      for (int t = 0; t < shares; ++t) r += r_part[static_cast<size_t>(t) * B + i];
      if (!(r > 0.0) || !(r < static_cast<double>(std::numeric_limits<T>::max()))) bad = 1;
      row_sum[i] = r;
      c[i] = static_cast<T>(std::exp(a.at(i)) / r);
    }
    return bad == 0;
  };

  for (int64_t it = 1; it <= n_iters; ++it) {
    interrupt::check();
    result.iterations = it;
    if (!pass(it == 1)) return false;
  }
  // The plan times exp(log_out_scale): P_ij = c_i E_ij w_j, in place (row by row: a few rows,
  // each as long as a whole tile range; no sums to share).
  Team team(shares, B * K);
#if defined(PYM4_WITH_OPENMP)
#pragma omp parallel for schedule(static) num_threads(team.size())
#endif
  for (int64_t i = 0; i < B; ++i) {
    team.arrive();
    scale_row_by(static_cast<T>(std::exp(a.at(i) + log_out_scale) / row_sum[i]), w.data(), out + i * ld_out, K);
  }
  if (g_out)
    for (int64_t j = 0; j < K; ++j) g_out[j] = std::log(static_cast<double>(w[j])) - static_cast<double>(hi);
  return true;
}

}  // namespace

template <typename T>
Result solve(const Matrix<T>& m, const double* log_b, RowMarginal a, int64_t n_iters, double tol,
             double log_out_scale, T* out, int64_t ld_out, double* g_out, const Options& opt) {
  Result result;
  // Few rows: the fused column-tile passes (no tolerance or warm start there: SwAV, SEER).
  constexpr int64_t kWideRows = 64;
  const bool wide = m.rows <= kWideRows && tol <= 0 && opt.check_every == 0 && !opt.g_init;
  if (wide ? solve_kernel_form_wide(m, log_b, a, n_iters, log_out_scale, out, ld_out, g_out, result)
           : solve_kernel_form(m, log_b, a, n_iters, tol, log_out_scale, out, ld_out, g_out, opt, result)) {
    result.kernel_form = result.finite;
    return result;
  }
  if (static_cast<const void*>(m.data) == static_cast<const void*>(out)) {
    result.solved = false;  // in place: the input is gone, the log domain cannot run on it
    return result;
  }
  result = Result();  // the kernel form may have recorded errors before declining
  return solve_log_domain(m, log_b, a, n_iters, tol, log_out_scale, out, ld_out, g_out, opt);
}

#define PYM4_SINKHORN_INSTANTIATE(T)                                                                   \
  template bool column_logsumexp<T>(const Matrix<T>&, double*, double*);                               \
  template void row_pass<T>(const Matrix<T>&, const double*, RowMarginal, const double*, double*, double*); \
  template void write_plan<T>(const Matrix<T>&, const double*, RowMarginal, const double*, T*, int64_t,   \
                              double*);                                                                   \
  template Result solve<T>(const Matrix<T>&, const double*, RowMarginal, int64_t, double, double, T*, \
                           int64_t, double*, const Options&);
PYM4_SINKHORN_INSTANTIATE(float)
PYM4_SINKHORN_INSTANTIATE(double)

}  // namespace sinkhorn
}  // namespace pym4
