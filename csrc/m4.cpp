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
                                   int64_t b, int64_t e, double* acc) {
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
    for (int64_t t = 0; t < nz; ++t) {
      qv[idx[t]] += q;
      cv[idx[t]] += 1.0;
    }
    for (int64_t g = 0; g < ng; ++g) {
      double* qk = qv + (1 + groups[g]) * L;
      double* ck = cv + (1 + groups[g]) * L;
      for (int64_t t = 0; t < nz; ++t) {
        qk[idx[t]] += q;
        ck[idx[t]] += 1.0;
      }
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

double keep_probability_at_budget(const Data& d, const Problem& prob, const double* w, double mu0, double* q,
                                  double* counts_after, double* counts_before) {
  const int64_t n = d.n;
  if (n == 0) return mu0;
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
  lo -= 1.0;
  const double target = static_cast<double>(n) * prob.eta;
  double mu = std::min(std::max(mu0, lo), hi);
  for (int it = 0; it < 200; ++it) {
    double acc[2] = {0.0, 0.0};  // sum q, active count
    parallel_accumulate(n, 2, acc, [&](int64_t b, int64_t e, double* a) {
      double sq = 0.0, na = 0.0;
      for (int64_t i = b; i < e; ++i) {
        const double z = q[i] - mu;
        sq += clip01(z);
        na += (z > 0.0 && z < 1.0) ? 1.0 : 0.0;
      }
      a[0] += sq;
      a[1] += na;
    });
    const double f = acc[0] - target;
    if (std::abs(f) <= 1e-13 * static_cast<double>(n)) break;
    (f > 0.0 ? lo : hi) = mu;
    double next = acc[1] > 0.0 ? mu + f / acc[1] : 0.5 * (lo + hi);
    if (!(next > lo && next < hi)) next = 0.5 * (lo + hi);
    if (next == mu || hi - lo <= 1e-15 * (1.0 + std::abs(mu))) break;
    mu = next;
  }
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

int64_t stream_fit(const Data& d, const Problem& prob, const StreamConfig& cfg, StreamState& st,
                   const int64_t* order) {
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
  return steps;
}

int64_t newton_stats_size(int64_t m, int64_t c) {
  const int64_t L = c + 1;
  return (1 + m + m * (m - 1) / 2) * L * L + 2 * (1 + m) * L + 1;
}

void newton_stats(const Data& d, const Problem& prob, const double* w, double mu, int64_t hessian_stride,
                  double* stats) {
  const int64_t stride = std::max<int64_t>(1, hessian_stride);
  parallel_accumulate(d.n, newton_stats_size(d.m, d.c), stats,
                      [&](int64_t b, int64_t e, double* acc) { newton_range(d, prob, w, mu, stride, b, e, acc); });
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
