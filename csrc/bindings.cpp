// The only file that knows Python: argument checks, GIL release, error translation.
// Every op's core is plain C++ (include/pym4/*.h); CUDA entry points take raw device
// pointers and the caller's stream from the Python layer, so the core never links libtorch.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "pym4/columns.h"
#include "pym4/common.h"
#include "pym4/interrupt.h"
#include "pym4/m4.h"
#include "pym4/sinkhorn.h"
#if defined(PYM4_WITH_CUDA)
#include "pym4/cuda.h"
#endif

namespace py = pybind11;

namespace {

// ----- argument checks: each raises ValueError/TypeError naming the argument ------------
[[noreturn]] void fail_value(const std::string& msg) { throw py::value_error(msg); }
[[noreturn]] void fail_type(const std::string& msg) { throw py::type_error(msg); }

#define PYM4_CHECK_VALUE(cond, msg)        \
  do {                                     \
    if (!(cond)) {                         \
      std::ostringstream os_;              \
      os_ << msg;                          \
      fail_value(os_.str());               \
    }                                      \
  } while (0)

template <typename T>
const char* dtype_name();
template <>
const char* dtype_name<float>() { return "float32"; }
template <>
const char* dtype_name<double>() { return "float64"; }

// A 2-D array of T with unit column stride (rows may be strided); returns the row stride.
template <typename T>
int64_t check_matrix(const py::array& a, const char* name) {
  if (!py::isinstance<py::array_t<T>>(a) || a.dtype().kind() != 'f' || a.itemsize() != sizeof(T))
    fail_type(std::string(name) + ": expected a " + dtype_name<T>() + " array, got dtype " +
              std::string(py::str(a.dtype())));
  PYM4_CHECK_VALUE(a.ndim() == 2, name << ": expected a 2-D array, got " << a.ndim() << " dimensions");
  PYM4_CHECK_VALUE(a.shape(0) >= 1 && a.shape(1) >= 1, name << ": expected a non-empty matrix, got shape ("
                                                             << a.shape(0) << ", " << a.shape(1) << ")");
  PYM4_CHECK_VALUE(a.shape(1) == 1 || a.strides(1) == static_cast<py::ssize_t>(sizeof(T)),
                   name << ": columns must be contiguous (row-major layout)");
  PYM4_CHECK_VALUE(a.strides(0) % static_cast<py::ssize_t>(sizeof(T)) == 0 && a.strides(0) >= 0,
                   name << ": unsupported row stride");
  return a.shape(0) == 1 ? a.shape(1) : a.strides(0) / static_cast<int64_t>(sizeof(T));
}

const double* check_vector(const py::object& v, int64_t n, const char* name) {
  if (v.is_none()) return nullptr;
  auto arr = py::cast<py::array>(v);
  if (!py::isinstance<py::array_t<double>>(arr) || arr.dtype().kind() != 'f' || arr.itemsize() != 8)
    fail_type(std::string(name) + ": expected a float64 vector");
  PYM4_CHECK_VALUE(arr.ndim() == 1 && arr.shape(0) == n,
                   name << ": expected shape (" << n << ",), got ndim " << arr.ndim());
  PYM4_CHECK_VALUE(arr.strides(0) == 8, name << ": must be contiguous");
  return static_cast<const double*>(arr.data());
}

template <typename T>
pym4::sinkhorn::Matrix<T> as_matrix(const py::array& x, double alpha) {
  const int64_t ld = check_matrix<T>(x, "x");
  return {static_cast<const T*>(x.data()), x.shape(0), x.shape(1), ld, alpha};
}

pym4::sinkhorn::RowMarginal row_marginal(const py::object& log_a, int64_t rows) {
  pym4::sinkhorn::RowMarginal a;
  if (py::isinstance<py::float_>(log_a) || py::isinstance<py::int_>(log_a)) {
    a.log_a_scalar = py::cast<double>(log_a);
  } else {
    a.log_a = check_vector(log_a, rows, "log_a");
  }
  return a;
}

// ----- Ctrl-C (include/pym4/interrupt.h) ---------------------------------------------------
// Python runs signal handlers on the main thread only (PyErr_CheckSignals is a no-op
// elsewhere), so only a call made there polls; from any other thread the loops never take
// the GIL. Asked each call (~0.1 us): the main thread changes after a fork from another one.
bool on_main_thread() {
  static PyObject* main_thread = nullptr;  // threading.main_thread; never freed (exit order)
  if (!main_thread) main_thread = py::object(py::module_::import("threading").attr("main_thread")).release().ptr();
  py::object ident = py::reinterpret_borrow<py::object>(main_thread)().attr("ident");
  return !ident.is_none() && ident.cast<unsigned long>() == PyThread_get_thread_ident();
}

// The poll: runs the pending signal handlers with the GIL held. A handler that raises
// (SIGINT's raises KeyboardInterrupt) stops the solve; its exception stays set on this
// thread and is raised by the translator registered in PYBIND11_MODULE.
bool signal_raised() {
  py::gil_scoped_acquire gil;
  return PyErr_CheckSignals() != 0;
}

// Releases the GIL around a long core call whose loops check for Ctrl-C: declared where a
// plain py::gil_scoped_release would be. The scope is set up while the GIL is still held.
class InterruptibleRelease {
  pym4::interrupt::Scope scope_;
  py::gil_scoped_release release_;

