"""M4 inputs: 0/1 matrices as bytes, labels dense or CSR, utility, weights, scalars, the
target proportions (one default) and names. Each check raises before any work starts."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, List, Optional, Sequence

import numpy as np

# torch is imported inside the functions that take tensors: the data-side path (fit_dataset,
# engines, M4Model) goes through this module with numpy only (DESIGN.md §3b).

# Dense label rows are read as bytes; beyond this many labels, index lists are cheaper.
_SPARSE_FROM = 128

# The largest count (max_iter, batch_size) taken: the core's int64 arithmetic (n + B - 1,
# iteration counters) stays clear of overflow below it.
_MAX_COUNT = 2 ** 62


def is_scipy_sparse(x: Any) -> bool:
    # By module, so that scipy is never imported here: every scipy.sparse matrix and array
    # (CSR, CSC, COO, LIL, DOK, BSR, DIA) has tocsr().
    return type(x).__module__.startswith("scipy.sparse") and hasattr(x, "tocsr")


def _is_torch_sparse(x: Any) -> bool:
    import sys
    torch = sys.modules.get("torch")  # a torch tensor can only exist once torch is imported
    return torch is not None and isinstance(x, torch.Tensor) and x.layout != torch.strided


def dense_input(x: Any) -> Any:
    """``x`` with a sparse matrix (scipy, any format, or a torch sparse tensor) made dense and a
    torch tensor detached from autograd; anything else as it is. For inputs with few columns
    (groups) and for the torch path, which reads dense rows."""
    if is_scipy_sparse(x):
        return x.toarray()
    if _is_torch_sparse(x):
        return x.detach().to_dense()
    if hasattr(x, "detach") and hasattr(x, "requires_grad"):
        return x.detach()
    return x


@dataclass
class Labels:
    """Labels in the form the core reads: dense uint8 rows, or CSR index lists."""
    c: int
    dense: Optional[np.ndarray] = None        # (n, c) uint8
    indptr: Optional[np.ndarray] = None       # (n + 1,) int64
    indices: Optional[np.ndarray] = None      # (nnz,) int32

    @classmethod
    def none(cls, n: int) -> "Labels":
        return cls(0, dense=np.zeros((n, 0), dtype=np.uint8))

    def take(self, idx: np.ndarray) -> "Labels":
        if self.dense is not None:
            return Labels(self.c, dense=np.ascontiguousarray(self.dense[idx]))
        starts, ends = self.indptr[idx], self.indptr[idx + 1]
        lengths = ends - starts
        indptr = np.zeros(len(idx) + 1, dtype=np.int64)
        np.cumsum(lengths, out=indptr[1:])
        gather = np.repeat(starts - indptr[:-1], lengths) + np.arange(indptr[-1])
        return Labels(self.c, indptr=indptr, indices=np.ascontiguousarray(self.indices[gather]))

    def slice(self, b: int, e: int) -> "Labels":
        if self.dense is not None:
            return Labels(self.c, dense=self.dense[b:e])
        ip = self.indptr[b:e + 1]
        return Labels(self.c, indptr=ip - ip[0], indices=self.indices[ip[0]:ip[-1]])

    def to_dense(self) -> np.ndarray:
        if self.dense is not None:
            return self.dense
        n = len(self.indptr) - 1
        out = np.zeros((n, self.c), dtype=np.uint8)
        rows = np.repeat(np.arange(n), np.diff(self.indptr))
        out[rows, self.indices] = 1
        return out


def group_matrix(s: Any) -> np.ndarray:
    """The (n, m) uint8 0/1 group indicators ``s`` (:func:`binary_matrix`), m >= 1: a problem
    with no group has no constraint to balance."""
    s8 = binary_matrix(s, "s")
    if s8.shape[1] == 0:
        raise ValueError(f"s: need at least one group column, got shape {s8.shape}")
    return s8


def binary_matrix(x: Any, name: str, n: Optional[int] = None) -> np.ndarray:
    """A (n, k) uint8 0/1 array from a bool/int/float array or tensor (dense, or sparse:
    scipy or torch, made dense); checks values."""
    x = dense_input(x)
    if isinstance(x, np.ndarray) and x.dtype in (np.uint8, np.bool_) and x.ndim == 2 and \
            (n is None or x.shape[0] == n):
        # The common case (bytes already): one max() instead of elementwise comparisons.
        out = np.ascontiguousarray(x).view(np.uint8) if x.dtype == np.bool_ else np.ascontiguousarray(x)
        if out.size and out.max() > 1:
            i, col = (int(v) for v in np.argwhere(out > 1)[0])
            raise ValueError(f"{name}: values must be 0 or 1 (binary), got {out[i, col]!r} in column {col} (row {i})")
        return out
    import torch

    from .._arrays import to_tensor
    t, _ = to_tensor(x, name)
    if t.dim() == 1:
        t = t[:, None]
    if t.dim() != 2:
        raise ValueError(f"{name}: expected a 1-D or 2-D array (examples, columns), got shape {tuple(t.shape)}")
    if n is not None and t.shape[0] != n:
        raise ValueError(f"{name}: expected {n} rows (one per example), got {t.shape[0]}")
    t = t.detach().cpu()
    if t.dtype == torch.bool:
        return np.ascontiguousarray(t.numpy().astype(np.uint8))
    if t.is_floating_point():
        bad = ~torch.isfinite(t)
        if bool(bad.any()):
            col = int(torch.nonzero(bad)[0, 1])
            raise ValueError(f"{name}: column {col} has missing values (NaN) or Inf; expected 0 or 1")
    nonbin = (t != 0) & (t != 1)
    if bool(nonbin.any()):
        i, col = (int(v) for v in torch.nonzero(nonbin)[0])
        raise ValueError(f"{name}: values must be 0 or 1 (binary), got {t[i, col].item()!r} in column {col} (row {i})")
    return np.ascontiguousarray(t.numpy().astype(np.uint8))


def _csr_labels(indptr: np.ndarray, indices: np.ndarray, c: int) -> Labels:
    """Labels from checked CSR index lists, in the form a dense input of c labels gets: index
    lists from _SPARSE_FROM labels on, bytes below (so q does not depend on the input's form)."""
    lab = Labels(c, indptr=np.ascontiguousarray(indptr, dtype=np.int64),
                 indices=np.ascontiguousarray(indices, dtype=np.int32))
    return lab if c >= _SPARSE_FROM else Labels(c, dense=lab.to_dense())


def _scipy_labels(y: Any, n: int) -> Labels:
    """Labels from a scipy.sparse matrix or array of any format (converted to CSR)."""
    if len(y.shape) != 2:
        raise ValueError(f"y: expected a 2-D sparse matrix (examples, labels), got shape {tuple(y.shape)}")
    if getattr(y, "format", "csr") != "csr":
        y = y.tocsr()
    if y.shape[0] != n:
        raise ValueError(f"y: expected {n} rows (one per example), got {y.shape[0]}")
    # scipy does not check a CSR built from raw arrays; the core indexes with these directly.
    indptr = np.asarray(y.indptr, dtype=np.int64)
    if indptr.shape != (n + 1,) or indptr[0] != 0 or indptr[-1] > len(y.indices) or np.any(np.diff(indptr) < 0):
        raise ValueError("y: sparse labels have an inconsistent indptr")
    indices = np.asarray(y.indices)[:indptr[-1]]
    if indices.size and (indices.min() < 0 or indices.max() >= y.shape[1]):
        raise ValueError(f"y: sparse label indices must be in [0, {y.shape[1]}), got "
                         f"{int(indices.min())}..{int(indices.max())}")
    y = y.copy()
    y.sum_duplicates()
    data = np.asarray(y.data)
    if data.dtype.kind not in "biuf":
        raise TypeError(f"y: expected 0/1 numbers or booleans, got sparse values of dtype {data.dtype}")
    if data.size and not np.all((data == 1) | (data == 0)):
        bad = data[~((data == 1) | (data == 0))][0]
        raise ValueError(f"y: sparse labels must have stored values 1 (binary), got {bad.item()!r}")
    if data.size and not np.all(data == 1):
        y.eliminate_zeros()  # a stored 0 is a 0
    return _csr_labels(y.indptr, y.indices, int(y.shape[1]))


def _torch_sparse_labels(y: Any, n: int) -> Labels:
    """Labels from a torch sparse tensor (COO, CSR, CSC, BSR, BSC), read on the host."""
    t = y.detach().cpu()
    if t.dim() != 2:
        raise ValueError(f"y: expected a 2-D sparse tensor (examples, labels), got shape {tuple(t.shape)}")
    if t.shape[0] != n:
        raise ValueError(f"y: expected {n} rows (one per example), got {t.shape[0]}")
    if t.dense_dim():
        raise ValueError(f"y: expected a sparse tensor with scalar values, got {t.dense_dim()} dense dimensions")
    t = t.to_sparse().coalesce()  # COO, duplicates summed, indices sorted by (row, column)
    rows, cols = t.indices().numpy()
    values = t.values()
    if values.is_complex():
        raise TypeError(f"y: expected 0/1 numbers or booleans, got {values.dtype}")
    vals = values.double().numpy()
    binary = (vals == 0) | (vals == 1)
    if not np.all(binary):
        j = int(np.flatnonzero(~binary)[0])
        raise ValueError(f"y: values must be 0 or 1 (binary), got {vals[j].item()!r} in column {int(cols[j])} "
                         f"(row {int(rows[j])})")
    keep = vals == 1
    indptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.bincount(rows[keep], minlength=n), out=indptr[1:])
    return _csr_labels(indptr, cols[keep], int(t.shape[1]))


