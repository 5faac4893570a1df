// M4 data balancing (Alabdulmohsin et al., "CLIP the Bias", ICLR 2024): keep probabilities
// q_i in [0, 1] solving, for N examples with sensitive groups s_i in {0,1}^m, labels
// y_i in {0,1}^c and utilities u_i,
//
//     minimise    (1/N) sum_i [ 1/2 (q_i - eta)^2 - u_i q_i ]
//     subject to  (1/N) sum_i q_i = eta                                   (budget)
//                 |(1/N) sum_i q_i a_ij| <= lambda_j  for every j          (bias)
//                 0 <= q_i <= 1,
//
// where a_i = (s_i - pi) (x) [1; y_i] has p = m (c + 1) entries: entry k (c+1) is the
// representation constraint of group k (lambda = eta eps_rep) and entry k (c+1) + 1 + r the
// association constraint of (group k, label r) (lambda = eta eps_assoc). With the dual
// w = v+ - v- of the bias constraints and mu of the budget, the minimiser is
//
//     q_i = clip(eta + u_i - a_i^T w - mu, 0, 1).
//
// Nothing here builds the N x p matrix: every pass reads s_i and y_i (dense uint8 rows, or
// CSR index lists for large c) and forms a_i on the fly. Plain C++17, no Python.
#pragma once

#include <cstdint>
#include <vector>

namespace pym4 {
namespace m4 {

// One block of examples. Labels are dense (y != nullptr: n x c uint8 0/1, row stride ld_y)
// or sparse (y == nullptr: CSR y_indptr[n+1] (int64), y_indices (int32, in [0, c))).
// s is n x m uint8 0/1 with row stride ld_s; u (n doubles) may be null (all zero).
struct Data {
  int64_t n = 0, m = 0, c = 0;
  const uint8_t* s = nullptr;
  int64_t ld_s = 0;
  const uint8_t* y = nullptr;
  int64_t ld_y = 0;
  const int64_t* y_indptr = nullptr;
  const int32_t* y_indices = nullptr;
  const double* u = nullptr;
  int64_t dim() const { return m * (c + 1); }
};

struct Problem {
  const double* pi = nullptr;  // m target proportions
  double eta = 0.9;            // budget
  double eps_rep = 0.01;       // representation tolerance (relative to eta)
  double eps_assoc = 0.01;     // association tolerance (relative to eta)
  // lambda_j = eta * eps of constraint j (index layout above).
  double lambda(int64_t j, int64_t c) const { return eta * (j % (c + 1) == 0 ? eps_rep : eps_assoc); }
};

// out_i = a_i^T w for i in [0, n).
void margins(const Data& d, const double* pi, const double* w, double* out);

// q_i = clip(eta + u_i - a_i^T w - mu, 0, 1).
void keep_probability(const Data& d, const Problem& prob, const double* w, double mu, double* q);

// Weighted counts for the bias metrics and the constraint values, accumulated (+=) into
// counts = [sum_i q_i | sum_i q_i s_ik (m) | sum_i q_i y_ir (c) | sum_i q_i s_ik y_ir (m x c)]
// (size 1 + m + c + m c, all doubles). q == nullptr means q_i = 1.
int64_t counts_size(int64_t m, int64_t c);
void weighted_counts(const Data& d, const double* q, double* counts);

// ----- method="stream": one-pass stochastic projected dual ascent -------------------------
// Per mini-batch B with the current iterate (w = v+ - v-, mu): g = mean_B q_i a_i and
// g_mu = mean_B q_i - eta, then
//     v+ <- max(0, v+ + lr (g - lambda) / h),  v- <- max(0, v- + lr (-g - lambda) / h),
//     mu <- mu + lr g_mu,
// with h_j = mean a_ij^2 over all examples seen so far (a diagonal preconditioner: the
// association entries of rare labels have little curvature), and the returned duals the
// polynomial-decay average avg <- (1 - r) avg + r x, r = (gamma + 1) / (t + gamma)
// (Shamir & Zhang, ICML 2013), which needs no knowledge of the stream's length.
struct StreamConfig {
  double lr = 0.1;
  double gamma = 3.0;
  int64_t batch_size = 256;
};

// The whole state lives in caller-owned arrays: checkpointing is copying them.
struct StreamState {
  double* v_plus;   // p
  double* v_minus;  // p
  double* avg_w;    // p, averaged v+ - v-
  double* curv;     // p, sum of a_ij^2 over examples seen
  double* scalars;  // [mu, avg_mu, examples seen, steps]
};

// stats = [sum q a (p) | sum a^2 (p) | sum q | count] over examples [begin, end) with duals (w, mu).
int64_t stats_size(int64_t p);
void batch_stats(const Data& d, const Problem& prob, const double* w, double mu, int64_t begin, int64_t end,
                 double* stats);
// One ascent step from the (possibly all-reduced) stats of a mini-batch.
void apply_update(const Problem& prob, int64_t m, int64_t c, const StreamConfig& cfg, StreamState& st,
                  const double* stats);
// batch_stats + apply_update over consecutive mini-batches of cfg.batch_size (the last one
// may be shorter). Returns the number of steps taken.
int64_t stream_fit(const Data& d, const Problem& prob, const StreamConfig& cfg, StreamState& st);

// ----- method="exact": proximal Newton on the dual ----------------------------------------
// mu is eliminated exactly (for given w, mean_i clip(b_i - mu, 0, 1) = eta is a monotone
// piecewise-linear equation, solved by safeguarded Newton), leaving the concave
//     F(w) = max_mu D(w, mu) - sum_j lambda_j |w_j|,  |w_j| <= rho,
// whose smooth part has gradient g = (1/N) sum q_i a_i and generalised Hessian
// -(1/N) [sum_A a_i a_i^T - S S^T / |A|] (A: examples with 0 < q_i < 1, S = sum_A a_i).
// Each iteration solves the l1-regularised quadratic model by coordinate descent and
// backtracks on F. The Hessian is kept as Kronecker blocks sum s_k s_l [1;y][1;y]^T and
// updated only for the examples whose activity changed. Infeasibility is certified by the
// recession function of the dual, D_inf(w) = max_mu (1/N) sum_i min(0, a_i^T w + mu) - mu eta
// - sum_j lambda_j |w_j| > 0 (no feasible q exists then, by weak duality).
struct ExactConfig {
  int64_t max_iter = 100;
  double tol = 1e-10;  // on constraint violations and on the duality gap (relative)
  double rho = 1e6;    // box on the duals
};

enum class Status : int { Optimal = 0, Infeasible = 1, MaxIter = 2 };

struct ExactResult {
  Status status = Status::MaxIter;
  int64_t iterations = 0;
  double mu = 0.0;
  double max_violation = 0.0;  // max_j (|g_j| - lambda_j)_+ at the returned q
  double gap = 0.0;            // duality gap sum_j lambda_j |w_j| - w_j g_j
  double recession = 0.0;      // D_inf(w) (> 0 certifies infeasibility)
};

// w (p, in/out: the start point, zeros for a cold start), q (n, out).
ExactResult solve_exact(const Data& d, const Problem& prob, const ExactConfig& cfg, double* w, double* q);

}  // namespace m4
}  // namespace pym4