 public:
  InterruptibleRelease() : scope_(on_main_thread() ? &signal_raised : nullptr) {}
};

// ----- Sinkhorn ---------------------------------------------------------------------------
template <typename T>
py::tuple sinkhorn_solve(const py::array& x, double alpha, const py::object& log_b, const py::object& log_a,
                         int64_t n_iters, double tol, double log_out_scale, py::array out, const py::object& g_init,
                         int64_t check_every) {
  auto m = as_matrix<T>(x, alpha);
  const double* lb = check_vector(log_b, m.cols, "log_b");
  auto a = row_marginal(log_a, m.rows);
  const int64_t ld_out = check_matrix<T>(out, "out");
  PYM4_CHECK_VALUE(out.shape(0) == m.rows && out.shape(1) == m.cols, "out: shape must match x");
  PYM4_CHECK_VALUE(out.writeable(), "out: must be writeable");
  PYM4_CHECK_VALUE(n_iters >= 1, "n_iters: must be >= 1, got " << n_iters);
  PYM4_CHECK_VALUE(out.data() != x.data() || ld_out == m.ld, "out: an in-place solve needs the same row stride as x");
  PYM4_CHECK_VALUE(check_every >= 0, "check_every: must be >= 0, got " << check_every);
  pym4::sinkhorn::Options opt;
  opt.g_init = check_vector(g_init, m.cols, "g_init");
  opt.check_every = check_every;
  py::array_t<double> g(m.cols);
  T* out_ptr = static_cast<T*>(out.mutable_data());
  double* g_ptr = g.mutable_data();
  pym4::sinkhorn::Result r;
  {
    InterruptibleRelease release;
    r = pym4::sinkhorn::solve<T>(m, lb, a, n_iters, tol, log_out_scale, out_ptr, ld_out, g_ptr, opt);
  }
  PYM4_CHECK_VALUE(r.finite, "scores: contains NaN or Inf (or overflows once divided by epsilon)");
  return py::make_tuple(r.iterations, r.marginal_error, g, !r.solved ? "none" : r.kernel_form ? "kernel" : "log",
                        r.converged, py::cast(r.errors));
}

// SwAV's solve as pym4.sinkhorn runs it on the CPU: rows of mass 1/B, columns 1/K, the plan
// written times B, no tolerance. Returns (form, max |alpha x|) instead of the column potential
// (K logs the caller has no use for: 0.1 ms at SEER's K = 16000).
template <typename T>
py::tuple sinkhorn_swav(const py::array& x, double alpha, int64_t n_iters, py::array out) {
  auto m = as_matrix<T>(x, alpha);
  const int64_t ld_out = check_matrix<T>(out, "out");
  PYM4_CHECK_VALUE(out.shape(0) == m.rows && out.shape(1) == m.cols, "out: shape must match x");
  PYM4_CHECK_VALUE(out.writeable(), "out: must be writeable");
  PYM4_CHECK_VALUE(n_iters >= 1, "n_iters: must be >= 1, got " << n_iters);
  PYM4_CHECK_VALUE(out.data() != x.data() || ld_out == m.ld, "out: an in-place solve needs the same row stride as x");
  pym4::sinkhorn::RowMarginal a;
  a.log_a_scalar = -std::log(static_cast<double>(m.rows));
  T* out_ptr = static_cast<T*>(out.mutable_data());
  pym4::sinkhorn::Result r;
  {
    InterruptibleRelease release;
    r = pym4::sinkhorn::solve<T>(m, nullptr, a, n_iters, 0.0, -a.log_a_scalar, out_ptr, ld_out, nullptr);
  }
  PYM4_CHECK_VALUE(r.finite, "scores: contains NaN or Inf (or overflows once divided by epsilon)");
  return py::make_tuple(!r.solved ? "none" : r.kernel_form ? "kernel" : "log", r.max_abs_exponent);
}

template <typename T>
py::tuple sinkhorn_column_logsumexp(const py::array& x, double alpha) {
  auto m = as_matrix<T>(x, alpha);
  py::array_t<double> col_max(m.cols), col_sum(m.cols);
  double *mx = col_max.mutable_data(), *sm = col_sum.mutable_data();
  bool finite;
  {
    py::gil_scoped_release release;
    finite = pym4::sinkhorn::column_logsumexp<T>(m, mx, sm);
  }
  PYM4_CHECK_VALUE(finite, "scores: contains NaN or Inf (or overflows once divided by epsilon)");
  return py::make_tuple(col_max, col_sum);
}

template <typename T>
py::array_t<double> sinkhorn_row_pass(const py::array& x, double alpha, const py::object& g, const py::object& log_a) {
  auto m = as_matrix<T>(x, alpha);
  const double* gp = check_vector(g, m.cols, "g");
  PYM4_CHECK_VALUE(gp != nullptr, "g: required");
  auto a = row_marginal(log_a, m.rows);
  py::array_t<double> col_mass(m.cols);
  double* cm = col_mass.mutable_data();
  {
    py::gil_scoped_release release;
    pym4::sinkhorn::row_pass<T>(m, gp, a, nullptr, nullptr, cm);
  }
  return col_mass;
}

template <typename T>
void sinkhorn_write_plan(const py::array& x, double alpha, const py::object& g, const py::object& log_a, py::array out) {
  auto m = as_matrix<T>(x, alpha);
  const double* gp = check_vector(g, m.cols, "g");
  PYM4_CHECK_VALUE(gp != nullptr, "g: required");
  auto a = row_marginal(log_a, m.rows);
  const int64_t ld_out = check_matrix<T>(out, "out");
  PYM4_CHECK_VALUE(out.shape(0) == m.rows && out.shape(1) == m.cols, "out: shape must match x");
  T* op = static_cast<T*>(out.mutable_data());
  py::gil_scoped_release release;
  pym4::sinkhorn::write_plan<T>(m, gp, a, nullptr, op, ld_out, nullptr);
}

// ----- M4 ------------------------------------------------------------------------------------
// Data travel as a tuple (s, y, y_indptr, y_indices, c, u): s (n, m) uint8; labels dense
// y (n, c) uint8, or y None with CSR y_indptr (n+1,) int64 and y_indices int32; u None or
// (n,) float64. The problem is (pi (m,) float64, eta, eps_rep, eps_assoc). The Python layer
// (pym4/m4/) has already checked values (0/1, finite, ranges); here only layouts.
template <typename T>
const T* m4_array(const py::object& o, const char* name, int ndim, char kind, py::ssize_t rows, py::ssize_t cols = -1) {
  auto a = py::cast<py::array>(o);
  PYM4_CHECK_VALUE(a.dtype().kind() == kind && a.itemsize() == static_cast<py::ssize_t>(sizeof(T)),
                   name << ": wrong dtype " << std::string(py::str(a.dtype())));
  PYM4_CHECK_VALUE(a.ndim() == ndim, name << ": expected " << ndim << " dimensions, got " << a.ndim());
  PYM4_CHECK_VALUE(a.shape(0) == rows, name << ": expected " << rows << " rows, got " << a.shape(0));
  if (ndim == 2 && cols >= 0) PYM4_CHECK_VALUE(a.shape(1) == cols, name << ": expected " << cols << " columns, got " << a.shape(1));
  PYM4_CHECK_VALUE((a.flags() & py::array::c_style) != 0, name << ": must be C-contiguous");
  return static_cast<const T*>(a.data());
}

template <typename T>
T* m4_out(py::array& a, const char* name, py::ssize_t size) {
  PYM4_CHECK_VALUE(py::isinstance<py::array_t<T>>(a) && a.itemsize() == static_cast<py::ssize_t>(sizeof(T)),
                   name << ": wrong dtype");
  PYM4_CHECK_VALUE(a.ndim() == 1 && a.shape(0) == size, name << ": expected shape (" << size << ",)");
  PYM4_CHECK_VALUE((a.flags() & py::array::c_style) != 0 && a.writeable(), name << ": must be a writeable contiguous array");
  return static_cast<T*>(a.mutable_data());
}

pym4::m4::Data m4_data(const py::tuple& t) {
  PYM4_CHECK_VALUE(t.size() == 6, "data: expected (s, y, y_indptr, y_indices, c, u)");
  pym4::m4::Data d;
  auto s = py::cast<py::array>(t[0]);
  PYM4_CHECK_VALUE(s.ndim() == 2, "s: expected a 2-D array (examples, groups)");
  d.n = s.shape(0);
  d.m = s.shape(1);
  d.c = py::cast<int64_t>(t[4]);
  PYM4_CHECK_VALUE(d.m >= 1 && d.c >= 0, "s, y: need at least one group and c >= 0 labels");
  d.s = m4_array<uint8_t>(t[0], "s", 2, 'u', d.n, d.m);
  d.ld_s = d.m;
  if (!t[1].is_none()) {
    d.y = m4_array<uint8_t>(t[1], "y", 2, 'u', d.n, d.c);
    d.ld_y = d.c;
  } else {
    d.y_indptr = m4_array<int64_t>(t[2], "y_indptr", 1, 'i', d.n + 1);
    auto idx = py::cast<py::array>(t[3]);
    PYM4_CHECK_VALUE(idx.ndim() == 1, "y_indices: expected a 1-D array");
    d.y_indices = m4_array<int32_t>(t[3], "y_indices", 1, 'i', idx.shape(0));
    PYM4_CHECK_VALUE(d.y_indptr[0] == 0 && d.y_indptr[d.n] == idx.shape(0), "y_indptr: inconsistent with y_indices");
    // The kernels index label tables by these without bounds checks: one O(n + nnz) scan
    // here, so a malformed CSR is an error rather than memory read out of bounds.
    for (int64_t i = 0; i < d.n; ++i)
      PYM4_CHECK_VALUE(d.y_indptr[i] <= d.y_indptr[i + 1],
                       "y_indptr: must be non-decreasing, but entry " << i + 1 << " < entry " << i);
    for (py::ssize_t k = 0; k < idx.shape(0); ++k)
      PYM4_CHECK_VALUE(d.y_indices[k] >= 0 && d.y_indices[k] < d.c,
                       "y_indices: entry " << k << " is " << d.y_indices[k] << ", outside [0, c = " << d.c << ")");
  }
  if (!t[5].is_none()) d.u = m4_array<double>(t[5], "u", 1, 'f', d.n);
  return d;
}

pym4::m4::Problem m4_problem(const py::tuple& t, int64_t m) {
  PYM4_CHECK_VALUE(t.size() == 4, "problem: expected (pi, eta, eps_rep, eps_assoc)");
  pym4::m4::Problem p;
  p.pi = m4_array<double>(t[0], "target", 1, 'f', m);
  p.eta = py::cast<double>(t[1]);
  p.eps_rep = py::cast<double>(t[2]);
  p.eps_assoc = py::cast<double>(t[3]);
  return p;
}

struct M4State {
  pym4::m4::StreamState st;
};

M4State m4_state(py::array& v_plus, py::array& v_minus, py::array& avg_w, py::array& curv, py::array& scalars, int64_t p) {
  M4State s;
  s.st.v_plus = m4_out<double>(v_plus, "v_plus", p);
  s.st.v_minus = m4_out<double>(v_minus, "v_minus", p);
  s.st.avg_w = m4_out<double>(avg_w, "avg_w", p);
  s.st.curv = m4_out<double>(curv, "curv", p);
  s.st.scalars = m4_out<double>(scalars, "scalars", 4);
  return s;
}

// A private copy of a stream state (the five arrays of m4_state, p entries each, scalars 4).
struct StreamStateCopy {
  int64_t p;
  std::vector<double> buf;
  pym4::m4::StreamState st;
  StreamStateCopy(const pym4::m4::StreamState& from, int64_t p_) : p(p_), buf(4 * p_ + 4) {
    st = {buf.data(), buf.data() + p, buf.data() + 2 * p, buf.data() + 3 * p, buf.data() + 4 * p};
    copy(from, st);
  }
  void copy_to(const pym4::m4::StreamState& to) const { copy(st, to); }
  void copy(const pym4::m4::StreamState& a, const pym4::m4::StreamState& b) const {
    std::copy(a.v_plus, a.v_plus + p, b.v_plus);
    std::copy(a.v_minus, a.v_minus + p, b.v_minus);
    std::copy(a.avg_w, a.avg_w + p, b.avg_w);
    std::copy(a.curv, a.curv + p, b.curv);
    std::copy(a.scalars, a.scalars + 4, b.scalars);
  }
};

// hessian: "auto", "dense" or "free" (include/pym4/m4.h, ExactConfig).
int m4_hessian_mode(const std::string& hessian) {
  if (hessian == "auto") return pym4::m4::kHessianAuto;
  if (hessian == "dense") return pym4::m4::kHessianDense;
  if (hessian == "free") return pym4::m4::kHessianFree;
  PYM4_CHECK_VALUE(false, "hessian: expected 'auto', 'dense' or 'free', got '" << hessian << "'");
  return pym4::m4::kHessianAuto;
}

pym4::m4::ExactConfig m4_exact_config(int64_t max_iter, double tol, double rho, int64_t sample_rows = 1 << 17,
                                      const std::string& hessian = "auto", int64_t max_bytes = int64_t(1) << 32) {
  PYM4_CHECK_VALUE(max_iter >= 1, "max_iter: must be >= 1, got " << max_iter);
  PYM4_CHECK_VALUE(max_bytes >= 1, "max_bytes: must be >= 1, got " << max_bytes);
  PYM4_CHECK_VALUE(tol > 0.0 && std::isfinite(tol), "tol: must be a positive number, got " << tol);
  PYM4_CHECK_VALUE(rho > 0.0, "rho: must be positive, got " << rho);
  PYM4_CHECK_VALUE(sample_rows >= 0, "sample_rows: must be >= 0, got " << sample_rows);
  pym4::m4::ExactConfig cfg;
  cfg.max_iter = max_iter;
  cfg.tol = tol;
  cfg.rho = rho;
  cfg.sample_rows = sample_rows;
  cfg.hessian = m4_hessian_mode(hessian);
  cfg.max_bytes = max_bytes;
  return cfg;
}

py::dict m4_result_dict(const pym4::m4::ExactResult& r) {
  py::dict out;
  out["status"] = static_cast<int>(r.status);
  out["iterations"] = r.iterations;
  out["passes"] = r.passes;
  out["sample_passes"] = r.sample_passes;
  out["hessian_passes"] = r.hessian_passes;
  out["product_passes"] = r.product_passes;
  out["hessian"] = r.hessian_free ? "free" : "dense";
  out["mu"] = r.mu;
  out["max_violation"] = r.max_violation;
  out["gap"] = r.gap;
  out["recession"] = r.recession;
  out["objective"] = r.objective;
  return out;
}

// Per-row integer weights (None: 1 each), checked non-negative.
const int64_t* m4_counts(const py::object& counts, int64_t n) {
  if (counts.is_none()) return nullptr;
  const int64_t* c = m4_array<int64_t>(counts, "counts", 1, 'i', n);
  for (int64_t i = 0; i < n; ++i) PYM4_CHECK_VALUE(c[i] >= 0, "counts: must be >= 0, got " << c[i] << " at row " << i);
  return c;
}

// The exact solver's state: a float64 vector of exact_state_size(m, c, mode), the mode (dense
// or Hessian-free) read from its header.
double* m4_exact_state(py::array& state, int64_t m, int64_t c) {
  PYM4_CHECK_VALUE(py::isinstance<py::array_t<double>>(state) && state.ndim() == 1 &&
                       state.shape(0) >= pym4::m4::exact_header_size(),
                   "state: expected a float64 solver state from m4_exact_init");
  const bool free = pym4::m4::exact_state_hessian_free(static_cast<const double*>(state.data()));
  return m4_out<double>(state, "state", pym4::m4::exact_state_size(m, c, free));
}

int64_t m4_exact_stats_size(const py::array& state, int64_t m, int64_t c) {
  return pym4::m4::exact_stats_size(m, c, pym4::m4::exact_state_hessian_free(static_cast<const double*>(state.data())));
}

// Dispatch on the dtype of x (float32 or float64) to the templated entry point.
#define PYM4_DISPATCH_FLOAT(x, FN, ...)                                                          \
  ((x).dtype().kind() == 'f' && (x).itemsize() == 8 ? FN<double>(x, __VA_ARGS__)               \
   : (x).dtype().kind() == 'f' && (x).itemsize() == 4                                          \
       ? FN<float>(x, __VA_ARGS__)                                                               \
       : (fail_type(std::string("x: expected float32 or float64, got ") + std::string(py::str((x).dtype()))), \
          FN<float>(x, __VA_ARGS__)))

py::dict build_info() {
  py::dict info;
  info["version"] = PYM4_VERSION;
  info["compiler"] = PYM4_COMPILER;
#if defined(PYM4_WITH_OPENMP)
  info["openmp"] = true;
  info["openmp_version"] = _OPENMP;
  info["omp_max_threads"] = pym4::max_threads();
#else
  info["openmp"] = false;
  info["openmp_version"] = py::none();
  info["omp_max_threads"] = 1;
#endif
  // SIMD: the ISA clones compiled in, and the one this CPU runs.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__linux__)
  info["simd_clones"] = py::make_tuple("x86-64-v4 (AVX-512)", "x86-64-v3 (AVX2+FMA)", "x86-64 (SSE2)");
  __builtin_cpu_init();
  const char* level = __builtin_cpu_supports("x86-64-v4")   ? "x86-64-v4 (AVX-512)"
                      : __builtin_cpu_supports("x86-64-v3") ? "x86-64-v3 (AVX2+FMA)"
                                                            : "x86-64 (SSE2)";
  info["simd"] = level;
#else
  info["simd_clones"] = py::make_tuple();
#if defined(__ARM_NEON)
  info["simd"] = "neon";
#else
  info["simd"] = "compiler default";
#endif
#endif
#if defined(PYM4_WITH_CUDA)
  info["cuda"] = true;
  info["cuda_archs"] = PYM4_CUDA_ARCHS;
#else
  info["cuda"] = false;
  info["cuda_archs"] = "";
#endif
#if defined(PYM4_SANITIZE)
  info["sanitize"] = PYM4_SANITIZE;  // a test build (make sanitize-check)
#else
  info["sanitize"] = "";
#endif
  return info;
}

}  // namespace