def as_labels(y: Any, n: int) -> Labels:
    """Labels from None, a 0/1 array or tensor (n, c), a sparse matrix (scipy, any format;
    a torch sparse tensor) or Labels."""
    if y is None:
        return Labels.none(n)
    if isinstance(y, Labels):  # already checked (balance hands its own to the solver)
        rows = (y.dense.shape[0] if y.dense is not None else len(y.indptr) - 1)
        if rows != n:
            raise ValueError(f"y: expected {n} rows (one per example), got {rows}")
        return y
    if is_scipy_sparse(y) or (hasattr(y, "indptr") and hasattr(y, "indices") and hasattr(y, "shape")):
        return _scipy_labels(y, n)
    if _is_torch_sparse(y):
        return _torch_sparse_labels(y, n)
    dense = binary_matrix(y, "y", n)
    lab = Labels(dense.shape[1], dense=dense)
    if lab.c >= _SPARSE_FROM:
        rows, cols = np.nonzero(dense)
        indptr = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(np.bincount(rows, minlength=n), out=indptr[1:])
        lab = Labels(lab.c, indptr=indptr, indices=cols.astype(np.int32))
    return lab


def _float_vector(x: Any, n: int, name: str, numeric_only: bool) -> np.ndarray:
    """(n,) float64 copy of a numeric array or tensor of any integer, float or bool dtype."""
    if isinstance(x, np.ndarray):  # numpy directly: every integer width (uint16, uint32, ...) converts
        if x.dtype.kind not in "biuf":
            raise TypeError(f"{name}: expected a numeric array, got dtype {x.dtype}")
        arr = x
    else:
        import torch

        from .._arrays import to_tensor
        t, _ = to_tensor(x, name)
        if t.layout != torch.strided:
            t = t.to_dense()
        if t.is_complex():
            raise TypeError(f"{name}: expected a numeric array, got {t.dtype}")
        t = t.detach().cpu()
        # numpy reads every dtype torch can hand over except the ones it lacks (bfloat16).
        arr = t.numpy() if t.dtype not in (torch.bfloat16,) else t.double().numpy()
    if arr.ndim != 1 or arr.shape[0] != n:
        raise ValueError(f"{name}: expected shape ({n},), got {tuple(arr.shape)}")
    if numeric_only and arr.dtype == np.bool_:
        raise TypeError(f"{name}: expected a numeric array, got {arr.dtype}")
    return np.ascontiguousarray(arr, dtype=np.float64)


