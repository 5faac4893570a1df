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
#include <limits>
#include <vector>

#include "pym4/common.h"

namespace pym4 {
namespace m4 {
namespace {

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

// ----- exact solver pieces ------------------------------------------------------------------

// Evaluations along a line: z_i = b_i - t r_i - mu (r may be null).
struct Line {
  const double* b;
  const double* r;
  double t;
  int64_t n;
  double z(int64_t i, double mu) const { return b[i] - (r ? t * r[i] : 0.0) - mu; }
};

// sum_i clip(z_i, 0, 1) and #{0 < z_i < 1}.
void budget_terms(const Line& ln, double mu, double& sum_q, double& active) {
  double s = 0.0, c = 0.0;
  for (int64_t i = 0; i < ln.n; ++i) {
    const double z = ln.z(i, mu);
    s += clip01(z);
    c += (z > 0.0 && z < 1.0) ? 1.0 : 0.0;
  }
  sum_q = s;
  active = c;
}

// The mu with mean_i clip(z_i(mu), 0, 1) = eta: the left side is continuous, nonincreasing
// and piecewise linear in mu, so Newton steps inside a bracket end on the exact root once
// they reach its linear piece; bisection guards the rest.
double solve_mu(const Line& ln, double eta, double mu0) {
  double acc[2] = {std::numeric_limits<double>::infinity(), -std::numeric_limits<double>::infinity()};
  for (int64_t i = 0; i < ln.n; ++i) {
    const double v = ln.z(i, 0.0);
    acc[0] = std::min(acc[0], v);
    acc[1] = std::max(acc[1], v);
  }
  double lo = acc[0] - 1.0, hi = acc[1];  // phi(lo) = 1 - eta >= 0, phi(hi) = -eta < 0
  if (eta >= 1.0) return lo;
  const double N = static_cast<double>(ln.n);
  double mu = std::min(std::max(mu0, lo), hi);
  for (int it = 0; it < 200; ++it) {
    double sum_q, active;
    budget_terms(ln, mu, sum_q, active);
    const double phi = sum_q / N - eta;
    if (phi == 0.0) return mu;
    if (phi > 0.0) lo = mu; else hi = mu;
    double next = active > 0.0 ? mu + phi * N / active : 0.5 * (lo + hi);
    if (!(next > lo && next < hi)) next = 0.5 * (lo + hi);
    if (std::abs(phi) <= 4.0 * std::numeric_limits<double>::epsilon() || next == mu ||
        hi - lo <= 4.0 * std::numeric_limits<double>::epsilon() * std::max(1.0, std::abs(mu)))
      return mu;
    mu = next;
  }
  return mu;
}

// (1/N) sum_i [1/2 (q_i - eta)^2 - q_i (z_i - eta)] - mu eta: the smooth dual at the line point.
double dual_smooth(const Line& ln, double mu, double eta) {
  double acc = 0.0;
  for (int64_t i = 0; i < ln.n; ++i) {
    const double z = ln.z(i, mu);
    const double q = clip01(z);
    acc += 0.5 * (q - eta) * (q - eta) - q * (z - eta);
  }
  return acc / static_cast<double>(ln.n) - mu * eta;
}

// Kronecker blocks of the active examples' second moments (see m4.h):
// block 0 = sum_A ytil ytil^T, block 1 + pair(k, l) = sum_A s_k s_l ytil ytil^T (k <= l),
// with ytil = [1; y] of size L = c + 1; s0 = sum_A ytil, sk = sum_A s_k ytil, count = |A|.
struct Moments {
  int64_t m, L;
  std::vector<double> blocks, s0, sk;
  double count = 0.0;
  Moments(int64_t m_, int64_t c) : m(m_), L(c + 1) {
    blocks.assign(static_cast<size_t>(1 + m * (m + 1) / 2) * L * L, 0.0);
    s0.assign(L, 0.0);
    sk.assign(static_cast<size_t>(m) * L, 0.0);
  }
  int64_t pair(int64_t k, int64_t l) const {  // k <= l
    return k * m - k * (k - 1) / 2 + (l - k);
  }
  double* block(int64_t idx) { return blocks.data() + static_cast<size_t>(idx) * L * L; }

