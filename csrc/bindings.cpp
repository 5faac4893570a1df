// The only file that knows Python: argument checks, GIL release, error translation.
// Every op's core is plain C++ (include/pym4/*.h); CUDA entry points take raw device
// pointers and the caller's stream from the Python layer, so the core never links libtorch.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <sstream>
#include <stdexcept>
#include <string>

#include "pym4/common.h"
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

// ----- Sinkhorn ---------------------------------------------------------------------------
template <typename T>
py::tuple sinkhorn_solve(const py::array& x, double alpha, const py::object& log_b, const py::object& log_a,
                         int64_t n_iters, double tol, double log_out_scale, py::array out) {
  auto m = as_matrix<T>(x, alpha);
  const double* lb = check_vector(log_b, m.cols, "log_b");
  auto a = row_marginal(log_a, m.rows);
  const int64_t ld_out = check_matrix<T>(out, "out");
  PYM4_CHECK_VALUE(out.shape(0) == m.rows && out.shape(1) == m.cols, "out: shape must match x");
  PYM4_CHECK_VALUE(out.writeable(), "out: must be writeable");
  PYM4_CHECK_VALUE(n_iters >= 1, "n_iters: must be >= 1, got " << n_iters);
  py::array_t<double> g(m.cols);
  T* out_ptr = static_cast<T*>(out.mutable_data());
  double* g_ptr = g.mutable_data();
  pym4::sinkhorn::Result r;
  {
    py::gil_scoped_release release;
    r = pym4::sinkhorn::solve<T>(m, lb, a, n_iters, tol, log_out_scale, out_ptr, ld_out, g_ptr);
  }
  PYM4_CHECK_VALUE(r.finite, "scores: contains NaN or Inf (or overflows once divided by epsilon)");
  return py::make_tuple(r.iterations, r.marginal_error, g);
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
  return info;
}

}  // namespace

PYBIND11_MODULE(_core, m) {
  m.doc() = "pym4 compiled core: CPU kernels (OpenMP) and, when built with CUDA, GPU launchers";
  m.def("build_info", &build_info, "What this core was built with.");

  // Sinkhorn: x float32/float64 (rows, cols); see include/pym4/sinkhorn.h.
  m.def("sinkhorn_solve",
        [](const py::array& x, double alpha, py::object log_b, py::object log_a, int64_t n_iters, double tol,
           double log_out_scale, py::array out) {
          return PYM4_DISPATCH_FLOAT(x, sinkhorn_solve, alpha, log_b, log_a, n_iters, tol, log_out_scale, out);
        },
        py::arg("x"), py::arg("alpha"), py::arg("log_b"), py::arg("log_a"), py::arg("n_iters"), py::arg("tol"),
        py::arg("log_out_scale"), py::arg("out"),
        "Whole log-domain Sinkhorn solve into `out`; returns (iterations, marginal_error, g).");
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

#if defined(PYM4_WITH_CUDA)
  // CUDA launchers: device pointers as integers, stream as an integer handle (0 = default).
  m.def("cuda_device_count", &pym4::cuda::device_count);
  m.def("sinkhorn_workspace_bytes_cuda", &pym4::cuda::sinkhorn_workspace_bytes);
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