def utility(u: Any, n: int) -> Optional[np.ndarray]:
    """(n,) float64 utilities, or None."""
    if u is None:
        return None
    arr = _float_vector(u, n, "utility", numeric_only=True)
    if not np.all(np.isfinite(arr)):
        raise ValueError("utility: contains NaN or Inf")
    return arr


def weights(w: Any, n: int) -> Optional[np.ndarray]:
    """(n,) float64 non-negative weights, or None (uniform)."""
    if w is None:
        return None
    arr = _float_vector(w, n, "weights", numeric_only=False)  # a keep mask counts as 0/1 weights
    if not np.all(np.isfinite(arr)) or np.any(arr < 0):
        raise ValueError("weights: must be finite and non-negative")
    return arr


def selection_weights(w: Any, n: int) -> Optional[np.ndarray]:
    """:func:`weights` of a selection whose bias is measured: at least one example and a
    positive total weight (a bias of nothing is undefined: 0/0)."""
    if n == 0:
        raise ValueError("s: no examples; the bias of an empty selection is undefined")
    arr = weights(w, n)
    if arr is None:
        return None
    with np.errstate(over="ignore"):
        total = float(arr.sum())
    if not total > 0:
        raise ValueError("weights: every weight is 0; the bias of an empty selection is undefined")
    if not math.isfinite(total):
        # The biases are ratios of weighted counts, the same for any scale of the weights:
        # finite weights whose sums overflow (1e308s) are measured as their shares of the
        # largest (the bias was NaN).
        arr = arr / arr.max()
    return arr


