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
// CSR index lists for large c) and forms a_i on the fly. With dense rows and m <= 4 groups
// the passes work per s-pattern sigma: a_i^T w = W_sigma . [1; y_i] with W_sigma = sum_k
// (sigma_k - pi_k) w_k (one c-dot per row), and sums over rows per pattern, folded into
// per-group sums at the end (csrc/m4_rows.h). Plain C++17, no Python.
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

// The same with mu chosen so that the budget holds on these rows, mean_i q_i = eta (to
// rounding): mean q is a monotone piecewise-linear function of mu, whose root safeguarded
// Newton steps over the stored z_i find (starting from mu0). Returns that mu. The pass
// that writes q also adds the weighted counts of q (counts_after) and of the data
// (counts_before) when they are not null (layout of weighted_counts).
double keep_probability_at_budget(const Data& d, const Problem& prob, const double* w, double mu0, double* q,
                                  double* counts_after = nullptr, double* counts_before = nullptr);

// Weighted counts for the bias metrics and the constraint values, accumulated (+=) into
// counts = [sum_i q_i | sum_i q_i s_ik (m) | sum_i q_i y_ir (c) | sum_i q_i s_ik y_ir (m x c)]
// (size 1 + m + c + m c, all doubles). q == nullptr means q_i = 1.
int64_t counts_size(int64_t m, int64_t c);
// counts_data (may be null): the data's counts (q_i = 1) as well, in the same pass.
void weighted_counts(const Data& d, const double* q, double* counts, double* counts_data = nullptr);

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
// may be shorter). Returns the number of steps taken. order (n row indices, may be null)
// visits the rows in that order: each mini-batch is gathered into a small buffer, so a
// shuffled pass needs no shuffled copy of the data. counts_data (may be null): += the data's
// counts (weighted_counts layout, q = 1) of the rows streamed, which the per-pattern pass
// has as the sums its curvature needs (the general loop counts them in one more pass).
// Dense labels with m <= 4 over n >= 2^16 rows in batches of >= 128: each batch is summed in
// two shares, on two threads where there are two (m4.cpp), added in share order; the result
// depends on the shares only (the same bits on one thread or two), and differs from one
// undivided sum per batch by rounding.
int64_t stream_fit(const Data& d, const Problem& prob, const StreamConfig& cfg, StreamState& st,
                   const int64_t* order = nullptr, double* counts_data = nullptr);

// stream_fit over the rows in the order shuffled_order(n, seed) (the same steps, to
// rounding). With dense labels, c <= 60, m <= 4 and no utility, a row is 8 bytes (its
// s-pattern and label bits): the rows are packed in the shuffled order while they are read
// in place (the permutation's cache-sized buckets, as shuffled_order builds it), and the pass
// reads them sequentially instead of two scattered rows per example. Otherwise the order is
// built and the rows gathered as stream_fit does with an order.
int64_t stream_fit_shuffled(const Data& d, const Problem& prob, const StreamConfig& cfg, StreamState& st,
                            uint64_t seed, double* counts_data = nullptr);

// out (n) = a uniformly random permutation of [0, n), a pure function of (n, seed): the
// stream's shuffled order. Each index draws a bucket (2^k buckets of ~2^15 indices each),
// the indices are laid out bucket by bucket, and each bucket is shuffled by Fisher-Yates
// (its own generator per bucket): with iid uniform buckets and uniform orders within them
// every permutation is equally likely, and every pass runs in cache (a Fisher-Yates over
// all n swaps at random across the whole array: a cache miss per index; at n = 1e7 numpy's
// permutation takes several times as long). The draws are counter-based, so the passes run
// on every thread and the result does not depend on the thread count.
void shuffled_order(int64_t n, uint64_t seed, int64_t* out);

// ----- Newton refinement of given duals (method="stream" after its pass) ---------------
// At fixed duals x = (w, mu) the dual is, to second order, the quadratic model with gradient
// (1/N) sum_i q_i [a_i; 1] - [0; eta] and Hessian -(1/N) sum_A [a_i; 1][a_i; 1]^T (A: the
// rows with 0 < z_i < 1). Both are sums of Kronecker pieces: with v_i = [1; y_i] (L = c + 1),
// a_i = (s_i - pi) (x) v_i, so everything follows from per-group-set sums of v_i v_i^T and v_i:
//   blocks (nb = 1 + m + m (m - 1) / 2, each L x L, over A): sum v v^T, sum s_k v v^T,
//          sum s_k s_l v v^T (k < l, pair index in row-major order of the upper triangle);
//   first moments ((1 + m) x L, over all rows): sum q v, sum q s_k v; and the same unweighted,
//   sum v, sum s_k v: the weighted counts of q and of the data (the report) come from these.
// The Hessian needs far fewer rows than the gradient (an inexact Newton step converges
// when the gradient is exact): only rows i with i % hessian_stride == 0 add to the blocks,
// and the last entry counts those rows (all of them, active or not), so H / that count
// estimates the mean curvature. stats (newton_stats_size doubles) are plain sums: shards
// merge by adding.
int64_t newton_stats_size(int64_t m, int64_t c);
// count_data = false leaves the unweighted first moments (sum v, sum s_k v) out (zeros):
// they do not depend on the duals, so a caller that has them skips their work.
void newton_stats(const Data& d, const Problem& prob, const double* w, double mu, int64_t hessian_stride,
                  double* stats, bool count_data = true);