PYBIND11_MODULE(_core, m) {
  m.doc() = "pym4 compiled core: CPU kernels (OpenMP) and, when built with CUDA, GPU launchers";
  m.def("build_info", &build_info, "What this core was built with.");
  // An engine's pool thread already keeps a core busy: its calls into the core should not each
  // fork an OpenMP team (nested parallelism on a 2-core machine cost ~20 ms a call, measured).
  // OpenMP's nthreads-var belongs to the calling thread, so this changes no other thread.
  m.def(
      "set_thread_limit",
      [](int threads) {
        PYM4_CHECK_VALUE(threads >= 1, "threads: must be >= 1, got " << threads);
#if defined(PYM4_WITH_OPENMP)
        omp_set_num_threads(threads);
#endif
        return pym4::max_threads();
      },
      py::arg("threads"),
      "OpenMP threads for the core's calls made from the calling thread (other threads keep\n"
      "theirs); returns the limit now in force (1 in a core built without OpenMP).");
  m.def(
      "unpack_bit_columns",
      [](const std::vector<py::buffer>& bitmaps, const std::vector<int64_t>& offsets, int64_t n) {
        PYM4_CHECK_VALUE(bitmaps.size() == offsets.size(), "offsets: expected one per bitmap (" << bitmaps.size()
                                                               << "), got " << offsets.size());
        PYM4_CHECK_VALUE(n >= 0, "n: must be >= 0, got " << n);
        const int64_t k = static_cast<int64_t>(bitmaps.size());
        std::vector<const uint8_t*> bits(k);
        for (int64_t j = 0; j < k; ++j) {
          const py::buffer_info info = bitmaps[j].request();
          PYM4_CHECK_VALUE(offsets[j] >= 0, "offsets: entry " << j << " is negative (" << offsets[j] << ")");
          const int64_t have = static_cast<int64_t>(info.size * info.itemsize);
          const int64_t need = (offsets[j] + n + 7) / 8;
          PYM4_CHECK_VALUE(have >= need, "bitmaps: entry " << j << " has " << have << " bytes; " << n
                                                           << " rows from bit " << offsets[j] << " need " << need);
          bits[j] = static_cast<const uint8_t*>(info.ptr);
        }
        py::array_t<uint8_t> out({static_cast<py::ssize_t>(n), static_cast<py::ssize_t>(k)});
        uint8_t* dst = out.mutable_data();
        {
          py::gil_scoped_release release;
          pym4::unpack_bit_columns(bits.data(), offsets.data(), k, n, dst);
        }
        return out;
      },
      py::arg("bitmaps"), py::arg("offsets"), py::arg("n"),
      "(n, k) uint8 0/1, row-major, from k bit-packed boolean columns (Arrow's LSB-first bitmaps,\n"
      "column j from bit offsets[j] of bitmaps[j]).");
  m.def(
      "unpack_bit_words",
      [](const std::vector<py::array_t<int64_t, py::array::c_style>>& words, int64_t n, int64_t first, int64_t k) {
        PYM4_CHECK_VALUE(n >= 0, "n: must be >= 0, got " << n);
        PYM4_CHECK_VALUE(first >= 0 && k >= 0, "first, k: must be >= 0, got " << first << ", " << k);
        const int64_t w = static_cast<int64_t>(words.size());
        PYM4_CHECK_VALUE(first + k <= w * pym4::kWordBits, "words: " << w << " words hold " << w * pym4::kWordBits
                                                                      << " bits; bits " << first << " .. "
                                                                      << first + k - 1 << " were asked for");
        std::vector<const int64_t*> ptrs(w);
        for (int64_t i = 0; i < w; ++i) {
          PYM4_CHECK_VALUE(words[i].ndim() == 1 && words[i].shape(0) == n,
                           "words: entry " << i << " must be 1-D with " << n << " rows");
          ptrs[i] = words[i].data();
        }
        py::array_t<uint8_t> out({static_cast<py::ssize_t>(n), static_cast<py::ssize_t>(k)});
        uint8_t* dst = out.mutable_data();
        {
          py::gil_scoped_release release;
          pym4::unpack_bit_words(ptrs.data(), w, n, first, k, dst);
        }
        return out;
      },
      py::arg("words"), py::arg("n"), py::arg("first"), py::arg("k"),
      "(n, k) uint8 0/1, row-major: bits first .. first + k - 1 of each row of the packed int64\n"
      "words (column b is bit b % 63 of word b // 63; bit 63 is a flag, not read).");
  // A loop stopped by Ctrl-C: the exception the signal handler raised is still set.
  py::register_local_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const pym4::Interrupted&) {
      if (!PyErr_Occurred()) PyErr_SetNone(PyExc_KeyboardInterrupt);
    }
  });

  // Sinkhorn: x float32/float64 (rows, cols); see include/pym4/sinkhorn.h.
  m.def("sinkhorn_solve",
        [](const py::array& x, double alpha, py::object log_b, py::object log_a, int64_t n_iters, double tol,
           double log_out_scale, py::array out, py::object g_init, int64_t check_every) {
          return PYM4_DISPATCH_FLOAT(x, sinkhorn_solve, alpha, log_b, log_a, n_iters, tol, log_out_scale, out, g_init,
                                     check_every);
        },
        py::arg("x"), py::arg("alpha"), py::arg("log_b"), py::arg("log_a"), py::arg("n_iters"), py::arg("tol"),
        py::arg("log_out_scale"), py::arg("out"), py::arg("g_init") = py::none(), py::arg("check_every") = 0,
        "Whole Sinkhorn solve into `out` (which may be x itself); returns (iterations, marginal_error, g,\n"
        "form, converged, errors), form saying what ran: \"kernel\", \"log\", or \"none\" for an in-place\n"
        "solve the kernel form declined (x overwritten). g_init (warm start) and check_every: see\n"
        "sinkhorn::Options in include/pym4/sinkhorn.h.");
  m.def("sinkhorn_swav",
        [](const py::array& x, double alpha, int64_t n_iters, py::array out) {
          return PYM4_DISPATCH_FLOAT(x, sinkhorn_swav, alpha, n_iters, out);
        },
        py::arg("x"), py::arg("alpha"), py::arg("n_iters"), py::arg("out"),
        "SwAV's solve (rows 1/B, columns 1/K, the plan times B) into `out`; returns (form,\n"
        "max_abs_exponent): max |alpha x| when the kernel form ran, NaN when the log domain did.");
  m.def("sinkhorn_column_logsumexp",
        [](const py::array& x, double alpha) { return PYM4_DISPATCH_FLOAT(x, sinkhorn_column_logsumexp, alpha); },
        py::arg("x"), py::arg("alpha"), "(col_max, col_sum) with LSE_i(alpha x_ij) = col_max + log(col_sum).");
  m.def("sinkhorn_row_pass",
        [](const py::array& x, double alpha, py::object g, py::object log_a) {
          return PYM4_DISPATCH_FLOAT(x, sinkhorn_row_pass, alpha, g, log_a);
        },
        py::arg("x"), py::arg("alpha"), py::arg("g"), py::arg("log_a"),
        "Row step; returns the column masses of the plan after it.");
  m.def("sinkhorn_write_plan",
        [](const py::array& x, double alpha, py::object g, py::object log_a, py::array out) {
          PYM4_DISPATCH_FLOAT(x, sinkhorn_write_plan, alpha, g, log_a, out);
        },
        py::arg("x"), py::arg("alpha"), py::arg("g"), py::arg("log_a"), py::arg("out"),
        "Final row step, writing the plan into `out`.");

  // ----- M4: data = (s, y, y_indptr, y_indices, c, u), problem = (pi, eta, eps_rep, eps_assoc);
  // see include/pym4/m4.h.
  m.def("m4_keep_probability",
        [](py::tuple data, py::tuple problem, py::array w, double mu, py::array q) {
          auto d = m4_data(data);
          auto pr = m4_problem(problem, d.m);
          const double* wp = m4_array<double>(w, "w", 1, 'f', d.dim());
          double* qp = m4_out<double>(q, "q", d.n);
          py::gil_scoped_release release;
          pym4::m4::keep_probability(d, pr, wp, mu, qp);
        },
        py::arg("data"), py::arg("problem"), py::arg("w"), py::arg("mu"), py::arg("q"),
        "q_i = clip(eta + u_i - a_i^T w - mu, 0, 1) into q.");
  m.def("m4_keep_probability_at_budget",
        [](py::tuple data, py::tuple problem, py::array w, double mu0, py::array q, py::object counts_after,
           py::object counts_before) {
          auto d = m4_data(data);
          auto pr = m4_problem(problem, d.m);
          const double* wp = m4_array<double>(w, "w", 1, 'f', d.dim());
          double* qp = m4_out<double>(q, "q", d.n);
          const int64_t K = pym4::m4::counts_size(d.m, d.c);
          py::array ca = counts_after.is_none() ? py::array() : counts_after.cast<py::array>();
          py::array cb = counts_before.is_none() ? py::array() : counts_before.cast<py::array>();
          double* cap = counts_after.is_none() ? nullptr : m4_out<double>(ca, "counts_after", K);
          double* cbp = counts_before.is_none() ? nullptr : m4_out<double>(cb, "counts_before", K);
          py::gil_scoped_release release;
          return pym4::m4::keep_probability_at_budget(d, pr, wp, mu0, qp, cap, cbp);
        },
        py::arg("data"), py::arg("problem"), py::arg("w"), py::arg("mu0"), py::arg("q"),
        py::arg("counts_after") = py::none(), py::arg("counts_before") = py::none(),
        "q_i = clip(eta + u_i - a_i^T w - mu, 0, 1) into q with mu such that mean q = eta; returns mu.\n"
        "Adds the weighted counts of q and of the data into counts_after/counts_before when given.");
  m.def("m4_weighted_counts",
        [](py::tuple data, py::object q, py::array counts, py::object counts_data) {
          auto d = m4_data(data);
          const double* qp = q.is_none() ? nullptr : m4_array<double>(q, "q", 1, 'f', d.n);
          const int64_t K = pym4::m4::counts_size(d.m, d.c);
          double* cp = m4_out<double>(counts, "counts", K);
          py::array cd = counts_data.is_none() ? py::array() : counts_data.cast<py::array>();
          double* cdp = counts_data.is_none() ? nullptr : m4_out<double>(cd, "counts_data", K);
          py::gil_scoped_release release;
          pym4::m4::weighted_counts(d, qp, cp, cdp);
        },
        py::arg("data"), py::arg("q"), py::arg("counts"), py::arg("counts_data") = py::none(),
        "Adds [sum q | sum q s_k | sum q y_r | sum q s_k y_r] into counts (and with q = 1 into\n"
        "counts_data when given, in the same pass).");
  m.def("m4_batch_stats",
        [](py::tuple data, py::tuple problem, py::array w, double mu) {
          auto d = m4_data(data);
          auto pr = m4_problem(problem, d.m);
          const double* wp = m4_array<double>(w, "w", 1, 'f', d.dim());
          py::array_t<double> stats(pym4::m4::stats_size(d.dim()));
          double* sp = stats.mutable_data();
          {
            py::gil_scoped_release release;
            pym4::m4::batch_stats(d, pr, wp, mu, 0, d.n, sp);
          }
          return stats;
        },
        py::arg("data"), py::arg("problem"), py::arg("w"), py::arg("mu"),
        "[sum q a (p) | sum a^2 (p) | sum q | count] of one mini-batch.");
  m.def("m4_apply_update",
        [](int64_t m_, int64_t c, py::tuple problem, double lr, double gamma, py::array v_plus, py::array v_minus,
           py::array avg_w, py::array curv, py::array scalars, py::array stats) {
          const int64_t p = m_ * (c + 1);
          auto pr = m4_problem(problem, m_);
          auto s = m4_state(v_plus, v_minus, avg_w, curv, scalars, p);
          const double* sp = m4_array<double>(stats, "stats", 1, 'f', pym4::m4::stats_size(p));
          pym4::m4::StreamConfig cfg;
          cfg.lr = lr;
          cfg.gamma = gamma;
          pym4::m4::apply_update(pr, m_, c, cfg, s.st, sp);
        },
        py::arg("m"), py::arg("c"), py::arg("problem"), py::arg("lr"), py::arg("gamma"), py::arg("v_plus"),
        py::arg("v_minus"), py::arg("avg_w"), py::arg("curv"), py::arg("scalars"), py::arg("stats"),
        "One stochastic dual-ascent step from (all-reduced) mini-batch stats.");
  m.def("m4_stream_fit",
        [](py::tuple data, py::tuple problem, double lr, double gamma, int64_t batch_size, py::array v_plus,
           py::array v_minus, py::array avg_w, py::array curv, py::array scalars, py::object order,
           py::object counts_data, py::object shuffle_seed) {
          auto d = m4_data(data);
          auto pr = m4_problem(problem, d.m);
          PYM4_CHECK_VALUE(batch_size >= 1, "batch_size: must be >= 1, got " << batch_size);
          auto s = m4_state(v_plus, v_minus, avg_w, curv, scalars, d.dim());
          // The caller passes a permutation of [0, n) (checked in pym4/m4/_solver.py).
          const int64_t* op = order.is_none() ? nullptr : m4_array<int64_t>(order, "order", 1, 'i', d.n);
          PYM4_CHECK_VALUE(order.is_none() || shuffle_seed.is_none(), "order, shuffle_seed: give one, not both");
          py::array cd = counts_data.is_none() ? py::array() : counts_data.cast<py::array>();
          double* cdp = counts_data.is_none() ? nullptr
                                              : m4_out<double>(cd, "counts_data", pym4::m4::counts_size(d.m, d.c));
          pym4::m4::StreamConfig cfg;
          cfg.lr = lr;
          cfg.gamma = gamma;
          cfg.batch_size = batch_size;
          // The fit runs on a copy of the state (O(p), the data is O(n p)), copied back once it
          // has finished: after Ctrl-C the caller's state is as it was before the call.
          StreamStateCopy work(s.st, d.dim());
          const uint64_t seed = shuffle_seed.is_none() ? 0 : shuffle_seed.cast<uint64_t>();
          int64_t steps;
          {
            InterruptibleRelease release;
            steps = shuffle_seed.is_none()
                        ? pym4::m4::stream_fit(d, pr, cfg, work.st, op, cdp)
                        : pym4::m4::stream_fit_shuffled(d, pr, cfg, work.st, seed, cdp);
          }
          work.copy_to(s.st);
          return steps;
        },
        py::arg("data"), py::arg("problem"), py::arg("lr"), py::arg("gamma"), py::arg("batch_size"),
        py::arg("v_plus"), py::arg("v_minus"), py::arg("avg_w"), py::arg("curv"), py::arg("scalars"),
        py::arg("order") = py::none(), py::arg("counts_data") = py::none(), py::arg("shuffle_seed") = py::none(),
        "Stochastic dual ascent over consecutive mini-batches (of the rows in `order` when given, or\n"
        "in the order m4_shuffled_order(n, shuffle_seed) when that is given); returns the number of\n"
        "steps. Adds the data's counts (weighted_counts layout) of the rows streamed into\n"
        "counts_data when given.");
  m.def("m4_shuffled_order",
        [](int64_t n, uint64_t seed) {
          PYM4_CHECK_VALUE(n >= 0, "n: must be >= 0, got " << n);
          py::array_t<int64_t> out(n);
          int64_t* op = out.mutable_data();
          {
            py::gil_scoped_release release;
            pym4::m4::shuffled_order(n, seed, op);
          }
          return out;
        },
        py::arg("n"), py::arg("seed"),
        "(n,) int64: a uniformly random permutation of range(n), a pure function of (n, seed).");
  m.def("m4_newton_stats",
        [](py::tuple data, py::tuple problem, py::array w, double mu, int64_t hessian_stride, py::array stats,
           bool count_data) {
          auto d = m4_data(data);
          auto pr = m4_problem(problem, d.m);
          const double* wp = m4_array<double>(w, "w", 1, 'f', d.dim());
          double* sp = m4_out<double>(stats, "stats", pym4::m4::newton_stats_size(d.m, d.c));
          py::gil_scoped_release release;
          pym4::m4::newton_stats(d, pr, wp, mu, hessian_stride, sp, count_data);
        },
        py::arg("data"), py::arg("problem"), py::arg("w"), py::arg("mu"), py::arg("hessian_stride"),
        py::arg("stats"), py::arg("count_data") = true,
        "Adds the Newton-model sums at duals (w, mu) into stats (see include/pym4/m4.h); count_data=False\n"
        "leaves the unweighted moments (the data's counts, independent of the duals) out.");
  m.def("m4_newton_model",
        [](int64_t m_, int64_t c, py::tuple problem, py::array stats) {
          PYM4_CHECK_VALUE(m_ >= 1 && c >= 0, "m, c: need at least one group and c >= 0 labels");
          auto pr = m4_problem(problem, m_);
          const double* sp = m4_array<double>(stats, "stats", 1, 'f', pym4::m4::newton_stats_size(m_, c));
          const py::ssize_t P = m_ * (c + 1) + 1;
          py::array_t<double> H({P, P});
          py::array_t<double> r(P);
          pym4::m4::newton_model(pr, m_, c, sp, H.mutable_data(), r.mutable_data());
          return py::make_tuple(H, r);
        },
        py::arg("m"), py::arg("c"), py::arg("problem"), py::arg("stats"),
        "(H, r): the Newton model's (p+1)^2 curvature and (p+1) gradient sums from merged stats.");
  m.def("m4_newton_stats_size", &pym4::m4::newton_stats_size, py::arg("m"), py::arg("c"));
  m.def("m4_solve_exact",
        [](py::tuple data, py::tuple problem, int64_t max_iter, double tol, double rho, py::array w, py::array q,
           const std::string& hessian, int64_t max_bytes) {
          auto d = m4_data(data);
          auto pr = m4_problem(problem, d.m);
          PYM4_CHECK_VALUE(d.n >= 1, "s: no examples");
          double* wp = m4_out<double>(w, "w", d.dim());
          double* qp = m4_out<double>(q, "q", d.n);
          auto cfg = m4_exact_config(max_iter, tol, rho, 1 << 17, hessian, max_bytes);
          pym4::m4::ExactResult r;
          pym4::m4::ExactInfo info;
          {
            InterruptibleRelease release;
            r = pym4::m4::solve_exact(d, pr, cfg, wp, qp, &info);
          }
          py::dict out = m4_result_dict(r);
          out["compressed"] = info.compressed;
          out["patterns"] = info.patterns;
          return out;
        },
        py::arg("data"), py::arg("problem"), py::arg("max_iter"), py::arg("tol"), py::arg("rho"), py::arg("w"),
        py::arg("q"), py::arg("hessian") = "auto", py::arg("max_bytes") = int64_t(1) << 32,
        "Newton on the dual as passes over the data (over its pattern table when there is no utility\n"
        "and it compresses); w (p,) in/out, q (n,) out; hessian 'auto', 'dense' or 'free'; a ValueError\n"
        "giving the bytes needed when the solver's arrays would pass max_bytes; returns a status dict\n"
        "(see include/pym4/m4.h).");
  // ----- M4 exact solver as passes: partial(rows, state) -> stats, stats merge by addition
  // (flat float64 sums), step(state, stats) -> state; see include/pym4/m4.h and pym4/_m4_passes.py.
  m.def("m4_exact_sizes",
        [](int64_t m_, int64_t c, const std::string& hessian) {
          PYM4_CHECK_VALUE(m_ >= 1 && c >= 0, "m, c: need at least one group and c >= 0 labels");
          pym4::m4::ExactConfig cfg;
          cfg.hessian = m4_hessian_mode(hessian);
          const bool free = pym4::m4::exact_resolve_hessian(cfg, m_, c);
          return py::make_tuple(pym4::m4::exact_state_size(m_, c, free), pym4::m4::exact_stats_size(m_, c, free));
        },
        py::arg("m"), py::arg("c"), py::arg("hessian") = "auto",
        "(state size, stats size) of the exact solver, in float64 entries.");
  m.def("m4_exact_memory",
        [](int64_t m_, int64_t c, const std::string& hessian) {
          PYM4_CHECK_VALUE(m_ >= 1 && c >= 0, "m, c: need at least one group and c >= 0 labels");
          pym4::m4::ExactConfig cfg;
          cfg.hessian = m4_hessian_mode(hessian);
          const bool free = pym4::m4::exact_resolve_hessian(cfg, m_, c);
          return py::make_tuple(free ? "free" : "dense", pym4::m4::exact_memory_bytes(m_, c, free, pym4::max_threads()));
        },
        py::arg("m"), py::arg("c"), py::arg("hessian") = "auto",
        "(mode, bytes): the mode 'auto' (or the named one) runs in and the bytes of its arrays.");
  m.def("m4_exact_check_memory",
        [](int64_t m_, int64_t c, const std::string& hessian, int64_t max_bytes) {
          PYM4_CHECK_VALUE(m_ >= 1 && c >= 0, "m, c: need at least one group and c >= 0 labels");
          pym4::m4::exact_check_memory(m4_exact_config(1, 1.0, 1.0, 0, hessian, max_bytes), m_, c);
        },
        py::arg("m"), py::arg("c"), py::arg("hessian") = "auto", py::arg("max_bytes") = int64_t(1) << 32,
        "A ValueError giving the bytes needed when the solver's arrays would pass max_bytes.");
  m.def("m4_exact_init",
        [](py::tuple problem, int64_t m_, int64_t c, int64_t rows, int64_t max_iter, double tol, double rho,
           py::object w0, int64_t sample_rows, const std::string& hessian, int64_t max_bytes) {
          PYM4_CHECK_VALUE(m_ >= 1 && c >= 0, "m, c: need at least one group and c >= 0 labels");
          PYM4_CHECK_VALUE(rows >= 1, "rows: the data has no rows");
          auto pr = m4_problem(problem, m_);
          auto cfg = m4_exact_config(max_iter, tol, rho, sample_rows, hessian, max_bytes);
          pym4::m4::exact_check_memory(cfg, m_, c);  // before allocating the state
          const double* wp = w0.is_none() ? nullptr : m4_array<double>(w0, "w0", 1, 'f', m_ * (c + 1));
          py::array_t<double> state(pym4::m4::exact_state_size(m_, c, pym4::m4::exact_resolve_hessian(cfg, m_, c)));
          pym4::m4::exact_init(pr, m_, c, cfg, rows, wp, state.mutable_data());
          return state;
        },
        py::arg("problem"), py::arg("m"), py::arg("c"), py::arg("rows"), py::arg("max_iter"), py::arg("tol"),
        py::arg("rho"), py::arg("w0") = py::none(), py::arg("sample_rows") = 1 << 17, py::arg("hessian") = "auto",
        py::arg("max_bytes") = int64_t(1) << 32,
        "A fresh exact-solver state for `rows` rows in all (w0: (p,) start, default zeros); hessian\n"
        "'auto', 'dense' or 'free'; a ValueError giving the bytes needed past max_bytes.");
  m.def("m4_partial",
        [](py::tuple data, py::object counts, py::tuple problem, py::array state, int64_t row_offset) {
          auto d = m4_data(data);
          auto pr = m4_problem(problem, d.m);
          const int64_t* cp = m4_counts(counts, d.n);
          PYM4_CHECK_VALUE(row_offset >= 0, "row_offset: must be >= 0, got " << row_offset);
          const double* sp = m4_exact_state(state, d.m, d.c);
          py::array_t<double> stats(m4_exact_stats_size(state, d.m, d.c));
          double* out = stats.mutable_data();
          {
            py::gil_scoped_release release;
            std::fill(out, out + stats.size(), 0.0);
            pym4::m4::exact_partial(d, cp, pr, sp, row_offset, out);
          }
          return stats;
        },
        py::arg("data"), py::arg("counts"), py::arg("problem"), py::arg("state"), py::arg("row_offset") = 0,
        "Stats of one shard at the points the state asks for (merge shards' stats by adding them).");
  m.def("m4_step",
        [](py::tuple problem, int64_t m_, int64_t c, py::array state, py::array stats) {
          auto pr = m4_problem(problem, m_);
          double* sp = m4_exact_state(state, m_, c);
          const double* st = m4_array<double>(stats, "stats", 1, 'f', m4_exact_stats_size(state, m_, c));
          return pym4::m4::exact_step(pr, m_, c, sp, st);
        },
        py::arg("problem"), py::arg("m"), py::arg("c"), py::arg("state"), py::arg("stats"),
        "One driver step from the merged stats of a pass (state in/out); True when finished.");
  m.def("m4_exact_result",
        [](int64_t m_, int64_t c, py::array state) {
          double* sp = m4_exact_state(state, m_, c);
          py::array_t<double> w(m_ * (c + 1)), dw(m_ * (c + 1));
          auto r = pym4::m4::exact_result(m_, c, sp, w.mutable_data(), dw.mutable_data());
          py::dict out = m4_result_dict(r);
          out["w"] = w;
          out["dw"] = dw;
          out["dmu"] = r.dmu;
          return out;
        },
        py::arg("m"), py::arg("c"), py::arg("state"),
        "The duals w (p,), the last Newton direction (dw (p,), dmu) and the status fields of a state.");
  m.def("m4_pattern_table",
        [](py::tuple data, py::object counts, int64_t max_patterns) -> py::object {
          auto d = m4_data(data);
          PYM4_CHECK_VALUE(d.u == nullptr, "utility: a pattern table needs data without utilities");
          PYM4_CHECK_VALUE(max_patterns >= 1, "max_patterns: must be >= 1, got " << max_patterns);
          const int64_t* cp = m4_counts(counts, d.n);
          pym4::m4::PatternTable t;
          bool ok;
          {
            InterruptibleRelease release;
            ok = pym4::m4::pattern_table(d, cp, max_patterns, t);
          }
          if (!ok) return py::none();
          auto vec = [](const auto& v, std::vector<py::ssize_t> shape) {
            using T = typename std::decay_t<decltype(v)>::value_type;
            py::array_t<T> a(shape);
            std::copy(v.begin(), v.end(), a.mutable_data());
            return a;
          };
          py::object s = vec(t.s, {t.n, t.m});
          py::object tbl;
          if (t.dense) tbl = py::make_tuple(s, vec(t.y, {t.n, t.c}), py::none(), py::none(), t.c, py::none());
          else
            tbl = py::make_tuple(s, py::none(), vec(t.y_indptr, {t.n + 1}),
                                 vec(t.y_indices, {static_cast<py::ssize_t>(t.y_indices.size())}), t.c, py::none());
          return py::make_tuple(tbl, vec(t.count, {t.n}));
        },
        py::arg("data"), py::arg("counts"), py::arg("max_patterns"),
        "(table data tuple, counts int64) of the distinct (s, y) rows, or None past max_patterns;\n"
        "tables merge by aggregating their concatenation with their counts.");
  // ----- end M4

