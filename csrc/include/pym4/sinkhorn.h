// Sinkhorn-Knopp in the log domain, as three streaming passes over a (rows x cols) matrix.
//
// The transport kernel is exp(alpha * x_ij): x = scores and alpha = 1/epsilon for SwAV,
// x = cost and alpha = -1/reg for general entropic OT. The plan is kept implicitly through
// two potentials, g (one per column) and f (one per row):
//     P_ij = exp(alpha * x_ij + g_j + f_i),
// so an iteration reads the matrix once (a row step fused with the column sums of the next
// column step) instead of the ten full passes of the reference implementation. All
// exponentials are taken after subtracting a running maximum, so epsilon down to 0.01 with
// scores in [-1, 1] stays finite. Pointers are plain; rows are `ld` elements apart and
// columns contiguous. Potentials and column accumulators are double.
#pragma once

#include <cstdint>
#include <limits>
#include <vector>

namespace pym4 {
namespace sinkhorn {

template <typename T>
struct Matrix {
  const T* data;  // rows x cols, row stride ld (elements), unit column stride
  int64_t rows;
  int64_t cols;
  int64_t ld;
  double alpha;   // kernel = exp(alpha * x)
};

// Row log-marginals: log_a[i] when log_a != nullptr, else the same log_a_scalar for all rows.
struct RowMarginal {
  const double* log_a = nullptr;
  double log_a_scalar = 0.0;
  double at(int64_t i) const { return log_a ? log_a[i] : log_a_scalar; }
};

// First column step: col_max[j] = max_i alpha*x_ij, col_sum[j] = sum_i exp(alpha*x_ij - col_max[j]),
// so that log sum_i exp(alpha*x_ij) = col_max[j] + log(col_sum[j]). Read-only; returns false
// (and leaves the outputs unspecified) when any alpha*x_ij is NaN or infinite.
template <typename T>
bool column_logsumexp(const Matrix<T>& m, double* col_max, double* col_sum);

// Row step fused with the next column sums: for each row
//     f_i = log a_i - log sum_j exp(alpha*x_ij + g_j)      (rows now carry mass a_i)
// and col_mass[j] = sum_i exp(alpha*x_ij + g_j + f_i) (the column marginals of the plan
// after the row step). f_out may be null. shift (rows, may be null): an upper bound of
// max_j (alpha*x_ij + g_j) per row, known from the previous step, that saves computing the
// row maximum; a row where it proves too loose is recomputed with its maximum.
template <typename T>
void row_pass(const Matrix<T>& m, const double* g, RowMarginal a, const double* shift, double* f_out,
              double* col_mass);

// Final row step, writing the plan: out_ij = exp(alpha*x_ij + g_j + f_i) with f as in
// row_pass (rows of out sum to a_i). out rows are ld_out apart. shift as in row_pass;
// col_mass may be null.
template <typename T>
void write_plan(const Matrix<T>& m, const double* g, RowMarginal a, const double* shift, T* out, int64_t ld_out,
                double* col_mass);

struct Result {
  int64_t iterations = 0;     // column+row step pairs done
  double marginal_error = 0;  // ||col_mass - b||_2 after the last row step (0 if not measured)
  bool converged = false;     // stopped because a measured error fell below tol
  std::vector<double> errors; // every measured error, in order (POT's log["err"])
  bool finite = true;         // false: the input had NaN/Inf (nothing was written)
  bool kernel_form = false;   // true: solved in the kernel form (no exp after the first pass)
  bool solved = true;         // false: an in-place solve the kernel form declined (see solve)
  // max_ij |alpha x_ij| as the kernel form read it in its first pass (NaN: not measured, as
  // in the log domain): a float32 caller learns from it whether float32 was fine enough
  // for these exponents without reading x again.
  double max_abs_exponent = std::numeric_limits<double>::quiet_NaN();
};

// Whole solve on one process. When the spread of alpha * x is small enough for
// exp(alpha x - row max) to stay a normal number (80 for float, 650 for double), it runs in
// the kernel form: one exponential per entry, stored in `out`, then two multiply-adds per
// entry per iteration; otherwise in the log domain above, an exponential per entry per pass. log_b: column log-marginals (cols), or null for the
// uniform 1/cols. a: row log-marginals. Runs n_iters (column step, row step) pairs, or stops
// once ||col_mass - b||_2 < tol (tol <= 0: never measures, as SwAV). The plan is written
// multiplied by exp(log_out_scale) (SwAV returns B * P, whose rows sum to 1). g_out (cols)
// receives the column potential when non-null. `out` may be m.data itself (ld_out == m.ld):
// an in-place solve, for a caller that formed x in the result buffer (the features form).
// Only the kernel form can run in place; when it declines, x has been overwritten and
// Result::solved is false, and the caller forms x again and solves out of place.
struct Options {
  // The column potential after the first column step, when the caller has it (a warm start:
  // g_j = log b_j - LSE_i(alpha x_ij + f0_i) for initial row potentials f0); null: from f0 = 0.
  const double* g_init = nullptr;
  // Measure the marginal error after the row step of iterations 1, 1 + check_every, ... (and
  // after the last); 0: every iteration when tol > 0, never otherwise (SwAV). POT uses 10.
  int64_t check_every = 0;
};

template <typename T>
Result solve(const Matrix<T>& m, const double* log_b, RowMarginal a, int64_t n_iters, double tol,
             double log_out_scale, T* out, int64_t ld_out, double* g_out, const Options& opt = Options());

}  // namespace sinkhorn
}  // namespace pym4