  // Adds (sign +1) or removes (-1) the examples `idx` with signs `sign`.
  void update(const Data& d, const std::vector<int64_t>& idx, const std::vector<int8_t>& sign) {
    const int64_t n = static_cast<int64_t>(idx.size());
    if (n == 0) return;
    for (int64_t t = 0; t < n; ++t) count += sign[t];
    // Threads own disjoint row ranges of every block, so no two write the same entry.
    const int T = n * L >= kParallelMin ? max_threads() : 1;
#if defined(PYM4_WITH_OPENMP)
#pragma omp parallel num_threads(T)
#endif
    {
      const int t = T == 1 ? 0 : thread_id();
      int64_t r0, r1;
      range_of(L, t, T, r0, r1);
      std::vector<int64_t> lst;
      std::vector<int64_t> groups;
      lst.reserve(L);
      for (int64_t e = 0; e < n; ++e) {
        const int64_t i = idx[e];
        const double sg = sign[e];
        const Row r = row_of(d, i);
        lst.clear();
        lst.push_back(0);
        if (r.y) {
          for (int64_t j = 0; j < d.c; ++j)
            if (r.y[j]) lst.push_back(1 + j);
        } else {
          for (int64_t j = 0; j < r.nnz; ++j) lst.push_back(1 + r.idx[j]);
        }
        groups.clear();
        const uint8_t* s = d.s + i * d.ld_s;
        for (int64_t k = 0; k < m; ++k)
          if (s[k]) groups.push_back(k);
        for (int64_t ra : lst) {
          if (ra < r0 || ra >= r1) continue;
          s0[ra] += sg;
          for (int64_t k : groups) sk[k * L + ra] += sg;
          double* b0 = block(0) + ra * L;
          for (int64_t rb : lst) b0[rb] += sg;
          for (size_t gk = 0; gk < groups.size(); ++gk)
            for (size_t gl = gk; gl < groups.size(); ++gl) {
              double* bkl = block(1 + pair(groups[gk], groups[gl])) + ra * L;
              for (int64_t rb : lst) bkl[rb] += sg;
            }
        }
      }
    }
  }

