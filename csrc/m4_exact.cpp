// M4 method="exact" as passes (see include/pym4/m4.h): exact_partial, exact_step, the
// in-memory driver solve_exact, and the pattern table.
//
// Rows are read through two short index lists: J = [0] + [1 + r for labels r of the row]
// (positions in ytil = [1; y], L = c + 1 entries) and G = the row's groups. With them
//     a_i^T w = sum_{j in J} (V0[j] + sum_{k in G} w_k[j]),  V0 = -sum_k pi_k w_k,
// and every accumulation is a handful of scattered adds per set label, for dense uint8 rows
// and CSR index lists alike.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <initializer_list>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include "m4_rows.h"
#include "pym4/common.h"
#include "pym4/interrupt.h"
#include "pym4/m4.h"

namespace pym4 {
namespace m4 {
namespace {

using namespace detail;

// ----- layouts of the flat state and stats arrays -------------------------------------------

// State header slots. The request for the next pass (candidate steps, which candidate gets
// the Hessian, the sample rate) lives in the state, so partial() needs nothing else.
enum Slot : int64_t {
  kPhase = 0,       // 0 sample, 1 full, 2 done
  kStatus,          // Status once done
  kPasses,          // full-data passes
  kSamplePasses,
  kHessPasses,      // full-data passes that accumulated the Hessian
  kIterations,      // accepted Newton steps on the full data
  kK,               // candidates in the request
  kHessAt,          // candidate whose Hessian is accumulated (-1: none)
  kRate,            // sample one 64-row block in kRate (1: every row)
  kEvaluate,        // 1: the request only evaluates the current point
  kMu, kDmu, kF, kPred,
  kMaxViol, kGap, kRecession,
  kTol, kMaxIter, kRho,
  kHaveHess, kHessWeight,  // cached Hessian blocks valid; the row weight they were summed over
  kLastR,                  // optimality measure at the previous accepted point of this phase
  kAccepted,               // the candidate of the last pass that the duals now are (-1: none)
  // Hessian-free mode: the pass asked for is a Hessian-vector product (kProduct = 1) of the
  // conjugate-gradient iteration kCgIter on the Newton system (kCgRz = r^T z, kCgR0 = |r_0|,
  // kCgForce: stop at |r| <= kCgForce |r_0|); kCgRef = |r_0| of the first system of the phase,
  // kDamp the damping added to the Hessian, kFullNext: the line search after it tries t = 1 only.
  // kDampMul scales the damping (Levenberg-Marquardt): up when the step's line search fails.
  kFree, kProduct, kProductPasses, kCgIter, kCgRz, kCgR0, kCgForce, kCgRef, kDamp, kFullNext, kDampMul,
  kSteps,                  // kCandidates step lengths
  kHeader = kSteps + kCandidates
};

constexpr double kDone = 2.0;
constexpr int64_t kBlockShift = 6;  // the warm-start sample takes whole blocks of 64 rows

// Rows are grouped into classes by their groups s_i. With few groups (2^m at most twice the
// pair blocks' count: m <= 4) a row's class is its s-pattern sigma, and a_i = d_sigma (x) ytil
// with d_sigma = sigma - pi: a row touches one margin vector, one gradient accumulator and
// one Hessian block (the Kronecker blocks per s-pattern). With more groups the classes are
// block 0 (every row, coefficient -pi) plus one per group it belongs to, and the Hessian
// blocks are 0 and the pairs k <= l of its groups (s_k s_l ytil ytil^T).
struct Layout {
  int64_t m, c, L, p;
  bool by_pattern, free;
  int64_t nC, nH;  // margin/gradient classes, Hessian blocks
  Layout(int64_t m_, int64_t c_, bool free_)
      : m(m_), c(c_), L(c_ + 1), p(m_ * (c_ + 1)), by_pattern(m_ <= 4), free(free_),
        nC(m_ <= 4 ? (int64_t(1) << m_) : 1 + m_), nH(m_ <= 4 ? (int64_t(1) << m_) : 1 + m_ * (m_ + 1) / 2) {}
  // state: header | w (p) | dw (p) | dense: Hessian blocks (nH L L);
  //        Hessian-free: the conjugate-gradient vectors x, r, d, the Hessian's diagonal and
  //        the pseudo-gradient, p + 1 entries each (mu last).
  int64_t w() const { return kHeader; }
  int64_t dw() const { return kHeader + p; }
  int64_t hess() const { return kHeader + 2 * p; }
  int64_t cg(int64_t k) const { return hess() + k * (p + 1); }  // k: 0 x, 1 r, 2 d, 3 diag, 4 pg
  int64_t state_size() const { return free ? cg(5) : hess() + nH * L * L; }
  // stats: [weight | direction recession] | kCandidates x candidate | dense: Hessian blocks
  // (nH L L); Hessian-free: D (nC x L), D_b = sum over the active rows of class b of ytil,
  // at the Hessian candidate (the Hessian's diagonal). candidate: [sum q | sum phi |
  // sum min(0, a^T w + mu) | active weight | T (nC x L)] with T_b = sum over the rows of
  // class b of q ytil (all weighted by the row counts). A product pass (Hessian-free) fills
  // [weight | sum_A s | T (nC x L)] with s = a^T v + v_mu in place of q over the active rows.
  int64_t cand_size() const { return 4 + nC * L; }
  int64_t cand(int64_t k) const { return 2 + k * cand_size(); }
  int64_t shess() const { return 2 + kCandidates * cand_size(); }
  int64_t stats_size() const { return shess() + (free ? nC * L : nH * L * L); }
  int64_t product_size() const { return 2 + nC * L; }
  // Hessian block of the pair of groups k <= l (pair layout; block 0: all rows).
  int64_t pair(int64_t k, int64_t l) const { return 1 + k * m - k * (k - 1) / 2 + (l - k); }