// The model from merged stats: H ((p+1) x (p+1), row-major, the negated Hessian times N) and
// r (p+1) = sum_i q_i [a_i; 1], with the index layout of a_i and mu last.
void newton_model(const Problem& prob, int64_t m, int64_t c, const double* stats, double* H, double* r);

// ----- method="exact": Newton on the dual, as passes over the data (DESIGN.md §3b) -------
// With x = (w, mu) and z_i = eta + u_i - a_i^T w - mu, the dual to maximise is
//     D(w, mu) = (1/N) sum_i phi(z_i) - mu eta - sum_j lambda_j |w_j|,
//     phi(z) = 1/2 (q - eta)^2 - q (z - eta),  q = clip(z, 0, 1),
// concave in (w, mu) jointly (the budget is an equality), with gradient
// (1/N) sum_i q_i [a_i; 1] - [0; eta] and generalised Hessian -(1/N) sum_A [a_i; 1][a_i; 1]^T
// (A: examples with 0 < z_i < 1). Every quantity a step needs is a sum over examples of
// per-example terms of size O(p) or O(p^2), p = m (c + 1), so one step is
//     exact_partial(rows, state) -> stats    (any split of the rows into shards, in any order:
//                                             stats are flat float64 sums, merged by adding)
//     exact_step(state, stats)   -> state    (driver side, a few KB)
// One pass evaluates up to kCandidates points x + t_k d along the current Newton direction
// d (a_i^T w and a_i^T d once per row, then each candidate is a few flops): the dual value,
// the gradient and the recession terms at each, and, when asked, the Hessian at one of them
// as Kronecker blocks: a_i = (s_i - pi) (x) [1; y_i] with y binary, so an active row adds
// the outer product of its set-label indices (~nnz^2/2 increments) to the block of its
// s-pattern (m <= 4), or to the blocks sum_A s_k s_l [1;y][1;y]^T of its group pairs.
// The step takes the longest candidate with sufficient ascent (Armijo), tests convergence on
// that candidate's full-data stats (every constraint, the budget and the duality gap
// lambda^T|w| - w^T g - mu g_mu), then solves the l1-regularised Newton model (mu eliminated
// in the model, coordinate descent on the Schur complement). The Hessian is reused while the
// iteration contracts fast (an inexact Newton step converges when the gradient is exact each
// pass). Large inputs start with a solve on a block subsample of the rows (the "sample"
// phase, ~sample_rows rows in 64-row blocks); its duals start the full passes, the first of
// which also builds the Hessian, so that the next step is a full Newton step (at N = 1e7,
// m = 2, c = 32: two full passes to 1e-9). Infeasibility is certified by
// the recession function D_inf(w, mu) = (1/N) sum_i min(0, a_i^T w + mu) - mu eta -
// sum_j lambda_j |w_j| > 0 at an iterate or along the direction (D is then unbounded above,
// so by weak duality no feasible q exists).
//
// Two ways to take the Newton step, fixed per solve (the sizes of state and stats depend on it):
// - dense: the passes that build the Hessian accumulate its Kronecker blocks (nH blocks of
//   (c+1)^2, nH = 2^m or 1 + m(m+1)/2) and the driver solves the l1-regularised model on the
//   p x p matrix. Few passes, but memory and time grow as p^2 (and nnz^2 per active row).
// - Hessian-free: the driver solves the Newton system on the free coordinates (w_j != 0, or a
//   violated constraint) by preconditioned conjugate gradients, each product with the Hessian
//   being one pass over the rows (stats: one gradient-sized vector), then takes the step
//   projected onto the orthant of the current signs (orthant-wise Newton; the line search is
//   the same pass of candidates). Memory O(p) on the driver and per thread; more passes.
// kAuto picks dense while its arrays stay small (exact_hessian_free_default).
struct ExactConfig {
  int64_t max_iter = 100;      // steps over the full data
  double tol = 1e-10;          // on constraint violations (budget included) relative to the budget
                               // eta, and on the duality gap relative to max(eta^2, |D|)
  double rho = 1e6;            // box on the duals
  int64_t sample_rows = 1 << 17;  // target rows of the warm-start sample (0: no sample phase)
  int hessian = -1;            // kHessianAuto, kHessianDense or kHessianFree
  int64_t max_bytes = int64_t(1) << 32;  // bound on the solver's own arrays (exact_memory_bytes)
};
constexpr int kHessianAuto = -1, kHessianDense = 0, kHessianFree = 1;

enum class Status : int { Optimal = 0, Infeasible = 1, MaxIter = 2 };