def _number(v: Any, name: str) -> float:
    """A Python float from a number: int, float, numpy scalar, or a one-value (0-d) numpy
    array or tensor (detached); TypeError naming ``name`` for anything else (a string too)."""
    # (a bool is a mistake, not a number: budget=True would run as 1.0)
    if isinstance(v, (str, bytes, bool, np.bool_)) or (np.ndim(v) if isinstance(v, (np.ndarray, np.generic)) else 0) != 0 \
            or getattr(v, "dtype", None) is not None and str(v.dtype) in ("bool", "torch.bool"):
        raise TypeError(f"{name}: expected a number, got {v!r}")
    if hasattr(v, "detach") and hasattr(v, "numel"):  # a torch tensor: one value
        if v.numel() != 1 or v.dim() != 0:
            raise TypeError(f"{name}: expected a number, got a tensor of shape {tuple(v.shape)}")
        v = v.detach().cpu().item()
    try:
        return float(v)
    except (TypeError, ValueError, OverflowError):
        raise TypeError(f"{name}: expected a number, got {v!r}") from None


def scalar(v: Any, name: str, lo: float, hi: float, lo_open: bool = False, hi_open: bool = False) -> float:
    x = _number(v, name)
    ok = math.isfinite(x) and (x > lo if lo_open else x >= lo) and (x < hi if hi_open else x <= hi)
    if not ok:
        lb, rb = ("(" if lo_open else "["), (")" if hi_open else "]")
        raise ValueError(f"{name}: must be in {lb}{lo:g}, {hi:g}{rb}, got {v!r}")
    return x


def positive_number(v: Any, name: str) -> float:
    """A finite float > 0 (a tolerance) from any number, numpy scalars included."""
    x = _number(v, name)
    if not (math.isfinite(x) and x > 0):
        raise ValueError(f"{name}: must be a positive number, got {v!r}")
    return x


def positive_int(v: Any, name: str) -> int:
    """An int in [1, 2**62) from a Python or numpy integer (the core's counts are int64)."""
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
        raise ValueError(f"{name}: must be an integer >= 1, got {v!r}")
    if v >= _MAX_COUNT:
        raise ValueError(f"{name}: must be an integer below 2**62, got {v!r}")
    return int(v)


def seed(v: Any) -> int:
    """A random seed: a Python or numpy integer >= 0 (what numpy's generators take)."""
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
        raise ValueError(f"seed: must be an integer >= 0, got {v!r}")
    return int(v)


def target_from_shares(shares: np.ndarray) -> np.ndarray:
    """The default target: every group at the mean of the observed group shares, (m,) float64."""
    shares = np.asarray(shares, dtype=np.float64)
    return np.full(shares.shape[0], float(shares.mean()))


def default_target_of_shares(shares: np.ndarray, data: str = "s", give_target: str = "target=") -> np.ndarray:
    """:func:`target_from_shares`, refused (ValueError) where no default exists: every group
    empty, or every group holding every example. The message names the data (``data``: the
    argument, columns or flag the groups came from), not a target the caller never gave, and
    how to give one (``give_target``: ``target=``, or the CLI's ``--target``)."""
    pi = target_from_shares(shares)
    if not 0.0 < pi[0] < 1.0:
        what = "no example is in any group (every group column is 0)" if pi[0] <= 0.0 else \
            "every example is in every group (every group column is 1)"
        raise ValueError(f"{data}: {what}, so there is no default target (the mean group share is {pi[0]:g}); "
                         f"pass {give_target} proportions in (0, 1), or check the group columns")
    return pi


