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


def binary_matrix(x: Any, name: str, n: Optional[int] = None) -> np.ndarray:
    """A (n, k) uint8 0/1 array from a bool/int/float array or tensor; checks values."""
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


def as_labels(y: Any, n: int) -> Labels:
    """Labels from None, a 0/1 array or tensor (n, c), a scipy.sparse CSR matrix or Labels."""
    if y is None:
        return Labels.none(n)
    if isinstance(y, Labels):  # already checked (balance hands its own to the solver)
        rows = (y.dense.shape[0] if y.dense is not None else len(y.indptr) - 1)
        if rows != n:
            raise ValueError(f"y: expected {n} rows (one per example), got {rows}")
        return y
    if hasattr(y, "indptr") and hasattr(y, "indices") and hasattr(y, "shape"):  # scipy.sparse CSR
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
        if data.size and not np.all(data == 1):
            raise ValueError("y: sparse labels must have stored values 1 (binary)")
        return Labels(int(y.shape[1]), indptr=np.asarray(y.indptr, dtype=np.int64),
                      indices=np.asarray(y.indices, dtype=np.int32))
    dense = binary_matrix(y, "y", n)
    lab = Labels(dense.shape[1], dense=dense)
    if lab.c >= _SPARSE_FROM:
        rows, cols = np.nonzero(dense)
        indptr = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(np.bincount(rows, minlength=n), out=indptr[1:])
        lab = Labels(lab.c, indptr=indptr, indices=cols.astype(np.int32))
    return lab


def _float_vector(x: Any, n: int, name: str, numeric_only: bool) -> np.ndarray:
    import torch

    from .._arrays import to_tensor
    t, _ = to_tensor(x, name)
    if t.dim() != 1 or t.shape[0] != n:
        raise ValueError(f"{name}: expected shape ({n},), got {tuple(t.shape)}")
    if numeric_only and (t.dtype == torch.bool or t.is_complex()):
        raise TypeError(f"{name}: expected a numeric array, got {t.dtype}")
    return np.ascontiguousarray(t.detach().cpu().numpy().astype(np.float64))


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


def scalar(v: Any, name: str, lo: float, hi: float, lo_open: bool = False, hi_open: bool = False) -> float:
    try:
        x = float(v)
    except (TypeError, ValueError):
        raise TypeError(f"{name}: expected a number, got {v!r}") from None
    ok = math.isfinite(x) and (x > lo if lo_open else x >= lo) and (x < hi if hi_open else x <= hi)
    if not ok:
        lb, rb = ("(" if lo_open else "["), (")" if hi_open else "]")
        raise ValueError(f"{name}: must be in {lb}{lo:g}, {hi:g}{rb}, got {v!r}")
    return x


def positive_int(v: Any, name: str) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
        raise ValueError(f"{name}: must be an integer >= 1, got {v!r}")
    return int(v)


def target_from_shares(shares: np.ndarray) -> np.ndarray:
    """The default target: every group at the mean of the observed group shares, (m,) float64."""
    shares = np.asarray(shares, dtype=np.float64)
    return np.full(shares.shape[0], float(shares.mean()))


def default_target(s) -> np.ndarray:
    """The default target of ``s`` (N, m): every group at the mean of the observed group
    shares, (m,) float64."""
    s8 = binary_matrix(s, "s")
    if s8.shape[0] == 0:
        raise ValueError("s: no examples")
    return target_from_shares(s8.mean(axis=0, dtype=np.float64))


def target(value: Any, m: int, s8: Optional[np.ndarray]) -> np.ndarray:
    """(m,) proportions in (0, 1) from a scalar, a sequence or None (the default of s8)."""
    if value is None:
        if s8 is None:
            raise ValueError("target: required (a scalar or one proportion per group)")
        return default_target(s8)
    if isinstance(value, (int, float, np.floating, np.integer)) and not isinstance(value, bool):
        pi = np.full(m, float(value))
    else:
        if isinstance(value, (list, tuple, np.ndarray)):
            try:
                pi = np.asarray(value, dtype=np.float64).reshape(-1)
            except (TypeError, ValueError):
                raise TypeError(f"target: expected numbers, got {value!r}") from None
        else:
            from .._arrays import to_tensor
            t, _ = to_tensor(value, "target")
            pi = np.asarray(t.detach().cpu().numpy(), dtype=np.float64).reshape(-1)
        if pi.shape[0] != m:
            raise ValueError(f"target: expected a scalar or {m} proportions (one per group), got {pi.shape[0]}")
    if not np.all(np.isfinite(pi)) or np.any(pi <= 0) or np.any(pi >= 1):
        raise ValueError(f"target: proportions must be in (0, 1), got {pi.tolist()}")
    return pi


def names(given: Optional[Sequence[str]], n: int, prefix: str) -> List[str]:
    """n display names: the caller's, or "<prefix> <i>"."""
    if given is None:
        return [f"{prefix} {i}" for i in range(n)]
    given = [str(x) for x in given]
    if len(given) != n:
        raise ValueError(f"{prefix}_names: expected {n} names, got {len(given)}")
    return given


def data_tuple(s8: np.ndarray, lab: Labels, u: Optional[np.ndarray]):
    """The core's data argument: (s, y, y_indptr, y_indices, c, u)."""
    if lab.dense is not None:
        return (s8, np.ascontiguousarray(lab.dense), None, None, lab.c, u)
    return (s8, None, lab.indptr, lab.indices, lab.c, u)