  // K = (1/N) [sum_A a a^T - S S^T / |A|] (p x p, row-major), S = sum_A a_i.
  void assemble(const double* pi, double N, std::vector<double>& K) const {
    const int64_t p = m * L;
    K.assign(static_cast<size_t>(p) * p, 0.0);
    std::vector<double> S(p);
    for (int64_t k = 0; k < m; ++k)
      for (int64_t a = 0; a < L; ++a) S[k * L + a] = sk[k * L + a] - pi[k] * s0[a];
    const double inv_count = count > 0.0 ? 1.0 / count : 0.0;
    const double* b0 = blocks.data();
    for (int64_t k = 0; k < m; ++k)
      for (int64_t l = 0; l < m; ++l) {
        const double* bkl = blocks.data() + static_cast<size_t>(1 + pair(std::min(k, l), std::max(k, l))) * L * L;
        const double* bkk = blocks.data() + static_cast<size_t>(1 + pair(k, k)) * L * L;
        const double* bll = blocks.data() + static_cast<size_t>(1 + pair(l, l)) * L * L;
        for (int64_t a = 0; a < L; ++a) {
          double* out = K.data() + static_cast<size_t>(k * L + a) * p + l * L;
          const double sa = S[k * L + a] * inv_count;
          for (int64_t b = 0; b < L; ++b) {
            const int64_t o = a * L + b;
            const double mom = bkl[o] - pi[l] * bkk[o] - pi[k] * bll[o] + pi[k] * pi[l] * b0[o];
            out[b] = (mom - sa * S[l * L + b]) / N;
          }
        }
      }
  }
};

// Coordinate descent on min_x 1/2 (x - w)^T K (x - w) - g^T (x - w) + sum_j lam_j |x_j|,
// |x_j| <= rho (K symmetric positive definite, row-major); returns d = x - w.
void newton_direction(int64_t p, const std::vector<double>& K, const std::vector<double>& g, const double* w,
                      const std::vector<double>& lam, double rho, std::vector<double>& d) {
  std::vector<double> x(w, w + p), Kd(p, 0.0);
  for (int sweep = 0; sweep < 500; ++sweep) {
    double max_change = 0.0, max_x = 0.0;
    for (int64_t j = 0; j < p; ++j) {
      const double kjj = K[static_cast<size_t>(j) * p + j];
      const double v = x[j] - (Kd[j] - g[j]) / kjj;
      double nv = std::max(std::abs(v) - lam[j] / kjj, 0.0);
      nv = std::min(nv, rho);
      nv = v < 0 ? -nv : nv;
      const double dx = nv - x[j];
      if (dx != 0.0) {
        const double* kj = K.data() + static_cast<size_t>(j) * p;
        for (int64_t i = 0; i < p; ++i) Kd[i] += kj[i] * dx;
        x[j] = nv;
        max_change = std::max(max_change, std::abs(dx));
      }
      max_x = std::max(max_x, std::abs(x[j]));
    }
    if (max_change <= 1e-15 * (1.0 + max_x)) break;
  }
  d.resize(p);
  for (int64_t j = 0; j < p; ++j) d[j] = x[j] - w[j];
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
    const int64_t e = std::min(d.n, b + B);
    for (int64_t j = 0; j < p; ++j) w[j] = st.v_plus[j] - st.v_minus[j];
    batch_stats(d, prob, w.data(), st.scalars[0], b, e, stats.data());
    apply_update(prob, d.m, d.c, cfg, st, stats.data());
    ++steps;
  }
  return steps;
}

ExactResult solve_exact(const Data& d, const Problem& prob, const ExactConfig& cfg, double* w, double* q) {
  const int64_t n = d.n, p = d.dim(), c = d.c;
  const double N = static_cast<double>(n), eta = prob.eta;
  ExactResult res;
  std::vector<double> lam(p);
  for (int64_t j = 0; j < p; ++j) lam[j] = prob.lambda(j, c);
  auto l1 = [&](const double* x) {
    double s = 0.0;
    for (int64_t j = 0; j < p; ++j) s += lam[j] * std::abs(x[j]);
    return s;
  };

  // b_i = eta + u_i - a_i^T w; z_i = b_i - mu.
  std::vector<double> bvec(n), rvec(n);
  margins(d, prob.pi, w, bvec.data());
  parallel_ranges(n, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) bvec[i] = eta + (d.u ? d.u[i] : 0.0) - bvec[i];
  });
  Line here{bvec.data(), nullptr, 0.0, n};
  double mu = solve_mu(here, eta, 0.0);
  double F = dual_smooth(here, mu, eta) - l1(w);

  Moments mom(d.m, c);
  std::vector<uint8_t> active(n, 0);
  std::vector<int64_t> changed;
  std::vector<int8_t> signs;
  std::vector<double> g(p), K, dir;
  std::vector<double> wt(p);