struct ExactResult {
  Status status = Status::MaxIter;
  int64_t iterations = 0;      // Newton steps over the full data
  int64_t passes = 0;          // passes over the full data (candidates evaluated)
  int64_t sample_passes = 0;   // passes of the warm-start phase (over ~sample_rows rows)
  int64_t hessian_passes = 0;  // full-data passes that also accumulated the Hessian (dense)
  int64_t product_passes = 0;  // passes (full data and sample) that were Hessian-vector products
  bool hessian_free = false;   // the mode the solve ran in
  double mu = 0.0;
  double dmu = 0.0;            // the last Newton direction's mu part
  double max_violation = 0.0;  // max(max_j (|g_j| - lambda_j)_+, |mean q - eta|) at the returned duals
  double gap = 0.0;            // duality gap lambda^T |w| - w^T g - mu g_mu
  double recession = 0.0;      // best D_inf seen (> 0 certifies infeasibility)
  double objective = 0.0;      // dual value D(w, mu)
};

constexpr int64_t kCandidates = 4;

// Sizes of the flat arrays (doubles) for m groups and c labels, dense or Hessian-free.
int64_t exact_state_size(int64_t m, int64_t c, bool hessian_free);
int64_t exact_stats_size(int64_t m, int64_t c, bool hessian_free);
// What kHessianAuto picks: Hessian-free once the dense Hessian's arrays pass 64 MB or p > 2048.
bool exact_hessian_free_default(int64_t m, int64_t c);
// The mode a state was made for (its header records it; state must hold exact_header_size()).
int64_t exact_header_size();
bool exact_state_hessian_free(const double* state);
// Bytes of the solver's own arrays for one solve: state, the stats of a pass with one
// accumulator per thread, and the driver's model (the p x p matrices of the dense step).
int64_t exact_memory_bytes(int64_t m, int64_t c, bool hessian_free, int threads);

// A fresh state for a problem over `rows` rows in total (all shards; it sets the sample
// rate), starting from w0 (p doubles, null: zeros) and mu = 0, in the mode
// exact_resolve_hessian(cfg, m, c) names (state must hold exact_state_size of that mode).
// exact_check_memory throws std::invalid_argument, giving the bytes needed, when
// exact_memory_bytes of that mode passes cfg.max_bytes.
bool exact_resolve_hessian(const ExactConfig& cfg, int64_t m, int64_t c);
void exact_check_memory(const ExactConfig& cfg, int64_t m, int64_t c);
void exact_init(const Problem& prob, int64_t m, int64_t c, const ExactConfig& cfg, int64_t rows, const double* w0,
                double* state);

// stats += the sums of the rows of d (count: per-row integer weights, null: 1) at the points
// the state asks for. row_offset is the global index of d's first row (it places the
// warm-start sample; any fixed numbering of the rows works).
// q_first (n, may be null) receives every row's q at the first candidate point (passes over
// all rows only), so a driver whose solve ends on that point needs no pass to write q.
void exact_partial(const Data& d, const int64_t* count, const Problem& prob, const double* state, int64_t row_offset,
                   double* stats, double* q_first = nullptr);

// One driver step from the merged stats of a pass; returns true when the solve is finished.
bool exact_step(const Problem& prob, int64_t m, int64_t c, double* state, const double* stats);

// The current duals (w: p doubles), the last Newton direction (dw: p doubles; either may be
// null) and the result fields.
ExactResult exact_result(int64_t m, int64_t c, const double* state, double* w, double* dw = nullptr);

// ----- pattern compression ------------------------------------------------------------------
// Without utilities, q_i depends on the row only through (s_i, y_i): rows with equal
// patterns are one row weighted by its count. A hash aggregate over the rows (count: input
// weights, null: 1; several tables merge by aggregating their concatenation with their
// counts) returns false, leaving `out` empty, when more than max_patterns distinct patterns
// occur. The table keeps the input's label layout (dense rows, or CSR index lists sorted
// as given).
struct PatternTable {
  int64_t n = 0, m = 0, c = 0;
  bool dense = true;
  std::vector<uint8_t> s, y;        // n x m, n x c (dense)
  std::vector<int64_t> y_indptr;    // n + 1 (CSR)
  std::vector<int32_t> y_indices;
  std::vector<int64_t> count;       // n
  Data data() const;
};
bool pattern_table(const Data& d, const int64_t* count, int64_t max_patterns, PatternTable& out);

// The in-memory exact solve: over the pattern table when d has no utility, a probe of 2^15
// spread-out rows is at most half distinct, and the table has at most n / 2 patterns (then
// compressed = true); else passes over d, the last of which writes q (n) when it ends on its
// first candidate, otherwise one more pass does. w (p, in/out: the start point), q (n, out).
struct ExactInfo {
  bool compressed = false;
  int64_t patterns = 0;
};
ExactResult solve_exact(const Data& d, const Problem& prob, const ExactConfig& cfg, double* w, double* q,
                        ExactInfo* info = nullptr);

}  // namespace m4
}  // namespace pym4
