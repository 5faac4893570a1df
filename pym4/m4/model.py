"""M4Model: a fitted M4 problem (target, budget, tolerances, columns) and its duals, small
enough to pickle into every Ray or Spark task and to keep as a JSON file.

Since ``q_i = clip(eta + u_i - a_i^T w - mu, 0, 1)`` with ``a_i = (s_i - pi) (x) [1; y_i]``
and ``w = v+ - v-`` (DESIGN.md §3), the keep probability of a row is a pure function of the
model and the row: :meth:`M4Model.transform` computes it inside any engine's map::

    model = M4Model.load("model.json")
    ds.map_batches(model.transform, batch_format="pyarrow")          # Ray Data
    df.mapInArrow(model.transform_batches, schema)                     # Spark
    df = model.transform(pandas_df)                                    # pandas

Nothing here imports torch (DESIGN.md §3b).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence

import numpy as np

from .. import _backend
from .._io import atomic_output
from ._columns import ColumnSpec, ResolvedSpec, binary_matrix
from ._inputs import group_matrix, is_scipy_sparse

__all__ = ["M4Model"]

_FORMAT = "pym4.M4Model/1"


def _finite(x, name: str) -> float:
    try:
        v = float(x)
    except (TypeError, ValueError):
        raise TypeError(f"{name}: expected a number, got {x!r}") from None
    if not math.isfinite(v):
        raise ValueError(f"{name}: must be finite, got {x!r}")
    return v


def _plain(o):
    """numpy scalars and arrays in ``info`` as plain JSON numbers and lists."""
    if isinstance(o, (np.generic, np.ndarray)):
        return o.tolist()
    raise TypeError(f"info: {type(o).__name__} is not JSON-serialisable")


@dataclass
class M4Model:
    """The problem and the duals of a fitted M4 balance.

    target : (m,) float64 in (0, 1), the target group proportions pi.
    budget, eps_rep, eps_assoc : eta and the tolerances (DESIGN.md §3).
    w : (m (c + 1),) float64, ``v+ - v-``; entry ``k (c + 1)`` is the representation dual of
        group k, entry ``k (c + 1) + 1 + r`` the association dual of group k and label r.
    mu : the budget dual, for the utility as the model reads it: less ``columns.utility_shift``
        (a fit centres the utility; mu + utility_shift is the dual for the utility as given).
    columns : the column spec (tag vocabularies fixed, utility shift) that :meth:`transform` reads.
    info : what the fit reported (status, passes, rows, ...), JSON-serialisable.
    """
    target: np.ndarray
    budget: float
    eps_rep: float
    eps_assoc: float
    w: np.ndarray
    mu: float
    columns: ResolvedSpec
    info: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        self.target = np.array(self.target, dtype=np.float64).reshape(-1)
        self.w = np.array(self.w, dtype=np.float64).reshape(-1)
        self.budget = _finite(self.budget, "budget")
        self.eps_rep, self.eps_assoc = _finite(self.eps_rep, "eps_rep"), _finite(self.eps_assoc, "eps_assoc")
        self.mu = _finite(self.mu, "mu")
        if not isinstance(self.columns, ResolvedSpec):
            raise TypeError(f"columns: expected a ResolvedSpec, got {type(self.columns).__name__}")
        m, c = self.columns.m, self.columns.c
        if self.target.shape != (m,):
            raise ValueError(f"target: expected {m} proportions (one per group), got {self.target.shape[0]}")
        if not (np.all(np.isfinite(self.target)) and np.all(self.target > 0) and np.all(self.target < 1)):
            raise ValueError(f"target: proportions must be in (0, 1), got {self.target.tolist()}")
        if not 0.0 < self.budget <= 1.0:
            raise ValueError(f"budget: must be in (0, 1], got {self.budget}")
        if self.w.shape != (m * (c + 1),) or not np.all(np.isfinite(self.w)):
            raise ValueError(f"w: expected {m * (c + 1)} finite duals (m (c + 1) with m={m}, c={c}), "
                             f"got {self.w.shape[0]}")

    # ----- construction -------------------------------------------------------------------------
    @classmethod
    def from_duals(cls, columns: ResolvedSpec, *, target, budget: float, eps_rep: float, eps_assoc: float,
                   v_plus, v_minus, mu: float, info: Optional[Dict[str, Any]] = None) -> "M4Model":
        """From the duals as :class:`pym4.m4.BalanceResult` gives them: v_plus, v_minus (m, c + 1)."""
        w = np.asarray(v_plus, dtype=np.float64).reshape(-1) - np.asarray(v_minus, dtype=np.float64).reshape(-1)
        return cls(np.asarray(target, dtype=np.float64), budget, eps_rep, eps_assoc, w, float(mu), columns,
                   dict(info or {}))

    @property
    def m(self) -> int:
        return self.columns.m

    @property
    def c(self) -> int:
        return self.columns.c

    @property
    def group_names(self) -> List[str]:
        return self.columns.group_names

    @property
    def label_names(self) -> List[str]:
        return self.columns.label_names

    @property
    def v_plus(self) -> np.ndarray:
        return np.maximum(self.w, 0.0).reshape(self.m, self.c + 1)

    @property
    def v_minus(self) -> np.ndarray:
        return np.maximum(-self.w, 0.0).reshape(self.m, self.c + 1)

    @property
    def problem(self):
        """(pi, eta, eps_rep, eps_assoc), the core's problem tuple."""
        return (self.target, self.budget, self.eps_rep, self.eps_assoc)

    # ----- applying it --------------------------------------------------------------------------
    def keep_probability_data(self, data) -> np.ndarray:
        """q (n,) float64 of a core data tuple (s, y, y_indptr, y_indices, c, u)."""
        if not isinstance(data, tuple) or len(data) != 6:
            raise TypeError("data: expected the core's data tuple (s, y, y_indptr, y_indices, c, u), got "
                            + (f"a tuple of {len(data)}" if isinstance(data, tuple) else type(data).__name__)
                            + "; keep_probability(s, y, utility) takes arrays")
        s, c = data[0], data[4]
        if s.shape[1] != self.m or c != self.c:
            raise ValueError(f"data: this model has m={self.m} groups and c={self.c} labels, "
                             f"got m={s.shape[1]}, c={c}")
        q = np.empty(s.shape[0])
        if s.shape[0]:
            core = _backend.core()
            if core is None:
                raise RuntimeError("M4Model: pym4._core is not built; M4 needs the compiled core")
            core.m4_keep_probability(data, self.problem, self.w, self.mu, q)
        return q

    def keep_probability(self, s, y=None, utility=None) -> np.ndarray:
        """``q_i = clip(eta + u_i - a_i^T w - mu, 0, 1)``, (n,) float64.

        s : (n, m) 0/1 (bool / integer / float); y : (n, c) 0/1, or a scipy CSR matrix
        (n, c), or None when c = 0; utility : (n,) numbers, default 0 (only for a model
        fitted with a utility).
        """
        s8 = group_matrix(s)
        n = s8.shape[0]
        if s8.shape[1] != self.m:
            raise ValueError(f"s: this model has {self.m} groups, got {s8.shape[1]} columns")
        if y is None:
            if self.c:
                raise ValueError(f"y: this model has {self.c} labels; pass them")
            data_y = (np.zeros((n, 0), np.uint8), None, None)
        elif is_scipy_sparse(y) or (hasattr(y, "indptr") and hasattr(y, "indices") and hasattr(y, "shape")):
            y = y.tocsr()  # any scipy format (COO, LIL, DOK, ...) as CSR
            if y.shape != (n, self.c):
                raise ValueError(f"y: expected shape ({n}, {self.c}), got {tuple(y.shape)}")
            y = y.copy()
            y.sum_duplicates()
            if y.data.size and not np.all(y.data == 1):
                raise ValueError("y: sparse labels must have stored values 1 (binary)")
            data_y = (None, np.asarray(y.indptr, np.int64), np.asarray(y.indices, np.int32))
        else:
            y8 = binary_matrix(y, "y", n)
            if y8.shape[1] != self.c:
                raise ValueError(f"y: this model has {self.c} labels, got {y8.shape[1]} columns")
            data_y = (y8, None, None)
        u = None
        if utility is not None and self.columns.spec.utility is None:
            # (its duals are those of a utility of 0: another utility moves q off the budget)
            raise ValueError("utility: this model was fitted without a utility, so its q takes none")
        if utility is not None:
            u = np.ascontiguousarray(np.asarray(utility), dtype=np.float64)
            if u.shape != (n,):
                raise ValueError(f"utility: expected shape ({n},), got {u.shape}")
            if not np.all(np.isfinite(u)):
                raise ValueError("utility: contains NaN or Inf")
            u = u - self.columns.utility_shift  # the frame mu is in (see the class docstring)
        elif self.columns.utility_shift:
            u = np.full(n, -self.columns.utility_shift)  # utility 0 as given
        return self.keep_probability_data((s8, *data_y, self.c, u))

    def transform(self, batch, *, column: str = "q", shard: str = "batch"):
        """``batch`` with a float64 column ``column`` (default ``q``) appended.

        batch : pyarrow RecordBatch or Table, or pandas DataFrame, holding the model's columns
        (see :attr:`columns`); the result has the same type. ``shard`` names the batch in
        error messages.
        """
        import pyarrow as pa
        if not isinstance(column, str) or not column:
            raise ValueError(f"column: expected a non-empty column name, got {column!r}")
        is_pandas = type(batch).__module__.startswith("pandas")
        table = pa.Table.from_pandas(batch, preserve_index=False) if is_pandas else batch
        if not isinstance(table, (pa.RecordBatch, pa.Table)):
            raise TypeError(f"batch: expected a pyarrow RecordBatch/Table or a pandas DataFrame, "
                            f"got {type(batch).__name__}")
        if column in table.schema.names:
            raise ValueError(f"{shard}: the batch already has a column {column!r}; choose another name (column=)")
        q = self.keep_probability_data(self.columns.data_tuple(table, shard))
        if is_pandas:
            out = batch.copy()
            out[column] = q
            return out
        return table.append_column(pa.field(column, pa.float64()), pa.array(q))

    def transform_batches(self, batches: Iterable) -> Iterator:
        """:meth:`transform` over an iterator of batches (the shape of Spark's mapInArrow)."""
        for b in batches:
            yield self.transform(b)

    # ----- JSON -----------------------------------------------------------------------------------
    def to_json(self) -> dict:
        return {"format": _FORMAT, "target": self.target.tolist(), "budget": self.budget,
                "eps_rep": self.eps_rep, "eps_assoc": self.eps_assoc, "w": self.w.tolist(), "mu": self.mu,
                "columns": self.columns.spec.to_json(),
                "tags": {k: list(v) for k, v in self.columns.tags.items()},
                "utility_shift": self.columns.utility_shift,
                "group_names": self.group_names, "label_names": self.label_names, "info": self.info}

    @classmethod
    def from_json(cls, d: dict) -> "M4Model":
        if not isinstance(d, dict) or d.get("format") != _FORMAT:
            raise ValueError(f"not an M4Model file (expected format {_FORMAT!r})")
        spec = ColumnSpec.from_json(d["columns"])
        resolved = ResolvedSpec(spec, {k: tuple(v) for k, v in d["tags"].items()},
                                _finite(d.get("utility_shift", 0.0), "utility_shift"))
        return cls(np.asarray(d["target"], np.float64), d["budget"], d["eps_rep"], d["eps_assoc"],
                   np.asarray(d["w"], np.float64), d["mu"], resolved, dict(d.get("info") or {}))

    def save(self, path) -> None:
        """Write the model as JSON, atomically (the file appears whole or not at all).
        Floats are written with repr, so :meth:`load` gives back the same duals bit for bit."""
        with atomic_output(path) as tmp, open(tmp, "w") as f:
            json.dump(self.to_json(), f, indent=1, allow_nan=False, default=_plain)

    @classmethod
    def load(cls, path) -> "M4Model":
        with open(path) as f:
            return cls.from_json(json.load(f))
