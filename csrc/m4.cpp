// CPU kernels of M4 data balancing (see include/pym4/m4.h for the problem and the methods).
//
// Every pass streams over examples and forms a_i = (s_i - pi) (x) [1; y_i] on the fly from
// the example's uint8 row (dense labels) or its index list (sparse labels). Passes over
// examples run in parallel with OpenMP on static contiguous ranges; each thread keeps its
// own accumulators, summed in thread order, so results are deterministic for a given
// thread count.
#include "pym4/m4.h"

#include <algorithm>
#include <cmath>
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

PYM4_SIMD_CLONES void counts_range(const Data& d, const double* q, int64_t b, int64_t e, double* acc) {
  const int64_t m = d.m, c = d.c;
  double* qs = acc + 1;
  double* qy = acc + 1 + m;
  double* qsy = acc + 1 + m + c;
  for (int64_t i = b; i < e; ++i) {
    const double qi = q ? q[i] : 1.0;
    if (qi == 0.0) continue;
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

}  // namespace

// ----- public entry points --------------------------------------------------------------------

void margins(const Data& d, const double* pi, const double* w, double* out) {
  parallel_ranges(d.n, [&](int64_t b, int64_t e) { margins_range(d, pi, w, b, e, out); });
}

void keep_probability(const Data& d, const Problem& prob, const double* w, double mu, double* q) {
  parallel_ranges(d.n, [&](int64_t b, int64_t e) {
    margins_range(d, prob.pi, w, b, e, q);
    for (int64_t i = b; i < e; ++i) q[i] = clip01(prob.eta + (d.u ? d.u[i] : 0.0) - q[i] - mu);
  });
}

int64_t counts_size(int64_t m, int64_t c) { return 1 + m + c + m * c; }

void weighted_counts(const Data& d, const double* q, double* counts) {
  parallel_accumulate(d.n, counts_size(d.m, d.c), counts,
                      [&](int64_t b, int64_t e, double* acc) { counts_range(d, q, b, e, acc); });
}

int64_t stats_size(int64_t p) { return 2 * p + 2; }

void batch_stats(const Data& d, const Problem& prob, const double* w, double mu, int64_t begin, int64_t end,
                 double* stats) {
  const int64_t p = d.dim();
  std::fill(stats, stats + stats_size(p), 0.0);
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

int64_t stream_fit(const Data& d, const Problem& prob, const StreamConfig& cfg, StreamState& st) {
  const int64_t p = d.dim();
  const int64_t B = std::max<int64_t>(1, cfg.batch_size);
  std::vector<double> stats(stats_size(p)), w(p);
  int64_t steps = 0;
  for (int64_t b = 0; b < d.n; b += B) {
    interrupt::check();
    const int64_t e = std::min(d.n, b + B);
    for (int64_t j = 0; j < p; ++j) w[j] = st.v_plus[j] - st.v_minus[j];
    batch_stats(d, prob, w.data(), st.scalars[0], b, e, stats.data());
    apply_update(prob, d.m, d.c, cfg, st, stats.data());
    ++steps;
  }
  return steps;
}

}  // namespace m4
}  // namespace pym4