  auto refresh_q_and_g = [&]() {
    parallel_ranges(n, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) q[i] = clip01(bvec[i] - mu);
    });
    std::fill(g.begin(), g.end(), 0.0);
    parallel_accumulate(n, p, g.data(), [&](int64_t b, int64_t e, double* acc) { qa_range(d, prob.pi, q, b, e, acc); });
    for (double& v : g) v /= N;
  };
  auto measure = [&]() {
    res.max_violation = 0.0;
    res.gap = 0.0;
    for (int64_t j = 0; j < p; ++j) {
      res.max_violation = std::max(res.max_violation, std::abs(g[j]) - lam[j]);
      res.gap += lam[j] * std::abs(w[j]) - w[j] * g[j];
    }
    res.max_violation = std::max(res.max_violation, 0.0);
  };
  // D_inf(w): with c_i = a_i^T w, the best mu keeps the ceil(eta N) smallest c_i.
  auto recession = [&]() {
    margins(d, prob.pi, w, rvec.data());
    const int64_t k = std::max<int64_t>(1, std::min<int64_t>(n, static_cast<int64_t>(std::ceil(eta * N - 1e-9))));
    std::vector<double> cs(rvec);
    std::nth_element(cs.begin(), cs.begin() + (k - 1), cs.end());
    const double mu_r = -cs[k - 1];
    double s = 0.0;
    for (int64_t i = 0; i < n; ++i) s += std::min(0.0, rvec[i] + mu_r);
    return s / N - mu_r * eta - l1(w);
  };

  res.status = Status::MaxIter;
  for (int64_t it = 0;; ++it) {
    res.iterations = it;
    refresh_q_and_g();
    measure();
    const double tol = cfg.tol;
    if (res.max_violation <= tol && std::abs(res.gap) <= tol * std::max(1.0, std::abs(F))) {
      res.status = Status::Optimal;
      break;
    }
    if (res.max_violation > tol && it > 0) {
      double wsum = 0.0;
      for (int64_t j = 0; j < p; ++j) wsum += std::abs(w[j]);
      res.recession = recession();
      if (res.recession > 1e-10 * wsum) {
        res.status = Status::Infeasible;
        break;
      }
    }
    if (it >= cfg.max_iter) break;

    // Active-set changes since the last Hessian.
    changed.clear();
    signs.clear();
    for (int64_t i = 0; i < n; ++i) {
      const double z = bvec[i] - mu;
      const uint8_t a = (z > 0.0 && z < 1.0) ? 1 : 0;
      if (a != active[i]) {
        changed.push_back(i);
        signs.push_back(a ? 1 : -1);
        active[i] = a;
      }
    }
    mom.update(d, changed, signs);
    mom.assemble(prob.pi, N, K);
    double max_diag = 0.0;
    for (int64_t j = 0; j < p; ++j) max_diag = std::max(max_diag, K[static_cast<size_t>(j) * p + j]);
    const double damping = 1e-10 * std::max(max_diag, 1e-6) + 1e-14;
    for (int64_t j = 0; j < p; ++j) K[static_cast<size_t>(j) * p + j] += damping;
    newton_direction(p, K, g, w, lam, cfg.rho, dir);

    for (int64_t j = 0; j < p; ++j) wt[j] = w[j] + dir[j];
    double pred = l1(w) - l1(wt.data());
    for (int64_t j = 0; j < p; ++j) pred += g[j] * dir[j];
    if (!(pred > 1e-300)) break;  // no ascent direction left: the model is solved
    margins(d, prob.pi, dir.data(), rvec.data());
    double t = 1.0, mu_t = mu, F_t = F;
    bool accepted = false;
    for (int ls = 0; ls < 60; ++ls, t *= 0.5) {
      Line trial{bvec.data(), rvec.data(), t, n};
      mu_t = solve_mu(trial, eta, mu);
      for (int64_t j = 0; j < p; ++j) wt[j] = w[j] + t * dir[j];
      F_t = dual_smooth(trial, mu_t, eta) - l1(wt.data());
      if (F_t >= F + 1e-4 * t * pred) {
        accepted = true;
        break;
      }
    }
    if (!accepted) break;
    parallel_ranges(n, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) bvec[i] -= t * rvec[i];
    });
    std::copy(wt.begin(), wt.end(), w);
    mu = mu_t;
    F = F_t;
  }
  if (res.status != Status::Optimal && res.status != Status::Infeasible) {
    // Stopped without meeting tol: numerically optimal when the constraints hold to 1e-9.
    if (res.max_violation <= std::max(cfg.tol, 1e-9) && std::abs(res.gap) <= 1e-8 * std::max(1.0, std::abs(F)) &&
        res.iterations < cfg.max_iter)
      res.status = Status::Optimal;
  }
  res.mu = mu;
  return res;
}

}  // namespace m4
}  // namespace pym4
