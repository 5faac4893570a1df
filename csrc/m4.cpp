// CPU kernels of M4 data balancing (see include/pym4/m4.h for the problem and the methods).
//
// Every pass streams over examples and forms a_i = (s_i - pi) (x) [1; y_i] on the fly from
// the example's uint8 row (dense labels) or its index list (sparse labels). Passes over
// examples run in parallel with OpenMP on static contiguous ranges; each thread keeps its
// own accumulators, summed in thread order, so results are deterministic for a given
// thread count.
#include "pym4/m4.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstring>
#include <limits>
#include <thread>
#include <vector>

#include "m4_rows.h"
#include "pym4/common.h"
#include "pym4/interrupt.h"

namespace pym4 {
namespace m4 {
namespace {

using namespace detail;


// wk[0] + sum_{r in y_i} wk[1 + r]: one group's block of a_i^T w, divided by (s_ik - pi_k).
inline double label_dot(const Row& r, int64_t c, const double* __restrict wk) {
  double acc = 0.0;
  if (r.y) {
    const uint8_t* __restrict y = r.y;
    const double* __restrict w1 = wk + 1;
#pragma omp simd reduction(+ : acc)
    for (int64_t j = 0; j < c; ++j) acc += static_cast<double>(y[j]) * w1[j];
  } else {
    for (int64_t t = 0; t < r.nnz; ++t) acc += wk[1 + r.idx[t]];
  }
  return wk[0] + acc;
}

// gk[0] += coef; gk[1 + r] += coef for r in y_i.
inline void label_axpy(const Row& r, int64_t c, double coef, double* __restrict gk) {
  gk[0] += coef;
  if (r.y) {
    const uint8_t* __restrict y = r.y;
    double* __restrict g1 = gk + 1;
#pragma omp simd
    for (int64_t j = 0; j < c; ++j) g1[j] += coef * static_cast<double>(y[j]);
  } else {
    for (int64_t t = 0; t < r.nnz; ++t) gk[1 + r.idx[t]] += coef;
  }
}

inline double margin_of(const Data& d, const double* pi, const double* w, int64_t i) {
  const Row r = row_of(d, i);
  const uint8_t* s = d.s + i * d.ld_s;
  const int64_t L = d.c + 1;
  double t = 0.0;
  for (int64_t k = 0; k < d.m; ++k) t += (static_cast<double>(s[k]) - pi[k]) * label_dot(r, d.c, w + k * L);
  return t;
}

// ----- hot serial loops, cloned per ISA level ---------------------------------------------

PYM4_SIMD_CLONES void margins_range(const Data& d, const double* pi, const double* w, int64_t b, int64_t e,
                                    double* out) {
  for (int64_t i = b; i < e; ++i) out[i] = margin_of(d, pi, w, i);
}

PYM4_SIMD_CLONES void stream_range(const Data& d, const Problem& prob, const double* w, double mu, int64_t b,
                                   int64_t e, double* acc) {
  const int64_t L = d.c + 1, p = d.dim(), c = d.c;
  if (d.y) {
    // Dense labels: the row is widened to doubles once and every group's dot product and
    // both accumulations (q d_k [1;y] and d_k^2 [1;y]) run as straight vector loops.
    std::vector<double> ybuf(c);
    double* __restrict yd = ybuf.data();
    for (int64_t i = b; i < e; ++i) {
      const uint8_t* __restrict yr = d.y + i * d.ld_y;
      for (int64_t j = 0; j < c; ++j) yd[j] = static_cast<double>(yr[j]);
      const uint8_t* s = d.s + i * d.ld_s;
      double t = 0.0;
      for (int64_t k = 0; k < d.m; ++k) {
        const double* __restrict wk = w + k * L + 1;
        double dot = 0.0;
#pragma omp simd reduction(+ : dot)
        for (int64_t j = 0; j < c; ++j) dot += yd[j] * wk[j];
        t += (static_cast<double>(s[k]) - prob.pi[k]) * (w[k * L] + dot);
      }
      const double q = clip01(prob.eta + (d.u ? d.u[i] : 0.0) - t - mu);
      for (int64_t k = 0; k < d.m; ++k) {
        const double dk = static_cast<double>(s[k]) - prob.pi[k];
        const double cq = q * dk, c2 = dk * dk;
        double* __restrict g = acc + k * L;
        double* __restrict h = acc + p + k * L;
        g[0] += cq;
        h[0] += c2;
#pragma omp simd
        for (int64_t j = 0; j < c; ++j) {
          g[1 + j] += cq * yd[j];
          h[1 + j] += c2 * yd[j];
        }
      }
      acc[2 * p] += q;
      acc[2 * p + 1] += 1.0;
    }
    return;
  }
  for (int64_t i = b; i < e; ++i) {
    const Row r = row_of(d, i);
    const uint8_t* s = d.s + i * d.ld_s;
    double t = 0.0;
    for (int64_t k = 0; k < d.m; ++k) t += (static_cast<double>(s[k]) - prob.pi[k]) * label_dot(r, d.c, w + k * L);
    const double q = clip01(prob.eta + (d.u ? d.u[i] : 0.0) - t - mu);
    for (int64_t k = 0; k < d.m; ++k) {
      const double dk = static_cast<double>(s[k]) - prob.pi[k];
      label_axpy(r, d.c, q * dk, acc + k * L);
      label_axpy(r, d.c, dk * dk, acc + p + k * L);
    }
    acc[2 * p] += q;
    acc[2 * p + 1] += 1.0;
  }
}

// acc += sum_i q_i a_i over [b, e) with q given.
PYM4_SIMD_CLONES void qa_range(const Data& d, const double* pi, const double* q, int64_t b, int64_t e, double* acc) {
  const int64_t L = d.c + 1;
  for (int64_t i = b; i < e; ++i) {
    if (q[i] == 0.0) continue;
    const Row r = row_of(d, i);
    const uint8_t* s = d.s + i * d.ld_s;
    for (int64_t k = 0; k < d.m; ++k) label_axpy(r, d.c, q[i] * (static_cast<double>(s[k]) - pi[k]), acc + k * L);
  }
}

// counts += qi [1 | s_i | y_i | s_i (x) y_i] (see weighted_counts).
inline void count_row(const Data& d, int64_t i, double qi, double* acc) {
  const int64_t m = d.m, c = d.c;
  double* qs = acc + 1;
  double* qy = acc + 1 + m;
  double* qsy = acc + 1 + m + c;
  {
    const Row r = row_of(d, i);
    const uint8_t* s = d.s + i * d.ld_s;
    acc[0] += qi;
    if (r.y) {
      for (int64_t j = 0; j < c; ++j) qy[j] += qi * static_cast<double>(r.y[j]);
    } else {
      for (int64_t t = 0; t < r.nnz; ++t) qy[r.idx[t]] += qi;
    }
    for (int64_t k = 0; k < m; ++k) {
      if (!s[k]) continue;
      qs[k] += qi;
      double* row = qsy + k * c;
      if (r.y) {
        for (int64_t j = 0; j < c; ++j) row[j] += qi * static_cast<double>(r.y[j]);
      } else {
        for (int64_t t = 0; t < r.nnz; ++t) row[r.idx[t]] += qi;
      }
    }
  }
}

PYM4_SIMD_CLONES void counts_range(const Data& d, const double* q, int64_t b, int64_t e, double* acc) {
  for (int64_t i = b; i < e; ++i) {
    const double qi = q ? q[i] : 1.0;
    if (qi != 0.0) count_row(d, i, qi, acc);
  }
}

// The nonzero entries of v_i = [1; y_i]: 0, then 1 + r for every label r of the row.
inline int64_t support_of(const Row& r, int64_t c, int32_t* idx) {
  int64_t nz = 0;
  idx[nz++] = 0;
  if (r.y) {
    for (int64_t j = 0; j < c; ++j)
      if (r.y[j]) idx[nz++] = static_cast<int32_t>(1 + j);
  } else {
    for (int64_t t = 0; t < r.nnz; ++t) idx[nz++] = 1 + r.idx[t];
  }
  return nz;
}

inline int64_t pair_index(int64_t k, int64_t l, int64_t m) {  // k < l, upper triangle, row-major
  return k * (2 * m - k - 1) / 2 + (l - k - 1);
}

PYM4_SIMD_CLONES void newton_range(const Data& d, const Problem& prob, const double* w, double mu, int64_t stride,
                                   bool count_data, int64_t b, int64_t e, double* acc) {
  const int64_t m = d.m, c = d.c, L = c + 1;
  const int64_t LL = L * L, nb = 1 + m + m * (m - 1) / 2;
  double* blocks = acc;
  double* qv = acc + nb * LL;    // (1 + m) x L
  double* cv = qv + (1 + m) * L;  // (1 + m) x L
  double* sampled = cv + (1 + m) * L;
  std::vector<int32_t> idx(static_cast<size_t>(L));
  std::vector<int64_t> groups(static_cast<size_t>(m));
  for (int64_t i = b; i < e; ++i) {
    const Row r = row_of(d, i);
    const uint8_t* s = d.s + i * d.ld_s;
    const int64_t nz = support_of(r, c, idx.data());
    // a_i^T w over the row's support: the labels it has, not all c.
    double margin = 0.0;
    for (int64_t k = 0; k < m; ++k) {
      const double* wk = w + k * L;
      double acc_k = 0.0;
      for (int64_t t = 0; t < nz; ++t) acc_k += wk[idx[t]];
      margin += (static_cast<double>(s[k]) - prob.pi[k]) * acc_k;
    }
    const double z = prob.eta + (d.u ? d.u[i] : 0.0) - margin - mu;
    const double q = clip01(z);
    int64_t ng = 0;
    for (int64_t k = 0; k < m; ++k)
      if (s[k]) groups[ng++] = k;
    for (int64_t t = 0; t < nz; ++t) qv[idx[t]] += q;
    if (count_data)
      for (int64_t t = 0; t < nz; ++t) cv[idx[t]] += 1.0;
    for (int64_t g = 0; g < ng; ++g) {
      double* qk = qv + (1 + groups[g]) * L;
      double* ck = cv + (1 + groups[g]) * L;
      for (int64_t t = 0; t < nz; ++t) qk[idx[t]] += q;
      if (count_data)
        for (int64_t t = 0; t < nz; ++t) ck[idx[t]] += 1.0;
    }
    if (i % stride != 0) continue;
    sampled[0] += 1.0;
    if (!(z > 0.0 && z < 1.0)) continue;  // clipped: no curvature
    auto add_outer = [&](double* blk) {
      for (int64_t t = 0; t < nz; ++t) {
        double* row = blk + static_cast<int64_t>(idx[t]) * L;
        for (int64_t u = 0; u < nz; ++u) row[idx[u]] += 1.0;
      }
    };
    add_outer(blocks);
    for (int64_t g = 0; g < ng; ++g) {
      add_outer(blocks + (1 + groups[g]) * LL);
      for (int64_t h = g + 1; h < ng; ++h) add_outer(blocks + (1 + m + pair_index(groups[g], groups[h], m)) * LL);
    }
  }
}

// ----- the budget search of keep_probability_at_budget --------------------------------------
// A sum of n terms in [0, 1] kept in one running double errs by up to ~1e-16 n per term
// added, which at n = 1e7 is above the search's tolerance 1e-13 n: the search then cannot
// tell the root from rounding and bisects to the last bit (tens of passes). So sums run in
// blocks of 64 terms added plainly, and the block sums are added with Neumaier's compensation.
struct CompensatedSum {
  double sum = 0.0, comp = 0.0;
  void add(double x) {
    const double t = sum + x;
    comp += std::abs(sum) >= std::abs(x) ? (sum - t) + x : (x - t) + sum;
    sum = t;
  }
  double value() const { return sum + comp; }
};

// [sum clip(t_i - mu), #{0 < t_i - mu < 1}] over [b, e).
inline void clip_sums(const double* t, int64_t b, int64_t e, double mu, double* out) {
  CompensatedSum sq;
  double na = 0.0;
  for (int64_t i = b; i < e; i += 64) {
    const int64_t end = std::min(e, i + 64);
    double blk = 0.0;
    for (int64_t j = i; j < end; ++j) {
      const double z = t[j] - mu;
      blk += clip01(z);
      na += (z > 0.0 && z < 1.0) ? 1.0 : 0.0;
    }
    sq.add(blk);
  }
  out[0] += sq.value();
  out[1] += na;
}

// mu with sum_i clip(t_i - mu) = n eta (to 1e-13 n), by safeguarded Newton steps from mu0 on
// that monotone piecewise-linear function, within the bracket [lo, hi] (lo: min t - 1, hi: max
// t). first (may be null): [sum, count] at mu0 when a pass already has them.
double budget_root(int64_t n, const double* t, double eta, double mu0, double lo, double hi, const double* first) {
  const double target = static_cast<double>(n) * eta;
  double mu = std::min(std::max(mu0, lo), hi);
  for (int it = 0; it < 200; ++it) {
    double acc[2] = {0.0, 0.0};  // sum q, active count
    if (it == 0 && first && mu == mu0) {
      acc[0] = first[0];
      acc[1] = first[1];
    } else {
      parallel_accumulate(n, 2, acc, [&](int64_t b, int64_t e, double* a) { clip_sums(t, b, e, mu, a); });
    }
    const double f = acc[0] - target;
    if (std::abs(f) <= 1e-13 * static_cast<double>(n)) break;
    (f > 0.0 ? lo : hi) = mu;
    double next = acc[1] > 0.0 ? mu + f / acc[1] : 0.5 * (lo + hi);
    if (!(next > lo && next < hi)) next = 0.5 * (lo + hi);
    if (next == mu || hi - lo <= 1e-15 * (1.0 + std::abs(mu))) break;
    mu = next;
  }
  return mu;
}

// ----- the per-pattern passes (dense labels, m <= kPatternGroups: see m4_rows.h) -----------

// a_i^T w of a dense row from its pattern's margin vector Ws (m4_rows.h's dot, no label bits).
inline double pattern_dot(const uint8_t* __restrict yr, int64_t c, const double* __restrict Ws) {
  return pattern_dot_mask(yr, c, Ws, nullptr);
}

PYM4_SIMD_CLONES void margins_range_pattern(const Data& d, const double* W, int64_t b, int64_t e, double* out) {
  const int64_t S = pattern_stride(d.c), c = d.c;
  for (int64_t i = b; i < e; ++i)
    out[i] = pattern_dot(dense_row(d, i), c, W + pattern_at(pattern_of(d.s + i * d.ld_s, d.m), S));
}

// The stream's mini-batch sums per pattern over rows [b, e) (of order[b..e) when given; the
// packed rows keys[b..e) (packed_row, no utility) when given):
// acc = [G: sum q [1; y] | C: sum [1; y]], each 2^m padded vectors (nPS doubles).
PYM4_SIMD_CLONES void stream_range_pattern(const Data& d, const Problem& prob, const double* W, double mu,
                                           const int64_t* order, const uint64_t* keys, int64_t b, int64_t e,
                                           double* acc, RowBlock& rb) {
  const int64_t S = pattern_stride(d.c), c = d.c, nPS = (int64_t(1) << d.m) * S;
  double* const sums[2] = {acc, acc + nPS};
  if (keys) {
    for (int64_t t = b; t < e; ++t) {
      const uint64_t key = keys[t];
      const int64_t sg = static_cast<int64_t>(key & ((1u << kKeyShift) - 1));
      const uint64_t mask = key >> kKeyShift;
      const int64_t r = rb.n++;
      rb.row[r] = t;
      rb.mask[r] = mask;
      rb.pat[r] = static_cast<uint8_t>(sg);
      rb.w[0][r] = clip01(prob.eta - mask_dot(mask, c, W + pattern_at(sg, S)) - mu);
      rb.w[1][r] = 1.0;
      if (rb.n == kBlock) flush_block(d, rb, 2, sums, true);
    }
    flush_block(d, rb, 2, sums, true);
    return;
  }
  for (int64_t t = b; t < e; ++t) {
    const int64_t i = order ? order[t] : t;
    if (order && t + 8 < e) {  // the shuffled rows are scattered: ask for them ahead
      __builtin_prefetch(d.s + order[t + 8] * d.ld_s);
      if (c) __builtin_prefetch(d.y + order[t + 8] * d.ld_y);
    }
    const int64_t sg = pattern_of(d.s + i * d.ld_s, d.m);
    const int64_t r = rb.n++;
    const double margin = pattern_dot_mask(dense_row(d, i), c, W + pattern_at(sg, S), &rb.mask[r]);
    rb.row[r] = i;
    rb.pat[r] = static_cast<uint8_t>(sg);
    rb.w[0][r] = clip01(prob.eta + (d.u ? d.u[i] : 0.0) - margin - mu);
    rb.w[1][r] = 1.0;
    if (rb.n == kBlock) flush_block(d, rb, 2, sums, c <= 64);
  }
  flush_block(d, rb, 2, sums, c <= 64);
}

// The Newton model's sums per pattern (newton_stats): acc = [G: sum q ytil | C: sum ytil
// (padded, nPS each) | sampled rows | H (2^m x L x L): sum over the sampled active rows of
// ytil ytil^T], ytil = [1; y].
PYM4_SIMD_CLONES void newton_range_pattern(const Data& d, const Problem& prob, const double* W, double mu,
                                           int64_t stride, bool count_data, int64_t b, int64_t e, double* acc,
                                           RowBlock& rb, int32_t* idx) {
  const int64_t L = d.c + 1, c = d.c, S = pattern_stride(c), nPS = (int64_t(1) << d.m) * S, LL = L * L;
  double* const sums[2] = {acc, acc + nPS};
  double* sampled = acc + 2 * nPS;
  double* H = sampled + 1;
  int64_t next = (b + stride - 1) / stride * stride;  // the first row of [b, e) with i % stride == 0
  for (int64_t i = b; i < e; ++i) {
    const int64_t sg = pattern_of(d.s + i * d.ld_s, d.m);
    const uint8_t* yr = dense_row(d, i);
    const int64_t r = rb.n++;
    const double z = prob.eta + (d.u ? d.u[i] : 0.0) - pattern_dot_mask(yr, c, W + pattern_at(sg, S), &rb.mask[r]) - mu;
    rb.row[r] = i;
    rb.pat[r] = static_cast<uint8_t>(sg);
    rb.w[0][r] = clip01(z);
    rb.w[1][r] = 1.0;
    if (rb.n == kBlock) flush_block(d, rb, count_data ? 2 : 1, sums, c <= 64);
    if (i != next) continue;
    next += stride;
    sampled[0] += 1.0;
    if (!(z > 0.0 && z < 1.0)) continue;  // clipped: no curvature
    int64_t nz = 0;
    idx[nz++] = 0;
    for (int64_t j = 0; j < c; ++j) {
      idx[nz] = static_cast<int32_t>(1 + j);
      nz += yr[j] != 0;
    }
    double* blk = H + sg * LL;
    for (int64_t t = 0; t < nz; ++t) {
      double* row = blk + static_cast<int64_t>(idx[t]) * L;
      for (int64_t u = 0; u < nz; ++u) row[idx[u]] += 1.0;
    }
  }
  flush_block(d, rb, count_data ? 2 : 1, sums, c <= 64);
}

// Pass 1 of keep_probability_at_budget: t_i = eta + u_i - a_i^T w into out, and (with
// counts) per pattern at mu0 G0 = sum clip(t - mu0) ytil, A0 = sum over the active rows
// (0 < t - mu0 < 1) of ytil, C = sum ytil (when count_data): acc = [G0 | A0 | C] (padded,
// nPS each) then [sum clip(t - mu0) | active rows]; lo/hi: min and max of t.
PYM4_SIMD_CLONES void budget_range_pattern(const Data& d, const Problem& prob, const double* W, double mu0,
                                           bool counts, bool count_data, int64_t b, int64_t e, double* out,
                                           double* acc, RowBlock& rb, double& lo, double& hi) {
  const int64_t S = pattern_stride(d.c), c = d.c, nPS = (int64_t(1) << d.m) * S;
  double* sums[3];
  int nw = 0;
  if (counts) {
    sums[nw++] = acc;
    sums[nw++] = acc + nPS;
  }
  if (count_data) sums[nw++] = acc + 2 * nPS;
  double mn = lo, mx = hi;
  CompensatedSum sq;  // as clip_sums: plain within 64 rows, compensated across
  double blk = 0.0, na = 0.0;
  for (int64_t i = b; i < e; ++i) {
    if (((i - b) & 63) == 0) {
      sq.add(blk);
      blk = 0.0;
    }
    const int64_t sg = pattern_of(d.s + i * d.ld_s, d.m);
    uint64_t bits;
    const double t = prob.eta + (d.u ? d.u[i] : 0.0) - pattern_dot_mask(dense_row(d, i), c, W + pattern_at(sg, S), &bits);
    out[i] = t;
    mn = std::min(mn, t);
    mx = std::max(mx, t);
    const double z = t - mu0, q = clip01(z);
    const double active = (z > 0.0 && z < 1.0) ? 1.0 : 0.0;
    blk += q;
    na += active;
    if (!nw) continue;
    const int64_t r = rb.n++;
    rb.row[r] = i;
    rb.mask[r] = bits;
    rb.pat[r] = static_cast<uint8_t>(sg);
    int k = 0;
    if (counts) {
      rb.w[k++][r] = q;
      rb.w[k++][r] = active;
    }
    if (count_data) rb.w[k][r] = 1.0;
    if (rb.n == kBlock) flush_block(d, rb, nw, sums, c <= 64);
  }
  flush_block(d, rb, nw, sums, c <= 64);
  sq.add(blk);
  acc[3 * nPS] += sq.value();
  acc[3 * nPS + 1] += na;
  lo = mn;
  hi = mx;
}

// The writing pass of keep_probability_at_budget: q_i = clip(t_i - mu) in place; the rows
// whose q is not the linear extrapolation clip(t - mu0) - (mu - mu0) [0 < t - mu0 < 1] of
// pass 1 (those that crossed a kink of clip between mu0 and mu) add their difference times
// ytil to their pattern's correction in acc (padded; null: q only).
PYM4_SIMD_CLONES void budget_write_pattern(const Data& d, double mu0, double mu, int64_t b, int64_t e, double* q,
                                           double* acc, RowBlock& rb) {
  const double dm = mu - mu0;
  double* const sums[1] = {acc};
  for (int64_t i = b; i < e; ++i) {
    const double t = q[i], z0 = t - mu0, z = t - mu, qi = clip01(z);
    q[i] = qi;
    if (!acc) continue;
    const bool act0 = z0 > 0.0 && z0 < 1.0, act = z > 0.0 && z < 1.0;
    if ((act0 && act) || (z0 <= 0.0 && z <= 0.0) || (z0 >= 1.0 && z >= 1.0)) continue;
    const int64_t r = rb.n++;
    rb.row[r] = i;
    if (d.c <= 64) rb.mask[r] = label_bits(dense_row(d, i), d.c);
    rb.pat[r] = static_cast<uint8_t>(pattern_of(d.s + i * d.ld_s, d.m));
    rb.w[0][r] = qi - (clip01(z0) - (act0 ? dm : 0.0));
    if (rb.n == kBlock) flush_block(d, rb, 1, sums, d.c <= 64);
  }
  if (acc) flush_block(d, rb, 1, sums, d.c <= 64);
}

// counts of weighted_counts per pattern: acc (padded) += q_i ytil over the rows.
// With count_data, acc + nPS (padded) += ytil over the rows as well (the data's counts).
PYM4_SIMD_CLONES void counts_range_pattern(const Data& d, const double* q, bool count_data, int64_t b, int64_t e,
                                           double* acc, RowBlock& rb) {
  const int64_t nPS = (int64_t(1) << d.m) * pattern_stride(d.c);
  double* const sums[2] = {acc, acc + nPS};
  const int nw = count_data ? 2 : 1;
  for (int64_t i = b; i < e; ++i) {
    const double qi = q ? q[i] : 1.0;
    if (qi == 0.0 && !count_data) continue;
    const int64_t r = rb.n++;
    rb.row[r] = i;
    if (d.c <= 64) rb.mask[r] = label_bits(dense_row(d, i), d.c);
    rb.pat[r] = static_cast<uint8_t>(pattern_of(d.s + i * d.ld_s, d.m));
    rb.w[0][r] = qi;
    rb.w[1][r] = 1.0;
    if (rb.n == kBlock) flush_block(d, rb, nw, sums, d.c <= 64);
  }
  flush_block(d, rb, nw, sums, d.c <= 64);
}

// The Newton stats' layout (newton_stats) from the per-pattern sums of newton_range_pattern.
void fold_newton(int64_t m, int64_t c, const double* acc, double* stats) {
  const int64_t L = c + 1, LL = L * L, nP = int64_t(1) << m, nb = 1 + m + m * (m - 1) / 2;
  const int64_t S = pattern_stride(c), nPS = nP * S;
  const double* G = acc;
  const double* C = acc + nPS;
  const double* H = acc + 2 * nPS + 1;
  double* qv = stats + nb * LL;
  double* cv = qv + (1 + m) * L;
  auto add = [](double* dst, const double* src, int64_t len) {
    for (int64_t a = 0; a < len; ++a) dst[a] += src[a];
  };
  for (int64_t sg = 0; sg < nP; ++sg) {
    const int64_t at = pattern_at(sg, S);
    add(stats, H + sg * LL, LL);
    add(qv, G + at, L);
    add(cv, C + at, L);
    for (int64_t k = 0; k < m; ++k) {
      if (!((sg >> k) & 1)) continue;
      add(stats + (1 + k) * LL, H + sg * LL, LL);
      add(qv + (1 + k) * L, G + at, L);
      add(cv + (1 + k) * L, C + at, L);
      for (int64_t l = k + 1; l < m; ++l)
        if ((sg >> l) & 1) add(stats + (1 + m + pair_index(k, l, m)) * LL, H + sg * LL, LL);
    }
  }
  stats[nb * LL + 2 * (1 + m) * L] += acc[2 * nPS];
}

// One mini-batch of the stream per pattern (batch_stats, stream_fit), with its buffers
// reused across the batches of a pass.
struct PatternBatch {
  int64_t m, c, L, nPS;
  AlignedDoubles W, acc;
  RowBlock rb;
  explicit PatternBatch(const Data& d)
      : m(d.m), c(d.c), L(d.c + 1), nPS((int64_t(1) << d.m) * pattern_stride(d.c)), W(nPS), acc(2 * nPS) {}
  // stats (stats_size(p), overwritten) of rows [b, e) (of order[b..e), or keys[b..e)) at duals (w, mu).
  void stats(const Data& d, const Problem& prob, const double* w, double mu, const int64_t* order,
             const uint64_t* keys, int64_t b, int64_t e, double* out) {
    pattern_weights(m, c, prob.pi, w, W.data());
    acc.zero(2 * nPS);
    if (e - b >= kParallelMin) {
      parallel_accumulate(e - b, 2 * nPS, acc.data(), [&](int64_t lb, int64_t le, double* a) {
        RowBlock rbt;
        stream_range_pattern(d, prob, W.data(), mu, order, keys, b + lb, b + le, a, rbt);
      });
    } else {
      stream_range_pattern(d, prob, W.data(), mu, order, keys, b, e, acc.data(), rb);
    }
    fold_batch(m, c, prob.pi, acc.data(), out);
  }
  // stats (stats_size(p), overwritten) from a batch's per-pattern sums acc = [G | C] (padded).
  static void fold_batch(int64_t m, int64_t c, const double* pi, const double* acc, double* out) {
    const int64_t p = m * (c + 1), S = pattern_stride(c), nPS = (int64_t(1) << m) * S;
    std::fill(out, out + stats_size(p), 0.0);
    fold_groups(m, c, pi, acc, 1, out);
    fold_groups(m, c, pi, acc + nPS, 2, out + p);
    for (int64_t sg = 0; sg < (int64_t(1) << m); ++sg) {
      out[2 * p] += acc[pattern_at(sg, S)];
      out[2 * p + 1] += acc[nPS + pattern_at(sg, S)];
    }
  }
};

// ----- the stream's pass on two cores (dense labels, m <= kPatternGroups) --------------------
// The ascent is sequential over mini-batches, but a batch's sums are sums over its rows: each
// batch is cut into two contiguous shares, summed separately and added in share order, so the
// result depends on the shares only, not on which thread ran them. Thread 0 runs the pass:
// per batch it publishes the batch's margin vectors, sums share 0, and then sums share 1
// itself unless a helper thread (one team for the whole pass: a fork/join per batch would
// cost more than the batch) has claimed it first, in which case it waits for the helper's
// sums. A claim is one compare-and-swap on the index of the last claimed batch, so exactly
// one thread sums each share, and a helper that starts late (a busy machine) costs nothing
// but the work it does not take. A helper descheduled in the middle of its share costs thread
// 0 a scheduler slice, and a waiting thread that spins takes the core from a thread with
// work: so waits spin briefly, then sleep; after one wait over kLateNs the helper sleeps
// through kSoloBatches batches, and the next passes for kBusyNs run without it (as
// sinkhorn.cpp's Team does).
constexpr int64_t kShareRows = 64;           // a batch is cut only when each share gets this many rows
constexpr int64_t kLateNs = 250000;          // a wait for the helper this long: the machine is busy
constexpr int64_t kSoloBatches = 1 << 12;    // batches thread 0 then runs alone (~50 ms at 256 rows)
constexpr int64_t kBusyNs = 2000000000;      // and the passes that start within this time
std::atomic<int64_t> stream_busy_until{0};

bool stream_in_shares(const Data& d, int64_t batch) {
  return by_pattern(d) && d.n >= kParallelMin && batch >= 2 * kShareRows;
}

inline int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

// Spins a little (a batch's other share takes microseconds), yields a few times, then
// sleeps in short naps until ready() holds.
template <typename Ready>
inline void wait_until(Ready ready) {
  for (int k = 0; !ready(); ++k) {
    if (k < 512) {
#if defined(__x86_64__) || defined(__i386__)
      __builtin_ia32_pause();
#endif
    } else if (k < 544) {
      std::this_thread::yield();
    } else {
      std::this_thread::sleep_for(std::chrono::microseconds(20));
    }
  }
}

int64_t stream_fit_shares(const Data& d, const Problem& prob, const StreamConfig& cfg, StreamState& st,
                          const int64_t* order, const uint64_t* keys, double* counts_data) {
  const int64_t m = d.m, c = d.c, p = d.dim(), B = cfg.batch_size;
  const int64_t nPS = (int64_t(1) << m) * pattern_stride(c), width = (2 * nPS + 7) / 8 * 8;
  const int64_t steps = (d.n + B - 1) / B;
  const bool helper = max_threads() > 1 && now_ns() >= stream_busy_until.load(std::memory_order_relaxed);
  // [share 0 | share 1 (thread 0's) | share 1 (the helper's)], a whole number of cache lines each.
  AlignedDoubles part(static_cast<size_t>(3 * width)), W(static_cast<size_t>(nPS));
  double mu_batch = 0.0;                 // the batch's mu, published with W
  std::atomic<int64_t> opened{-1};       // the batch whose W and mu are published
  std::atomic<int64_t> claimed{-1};      // the last batch whose share 1 a thread claimed
  std::atomic<int64_t> helped{-1};       // the last batch whose share 1 the helper has summed
  std::atomic<int64_t> solo_until{0};    // the helper claims no batch below this
  std::atomic<bool> finished{false};
  int64_t done = 0;
  auto share = [&](int64_t j, int h, double* a, RowBlock& rb) {
    const int64_t b = j * B, e = std::min(d.n, b + B), mid = b + (e - b) / 2;
    std::fill(a, a + 2 * nPS, 0.0);
    stream_range_pattern(d, prob, W.data(), mu_batch, order, keys, h ? mid : b, h ? e : mid, a, rb);
  };
  std::vector<double> data_sums(counts_data ? nPS : 0, 0.0);  // per pattern: sum [1; y] over the batches
  auto main_loop = [&]() {
    std::vector<double> w(p), stats(stats_size(p));
    RowBlock rb;
    double* s0 = part.data();
    double* s1 = part.data() + width;
    double* s1_helper = part.data() + 2 * width;
    for (int64_t j = 0; j < steps; ++j) {
      if (interrupt::pending()) break;
      for (int64_t k = 0; k < p; ++k) w[k] = st.v_plus[k] - st.v_minus[k];
      pattern_weights(m, c, prob.pi, w.data(), W.data());
      mu_batch = st.scalars[0];
      opened.store(j, std::memory_order_release);
      share(j, 0, s0, rb);
      int64_t expect = j - 1;
      const double* other = s1;
      if (claimed.compare_exchange_strong(expect, j, std::memory_order_acq_rel)) {
        share(j, 1, s1, rb);
      } else {  // the helper claimed it
        const int64_t t0 = now_ns();
        wait_until([&] { return helped.load(std::memory_order_acquire) >= j; });
        if (now_ns() - t0 > kLateNs) {
          solo_until.store(j + kSoloBatches, std::memory_order_relaxed);
          stream_busy_until.store(now_ns() + kBusyNs, std::memory_order_relaxed);
        }
        other = s1_helper;
      }
      for (int64_t x = 0; x < 2 * nPS; ++x) s0[x] += other[x];  // share 0 + share 1, in that order
      if (counts_data)
        for (int64_t x = 0; x < nPS; ++x) data_sums[x] += s0[nPS + x];
      PatternBatch::fold_batch(m, c, prob.pi, s0, stats.data());
      apply_update(prob, m, c, cfg, st, stats.data());
      done = j + 1;
    }
    finished.store(true, std::memory_order_release);
  };
  auto helper_loop = [&]() {
    RowBlock rb;
    int64_t last = -1;
    while (true) {
      wait_until([&] {
        return opened.load(std::memory_order_acquire) > last || finished.load(std::memory_order_acquire);
      });
      if (finished.load(std::memory_order_acquire)) return;
      const int64_t j = opened.load(std::memory_order_acquire);
      last = j;
      if (j < solo_until.load(std::memory_order_relaxed)) {  // a busy machine: leave the core to thread 0
        std::this_thread::sleep_for(std::chrono::milliseconds(1));
        continue;
      }
      int64_t expect = j - 1;
      if (!claimed.compare_exchange_strong(expect, j, std::memory_order_acq_rel)) continue;
      // Claimed: thread 0 waits for these sums, so W and mu stay those of batch j meanwhile.
      share(j, 1, part.data() + 2 * width, rb);
      helped.store(j, std::memory_order_release);
    }
  };
  if (helper) {
#if defined(PYM4_WITH_OPENMP)
#pragma omp parallel num_threads(2)
#endif
    {
      if (thread_id() == 0) main_loop();
      else helper_loop();
    }
  } else {
    main_loop();
  }
  interrupt::check();  // throws when the pass stopped for an interrupt
  if (counts_data) fold_counts(m, c, data_sums.data(), counts_data);
  return done;
}

// keep_probability_at_budget on the per-pattern passes: one pass over the rows (t_i, and the
// counts at mu0), the budget search over the stored t, and a writing pass that reads only
// the rows that crossed a kink between mu0 and the final mu.
double budget_pattern(const Data& d, const Problem& prob, const double* w, double mu0, double* q,
                      double* counts_after, double* counts_before) {
  const int64_t n = d.n, S = pattern_stride(d.c), nPS = (int64_t(1) << d.m) * S;
  AlignedDoubles W(nPS);
  pattern_weights(d.m, d.c, prob.pi, w, W.data());
  const bool counts = counts_after != nullptr, count_data = counts_before != nullptr;
  const int64_t width = (3 * nPS + 2 + 7) / 8 * 8;
  const int T = team_size(n);
  AlignedDoubles part(static_cast<size_t>(T) * width);
  std::vector<double> lo_t(T, 0.0), hi_t(T, 0.0);
  parallel_threads(n, [&](int t, int, int64_t b, int64_t e) {
    RowBlock rb;
    lo_t[t] = std::numeric_limits<double>::infinity();
    hi_t[t] = -std::numeric_limits<double>::infinity();
    budget_range_pattern(d, prob, W.data(), mu0, counts, count_data, b, e, q,
                         part.data() + static_cast<size_t>(t) * width, rb, lo_t[t], hi_t[t]);
  });
  std::vector<double> acc(width, 0.0);
  double lo = lo_t[0], hi = hi_t[0];
  for (int t = 0; t < T; ++t) {
    for (int64_t j = 0; j < width; ++j) acc[j] += part.data()[static_cast<size_t>(t) * width + j];
    lo = std::min(lo, lo_t[t]);
    hi = std::max(hi, hi_t[t]);
  }
  // f(mu) = sum_i clip(t_i - mu) - n eta: >= 0 at min t - 1 (every q is 1), <= 0 at max t.
  const double mu = budget_root(n, q, prob.eta, mu0, lo - 1.0, hi, acc.data() + 3 * nPS);
  std::vector<double> corr(counts ? nPS : 0, 0.0);
  parallel_accumulate(n, counts ? nPS : 0, corr.data(), [&](int64_t b, int64_t e, double* a) {
    RowBlock rb;
    budget_write_pattern(d, mu0, mu, b, e, q, counts ? a : nullptr, rb);
  });
  if (counts) {
    // sum_i q_i ytil = G0 - (mu - mu0) A0 + the crossing rows' corrections, per pattern.
    const double dm = mu - mu0;
    for (int64_t j = 0; j < nPS; ++j) corr[j] += acc[j] - dm * acc[nPS + j];
    fold_counts(d.m, d.c, corr.data(), counts_after);
  }
  if (count_data) fold_counts(d.m, d.c, acc.data() + 2 * nPS, counts_before);
  return mu;
}

}  // namespace

// ----- public entry points --------------------------------------------------------------------

void margins(const Data& d, const double* pi, const double* w, double* out) {
  if (by_pattern(d)) {
    AlignedDoubles W((size_t(1) << d.m) * pattern_stride(d.c));
    pattern_weights(d.m, d.c, pi, w, W.data());
    parallel_ranges(d.n, [&](int64_t b, int64_t e) { margins_range_pattern(d, W.data(), b, e, out); });
    return;
  }
  parallel_ranges(d.n, [&](int64_t b, int64_t e) { margins_range(d, pi, w, b, e, out); });
}

void keep_probability(const Data& d, const Problem& prob, const double* w, double mu, double* q) {
  AlignedDoubles W(by_pattern(d) ? (size_t(1) << d.m) * pattern_stride(d.c) : 0);
  if (by_pattern(d)) pattern_weights(d.m, d.c, prob.pi, w, W.data());
  parallel_ranges(d.n, [&](int64_t b, int64_t e) {
    if (by_pattern(d)) margins_range_pattern(d, W.data(), b, e, q);
    else margins_range(d, prob.pi, w, b, e, q);
    for (int64_t i = b; i < e; ++i) q[i] = clip01(prob.eta + (d.u ? d.u[i] : 0.0) - q[i] - mu);
  });
}

double keep_probability_at_budget(const Data& d, const Problem& prob, const double* w, double mu0, double* q,
                                  double* counts_after, double* counts_before) {
  const int64_t n = d.n;
  if (n == 0) return mu0;
  if (by_pattern(d)) return budget_pattern(d, prob, w, mu0, q, counts_after, counts_before);
  parallel_ranges(n, [&](int64_t b, int64_t e) {
    margins_range(d, prob.pi, w, b, e, q);
    for (int64_t i = b; i < e; ++i) q[i] = prob.eta + (d.u ? d.u[i] : 0.0) - q[i];  // z_i + mu
  });
  double lo = q[0], hi = q[0];
  for (int64_t i = 1; i < n; ++i) {
    lo = std::min(lo, q[i]);
    hi = std::max(hi, q[i]);
  }
  // f(mu) = sum_i clip(z_i - mu) - n eta: >= 0 at min z - 1 (every q is 1), <= 0 at max z.
  const double mu = budget_root(n, q, prob.eta, mu0, lo - 1.0, hi, nullptr);
  // The writing pass also counts the kept data (and the data): one more read of the rows.
  const int64_t K = counts_size(d.m, d.c);
  std::vector<double> both(2 * K, 0.0);
  parallel_accumulate(n, 2 * K, both.data(), [&](int64_t b, int64_t e, double* acc) {
    for (int64_t i = b; i < e; ++i) {
      q[i] = clip01(q[i] - mu);
      if (counts_after && q[i] != 0.0) count_row(d, i, q[i], acc);
      if (counts_before) count_row(d, i, 1.0, acc + K);
    }
  });
  for (int64_t j = 0; j < K; ++j) {
    if (counts_after) counts_after[j] += both[j];
    if (counts_before) counts_before[j] += both[K + j];
  }
  return mu;
}

int64_t counts_size(int64_t m, int64_t c) { return 1 + m + c + m * c; }

void weighted_counts(const Data& d, const double* q, double* counts, double* counts_data) {
  if (by_pattern(d)) {
    const int64_t nPS = (int64_t(1) << d.m) * pattern_stride(d.c);
    const bool both = counts_data != nullptr;
    std::vector<double> P((both ? 2 : 1) * nPS, 0.0);
    parallel_accumulate(d.n, static_cast<int64_t>(P.size()), P.data(), [&](int64_t b, int64_t e, double* acc) {
      RowBlock rb;
      counts_range_pattern(d, q, both, b, e, acc, rb);
    });
    fold_counts(d.m, d.c, P.data(), counts);
    if (both) fold_counts(d.m, d.c, P.data() + nPS, counts_data);
    return;
  }
  const int64_t K = counts_size(d.m, d.c);
  std::vector<double> both(2 * K, 0.0);
  parallel_accumulate(d.n, counts_data ? 2 * K : K, both.data(), [&](int64_t b, int64_t e, double* acc) {
    counts_range(d, q, b, e, acc);
    if (counts_data) counts_range(d, nullptr, b, e, acc + K);
  });
  for (int64_t j = 0; j < K; ++j) {
    counts[j] += both[j];
    if (counts_data) counts_data[j] += both[K + j];
  }
}

int64_t stats_size(int64_t p) { return 2 * p + 2; }

void batch_stats(const Data& d, const Problem& prob, const double* w, double mu, int64_t begin, int64_t end,
                 double* stats) {
  const int64_t p = d.dim();
  std::fill(stats, stats + stats_size(p), 0.0);
  if (by_pattern(d)) {
    PatternBatch pb(d);
    pb.stats(d, prob, w, mu, nullptr, nullptr, begin, end, stats);
    return;
  }
  parallel_accumulate(end - begin, stats_size(p), stats, [&](int64_t b, int64_t e, double* acc) {
    stream_range(d, prob, w, mu, begin + b, begin + e, acc);
  });
}

void apply_update(const Problem& prob, int64_t m, int64_t c, const StreamConfig& cfg, StreamState& st,
                  const double* stats) {
  const int64_t p = m * (c + 1);
  const double count = stats[2 * p + 1];
  if (!(count > 0.0)) return;
  double& mu = st.scalars[0];
  double& avg_mu = st.scalars[1];
  double& seen = st.scalars[2];
  double& steps = st.scalars[3];
  seen += count;
  steps += 1.0;
  const double lr = cfg.lr;
  const double r = (cfg.gamma + 1.0) / (steps + cfg.gamma);
  for (int64_t j = 0; j < p; ++j) {
    st.curv[j] += stats[p + j];
    const double h = st.curv[j] / seen + 1e-6;
    const double g = stats[j] / count;
    const double lam = prob.lambda(j, c);
    st.v_plus[j] = std::max(0.0, st.v_plus[j] + lr * (g - lam) / h);
    st.v_minus[j] = std::max(0.0, st.v_minus[j] + lr * (-g - lam) / h);
    st.avg_w[j] = (1.0 - r) * st.avg_w[j] + r * (st.v_plus[j] - st.v_minus[j]);
  }
  mu += lr * (stats[2 * p] / count - prob.eta);
  avg_mu = (1.0 - r) * avg_mu + r * mu;
}

namespace {

// stream_fit, and over packed rows keys (n, in the order to visit; dense labels, m <= 4, no
// utility) when given.
int64_t stream_fit_rows(const Data& d, const Problem& prob, const StreamConfig& cfg, StreamState& st,
                        const int64_t* order, const uint64_t* keys, double* counts_data) {
  const int64_t p = d.dim();
  const int64_t B = std::max<int64_t>(1, cfg.batch_size);
  std::vector<double> stats(stats_size(p)), w(p);
  // The gathered mini-batch (order given): rows order[b..e) copied into contiguous buffers.
  const int64_t Bn = std::min(B, std::max<int64_t>(d.n, 1));
  // (gy gets one spare byte: with c = 0 an empty vector's null data() would read as sparse labels)
  std::vector<uint8_t> gs(order ? Bn * d.m : 0), gy(order && d.y ? Bn * d.c + 1 : 0);
  std::vector<double> gu(order && d.u ? Bn : 0);
  std::vector<int64_t> gptr(order && !d.y ? Bn + 1 : 0);
  std::vector<int32_t> gidx;
  int64_t steps = 0;
  if (stream_in_shares(d, B)) return stream_fit_shares(d, prob, cfg, st, order, keys, counts_data);
  if (by_pattern(d)) {  // the rows are read in place (in `order`): no gathered copies
    PatternBatch pb(d);
    std::vector<double> data_sums(counts_data ? pb.nPS : 0, 0.0);
    for (int64_t b = 0; b < d.n; b += B) {
      interrupt::check();
      const int64_t e = std::min(d.n, b + B);
      for (int64_t j = 0; j < p; ++j) w[j] = st.v_plus[j] - st.v_minus[j];
      pb.stats(d, prob, w.data(), st.scalars[0], order, keys, b, e, stats.data());
      if (counts_data)
        for (int64_t x = 0; x < pb.nPS; ++x) data_sums[x] += pb.acc.data()[pb.nPS + x];
      apply_update(prob, d.m, d.c, cfg, st, stats.data());
      ++steps;
    }
    if (counts_data) fold_counts(d.m, d.c, data_sums.data(), counts_data);
    return steps;
  }
  for (int64_t b = 0; b < d.n; b += B) {
    interrupt::check();
    const int64_t e = std::min(d.n, b + B);
    for (int64_t j = 0; j < p; ++j) w[j] = st.v_plus[j] - st.v_minus[j];
    if (order) {
      Data g;
      g.n = e - b;
      g.m = d.m;
      g.c = d.c;
      g.s = gs.data();
      g.ld_s = d.m;
      for (int64_t i = b; i < e; ++i) {
        const int64_t src = order[i];
        std::copy(d.s + src * d.ld_s, d.s + src * d.ld_s + d.m, gs.data() + (i - b) * d.m);
        if (d.u) gu[i - b] = d.u[src];
      }
      if (d.y) {
        for (int64_t i = b; i < e; ++i)
          std::copy(d.y + order[i] * d.ld_y, d.y + order[i] * d.ld_y + d.c, gy.data() + (i - b) * d.c);
        g.y = gy.data();
        g.ld_y = d.c;
      } else {
        gidx.clear();
        gptr[0] = 0;
        for (int64_t i = b; i < e; ++i) {
          const int64_t src = order[i];
          gidx.insert(gidx.end(), d.y_indices + d.y_indptr[src], d.y_indices + d.y_indptr[src + 1]);
          gptr[i - b + 1] = static_cast<int64_t>(gidx.size());
        }
        g.y_indptr = gptr.data();
        g.y_indices = gidx.data();
      }
      if (d.u) g.u = gu.data();
      batch_stats(g, prob, w.data(), st.scalars[0], 0, g.n, stats.data());
    } else {
      batch_stats(d, prob, w.data(), st.scalars[0], b, e, stats.data());
    }
    apply_update(prob, d.m, d.c, cfg, st, stats.data());
    ++steps;
  }
  if (counts_data) weighted_counts(d, nullptr, counts_data);
  return steps;
}

constexpr uint64_t kGolden = 0x9e3779b97f4a7c15ull;

inline uint64_t splitmix_mix(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

// splitmix64 (Steele, Lea and Flood, 2014): a 64-bit generator that passes BigCrush.
struct SplitMix64 {
  uint64_t x;
  uint64_t next() { return splitmix_mix(x += kGolden); }
  // The i-th draw (from 0) of SplitMix64{seed}: the state is a counter, so any draw is O(1).
  static uint64_t draw(uint64_t seed, uint64_t i) { return splitmix_mix(seed + (i + 1) * kGolden); }
  // Uniform in [0, bound) by Lemire's multiply-shift with rejection (exact, no modulo bias).
  uint64_t below(uint64_t bound) {
    unsigned __int128 mm = static_cast<unsigned __int128>(next()) * bound;
    uint64_t low = static_cast<uint64_t>(mm);
    if (low < bound) {
      const uint64_t floor = (0 - bound) % bound;
      while (low < floor) {
        mm = static_cast<unsigned __int128>(next()) * bound;
        low = static_cast<uint64_t>(mm);
      }
    }
    return static_cast<uint64_t>(mm >> 64);
  }
};

// out[0..n) = value_of(i) for i in the order shuffled_order(n, seed) defines (see m4.h), in
// three passes that run on every thread: count each thread's indices per bucket, place
// them (thread t's indices of bucket k after those of threads < t: in index order, as one
// thread would), then shuffle each bucket with its own generator. value_of(i) reads row i
// in place: the rows are read in order, the writes go to 2^shift sequential streams.
template <typename V, typename Value>
void shuffle_into(int64_t n, uint64_t seed, V* out, Value value_of) {
  if (n <= 0) return;
  advise_huge_pages(out, static_cast<size_t>(n) * sizeof(V));  // a fresh output: its page faults
  int shift = 0;  // 2^shift buckets of about 2^15 entries (256 KB of 8-byte values: in L2), at most 2^12
  while (shift < 12 && (n >> (15 + shift)) > 0) ++shift;
  const int64_t K = int64_t(1) << shift;
  const uint64_t bucket_seed = SplitMix64{seed}.next(), shuffle_seed = SplitMix64{~seed}.next();
  auto bucket = [&](int64_t i) -> int64_t {
    return shift ? static_cast<int64_t>(SplitMix64::draw(bucket_seed, static_cast<uint64_t>(i)) >> (64 - shift)) : 0;
  };
  const int T = team_size(n);  // parallel_threads' team: thread t fills row t of `fill`
  std::vector<int64_t> fill(static_cast<size_t>(T) * K, 0), start(K + 1, 0);
  parallel_threads(n, [&](int t, int, int64_t b, int64_t e) {
    int64_t* f = fill.data() + static_cast<size_t>(t) * K;
    for (int64_t i = b; i < e; ++i) ++f[bucket(i)];
  });
  int64_t at = 0;
  for (int64_t k = 0; k < K; ++k) {
    start[k] = at;
    for (int t = 0; t < T; ++t) {
      const int64_t cnt = fill[static_cast<size_t>(t) * K + k];
      fill[static_cast<size_t>(t) * K + k] = at;
      at += cnt;
    }
  }
  start[K] = at;
  parallel_threads(n, [&](int t, int, int64_t b, int64_t e) {
    int64_t* f = fill.data() + static_cast<size_t>(t) * K;
    for (int64_t i = b; i < e; ++i) out[f[bucket(i)]++] = value_of(i);
  });
  // The buckets split over the threads (T contiguous ranges of [0, K)).
  auto shuffle_buckets = [&](int64_t kb, int64_t ke) {
    for (int64_t k = kb; k < ke; ++k) {
      SplitMix64 g{SplitMix64::draw(shuffle_seed, static_cast<uint64_t>(k))};
      V* a = out + start[k];
      for (int64_t i = start[k + 1] - start[k] - 1; i > 0; --i)
        std::swap(a[i], a[static_cast<int64_t>(g.below(static_cast<uint64_t>(i) + 1))]);
    }
  };
  if (T == 1 || K < T) {
    shuffle_buckets(0, K);
  } else {
#if defined(PYM4_WITH_OPENMP)
#pragma omp parallel num_threads(T)
#endif
    {
      int64_t kb, ke;
      range_of(K, thread_id(), T, kb, ke);
      shuffle_buckets(kb, ke);
    }
  }
}

}  // namespace

int64_t stream_fit(const Data& d, const Problem& prob, const StreamConfig& cfg, StreamState& st,
                   const int64_t* order, double* counts_data) {
  return stream_fit_rows(d, prob, cfg, st, order, nullptr, counts_data);
}

void shuffled_order(int64_t n, uint64_t seed, int64_t* out) {
  shuffle_into(n, seed, out, [](int64_t i) { return i; });
}

int64_t stream_fit_shuffled(const Data& d, const Problem& prob, const StreamConfig& cfg, StreamState& st,
                            uint64_t seed, double* counts_data) {
  if (by_pattern(d) && !d.u && d.c <= kKeyLabels) {
    std::vector<uint64_t> keys(static_cast<size_t>(d.n));
    shuffle_into(d.n, seed, keys.data(), [&](int64_t i) { return packed_row(d, i); });
    return stream_fit_rows(d, prob, cfg, st, nullptr, keys.data(), counts_data);
  }
  std::vector<int64_t> order(static_cast<size_t>(d.n));
  shuffled_order(d.n, seed, order.data());
  return stream_fit_rows(d, prob, cfg, st, order.data(), nullptr, counts_data);
}

int64_t newton_stats_size(int64_t m, int64_t c) {
  const int64_t L = c + 1;
  return (1 + m + m * (m - 1) / 2) * L * L + 2 * (1 + m) * L + 1;
}

void newton_stats(const Data& d, const Problem& prob, const double* w, double mu, int64_t hessian_stride,
                  double* stats, bool count_data) {
  const int64_t stride = std::max<int64_t>(1, hessian_stride);
  if (by_pattern(d)) {
    const int64_t L = d.c + 1, nP = int64_t(1) << d.m, S = pattern_stride(d.c);
    const int64_t width = 2 * nP * S + 1 + nP * L * L;
    AlignedDoubles W(nP * S);
    std::vector<double> acc(width, 0.0);
    pattern_weights(d.m, d.c, prob.pi, w, W.data());
    parallel_accumulate(d.n, width, acc.data(), [&](int64_t b, int64_t e, double* a) {
      RowBlock rb;
      std::vector<int32_t> idx(L);
      newton_range_pattern(d, prob, W.data(), mu, stride, count_data, b, e, a, rb, idx.data());
    });
    fold_newton(d.m, d.c, acc.data(), stats);
    return;
  }
  parallel_accumulate(d.n, newton_stats_size(d.m, d.c), stats,
                      [&](int64_t b, int64_t e, double* acc) { newton_range(d, prob, w, mu, stride, count_data, b, e, acc); });
}

void newton_model(const Problem& prob, int64_t m, int64_t c, const double* stats, double* H, double* r) {
  const int64_t L = c + 1, LL = L * L, p = m * L, P = p + 1;
  const double* blocks = stats;
  const double* qv = stats + (1 + m + m * (m - 1) / 2) * LL;
  const double* P0 = blocks;
  const double* pi = prob.pi;
  // sum_A d_k d_l v v^T with d_k = s_k - pi_k and s binary (s_k^2 = s_k).
  for (int64_t k = 0; k < m; ++k) {
    const double* Pk = blocks + (1 + k) * LL;
    for (int64_t l = 0; l < m; ++l) {
      const double* Pl = blocks + (1 + l) * LL;
      const double* Pkl = k == l ? nullptr : blocks + (1 + m + pair_index(std::min(k, l), std::max(k, l), m)) * LL;
      for (int64_t a = 0; a < L; ++a) {
        double* out = H + (k * L + a) * P + l * L;
        for (int64_t b = 0; b < L; ++b) {
          const int64_t ab = a * L + b;
          out[b] = k == l ? (1.0 - 2.0 * pi[k]) * Pk[ab] + pi[k] * pi[k] * P0[ab]
                          : Pkl[ab] - pi[l] * Pk[ab] - pi[k] * Pl[ab] + pi[k] * pi[l] * P0[ab];
        }
      }
    }
    // The mu row and column: sum_A d_k v (the first row of a block is sum v, as v_0 = 1).
    for (int64_t a = 0; a < L; ++a) {
      const double h = Pk[a] - pi[k] * P0[a];
      H[(k * L + a) * P + p] = h;
      H[p * P + k * L + a] = h;
      r[k * L + a] = qv[(1 + k) * L + a] - pi[k] * qv[a];
    }
  }
  H[p * P + p] = P0[0];
  r[p] = qv[0];
}

}  // namespace m4
}  // namespace pym4