#if defined(PYM4_WITH_CUDA)
  // CUDA launchers: device pointers as integers, stream as an integer handle (0 = default).
  // ----- M4 (CUDA): base pointers of whole (rows x m), (rows x c) and (rows,) arrays, 0 for
  // null; the kernel works on rows [row0, row0 + n) and offsets the pointers itself.
  m.def("m4_batch_cuda",
        [](uintptr_t s, uintptr_t y, uintptr_t u, int64_t rows, int64_t row0, int64_t n, int64_t m_, int64_t c,
           uintptr_t pi, double eta, uintptr_t w, uintptr_t mu, uintptr_t q, uintptr_t stats, uintptr_t stream) {
          PYM4_CHECK_VALUE(m_ >= 1 && c >= 0, "m4_batch_cuda: need m >= 1 groups and c >= 0 labels");
          PYM4_CHECK_VALUE(row0 >= 0 && n >= 0 && row0 + n <= rows,
                           "m4_batch_cuda: rows [" << row0 << ", " << row0 + n << ") outside the " << rows << " rows");
          py::gil_scoped_release release;
          pym4::cuda::m4_batch(reinterpret_cast<const uint8_t*>(s), reinterpret_cast<const uint8_t*>(y),
                               reinterpret_cast<const double*>(u), row0, n, m_, c, reinterpret_cast<const double*>(pi),
                               eta, reinterpret_cast<const double*>(w), reinterpret_cast<const double*>(mu),
                               reinterpret_cast<double*>(q), reinterpret_cast<double*>(stats),
                               reinterpret_cast<void*>(stream));
        },
        py::arg("s"), py::arg("y"), py::arg("u"), py::arg("rows"), py::arg("row0"), py::arg("n"), py::arg("m"),
        py::arg("c"), py::arg("pi"), py::arg("eta"), py::arg("w"), py::arg("mu"), py::arg("q"), py::arg("stats"),
        py::arg("stream"));
  m.def("sinkhorn_workspace_bytes_cuda", &pym4::cuda::sinkhorn_workspace_bytes);
  m.def("sinkhorn_pass_cuda",
        [](int kind, uintptr_t x, int dtype, int64_t rows, int64_t cols, int64_t ld, double alpha, uintptr_t g32,
           double log_a_scalar, uintptr_t out, uintptr_t stats, uintptr_t workspace, uintptr_t non_finite,
           uintptr_t stream) {
          PYM4_CHECK_VALUE(rows >= 1 && cols >= 1, "scores: empty");
          PYM4_CHECK_VALUE(dtype >= 0 && dtype <= 2, "dtype code out of range");
          py::gil_scoped_release release;
          pym4::cuda::sinkhorn_pass(kind, reinterpret_cast<const void*>(x), static_cast<pym4::cuda::DType>(dtype),
                                    rows, cols, ld, alpha, reinterpret_cast<const float*>(g32), log_a_scalar,
                                    reinterpret_cast<void*>(out), reinterpret_cast<double*>(stats),
                                    reinterpret_cast<void*>(workspace), reinterpret_cast<int*>(non_finite),
                                    reinterpret_cast<void*>(stream));
        },
        py::arg("kind"), py::arg("x"), py::arg("dtype"), py::arg("rows"), py::arg("cols"), py::arg("ld"),
        py::arg("alpha"), py::arg("g32"), py::arg("log_a_scalar"), py::arg("out"), py::arg("stats"),
        py::arg("workspace"), py::arg("non_finite"), py::arg("stream"),
        "One pass of the CUDA solve (0 column LSE, 1 row pass, 2 write), for all-reduces between passes.");
  m.def("sinkhorn_solve_cuda",
        [](uintptr_t x, int dtype, int64_t rows, int64_t cols, int64_t ld, double alpha, uintptr_t log_b,
           double log_a_scalar, int64_t n_iters, double log_out_scale, uintptr_t out, uintptr_t workspace,
           uintptr_t non_finite, uintptr_t stream) {
          PYM4_CHECK_VALUE(rows >= 1 && cols >= 1, "scores: empty");
          PYM4_CHECK_VALUE(n_iters >= 1, "n_iters: must be >= 1");
          PYM4_CHECK_VALUE(dtype >= 0 && dtype <= 2, "dtype code out of range");
          py::gil_scoped_release release;
          pym4::cuda::sinkhorn_solve(reinterpret_cast<const void*>(x), static_cast<pym4::cuda::DType>(dtype), rows,
                                     cols, ld, alpha, reinterpret_cast<const double*>(log_b), log_a_scalar, n_iters,
                                     log_out_scale, reinterpret_cast<void*>(out), reinterpret_cast<void*>(workspace),
                                     reinterpret_cast<int*>(non_finite), reinterpret_cast<void*>(stream));
        },
        py::arg("x"), py::arg("dtype"), py::arg("rows"), py::arg("cols"), py::arg("ld"), py::arg("alpha"),
        py::arg("log_b"), py::arg("log_a_scalar"), py::arg("n_iters"), py::arg("log_out_scale"), py::arg("out"),
        py::arg("workspace"), py::arg("non_finite"), py::arg("stream"));
#endif
}