  // The coefficients tying classes and blocks to groups:
  //   a_i^T w = ytil^T sum_{b in classes(i)} V_b,  V_b = sum_k alpha(b, k) w_k,
  //   g_k = (1/W) sum_b alpha(b, k) T_b,
  //   sum_A d_k d_l ytil ytil^T = sum_h beta(h, k, l) H_h,  sum_A d_k ytil = sum_h gamma(h, k) H_h[0, :],
  //   |A| = sum_h eps(h) H_h[0, 0].
  //   K_jj (j = k L + a) = (1/W) sum_b delta(b, k) D_b[a]   (d_k^2 over the classes).
  struct Coef {
    std::vector<double> alpha, beta, gamma, eps, delta;
  };
  Coef coef(const double* pi) const {
    Coef cf;
    cf.delta.assign(nC * m, 0.0);
    cf.alpha.assign(nC * m, 0.0);
    // The Hessian blocks' coefficients (nH m^2 of them: millions at m = 60) only for the dense step.
    const bool blocks = !free;
    cf.beta.assign(blocks ? nH * m * m : 0, 0.0);
    cf.gamma.assign(nH * m, 0.0);
    cf.eps.assign(nH, 0.0);
    if (by_pattern) {
      for (int64_t sg = 0; sg < nC; ++sg) {
        cf.eps[sg] = 1.0;
        for (int64_t k = 0; k < m; ++k) {
          const double dk = static_cast<double>((sg >> k) & 1) - pi[k];
          cf.alpha[sg * m + k] = dk;
          cf.delta[sg * m + k] = dk * dk;
          cf.gamma[sg * m + k] = dk;
          for (int64_t l = 0; l < m && blocks; ++l)
            cf.beta[(sg * m + k) * m + l] = dk * (static_cast<double>((sg >> l) & 1) - pi[l]);
        }
      }
      return cf;
    }
    cf.eps[0] = 1.0;
    for (int64_t k = 0; k < m; ++k) {
      cf.alpha[k] = -pi[k];
      cf.alpha[(1 + k) * m + k] = 1.0;
      cf.delta[k] = pi[k] * pi[k];  // (s_k - pi_k)^2 = pi_k^2 + (1 - 2 pi_k) s_k
      cf.delta[(1 + k) * m + k] = 1.0 - 2.0 * pi[k];
      cf.gamma[k] = -pi[k];
      cf.gamma[pair(k, k) * m + k] = 1.0;
      for (int64_t l = 0; l < m && blocks; ++l) {  // d_k d_l = s_k s_l - pi_l s_k - pi_k s_l + pi_k pi_l
        cf.beta[(0 * m + k) * m + l] += pi[k] * pi[l];
        cf.beta[(pair(std::min(k, l), std::max(k, l)) * m + k) * m + l] += 1.0;
        cf.beta[(pair(k, k) * m + k) * m + l] -= pi[l];
        cf.beta[(pair(l, l) * m + k) * m + l] -= pi[k];
      }
    }
    return cf;
  }
};

inline uint64_t mix64(uint64_t x) {  // splitmix64 finaliser
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

// The index lists of row i (J sorted ascending, J[0] = 0).
struct Lists {
  std::vector<int32_t> J, G;
  int nJ = 0, nG = 0;
  Lists(int64_t m, int64_t c) : J(c + 1), G(m) {}
  // The row's margin/gradient classes and Hessian blocks (see Layout).
  int classes(const Layout& Ly, int64_t* C) const {
    if (Ly.by_pattern) {
      int64_t sg = 0;
      for (int g = 0; g < nG; ++g) sg |= int64_t(1) << G[g];
      C[0] = sg;
      return 1;
    }
    C[0] = 0;
    for (int g = 0; g < nG; ++g) C[1 + g] = 1 + G[g];
    return 1 + nG;
  }
  int hessian_blocks(const Layout& Ly, int64_t* Hb) const {
    if (Ly.by_pattern) return classes(Ly, Hb);
    int nb = 0;
    Hb[nb++] = 0;
    for (int g1 = 0; g1 < nG; ++g1)
      for (int g2 = g1; g2 < nG; ++g2) Hb[nb++] = Ly.pair(G[g1], G[g2]);
    return nb;
  }
  void load(const Data& d, int64_t i) {
    J[0] = 0;
    int n = 1;
    if (!d.y_indptr) {  // dense 0/1 rows (or no labels at all)
      const uint8_t* y = d.y + i * d.ld_y;
      int64_t j = 0;
      // Eight labels at a time: the multiply gathers bit 0 of each byte into the top byte
      // (byte k -> bit 56 + k), then the set bits are walked; ~nnz steps instead of c.
      for (; j + 8 <= d.c; j += 8) {
        uint64_t x;
        std::memcpy(&x, y + j, 8);
        uint32_t bits = static_cast<uint32_t>(((x & 0x0101010101010101ull) * 0x0102040810204080ull) >> 56);
        while (bits) {
          J[n++] = static_cast<int32_t>(j + 1 + __builtin_ctz(bits));
          bits &= bits - 1;
        }
      }
      for (; j < d.c; ++j) {
        J[n] = static_cast<int32_t>(j + 1);
        n += y[j] != 0;
      }
    } else {
      const int64_t b = d.y_indptr[i], e = d.y_indptr[i + 1];
      bool sorted = true;
      for (int64_t t = b; t < e; ++t) {
        J[n] = d.y_indices[t] + 1;
        sorted &= J[n] > J[n - 1];
        ++n;
      }
      if (!sorted) std::sort(J.begin() + 1, J.begin() + n);
    }
    nJ = n;
    const uint8_t* s = d.s + i * d.ld_s;
    int g = 0;
    for (int64_t k = 0; k < d.m; ++k) {
      G[g] = static_cast<int32_t>(k);
      g += s[k] != 0;
    }
    nG = g;
  }
};

double l1(const std::vector<double>& lam, const double* x, const double* dx = nullptr, double t = 0.0) {
  double s = 0.0;
  for (size_t j = 0; j < lam.size(); ++j) s += lam[j] * std::abs(x[j] + (dx ? t * dx[j] : 0.0));
  return s;
}

std::vector<double> lambdas(const Problem& prob, const Layout& Ly) {
  std::vector<double> lam(Ly.p);
  for (int64_t j = 0; j < Ly.p; ++j) lam[j] = prob.lambda(j, Ly.c);
  return lam;
}

// The rows of [b, e) the request reads: all, or the sampled 64-row blocks.
template <typename Body>
void for_rows(int64_t b, int64_t e, int64_t row_offset, int64_t rate, Body body) {
  if (rate <= 1) {
    for (int64_t i = b; i < e; ++i) body(i);
    return;
  }
  int64_t i = b;
  while (i < e) {
    const int64_t g = row_offset + i;
    const int64_t block = g >> kBlockShift;
    const int64_t block_end = std::min(e, ((block + 1) << kBlockShift) - row_offset);
    if (mix64(static_cast<uint64_t>(block)) % static_cast<uint64_t>(rate) == 0)
      for (; i < block_end; ++i) body(i);
    i = block_end;
  }
}

// ----- one pass ------------------------------------------------------------------------------

// A row's pair of margins (a^T x, a^T y) from V, which interleaves per class b the vectors
// (V_b of x, V_b of y) over ytil's entries: the row's classes C[0..nc) and label list J[0..nJ).
inline void margin_pair(const double* V, int64_t L, const int64_t* C, int nc, const int32_t* J, int nJ,
                        double& ax, double& ay) {
  ax = 0.0;
  ay = 0.0;
  for (int ci = 0; ci < nc; ++ci) {
    const double* Vb = V + 2 * C[ci] * L;
    for (int t = 0; t < nJ; ++t) {
      ax += Vb[2 * J[t]];
      ay += Vb[2 * J[t] + 1];
    }
  }
}

// A candidate step's scalar sums for one row (z: its unclipped keep value, q = clip01(z),
// margin: a^T w + mu at the step): [sum q | objective | sum min(0, margin) | active count],
// each weighted by the row's count. Returns whether the row is active (0 < z < 1). Shared by
// the general and the dense row loops, so that both sum exactly the same terms.
inline bool add_candidate_scalars(double* A, double cnt, double z, double q, double eta, double margin) {
  A[0] += cnt * q;
  A[1] += cnt * (0.5 * (q - eta) * (q - eta) - q * (z - eta));
  A[2] += cnt * std::min(0.0, margin);
  const bool active = z > 0.0 && z < 1.0;
  if (active) A[3] += cnt;
  return active;
}

PYM4_SIMD_CLONES void partial_range(const Data& d, const int64_t* count, const Problem& prob, const double* state,
                                    const double* V, int64_t row_offset, int64_t b, int64_t e, double* acc,
                                    double* q_out) {
  const Layout Ly(d.m, d.c, state[kFree] != 0.0);
  const int64_t L = Ly.L;
  const int K = static_cast<int>(state[kK]);
  const int hess_at = static_cast<int>(state[kHessAt]);
  const double* steps = state + kSteps;
  const double mu = state[kMu], dmu = state[kDmu], eta = prob.eta;
  Lists ls(d.m, d.c);
  std::vector<int64_t> C(Ly.nC), Hb(Ly.nH);
  double* H = acc + Ly.shess();
  for_rows(b, e, row_offset, static_cast<int64_t>(state[kRate]), [&](int64_t i) {
    ls.load(d, i);
    const int32_t* J = ls.J.data();
    const int nJ = ls.nJ;
    const int nc = ls.classes(Ly, C.data());
    const double cnt = count ? static_cast<double>(count[i]) : 1.0;
    // (a^T w, a^T dw): V holds per class the interleaved (V_b, dV_b) of ytil's entries.
    double cw, cd;
    margin_pair(V, L, C.data(), nc, J, nJ, cw, cd);
    const double m0 = cw + mu, md = cd + dmu;
    const double z0 = eta + (d.u ? d.u[i] : 0.0) - m0;
    acc[0] += cnt;
    acc[1] += cnt * std::min(0.0, md);
    for (int k = 0; k < K; ++k) {
      const double t = steps[k];
      const double z = z0 - t * md, q = clip01(z);
      if (k == 0 && q_out) q_out[i] = q;
      double* A = acc + Ly.cand(k);
      const bool active = add_candidate_scalars(A, cnt, z, q, eta, m0 + t * md);
      if (q != 0.0) {
        const double cq = cnt * q;
        for (int ci = 0; ci < nc; ++ci) {
          double* T = A + 4 + C[ci] * L;
          for (int u = 0; u < nJ; ++u) T[J[u]] += cq;
        }
      }
      if (k == hess_at && active && Ly.free) {  // the diagonal's sums D_b
        for (int ci = 0; ci < nc; ++ci) {
          double* D = H + C[ci] * L;
          for (int u = 0; u < nJ; ++u) D[J[u]] += cnt;
        }
      } else if (k == hess_at && active) {
        // Upper triangles (J ascending) of the row's Hessian blocks.
        const int nh = ls.hessian_blocks(Ly, Hb.data());
        for (int bi = 0; bi < nh; ++bi) {
          double* B = H + Hb[bi] * L * L;
          for (int a = 0; a < nJ; ++a) {
            double* row = B + static_cast<int64_t>(J[a]) * L;
            for (int u = a; u < nJ; ++u) row[J[u]] += cnt;
          }
        }
      }
    }
  });
}

// The dense Hessian blocks of unweighted rows with c < 64 labels, as Gram matrices of bit
// sets: a block's entry (a, b) is the number of its active rows with bits a and b of
// [1; y] set, so the rows are collected per pattern as 64-bit masks and, kGramRows at a
// time, turned into one bit set of rows per label; each entry is then a popcount of the AND
// of two such sets (~(c+1)^2/2 word operations per 64 rows instead of ~nnz^2/2 scattered
// adds per row). Integer counts: the same doubles as the per-row updates, in any order.
constexpr int64_t kGramRows = 2048;

struct GramBlocks {
  int64_t L, nP;
  std::vector<uint64_t> masks, cols;
  std::vector<int64_t> fill;
  GramBlocks(int64_t L_, int64_t nP_)
      : L(L_), nP(nP_), masks(static_cast<size_t>(nP_) * kGramRows), cols(static_cast<size_t>(L_) * (kGramRows / 64)),
        fill(nP_, 0) {}
  static bool applies(int64_t c, const int64_t* count) { return count == nullptr && c + 1 <= 64; }
  PYM4_M4_INLINE void add(int64_t sg, uint64_t mask, double* H) {
    masks[sg * kGramRows + fill[sg]++] = mask;
    if (fill[sg] == kGramRows) flush(sg, H);
  }
  PYM4_M4_INLINE void flush(int64_t sg, double* H) {
    const int64_t n = fill[sg], words = (n + 63) / 64;
    if (!n) return;
    std::fill(cols.begin(), cols.begin() + L * words, 0);
    const uint64_t* ms = masks.data() + sg * kGramRows;
    for (int64_t r = 0; r < n; ++r)
      for (uint64_t x = ms[r]; x; x &= x - 1) cols[__builtin_ctzll(x) * words + (r >> 6)] |= uint64_t(1) << (r & 63);
    double* B = H + sg * L * L;
    for (int64_t a = 0; a < L; ++a) {
      const uint64_t* ca = cols.data() + a * words;
      for (int64_t b = a; b < L; ++b) {
        const uint64_t* cb = cols.data() + b * words;
        int64_t tot = 0;
        for (int64_t w = 0; w < words; ++w) tot += __builtin_popcountll(ca[w] & cb[w]);
        B[a * L + b] += static_cast<double>(tot);
      }
    }
    fill[sg] = 0;
  }
  PYM4_M4_INLINE void flush_all(double* H) {
    for (int64_t sg = 0; sg < nP; ++sg) flush(sg, H);
  }
};

// Bit 0 and bits 1 + j for the set labels of a dense row (c < 64).
PYM4_M4_INLINE uint64_t row_mask(const uint8_t* yr, int64_t c) { return 1 | (label_bits(yr, c) << 1); }

// partial_range for dense label rows and few groups (the s-pattern classes, m <= 4): a row's
// two margins are two c-dots with its pattern's (V_b, dV_b) (Vw, Vd: nC x L each, the 0/1
// bytes widened through a table), and the candidates' T_b (and the Hessian-free diagonal's
// D_b) are block sums (m4_rows.h): per block of rows, each pattern's rows summed with the
// accumulators in registers. Only the dense Hessian blocks walk the row's set labels. Same
// sums as partial_range, to rounding. (No lambda here: a lambda's body would be compiled for
// the baseline ISA, not for the clone.)
PYM4_SIMD_CLONES void partial_range_dense(const Data& d, const int64_t* count, const Problem& prob,
                                          const double* state, const double* Vw, const double* Vd,
                                          int64_t row_offset, int64_t b, int64_t e, double* acc, double* q_out) {
  const Layout Ly(d.m, d.c, state[kFree] != 0.0);
  const int64_t L = Ly.L, c = d.c;
  const int K = static_cast<int>(state[kK]);
  const int hess_at = static_cast<int>(state[kHessAt]);
  const int64_t rate = static_cast<int64_t>(state[kRate]);
  const double* steps = state + kSteps;
  const double mu = state[kMu], dmu = state[kDmu], eta = prob.eta;
  double* H = acc + Ly.shess();
  // Block sums: T of every candidate, then D (Hessian-free, at the Hessian candidate).
  const bool diag = Ly.free && hess_at >= 0 && hess_at < K;
  const int nw = K + (diag ? 1 : 0);
  double* sums[kMaxWeights];
  for (int k = 0; k < K; ++k) sums[k] = acc + Ly.cand(k) + 4;
  if (diag) sums[K] = H;
  RowBlock rb;
  std::vector<int32_t> Jbuf(L);
  int32_t* J = Jbuf.data();
  const bool by_gram = !Ly.free && hess_at >= 0 && hess_at < K && GramBlocks::applies(c, count);
  GramBlocks gram(by_gram ? L : 0, by_gram ? Ly.nC : 0);
  int64_t i = b;
  while (i < e) {
    // The rows the request reads (as for_rows): all, or the sampled 64-row blocks.
    int64_t run_end = e;
    if (rate > 1) {
      const int64_t blk = (row_offset + i) >> kBlockShift;
      run_end = std::min(e, ((blk + 1) << kBlockShift) - row_offset);
      if (mix64(static_cast<uint64_t>(blk)) % static_cast<uint64_t>(rate) != 0) {
        i = run_end;
        continue;
      }
    }
    for (; i < run_end; ++i) {
      const int64_t sg = pattern_of(d.s + i * d.ld_s, d.m);
      const uint8_t* __restrict yr = dense_row(d, i);
      const double* __restrict vw = Vw + sg * L;
      const double* __restrict vd = Vd + sg * L;
      double cw = 0.0, cd = 0.0;
      int64_t j = 0;
#if defined(PYM4_M4_VEC)
      f64x4 aw0 = {0.0, 0.0, 0.0, 0.0}, aw1 = aw0, ad0 = aw0, ad1 = aw0;
      for (; j + 8 <= c; j += 8) {
        const unsigned bits = bits8(yr + j);
        f64x4 v0, v1, x;
        std::memcpy(&v0, kNibbles.v[bits & 15], sizeof v0);
        std::memcpy(&v1, kNibbles.v[bits >> 4], sizeof v1);
        std::memcpy(&x, vw + 1 + j, sizeof x);
        aw0 += v0 * x;
        std::memcpy(&x, vw + 5 + j, sizeof x);
        aw1 += v1 * x;
        std::memcpy(&x, vd + 1 + j, sizeof x);
        ad0 += v0 * x;
        std::memcpy(&x, vd + 5 + j, sizeof x);
        ad1 += v1 * x;
      }
      aw0 += aw1;
      ad0 += ad1;
      cw = (aw0[0] + aw0[1]) + (aw0[2] + aw0[3]);
      cd = (ad0[0] + ad0[1]) + (ad0[2] + ad0[3]);
#endif
      for (; j < c; ++j) {
        const double v = static_cast<double>(yr[j]);
        cw += v * vw[1 + j];
        cd += v * vd[1 + j];
      }
      cw += vw[0];
      cd += vd[0];
      const double cnt = count ? static_cast<double>(count[i]) : 1.0;
      const double m0 = cw + mu, md = cd + dmu;
      const double z0 = eta + (d.u ? d.u[i] : 0.0) - m0;
      acc[0] += cnt;
      acc[1] += cnt * std::min(0.0, md);
      const int64_t r = rb.n++;
      rb.row[r] = i;
      rb.pat[r] = static_cast<uint8_t>(sg);
      for (int k = 0; k < K; ++k) {
        const double t = steps[k];
        const double z = z0 - t * md, q = clip01(z);
        if (k == 0 && q_out) q_out[i] = q;
        double* A = acc + Ly.cand(k);
        const bool active = add_candidate_scalars(A, cnt, z, q, eta, m0 + t * md);
        rb.w[k][r] = cnt * q;
        if (k != hess_at) continue;
        if (Ly.free) {
          rb.w[K][r] = active ? cnt : 0.0;
        } else if (active && by_gram) {
          gram.add(sg, row_mask(yr, c), H);
        } else if (active) {
          // Upper triangle (J ascending) of the row's pattern block.
          int nJ = 0;
          J[nJ++] = 0;
          for (int64_t l = 0; l < c; ++l) {
            J[nJ] = static_cast<int32_t>(l + 1);
            nJ += yr[l] != 0;
          }
          double* B = H + sg * L * L;
          for (int a = 0; a < nJ; ++a) {
            double* row = B + static_cast<int64_t>(J[a]) * L;
            for (int u = a; u < nJ; ++u) row[J[u]] += cnt;
          }
        }
      }
      if (rb.n == kBlock) flush_block(d, rb, nw, sums, L, 0);
    }
  }
  flush_block(d, rb, nw, sums, L, 0);
  if (by_gram) gram.flush_all(H);
}

// One Hessian-vector product (Hessian-free mode): at the current point, over the active rows,
// s = a^T v + v_mu and the sums [weight | sum_A s | T_b = sum_{A, class b} s ytil] (counts
// weighting every term). V interleaves per class (V_b of w, V_b of v) as in partial_range.
PYM4_SIMD_CLONES void product_range(const Data& d, const int64_t* count, const Problem& prob, const double* state,
                                    const double* V, int64_t row_offset, int64_t b, int64_t e, double* acc) {
  const Layout Ly(d.m, d.c, true);
  const int64_t L = Ly.L;
  const double mu = state[kMu], v_mu = state[Ly.cg(2) + Ly.p], eta = prob.eta;
  Lists ls(d.m, d.c);
  std::vector<int64_t> C(Ly.nC);
  for_rows(b, e, row_offset, static_cast<int64_t>(state[kRate]), [&](int64_t i) {
    ls.load(d, i);
    const int32_t* J = ls.J.data();
    const int nJ = ls.nJ;
    const int nc = ls.classes(Ly, C.data());
    const double cnt = count ? static_cast<double>(count[i]) : 1.0;
    double cw, cv;
    margin_pair(V, L, C.data(), nc, J, nJ, cw, cv);
    const double z = eta + (d.u ? d.u[i] : 0.0) - (cw + mu);
    acc[0] += cnt;
    if (z > 0.0 && z < 1.0) {
      const double sv = cnt * (cv + v_mu);
      acc[1] += sv;
      for (int ci = 0; ci < nc; ++ci) {
        double* T = acc + 2 + C[ci] * L;
        for (int u = 0; u < nJ; ++u) T[J[u]] += sv;
      }
    }
  });
}

// ----- the Newton model ----------------------------------------------------------------------

// Coordinate descent on min_x 1/2 (x - w)^T K (x - w) - g^T (x - w) + sum_j lam_j |x_j|,
// |x_j| <= rho (K symmetric positive definite, row-major); returns d = x - w.
void prox_newton_direction(int64_t p, const std::vector<double>& K, const std::vector<double>& g, const double* w,
                           const std::vector<double>& lam, double rho, double scale, double* d) {
  std::vector<double> x(w, w + p), Kd(p, 0.0);
  for (int sweep = 0; sweep < 500; ++sweep) {
    interrupt::check();
    double max_change = 0.0, max_x = 0.0;
    for (int64_t j = 0; j < p; ++j) {
      const double kjj = K[static_cast<size_t>(j) * p + j];
      const double v = x[j] - (Kd[j] - g[j]) / kjj;
      double nv = std::min(std::max(std::abs(v) - lam[j] / kjj, 0.0), rho);
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
    if (max_change <= 1e-15 * (scale + max_x)) break;  // scale: of the duals, the budget
  }
  for (int64_t j = 0; j < p; ++j) d[j] = x[j] - w[j];
}

// The Newton direction (dw, dmu) of the model with Hessian blocks `hess` (summed over weight
// Wh) at gradient (g, g_mu); returns the predicted ascent of the full step.
double newton_direction(const Layout& Ly, const Problem& prob, const double* hess, double Wh, const double* g,
                        double g_mu, const double* w, const std::vector<double>& lam, double rho, double* dw,
                        double& dmu) {
  const int64_t m = Ly.m, L = Ly.L, p = Ly.p;
  const Layout::Coef cf = Ly.coef(prob.pi);
  auto B = [&](int64_t blk, int64_t a, int64_t b) {  // upper-triangular storage
    return hess[blk * L * L + std::min(a, b) * L + std::max(a, b)];
  };
  // Model Hessian (1/W) sum_A [a; 1][a; 1]^T: Kww (p x p), kwm = S / W, kmm = |A| / W.
  std::vector<double> Kww(static_cast<size_t>(p) * p, 0.0), kwm(p, 0.0);
  const double inv = 1.0 / Wh;
  double count_A = 0.0;
  for (int64_t h = 0; h < Ly.nH; ++h) {
    count_A += cf.eps[h] * B(h, 0, 0);
    for (int64_t k = 0; k < m; ++k) {
      const double gk = cf.gamma[h * m + k];
      if (gk != 0.0)
        for (int64_t a = 0; a < L; ++a) kwm[k * L + a] += gk * B(h, 0, a) * inv;
      for (int64_t l = 0; l < m; ++l) {
        const double bkl = cf.beta[(h * m + k) * m + l] * inv;
        if (bkl == 0.0) continue;
        for (int64_t a = 0; a < L; ++a) {
          double* out = Kww.data() + static_cast<size_t>(k * L + a) * p + l * L;
          for (int64_t b = 0; b < L; ++b) out[b] += bkl * B(h, a, b);
        }
      }
    }
  }
  double max_diag = 0.0;
  for (int64_t j = 0; j < p; ++j) max_diag = std::max(max_diag, Kww[static_cast<size_t>(j) * p + j]);
  const double damping = 1e-10 * std::max(max_diag, 1e-6) + 1e-14;
  const double kmm = count_A * inv + damping;
  // Eliminate dmu from the model: dmu = (g_mu - kwm^T dw) / kmm leaves the Schur complement.
  std::vector<double> Kr(Kww), gr(p);
  for (int64_t a = 0; a < p; ++a) {
    gr[a] = g[a] - kwm[a] * g_mu / kmm;
    double* row = Kr.data() + static_cast<size_t>(a) * p;
    for (int64_t b = 0; b < p; ++b) row[b] -= kwm[a] * kwm[b] / kmm;
    row[a] += damping;
  }
  prox_newton_direction(p, Kr, gr, w, lam, rho, std::min(1.0, prob.eta), dw);
  double kd = 0.0;
  for (int64_t j = 0; j < p; ++j) kd += kwm[j] * dw[j];
  dmu = (g_mu - kd) / kmm;
  double pred = g_mu * dmu + l1(lam, w) - l1(lam, w, dw, 1.0);
  for (int64_t j = 0; j < p; ++j) pred += g[j] * dw[j];
  return pred;
}

void set_steps(double* S, std::initializer_list<double> steps, int hess_at) {
  int k = 0;
  for (double t : steps) S[kSteps + k++] = t;
  for (int j = k; j < kCandidates; ++j) S[kSteps + j] = 0.0;
  S[kK] = k;
  S[kHessAt] = hess_at;
  S[kEvaluate] = 0.0;
}

void finish(double* S, Status st) {
  S[kStatus] = static_cast<double>(static_cast<int>(st));
  S[kPhase] = kDone;
  S[kK] = 0;
  S[kProduct] = 0.0;
}

// ----- the Hessian-free step ---------------------------------------------------------------------
// Orthant-wise Newton: on the orthant of the current signs (sign(w_j), or for w_j = 0 the sign
// of the violated constraint) the dual is smooth, with gradient pg (the pseudo-gradient) over
// the free coordinates F = {j : w_j != 0 or pg_j != 0} (and mu); the others stay 0 this step.
// The Newton system K_FF x = pg_F, K = (1/W) sum_A [a; 1][a; 1]^T + damping, is solved by
// conjugate gradients preconditioned by K's diagonal, each product K d being one pass; the
// step is then x projected onto that orthant (a coordinate that would change sign stops at
// 0) and into the box, and the line search runs on the segment to it (which stays on the
// orthant, so the candidates stay linear in t). Along it the dual's derivative is pg^T d > 0.

constexpr int kMaxCg = 50;  // conjugate-gradient iterations (product passes) per Newton step

bool is_free(const double* w, const double* pg, int64_t j) { return w[j] != 0.0 || pg[j] != 0.0; }

// CG from x = 0 on the system of the stored pseudo-gradient, damping kDamp kDampMul; requests
// the first product pass, false when the pseudo-gradient is 0 (nothing to solve).
bool cg_reset(const Layout& Ly, double* S, bool full_next) {
  const int64_t p = Ly.p;
  double *x = S + Ly.cg(0), *r = S + Ly.cg(1), *dir = S + Ly.cg(2), *diag = S + Ly.cg(3), *pg = S + Ly.cg(4);
  const double damp = S[kDamp] * std::max(1.0, S[kDampMul]);
  double rz = 0.0, rr = 0.0;
  for (int64_t j = 0; j <= p; ++j) {
    x[j] = 0.0;
    r[j] = pg[j];
    dir[j] = r[j] / (diag[j] + damp);
    rz += r[j] * dir[j];
    rr += r[j] * r[j];
  }
  if (!(rr > 0.0)) return false;
  const double r0 = std::sqrt(rr);
  if (S[kCgRef] == 0.0) S[kCgRef] = r0;
  S[kCgR0] = r0;
  S[kCgRz] = rz;
  S[kCgIter] = 0.0;
  // Inexact Newton: a residual of sqrt(|pg| / |pg_first|) of |pg| keeps the outer
  // convergence superlinear (Eisenstat and Walker), with at most a 10x reduction asked early.
  S[kCgForce] = std::min(0.1, std::sqrt(r0 / S[kCgRef]));
  S[kFullNext] = full_next ? 1.0 : 0.0;
  S[kProduct] = 1.0;
  S[kK] = 0;
  S[kHessAt] = -1;
  S[kEvaluate] = 0.0;
  return true;
}

// Sets up the system at the accepted point (g, g_mu its gradient): the pseudo-gradient and the
// damping, then cg_reset.
bool cg_start(const Layout& Ly, double* S, const std::vector<double>& g, double g_mu, const std::vector<double>& lam,
              bool full_next) {
  const int64_t p = Ly.p;
  const double* w = S + Ly.w();
  const double* diag = S + Ly.cg(3);
  double* pg = S + Ly.cg(4);
  double max_diag = 0.0;
  for (int64_t j = 0; j < p; ++j) {
    double v;
    if (w[j] > 0.0) v = g[j] - lam[j];
    else if (w[j] < 0.0) v = g[j] + lam[j];
    else v = g[j] > lam[j] ? g[j] - lam[j] : (g[j] < -lam[j] ? g[j] + lam[j] : 0.0);
    pg[j] = v;
    max_diag = std::max(max_diag, diag[j]);
  }
  pg[p] = g_mu;
  S[kDamp] = 1e-10 * std::max(max_diag, 1e-6) + 1e-14;  // as the dense step's, times kDampMul
  return cg_reset(Ly, S, full_next);
}

// The step from the CG solution x: projected onto the orthant and the box; where that leaves
// no ascent (pg^T d <= 0), the components against pg are dropped as well. Requests the line
// search; false when no ascent is left.
bool cg_direction(const Layout& Ly, double* S) {
  const int64_t p = Ly.p;
  const double* w = S + Ly.w();
  double* dw = S + Ly.dw();
  const double *x = S + Ly.cg(0), *pg = S + Ly.cg(4);
  const double rho = S[kRho];
  auto project = [&](bool align) {
    double pred = 0.0;
    for (int64_t j = 0; j < p; ++j) {
      double d = 0.0;
      if (is_free(w, pg, j)) {
        const double sg = w[j] != 0.0 ? (w[j] > 0.0 ? 1.0 : -1.0) : (pg[j] > 0.0 ? 1.0 : -1.0);
        double target = w[j] + x[j];
        if (target * sg < 0.0) target = 0.0;
        target = std::min(std::max(target, -rho), rho);
        d = target - w[j];
        if (align && d * pg[j] < 0.0) d = 0.0;
      }
      dw[j] = d;
      pred += d * pg[j];
    }
    double dmu = x[p];
    if (align && dmu * pg[p] < 0.0) dmu = 0.0;
    S[kDmu] = dmu;
    return pred + dmu * pg[p];
  };
  double pred = project(false);
  if (!(pred > 0.0)) pred = project(true);
  S[kPred] = pred;
  S[kProduct] = 0.0;
  if (!(pred > 1e-300)) return false;
  if (S[kFullNext] != 0.0) set_steps(S, {1.0}, 0);
  else set_steps(S, {1.0, 0.5, 0.25, 0.125}, 0);
  return true;
}

// One CG iteration from a product pass (stats: K d before damping and masking). Returns 1
// when CG continues (another product pass is requested), 0 when the line search of the step
// is requested, -1 when no ascent is left.
int cg_continue(const Layout& Ly, const Problem& prob, double* S, const double* stats) {
  const int64_t p = Ly.p, L = Ly.L, m = Ly.m;
  const double W = stats[0], damp = S[kDamp] * std::max(1.0, S[kDampMul]);
  const double* w = S + Ly.w();
  double *x = S + Ly.cg(0), *r = S + Ly.cg(1), *dir = S + Ly.cg(2);
  const double *diag = S + Ly.cg(3), *pg = S + Ly.cg(4);
  const Layout::Coef cf = Ly.coef(prob.pi);
  std::vector<double> Kd(p + 1, 0.0);
  for (int64_t b = 0; b < Ly.nC; ++b)
    for (int64_t k = 0; k < m; ++k) {
      const double al = cf.alpha[b * m + k] / W;
      if (al == 0.0) continue;
      for (int64_t a = 0; a < L; ++a) Kd[k * L + a] += al * stats[2 + b * L + a];
    }
  Kd[p] = stats[1] / W;
  double dKd = 0.0;
  for (int64_t j = 0; j <= p; ++j) {
    Kd[j] = j < p && !is_free(w, pg, j) ? 0.0 : Kd[j] + damp * dir[j];
    dKd += dir[j] * Kd[j];
  }
  S[kCgIter] += 1.0;
  if (dKd > 0.0) {
    const double alpha = S[kCgRz] / dKd;
    double rr = 0.0, xmax = 0.0;
    for (int64_t j = 0; j <= p; ++j) {
      x[j] += alpha * dir[j];
      r[j] -= alpha * Kd[j];
      rr += r[j] * r[j];
      if (j < p) xmax = std::max(xmax, std::abs(x[j]));
    }
    const bool done = std::sqrt(rr) <= S[kCgForce] * S[kCgR0] || S[kCgIter] >= kMaxCg || xmax > S[kRho];
    if (!done) {
      double rz = 0.0;
      for (int64_t j = 0; j <= p; ++j) rz += r[j] * r[j] / (diag[j] + damp);
      const double beta = rz / S[kCgRz];
      for (int64_t j = 0; j <= p; ++j) dir[j] = r[j] / (diag[j] + damp) + beta * dir[j];
      S[kCgRz] = rz;
      return 1;
    }
  }
  return cg_direction(Ly, S) ? 0 : -1;
}

}  // namespace

// ----- public: the passes ---------------------------------------------------------------------

int64_t exact_state_size(int64_t m, int64_t c, bool hessian_free) { return Layout(m, c, hessian_free).state_size(); }
int64_t exact_stats_size(int64_t m, int64_t c, bool hessian_free) { return Layout(m, c, hessian_free).stats_size(); }
int64_t exact_header_size() { return kHeader; }
bool exact_state_hessian_free(const double* S) { return S[kFree] != 0.0; }

int64_t exact_memory_bytes(int64_t m, int64_t c, bool hessian_free, int threads) {
  // In doubles, in floating point: the dense sizes overflow int64 long before they matter.
  const double L = static_cast<double>(c) + 1.0, p = static_cast<double>(m) * L;
  const double nC = m <= 4 ? std::ldexp(1.0, static_cast<int>(m)) : 1.0 + m;
  const double nH = m <= 4 ? nC : 1.0 + 0.5 * m * (m + 1.0);
  const double shess = 2.0 + kCandidates * (4.0 + nC * L);
  const double header = static_cast<double>(kHeader), T = std::max(threads, 1);
  double doubles;
  if (hessian_free)  // state; stats: per thread, merged, the caller's; V; the driver's vectors
    doubles = header + 2 * p + 5 * (p + 1) + (shess + nC * L) * (T + 2) + 2 * nC * L + 3 * (p + 1);
  else  // the same with the Hessian blocks, and the model's two p x p matrices
    doubles = header + 2 * p + nH * L * L + (shess + nH * L * L) * (T + 2) + 2 * nC * L + 2 * p * p + 6 * p;
  const double bytes = 8.0 * doubles;
  return bytes >= 9.2e18 ? std::numeric_limits<int64_t>::max() : static_cast<int64_t>(bytes);
}

bool exact_hessian_free_default(int64_t m, int64_t c) {
  // The dense step's blocks cost nnz^2 / 2 adds per active row and its model p^2 per sweep:
  // past a few thousand constraints the product passes are cheaper as well as smaller.
  return m * (c + 1) > 2048 || exact_memory_bytes(m, c, false, 1) > (int64_t(128) << 20);
}

bool exact_resolve_hessian(const ExactConfig& cfg, int64_t m, int64_t c) {
  if (cfg.hessian != kHessianAuto && cfg.hessian != kHessianDense && cfg.hessian != kHessianFree)
    throw std::invalid_argument("hessian: must be auto (-1), dense (0) or free (1)");
  return cfg.hessian == kHessianAuto ? exact_hessian_free_default(m, c) : cfg.hessian == kHessianFree;
}

void exact_check_memory(const ExactConfig& cfg, int64_t m, int64_t c) {
  const bool free = exact_resolve_hessian(cfg, m, c);
  const int64_t need = exact_memory_bytes(m, c, free, max_threads());
  if (need <= cfg.max_bytes) return;
  std::string msg = "m4 exact: m=" + std::to_string(m) + " groups and c=" + std::to_string(c) + " labels (" +
                    std::to_string(m * (c + 1)) + " constraints) need " + std::to_string(need) +
                    " bytes for the solver's arrays in the " + (free ? "Hessian-free" : "dense-Hessian") +
                    " mode, over the bound of " + std::to_string(cfg.max_bytes) + " bytes (max_bytes)";
  if (!free)
    msg += "; the Hessian-free mode needs " + std::to_string(exact_memory_bytes(m, c, true, max_threads())) + " bytes";
  throw std::invalid_argument(msg);
}

void exact_init(const Problem& prob, int64_t m, int64_t c, const ExactConfig& cfg, int64_t rows, const double* w0,
                double* S) {
  (void)prob;
  const Layout Ly(m, c, exact_resolve_hessian(cfg, m, c));
  std::fill(S, S + Ly.state_size(), 0.0);
  S[kFree] = Ly.free ? 1.0 : 0.0;
  if (w0) std::copy(w0, w0 + Ly.p, S + Ly.w());
  // A warm-start sample only pays off when it is much smaller than the data.
  const int64_t rate = cfg.sample_rows > 0 ? rows / cfg.sample_rows : 0;
  S[kPhase] = rate >= 4 ? 0.0 : 1.0;
  S[kRate] = rate >= 4 ? static_cast<double>(rate) : 1.0;
  S[kTol] = cfg.tol;
  S[kMaxIter] = static_cast<double>(cfg.max_iter);
  S[kRho] = cfg.rho;
  S[kRecession] = -std::numeric_limits<double>::infinity();
  set_steps(S, {0.0}, 0);  // evaluate the start point, with its Hessian
  S[kEvaluate] = 1.0;
}

void exact_partial(const Data& d, const int64_t* count, const Problem& prob, const double* S, int64_t row_offset,
                   double* stats, double* q_first) {
  const Layout Ly(d.m, d.c, S[kFree] != 0.0);
  if (S[kPhase] == kDone || d.n == 0) return;
  // V: per class b the interleaved (sum_k alpha(b, k) w_k, sum_k alpha(b, k) dw_k), with the
  // product's vector in place of dw for a product pass.
  const bool product = S[kProduct] != 0.0;
  const double* w = S + Ly.w();
  const double* dw = S + (product ? Ly.cg(2) : Ly.dw());
  const Layout::Coef cf = Ly.coef(prob.pi);
  std::vector<double> V(2 * Ly.nC * Ly.L, 0.0);
  for (int64_t b = 0; b < Ly.nC; ++b)
    for (int64_t k = 0; k < Ly.m; ++k) {
      const double al = cf.alpha[b * Ly.m + k];
      if (al == 0.0) continue;
      for (int64_t a = 0; a < Ly.L; ++a) {
        V[2 * (b * Ly.L + a)] += al * w[k * Ly.L + a];
        V[2 * (b * Ly.L + a) + 1] += al * dw[k * Ly.L + a];
      }
    }
  if (product) {
    parallel_accumulate(d.n, Ly.product_size(), stats, [&](int64_t b, int64_t e, double* acc) {
      product_range(d, count, prob, S, V.data(), row_offset, b, e, acc);
    });
    return;
  }
  // Per-thread accumulators cover the Hessian blocks only when the pass builds them (they
  // are most of the stats once there are hundreds of labels).
  const int64_t width = S[kHessAt] >= 0 ? Ly.stats_size() : Ly.shess();
  if (Ly.by_pattern && (d.y || d.c == 0) && !d.y_indptr) {
    std::vector<double> Vw(Ly.nC * Ly.L), Vd(Ly.nC * Ly.L);
    for (int64_t j = 0; j < Ly.nC * Ly.L; ++j) {
      Vw[j] = V[2 * j];
      Vd[j] = V[2 * j + 1];
    }
    parallel_accumulate(d.n, width, stats, [&](int64_t b, int64_t e, double* acc) {
      partial_range_dense(d, count, prob, S, Vw.data(), Vd.data(), row_offset, b, e, acc,
                          S[kRate] <= 1.0 ? q_first : nullptr);
    });
    return;
  }
  parallel_accumulate(d.n, width, stats, [&](int64_t b, int64_t e, double* acc) {
    partial_range(d, count, prob, S, V.data(), row_offset, b, e, acc, S[kRate] <= 1.0 ? q_first : nullptr);
  });
}

bool exact_step(const Problem& prob, int64_t m, int64_t c, double* S, const double* stats) {
  if (S[kPhase] == kDone) return true;
  const Layout Ly(m, c, S[kFree] != 0.0);
  const int64_t p = Ly.p;
  const double W = stats[0];
  S[kAccepted] = -1.0;
  const double eta = prob.eta, tol = S[kTol];
  // Every term of the problem scales with the budget: with q = eta q', w = eta w', mu = eta mu'
  // (and u = eta u') the dual is eta^2 times the one at budget 1 (upper box 1 / eta). So
  // violations are measured relative to eta and dual values relative to eta^2 (or |F| when
  // larger): absolute thresholds would stop a solve at eta = 1e-6 on noise, or never.
  auto F_scale = [eta](double F) { return std::max(eta * eta, std::abs(F)); };
  const std::vector<double> lam = lambdas(prob, Ly);
  double* w = S + Ly.w();
  double* dw = S + Ly.dw();
  const bool sample = S[kPhase] == 0.0;
  if (!(W > 0.0) && sample) {  // a tiny input whose sample drew no block: solve on every row
    S[kPhase] = 1.0;
    S[kRate] = 1.0;
    return false;
  }
  if (!(W > 0.0)) throw std::invalid_argument("m4 exact: a pass over the data saw no rows (empty data)");
  S[sample ? kSamplePasses : kPasses] += 1.0;
  if (!sample && S[kHessAt] >= 0 && !Ly.free) S[kHessPasses] += 1.0;
  auto fallback = [&]() {  // no further progress possible: optimal if the measure says so
    // (At budget 0.5 these are the absolute 1e-9 and 1e-8 that held before the scaling.)
    const bool ok = S[kMaxViol] <= std::max(tol, 2e-9) * eta && std::abs(S[kGap]) <= 4e-8 * F_scale(S[kF]);
    finish(S, ok ? Status::Optimal : Status::MaxIter);
  };
  auto to_full = [&]() {  // leave the sample phase: evaluate the point on every row
    S[kPhase] = 1.0;
    S[kRate] = 1.0;
    S[kLastR] = 0.0;
    std::fill(dw, dw + p, 0.0);
    S[kDmu] = 0.0;
    // The sample's duals are close: the Hessian on every row there makes the next steps
    // full Newton steps (fewer passes than contracting with the sample's Hessian).
    set_steps(S, {0.0}, 0);
    S[kEvaluate] = 1.0;
    S[kCgRef] = 0.0;
  };
  if (S[kProduct] != 0.0) {  // a product pass of the Hessian-free step
    S[kProductPasses] += 1.0;
    if (cg_continue(Ly, prob, S, stats) < 0) {
      if (sample) to_full(); else fallback();
    }
    return S[kPhase] == kDone;
  }

  const int K = static_cast<int>(S[kK]);
  const double mu = S[kMu], dmu = S[kDmu];
  auto F_at = [&](int k) {
    const double t = S[kSteps + k];
    return stats[Ly.cand(k) + 1] / W - (mu + t * dmu) * eta - l1(lam, w, dw, t);
  };

  // Line search: the longest candidate with sufficient ascent (rounding slack near the optimum).
  int acc = -1;
  double F_new = 0.0;
  if (S[kEvaluate] != 0.0) {
    acc = 0;
    F_new = F_at(0);
  } else {
    const double F = S[kF], slack = 1e-13 * F_scale(F);
    for (int k = 0; k < K && acc < 0; ++k) {
      const double Fk = F_at(k);
      if (Fk >= F + 1e-4 * S[kSteps + k] * S[kPred] - slack) {
        acc = k;
        F_new = Fk;
      }
    }
  }
  const bool evaluated = S[kEvaluate] != 0.0;
  if (acc < 0) {
    const double tmin = S[kSteps + K - 1];
    // Hessian-free: a step that must be cut below 1/100 leaves the region where the model
    // holds (rows with no curvature yet, whose directions the small damping stretches):
    // the same system with 10^4 times the damping instead, down to a scaled-gradient step.
    if (Ly.free && tmin < 1e-2 && S[kDampMul] < 1e12) {
      S[kDampMul] = std::max(1.0, S[kDampMul]) * 1e4;
      if (cg_reset(Ly, S, false)) return false;
    }
    if (tmin < 1e-10) {
      if (sample) to_full(); else fallback();
      return S[kPhase] == kDone;
    }
    set_steps(S, {tmin / 2, tmin / 4, tmin / 8, tmin / 16}, sample || Ly.free ? 0 : -1);
    return false;
  }

  // Accept candidate acc.
  S[kAccepted] = acc;
  const double t = S[kSteps + acc];
  if (Ly.free && t == 1.0) S[kDampMul] = std::max(1.0, S[kDampMul] * 1e-2);
  for (int64_t j = 0; j < p; ++j) w[j] += t * dw[j];
  const double mu_new = mu + t * dmu;
  S[kMu] = mu_new;
  S[kF] = F_new;
  const double* A = stats + Ly.cand(acc);
  std::vector<double> g(p, 0.0);
  const Layout::Coef cf = Ly.coef(prob.pi);
  for (int64_t b = 0; b < Ly.nC; ++b)
    for (int64_t k = 0; k < m; ++k) {
      const double al = cf.alpha[b * m + k] / W;
      if (al == 0.0) continue;
      for (int64_t a = 0; a < Ly.L; ++a) g[k * Ly.L + a] += al * A[4 + b * Ly.L + a];
    }
  const double g_mu = A[0] / W - eta;
  double viol = std::abs(g_mu), gap = l1(lam, w) - mu_new * g_mu;
  for (int64_t j = 0; j < p; ++j) {
    viol = std::max(viol, std::abs(g[j]) - lam[j]);
    gap -= w[j] * g[j];
  }
  S[kMaxViol] = viol;
  S[kGap] = gap;
  const double r = std::max(viol / eta, std::abs(gap) / F_scale(F_new));
  // Recession at the accepted point and along the direction that led to it.
  double wsum = std::abs(mu_new), dsum = std::abs(dmu);
  for (int64_t j = 0; j < p; ++j) {
    wsum += std::abs(w[j]);
    dsum += std::abs(dw[j]);
  }
  const double rec_pt = A[2] / W - mu_new * eta - l1(lam, w);
  const double rec_dir = evaluated ? -std::numeric_limits<double>::infinity()
                                   : stats[1] / W - dmu * eta - l1(lam, dw);
  if (!sample) S[kRecession] = std::max({S[kRecession], rec_pt, rec_dir});  // of the full data only
  const bool have_fresh_hess = S[kHessAt] == acc;
  if (have_fresh_hess && Ly.free) {  // the diagonal of K at this point
    double* diag = S + Ly.cg(3);
    std::fill(diag, diag + p, 0.0);
    for (int64_t b = 0; b < Ly.nC; ++b)
      for (int64_t k = 0; k < m; ++k) {
        const double de = cf.delta[b * m + k] / W;
        if (de == 0.0) continue;
        for (int64_t a = 0; a < Ly.L; ++a) diag[k * Ly.L + a] += de * stats[Ly.shess() + b * Ly.L + a];
      }
    for (int64_t j = 0; j < p; ++j) diag[j] = std::max(diag[j], 0.0);  // rounding of 1 - 2 pi_k terms
    diag[p] = A[3] / W;
    S[kHaveHess] = 1.0;
    S[kHessWeight] = W;
  } else if (have_fresh_hess) {
    std::copy(stats + Ly.shess(), stats + Ly.stats_size(), S + Ly.hess());
    S[kHaveHess] = 1.0;
    S[kHessWeight] = W;
  }
  const double last_r = S[kLastR];
  S[kLastR] = r;

  if (!sample) {
    if (!evaluated) S[kIterations] += 1.0;
    if (viol <= tol * eta && std::abs(gap) <= tol * F_scale(F_new)) {
      finish(S, Status::Optimal);
      return true;
    }
    if (viol > tol * eta && (rec_pt > 1e-10 * wsum || rec_dir > 1e-10 * dsum)) {
      finish(S, Status::Infeasible);
      return true;
    }
    if (S[kIterations] >= S[kMaxIter]) {
      finish(S, Status::MaxIter);
      return true;
    }
  } else if (r <= std::max(tol, 1e-9) || S[kSamplePasses] >= 40 ||
             (viol > tol * eta && (rec_pt > 1e-10 * wsum || rec_dir > 1e-10 * dsum))) {
    // An infeasible sample's duals run along its recession direction: a ray, not a point near
    // the data's optimum, and a start from it can leave the full solve crawling (N = 997 with
    // a 64-row sample: violation 1.9e-4 after 100 iterations, 7.8e-5 after 400). The data
    // then starts cold, as without a sample.
    if (!(r <= std::max(tol, 1e-9)) && viol > tol * eta && (rec_pt > 1e-10 * wsum || rec_dir > 1e-10 * dsum)) {
      std::fill(w, w + p, 0.0);
      S[kMu] = 0.0;
    }
    to_full();
    return false;
  }
  if (S[kHaveHess] == 0.0) {  // the Hessian candidate was rejected before any was cached
    set_steps(S, {0.0}, 0);
    S[kEvaluate] = 1.0;
    return false;
  }

  if (Ly.free) {
    if (!cg_start(Ly, S, g, g_mu, lam, evaluated || (acc == 0 && t == 1.0))) {
      if (sample) to_full(); else fallback();
    }
    return S[kPhase] == kDone;
  }

  double dmu_new = 0.0;
  const double pred = newton_direction(Ly, prob, S + Ly.hess(), S[kHessWeight], g.data(), g_mu, w, lam, S[kRho],
                                       dw, dmu_new);
  S[kDmu] = dmu_new;
  S[kPred] = pred;
  if (!(pred > 1e-300)) {  // the model sees no ascent left
    if (sample) to_full(); else fallback();
    return S[kPhase] == kDone;
  }
  // The next pass: a fresh Hessian in the sample phase (cheap) and on the full data when the
  // reused one stops contracting fast. Once full steps are taken only the full step is
  // evaluated (a rejected one costs a pass of shorter candidates); after a shortened step,
  // four lengths at once.
  const bool need_hess = sample || (last_r > 0.0 && r > 0.05 * last_r) || (!evaluated && t < 1.0);
  const int h = need_hess ? 0 : -1;
  if (evaluated || (acc == 0 && t == 1.0))
    set_steps(S, {1.0}, h);
  else
    set_steps(S, {1.0, 0.5, 0.25, 0.125}, h);
  return false;
}

ExactResult exact_result(int64_t m, int64_t c, const double* S, double* w, double* dw) {
  const Layout Ly(m, c, S[kFree] != 0.0);
  if (w) std::copy(S + Ly.w(), S + Ly.w() + Ly.p, w);
  if (dw) std::copy(S + Ly.dw(), S + Ly.dw() + Ly.p, dw);
  ExactResult r;
  r.status = static_cast<Status>(static_cast<int>(S[kStatus]));
  if (S[kPhase] != kDone) r.status = Status::MaxIter;
  r.iterations = static_cast<int64_t>(S[kIterations]);
  r.passes = static_cast<int64_t>(S[kPasses]);
  r.sample_passes = static_cast<int64_t>(S[kSamplePasses]);
  r.hessian_passes = static_cast<int64_t>(S[kHessPasses]);
  r.product_passes = static_cast<int64_t>(S[kProductPasses]);
  r.hessian_free = Ly.free;
  r.mu = S[kMu];
  r.dmu = S[kDmu];
  r.max_violation = std::max(S[kMaxViol], 0.0);
  r.gap = S[kGap];
  r.recession = S[kRecession];
  r.objective = S[kF];
  return r;
}

// ----- pattern table ---------------------------------------------------------------------------
namespace {

// Open-addressing hash aggregate of variable-length word keys.
struct KeyTable {
  std::vector<uint64_t> words;     // keys, concatenated
  std::vector<int64_t> start{0};   // entry e: words [start[e], start[e + 1])
  std::vector<uint64_t> hashes;
  std::vector<int64_t> counts, first_row;
  std::vector<int64_t> slots = std::vector<int64_t>(1024, -1);

  int64_t size() const { return static_cast<int64_t>(counts.size()); }

  void grow() {
    std::vector<int64_t> fresh(slots.size() * 2, -1);
    const uint64_t mask = fresh.size() - 1;
    for (int64_t e = 0; e < size(); ++e) {
      uint64_t h = hashes[e] & mask;
      while (fresh[h] >= 0) h = (h + 1) & mask;
      fresh[h] = e;
    }
    slots.swap(fresh);
  }

  void add(const uint64_t* key, int64_t len, uint64_t hash, int64_t cnt, int64_t row) {
    const uint64_t mask = slots.size() - 1;
    uint64_t h = hash & mask;
    while (slots[h] >= 0) {
      const int64_t e = slots[h];
      if (hashes[e] == hash && start[e + 1] - start[e] == len &&
          std::equal(key, key + len, words.begin() + start[e])) {
        counts[e] += cnt;
        return;
      }
      h = (h + 1) & mask;
    }
    slots[h] = size();
    words.insert(words.end(), key, key + len);
    start.push_back(static_cast<int64_t>(words.size()));
    hashes.push_back(hash);
    counts.push_back(cnt);
    first_row.push_back(row);
    if (2 * size() > static_cast<int64_t>(slots.size())) grow();
  }
};

// The key of row i: group bits, then label bits (dense) or the label count and indices (CSR).
int64_t row_key(const Data& d, int64_t i, std::vector<uint64_t>& key) {
  key.clear();
  auto put_bits = [&](const uint8_t* x, int64_t n) {
    for (int64_t b = 0; b < n; b += 64) {
      uint64_t word = 0;
      const int64_t e = std::min(n, b + 64);
      for (int64_t j = b; j < e; ++j) word |= static_cast<uint64_t>(x[j] != 0) << (j - b);
      key.push_back(word);
    }
  };
  put_bits(d.s + i * d.ld_s, d.m);
  if (!d.y_indptr) {
    put_bits(d.y + i * d.ld_y, d.c);
  } else {
    const int64_t b = d.y_indptr[i], e = d.y_indptr[i + 1];
    key.push_back(static_cast<uint64_t>(e - b));
    for (int64_t t = b; t < e; t += 2)
      key.push_back(static_cast<uint32_t>(d.y_indices[t]) |
                    (t + 1 < e ? static_cast<uint64_t>(static_cast<uint32_t>(d.y_indices[t + 1])) << 32 : 0));
  }
  return static_cast<int64_t>(key.size());
}

uint64_t key_hash(const std::vector<uint64_t>& key) {
  uint64_t h = 0x243F6A8885A308D3ull;
  for (uint64_t w : key) h = mix64(h ^ w);
  return h;
}

}  // namespace

Data PatternTable::data() const {
  Data d;
  d.n = n;
  d.m = m;
  d.c = c;
  d.s = s.data();
  d.ld_s = m;
  if (dense) {
    d.y = y.data();
    d.ld_y = c;
  } else {
    d.y_indptr = y_indptr.data();
    d.y_indices = y_indices.data();
  }
  return d;
}

bool pattern_table(const Data& d, const int64_t* count, int64_t max_patterns, PatternTable& out) {
  out = PatternTable();
  const int T = team_size(d.n);
  std::vector<KeyTable> tables(T);
  std::atomic<bool> over{false};
#if defined(PYM4_WITH_OPENMP)
#pragma omp parallel num_threads(T)
#endif
  {
    const int t = T == 1 ? 0 : thread_id();
    int64_t b, e;
    range_of(d.n, t, T, b, e);
    std::vector<uint64_t> key;
    KeyTable& tab = tables[t];
    for (int64_t i = b; i < e; ++i) {
      const int64_t len = row_key(d, i, key);
      tab.add(key.data(), len, key_hash(key), count ? count[i] : 1, i);
      if ((i & 4095) == 0 && (tab.size() > max_patterns || over.load(std::memory_order_relaxed) || interrupt::pending())) {
        over.store(true, std::memory_order_relaxed);
        break;
      }
    }
  }
  interrupt::check();  // after the region: a poll inside it saw Ctrl-C
  if (over.load()) return false;
  KeyTable& all = tables[0];
  for (int t = 1; t < T; ++t) {
    const KeyTable& tab = tables[t];
    for (int64_t e = 0; e < tab.size(); ++e) {
      all.add(tab.words.data() + tab.start[e], tab.start[e + 1] - tab.start[e], tab.hashes[e], tab.counts[e],
              tab.first_row[e]);
      if (all.size() > max_patterns) return false;
    }
    tables[t] = KeyTable();
  }
  if (all.size() > max_patterns) return false;
  const int64_t P = all.size();
  out.n = P;
  out.m = d.m;
  out.c = d.c;
  out.dense = d.y_indptr == nullptr;
  out.s.resize(static_cast<size_t>(P) * d.m);
  out.count = all.counts;
  if (out.dense) out.y.resize(static_cast<size_t>(P) * d.c);
  else out.y_indptr.assign(P + 1, 0);
  for (int64_t e = 0; e < P; ++e) {
    const int64_t i = all.first_row[e];
    std::copy(d.s + i * d.ld_s, d.s + i * d.ld_s + d.m, out.s.begin() + e * d.m);
    if (out.dense) {
      std::copy(d.y + i * d.ld_y, d.y + i * d.ld_y + d.c, out.y.begin() + e * d.c);
    } else {
      out.y_indices.insert(out.y_indices.end(), d.y_indices + d.y_indptr[i], d.y_indices + d.y_indptr[i + 1]);
      out.y_indptr[e + 1] = static_cast<int64_t>(out.y_indices.size());
    }
  }
  return true;
}

// ----- the in-memory driver ----------------------------------------------------------------------
namespace {

constexpr int64_t kMaxPatterns = int64_t(1) << 24;  // ~16M patterns: a table of a few hundred MB at most

// A table of a spread-out sample of 2^15 rows: when more than half of them are distinct, the
// full table would not halve the rows either (the distinct fraction only falls with more
// rows, but slowly), and building it would cost more than a pass.
bool likely_compresses(const Data& d) {
  constexpr int64_t kProbe = int64_t(1) << 15;
  if (d.n <= 4 * kProbe) return true;
  const int64_t stride = d.n / kProbe;
  Data sd = d;
  sd.n = kProbe;
  std::vector<int64_t> ip;
  std::vector<int32_t> ix;
  if (d.y_indptr) {
    ip.assign(kProbe + 1, 0);
    for (int64_t r = 0; r < kProbe; ++r) {
      const int64_t i = r * stride;
      ix.insert(ix.end(), d.y_indices + d.y_indptr[i], d.y_indices + d.y_indptr[i + 1]);
      ip[r + 1] = static_cast<int64_t>(ix.size());
    }
    sd.y_indptr = ip.data();
    sd.y_indices = ix.data();
  } else {
    sd.ld_y = d.ld_y * stride;  // a strided view of the dense rows
  }
  sd.ld_s = d.ld_s * stride;
  if (!d.y_indptr && d.c == 0) sd.y = nullptr;
  PatternTable probe;
  return pattern_table(sd, nullptr, kProbe / 2, probe);
}

ExactResult run_passes(const Data& d, const int64_t* count, const Problem& prob, const ExactConfig& cfg,
                       double* w, double* q = nullptr, bool* q_done = nullptr) {
  const Layout Ly(d.m, d.c, exact_resolve_hessian(cfg, d.m, d.c));
  std::vector<double> state(Ly.state_size()), stats(Ly.stats_size());
  exact_init(prob, d.m, d.c, cfg, d.n, w, state.data());
  for (;;) {
    interrupt::check();
    std::fill(stats.begin(), stats.end(), 0.0);
    // The rows' q at the first candidate: when the solve ends on it, that is the answer
    // (no separate pass for q).
    const bool write_q = q && state[kRate] <= 1.0 && state[kK] >= 1;
    exact_partial(d, count, prob, state.data(), 0, stats.data(), write_q ? q : nullptr);
    if (exact_step(prob, d.m, d.c, state.data(), stats.data())) {
      if (q_done) *q_done = write_q && state[kAccepted] == 0.0;
      break;
    }
  }
  return exact_result(d.m, d.c, state.data(), w);
}

}  // namespace

ExactResult solve_exact(const Data& d, const Problem& prob, const ExactConfig& cfg, double* w, double* q,
                        ExactInfo* info) {
  exact_check_memory(cfg, d.m, d.c);  // before any work
  ExactResult res;
  bool compressed = false;
  int64_t patterns = 0;
  if (!d.u && d.n >= 2 && likely_compresses(d)) {
    PatternTable tab;
    if (pattern_table(d, nullptr, std::min<int64_t>(d.n / 2, kMaxPatterns), tab)) {
      const Data dt = tab.data();
      res = run_passes(dt, tab.count.data(), prob, cfg, w);
      compressed = true;
      patterns = tab.n;
    }
  }
  bool q_done = false;
  if (!compressed) res = run_passes(d, nullptr, prob, cfg, w, q, &q_done);
  if (!q_done) keep_probability(d, prob, w, res.mu, q);
  if (info) {
    info->compressed = compressed;
    info->patterns = patterns;
  }
  return res;
}

}  // namespace m4
}  // namespace pym4