def default_target(s) -> np.ndarray:
    """The default target of ``s`` (N, m): every group at the mean of the observed group
    shares, (m,) float64."""
    s8 = group_matrix(s)
    if s8.shape[0] == 0:
        raise ValueError("s: no examples")
    n, m = s8.shape
    if m <= 8:
        # One count per column: numpy's mean over axis 0 of a narrow uint8 matrix runs ~20x
        # slower (0.3 s at N = 1e7, m = 2). 0/1 values, so the sum is the count, and
        # count / n is the float64 mean to the bit.
        shares = np.array([np.count_nonzero(s8[:, k]) for k in range(m)], dtype=np.float64) / n
    else:
        shares = s8.mean(axis=0, dtype=np.float64)
    return default_target_of_shares(shares, "s")


def target(value: Any, m: int, s8: Optional[np.ndarray]) -> np.ndarray:
    """(m,) proportions in (0, 1) from a scalar (a number, a numpy scalar, a 0-d array or
    tensor), a sequence or 1-D array of m, or None (the default of s8)."""
    if value is None:
        if s8 is None:
            raise ValueError("target: required (a scalar or one proportion per group)")
        return default_target(s8)
    if isinstance(value, bool) or isinstance(value, (str, bytes)):
        raise TypeError(f"target: expected a number or {m} numbers, got {value!r}")
    if isinstance(value, (list, tuple)):
        try:
            pi = np.asarray(value, dtype=np.float64)
        except (TypeError, ValueError):
            raise TypeError(f"target: expected numbers, got {value!r}") from None
    elif isinstance(value, (int, float, np.generic, np.ndarray)):
        if isinstance(value, (np.ndarray, np.generic)) and value.dtype.kind not in "iuf":
            raise TypeError(f"target: expected numbers, got dtype {value.dtype}")
        pi = np.asarray(value, dtype=np.float64)
    else:
        import torch

        from .._arrays import to_tensor
        t, _ = to_tensor(value, "target")
        if t.is_complex() or t.dtype == torch.bool:
            raise TypeError(f"target: expected numbers, got {t.dtype}")
        pi = np.asarray(t.detach().cpu().double().numpy())
    if pi.ndim == 0:  # a scalar (0-d array or tensor too): every group at that proportion
        pi = np.full(m, float(pi))
    pi = pi.reshape(-1)
    if pi.shape[0] != m:
        raise ValueError(f"target: expected a scalar or {m} proportions (one per group), got {pi.shape[0]}")
    if not np.all(np.isfinite(pi)) or np.any(pi <= 0) or np.any(pi >= 1):
        raise ValueError(f"target: proportions must be in (0, 1), got {pi.tolist()}")
    return pi


def names(given: Optional[Sequence[str]], n: int, prefix: str) -> List[str]:
    """n display names: the caller's, or "<prefix> <i>"."""
    if given is None:
        return [f"{prefix} {i}" for i in range(n)]
    if isinstance(given, str):  # a str is a sequence of its letters
        raise TypeError(f"{prefix}_names: expected a sequence of {n} names, got the str {given!r}")
    given = [str(x) for x in given]
    if len(given) != n:
        raise ValueError(f"{prefix}_names: expected {n} names, got {len(given)}")
    seen = set()
    for x in given:  # the report's tables are keyed by name: a repeated one hides a row
        if x in seen:
            raise ValueError(f"{prefix}_names: {x!r} names two {prefix}s")
        seen.add(x)
    return given


def data_tuple(s8: np.ndarray, lab: Labels, u: Optional[np.ndarray]):
    """The core's data argument: (s, y, y_indptr, y_indices, c, u)."""
    if lab.dense is not None:
        return (s8, np.ascontiguousarray(lab.dense), None, None, lab.c, u)
    return (s8, None, lab.indptr, lab.indices, lab.c, u)
