// Private helpers shared by the M4 CPU kernels (m4.cpp: stream, metrics; m4_exact.cpp: the
// exact solver's passes and the pattern table): row access and OpenMP range splitting.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
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

// The threads a pass over n rows runs on: all of them when n is large, else one.
inline int team_size(int64_t n) { return n >= kParallelMin ? max_threads() : 1; }

// Runs body(begin, end) on contiguous ranges in parallel (no reduction).
template <typename Body>
void parallel_ranges(int64_t n, Body body) {
  const int T = team_size(n);
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

// Runs body(t, T, begin, end) on the T contiguous ranges of n (T threads when n is large,
// else one), for passes whose per-thread results are not plain sums (minima, maxima).
template <typename Body>
void parallel_threads(int64_t n, Body body) {
  const int T = team_size(n);
  if (T == 1) {
    body(0, 1, int64_t(0), n);
    return;
  }
#if defined(PYM4_WITH_OPENMP)
#pragma omp parallel num_threads(T)
#endif
  {
    const int t = thread_id();
    int64_t b, e;
    range_of(n, t, T, b, e);
    body(t, T, b, e);
  }
}

// ----- dense labels, few groups: one margin vector per s-pattern ----------------------------
// With dense 0/1 label rows and m <= kPatternGroups, a row's groups are its s-pattern sigma
// (bit k set when s_ik = 1) and a_i = (sigma - pi) (x) [1; y_i], so
//     a_i^T w = W_sigma[0] + y_i . W_sigma[1:],   W_sigma = sum_k (sigma_k - pi_k) w_k,
// one c-dot per row instead of m, and every sum over rows of f_i a_i (or f_i (s_ik - pi_k)^2
// [1; y_i]) is sum_sigma (sigma_k - pi_k)^e P_sigma with P_sigma = sum over the rows of
// pattern sigma of f_i [1; y_i]: a pass accumulates one (c+1)-vector per row into its
// pattern's P and folds the 2^m of them into per-group sums at the end.
constexpr int64_t kPatternGroups = 4;

inline bool by_pattern(const Data& d) { return d.m <= kPatternGroups && (d.y != nullptr || d.c == 0); }

// Row i's dense labels (c bytes; with c = 0 the pointer is never read and may be null).
inline const uint8_t* dense_row(const Data& d, int64_t i) { return d.c ? d.y + i * d.ld_y : d.y; }

inline int64_t pattern_of(const uint8_t* s, int64_t m) {  // m <= kPatternGroups
  int64_t sg = 0;
  switch (m) {  // unrolled: a loop over m is a loop the compiler vectorises for large m
    case 4: sg |= static_cast<int64_t>(s[3] != 0) << 3; [[fallthrough]];
    case 3: sg |= static_cast<int64_t>(s[2] != 0) << 2; [[fallthrough]];
    case 2: sg |= static_cast<int64_t>(s[1] != 0) << 1; [[fallthrough]];
    case 1: sg |= static_cast<int64_t>(s[0] != 0); break;
    default: break;
  }
  return sg;
}

inline double pattern_coef(int64_t sg, int64_t k, const double* pi) {
  return static_cast<double>((sg >> k) & 1) - pi[k];
}

// The per-pattern arrays (margin vectors W_sigma, sums P_sigma) are stored padded: pattern
// sigma's (c+1)-vector starts at sigma S + 3, S = pattern_stride(c), so that its label part
// (from sigma S + 4) is 32-byte aligned in a 64-byte aligned buffer. Vector loads and stores
// must not straddle cache lines there: a split store defeats the store forwarding that the
// next row's update of the same sums waits on.
inline int64_t pattern_stride(int64_t c) { return 4 + (c + 3) / 4 * 4; }
inline int64_t pattern_at(int64_t sg, int64_t S) { return sg * S + 3; }

// A zeroed buffer of n doubles whose data is 64-byte aligned.
struct AlignedDoubles {
  std::vector<double> raw;
  double* p;
  explicit AlignedDoubles(size_t n) : raw(n + 8, 0.0) {
    const uintptr_t a = reinterpret_cast<uintptr_t>(raw.data());
    p = raw.data() + ((64 - a % 64) % 64) / sizeof(double);
  }
  double* data() { return p; }
  void zero(size_t n) { std::fill(p, p + n, 0.0); }
};

// Runs body(begin, end, acc) on contiguous ranges in parallel, each with its own zeroed
// accumulator of `width` doubles, and adds the accumulators into out in thread order. The
// accumulators are 64-byte aligned and a whole number of cache lines apart, so that two
// threads never write one line and vector loads never straddle one.
template <typename Body>
void parallel_accumulate(int64_t n, int64_t width, double* out, Body body) {
  const int T = team_size(n);
  const int64_t stride = (width + 7) / 8 * 8;
  AlignedDoubles partial(static_cast<size_t>(T) * stride);
  parallel_threads(n, [&](int t, int, int64_t b, int64_t e) {
    body(b, e, partial.data() + static_cast<size_t>(t) * stride);
  });
  for (int t = 0; t < T; ++t)
    for (int64_t j = 0; j < width; ++j) out[j] += partial.data()[static_cast<size_t>(t) * stride + j];
}

// W (padded, 2^m patterns) = the per-pattern margin vectors of w (m x (c+1)).
inline void pattern_weights(int64_t m, int64_t c, const double* pi, const double* w, double* W) {
  const int64_t L = c + 1, nP = int64_t(1) << m, S = pattern_stride(c);
  for (int64_t sg = 0; sg < nP; ++sg) {
    double* Ws = W + pattern_at(sg, S);
    for (int64_t a = 0; a < L; ++a) Ws[a] = 0.0;
    for (int64_t k = 0; k < m; ++k) {
      const double dk = pattern_coef(sg, k, pi);
      for (int64_t a = 0; a < L; ++a) Ws[a] += dk * w[k * L + a];
    }
  }
}

// out (m x (c+1), +=): sum_sigma (sigma_k - pi_k)^power P_sigma (P padded), power 1 or 2.
inline void fold_groups(int64_t m, int64_t c, const double* pi, const double* P, int power, double* out) {
  const int64_t L = c + 1, nP = int64_t(1) << m, S = pattern_stride(c);
  for (int64_t k = 0; k < m; ++k)
    for (int64_t sg = 0; sg < nP; ++sg) {
      const double dk = pattern_coef(sg, k, pi);
      const double f = power == 1 ? dk : dk * dk;
      const double* Ps = P + pattern_at(sg, S);
      for (int64_t a = 0; a < L; ++a) out[k * L + a] += f * Ps[a];
    }
}

// counts (weighted_counts layout, +=) from P_sigma = sum over the rows of sigma of q_i [1; y_i]
// (padded).
inline void fold_counts(int64_t m, int64_t c, const double* P, double* counts) {
  const int64_t nP = int64_t(1) << m, S = pattern_stride(c);
  double* qs = counts + 1;
  double* qy = counts + 1 + m;
  double* qsy = counts + 1 + m + c;
  for (int64_t sg = 0; sg < nP; ++sg) {
    const double* Ps = P + pattern_at(sg, S);
    counts[0] += Ps[0];
    for (int64_t r = 0; r < c; ++r) qy[r] += Ps[1 + r];
    for (int64_t k = 0; k < m; ++k) {
      if (!((sg >> k) & 1)) continue;
      qs[k] += Ps[0];
      for (int64_t r = 0; r < c; ++r) qsy[k * c + r] += Ps[1 + r];
    }
  }
}


// ----- vectors of four doubles, and 0/1 bytes widened through a table -----------------------
// The row loops below run over the labels eight at a time as two vectors of four doubles
// (GCC's vector extensions: whole registers in every ISA clone). The widening of eight 0/1
// bytes takes no per-byte work: one multiply gathers their bits into a byte (byte k -> bit
// k) and each half indexes a table of the 16 vectors of four 0/1 doubles. The partial sums
// of the dot products are combined in a fixed order, so results do not depend on the clone.
// The remainder (c % 8 labels) runs one by one.
#if defined(__GNUC__)
#define PYM4_M4_VEC 1
typedef double f64x4 __attribute__((vector_size(32)));

struct Nibbles {
  alignas(32) double v[16][4];
  constexpr Nibbles() : v() {
    for (int b = 0; b < 16; ++b)
      for (int u = 0; u < 4; ++u) v[b][u] = static_cast<double>((b >> u) & 1);
  }
};
constexpr Nibbles kNibbles;

inline unsigned bits8(const uint8_t* p) {  // bit k = byte k (0/1 bytes)
  uint64_t x;
  std::memcpy(&x, p, 8);
  return static_cast<unsigned>(((x & 0x0101010101010101ull) * 0x0102040810204080ull) >> 56);
}
#endif

// ----- per-pattern sums over a block of rows -----------------------------------------------
// Updating a pattern's sums row by row is a chain through memory (load, add, store, and the
// next row of the same pattern loads it again), which runs several times slower than the
// arithmetic. So the passes first compute every row's weights for a block of up to kBlock
// rows, then sort the block's rows by pattern (a stable counting sort) and sum each
// pattern's rows with the accumulators in registers, eight labels at a time.
constexpr int64_t kBlock = 256;

// Inlined into each ISA clone of the passes that call them (a separate function would be
// compiled for the baseline ISA only).
#if defined(__GNUC__)
#define PYM4_M4_INLINE inline __attribute__((always_inline))
#else
#define PYM4_M4_INLINE inline
#endif

constexpr int kMaxWeights = 5;

struct RowBlock {
  int64_t n = 0;
  int64_t row[kBlock];
  uint64_t mask[kBlock];  // with c <= 64: bit j = label j of the row (pattern_dot_mask)
  uint8_t pat[kBlock];
  double w[kMaxWeights][kBlock];  // up to kMaxWeights weights per row
};

#if defined(PYM4_M4_VEC)
// acc0 += labels 0-3 of the 8 in `bits` times w[0..4), acc1 += labels 4-7 times w[4..8): the
// nibble-widened products that pattern_dot_mask and mask_dot both add, in one order, so a row's
// bytes and its label bits give the same dot to the bit.
PYM4_M4_INLINE void nibble_madd8(unsigned bits, const double* __restrict w, f64x4& acc0, f64x4& acc1) {
  f64x4 v0, v1, w0, w1;
  std::memcpy(&v0, kNibbles.v[bits & 15], sizeof v0);
  std::memcpy(&v1, kNibbles.v[bits >> 4], sizeof v1);
  std::memcpy(&w0, w, sizeof w0);
  std::memcpy(&w1, w + 4, sizeof w1);
  acc0 += v0 * w0;
  acc1 += v1 * w1;
}
#endif

// The label bits of a dense row (bit j = label j; c <= 64).
PYM4_M4_INLINE uint64_t label_bits(const uint8_t* yr, int64_t c) {
  uint64_t mask = 0;
  int64_t j = 0;
#if defined(PYM4_M4_VEC)
  for (; j + 8 <= c; j += 8) mask |= static_cast<uint64_t>(bits8(yr + j)) << j;
#endif
  for (; j < c; ++j) mask |= static_cast<uint64_t>(yr[j] != 0) << j;
  return mask;
}

// a_i^T w of a dense row from its pattern's margin vector Ws (Ws[0] + y . Ws[1:]), and with
// c <= 64 the row's label bits into *mask (for block_sums; mask null: not wanted, and the
// bit gathering folds away once inlined).
PYM4_M4_INLINE double pattern_dot_mask(const uint8_t* __restrict yr, int64_t c, const double* __restrict Ws,
                                       uint64_t* mask) {
  const double* __restrict W1 = Ws + 1;
  int64_t j = 0;
  double dot = 0.0;
  uint64_t bitsall = 0;
#if defined(PYM4_M4_VEC)
  f64x4 acc0 = {0.0, 0.0, 0.0, 0.0}, acc1 = acc0;
  for (; j + 8 <= c; j += 8) {
    const unsigned bits = bits8(yr + j);
    if (j < 64) bitsall |= static_cast<uint64_t>(bits) << j;
    nibble_madd8(bits, W1 + j, acc0, acc1);
  }
  acc0 += acc1;
  dot = (acc0[0] + acc0[1]) + (acc0[2] + acc0[3]);
#endif
  for (; j < c; ++j) {
    if (j < 64) bitsall |= static_cast<uint64_t>(yr[j] != 0) << j;
    dot += static_cast<double>(yr[j]) * W1[j];
  }
  if (mask) *mask = bitsall;
  return Ws[0] + dot;
}

// pattern_dot_mask of a row given as its label bits (bit j = label j, c <= 64): the same
// products added in the same order, so the same bits as from the row's bytes.
PYM4_M4_INLINE double mask_dot(uint64_t mask, int64_t c, const double* __restrict Ws) {
  const double* __restrict W1 = Ws + 1;
  int64_t j = 0;
  double dot = 0.0;
#if defined(PYM4_M4_VEC)
  f64x4 acc0 = {0.0, 0.0, 0.0, 0.0}, acc1 = acc0;
  for (; j + 8 <= c; j += 8) {
    nibble_madd8(static_cast<unsigned>(mask >> j) & 255u, W1 + j, acc0, acc1);
  }
  acc0 += acc1;
  dot = (acc0[0] + acc0[1]) + (acc0[2] + acc0[3]);
#endif
  for (; j < c; ++j) dot += static_cast<double>((mask >> j) & 1) * W1[j];
  return Ws[0] + dot;
}

// A dense row packed into 8 bytes (m <= kPatternGroups, c <= kKeyLabels): its s-pattern in
// the low kKeyShift bits, its label bits above.
constexpr int kKeyShift = 4;
constexpr int64_t kKeyLabels = 64 - kKeyShift;
PYM4_M4_INLINE uint64_t packed_row(const Data& d, int64_t i) {
  return static_cast<uint64_t>(pattern_of(d.s + i * d.ld_s, d.m)) |
         (d.c ? label_bits(dense_row(d, i), d.c) << kKeyShift : 0);
}

// sums[k] (+=, k < NW): for every pattern sigma, the sum over the block's rows of pattern
// sigma of w[k]_i [1; y_i], at sums[k] + sigma stride + off (the padded per-pattern layout:
// stride pattern_stride(c), off 3).
// with_masks: the rows' rb.mask are set (c <= 64), else the label bytes are read again.
template <int NW>
PYM4_M4_INLINE void block_sums(const Data& d, const RowBlock& rb, double* const* sums, int64_t stride,
                               int64_t off, bool with_masks) {
  const int64_t c = d.c, nP = int64_t(1) << d.m;
  int64_t start[(1 << kPatternGroups) + 1] = {};
  for (int64_t r = 0; r < rb.n; ++r) ++start[rb.pat[r] + 1];
  for (int64_t sg = 0; sg < nP; ++sg) start[sg + 1] += start[sg];
  int64_t fill[1 << kPatternGroups];
  std::copy(start, start + nP, fill);
  int32_t order[kBlock];
  for (int64_t r = 0; r < rb.n; ++r) order[fill[rb.pat[r]]++] = static_cast<int32_t>(r);
  for (int64_t sg = 0; sg < nP; ++sg) {
    const int64_t ob = start[sg], oe = start[sg + 1];
    if (ob == oe) continue;
    const int64_t at = sg * stride + off;
    for (int k = 0; k < NW; ++k) {
      double tot = 0.0;
      for (int64_t o = ob; o < oe; ++o) tot += rb.w[k][order[o]];
      sums[k][at] += tot;
    }
    int64_t j = 0;
#if defined(PYM4_M4_VEC)
    if (with_masks) {
      // Eight labels at a time from the rows' bit masks (no second read of the label bytes).
      for (; j < c; j += 8) {
        f64x4 acc[NW][2];
        for (int k = 0; k < NW; ++k) acc[k][0] = acc[k][1] = f64x4{0.0, 0.0, 0.0, 0.0};
        for (int64_t o = ob; o < oe; ++o) {
          const int64_t r = order[o];
          const unsigned bits = static_cast<unsigned>(rb.mask[r] >> j);
          f64x4 v0, v1;
          std::memcpy(&v0, kNibbles.v[bits & 15], sizeof v0);
          std::memcpy(&v1, kNibbles.v[(bits >> 4) & 15], sizeof v1);
          for (int k = 0; k < NW; ++k) {
            const double f = rb.w[k][r];
            const f64x4 fv = {f, f, f, f};
            acc[k][0] += fv * v0;
            acc[k][1] += fv * v1;
          }
        }
        const int64_t lanes = std::min<int64_t>(8, c - j);
        for (int k = 0; k < NW; ++k) {
          double* out = sums[k] + at + 1 + j;
          double tmp[8];
          std::memcpy(tmp, &acc[k][0], sizeof acc[k][0]);
          std::memcpy(tmp + 4, &acc[k][1], sizeof acc[k][1]);
          for (int64_t u = 0; u < lanes; ++u) out[u] += tmp[u];
        }
      }
      continue;
    }
    for (; j + 8 <= c; j += 8) {
      f64x4 acc[NW][2];
      for (int k = 0; k < NW; ++k) acc[k][0] = acc[k][1] = f64x4{0.0, 0.0, 0.0, 0.0};
      for (int64_t o = ob; o < oe; ++o) {
        const int64_t r = order[o];
        const unsigned bits = bits8(d.y + rb.row[r] * d.ld_y + j);
        f64x4 v0, v1;
        std::memcpy(&v0, kNibbles.v[bits & 15], sizeof v0);
        std::memcpy(&v1, kNibbles.v[bits >> 4], sizeof v1);
        for (int k = 0; k < NW; ++k) {
          const double f = rb.w[k][r];
          const f64x4 fv = {f, f, f, f};
          acc[k][0] += fv * v0;
          acc[k][1] += fv * v1;
        }
      }
      for (int k = 0; k < NW; ++k) {
        double* out = sums[k] + at + 1 + j;
        f64x4 o0, o1;
        std::memcpy(&o0, out, sizeof o0);
        std::memcpy(&o1, out + 4, sizeof o1);
        o0 += acc[k][0];
        o1 += acc[k][1];
        std::memcpy(out, &o0, sizeof o0);
        std::memcpy(out + 4, &o1, sizeof o1);
      }
    }
#endif
    for (; j < c; ++j)
      for (int k = 0; k < NW; ++k) {
        double tot = 0.0;
        for (int64_t o = ob; o < oe; ++o) {
          const int64_t r = order[o];
          tot += rb.w[k][r] * static_cast<double>(d.y[rb.row[r] * d.ld_y + j]);
        }
        sums[k][at + 1 + j] += tot;
      }
  }
}

// block_sums for nw = 0..kMaxWeights weights (sums[0..nw)), then empties the block.
PYM4_M4_INLINE void flush_block(const Data& d, RowBlock& rb, int nw, double* const* sums, int64_t stride,
                                int64_t off, bool with_masks = false) {
  if (rb.n) {
    switch (nw) {
      case 1: block_sums<1>(d, rb, sums, stride, off, with_masks); break;
      case 2: block_sums<2>(d, rb, sums, stride, off, with_masks); break;
      case 3: block_sums<3>(d, rb, sums, stride, off, with_masks); break;
      case 4: block_sums<4>(d, rb, sums, stride, off, with_masks); break;
      case 5: block_sums<5>(d, rb, sums, stride, off, with_masks); break;
      default: break;
    }
  }
  rb.n = 0;
}

// The same into padded per-pattern arrays.
PYM4_M4_INLINE void flush_block(const Data& d, RowBlock& rb, int nw, double* const* sums, bool with_masks = false) {
  flush_block(d, rb, nw, sums, pattern_stride(d.c), 3, with_masks);
}

}  // namespace detail
}  // namespace m4
}  // namespace pym4
