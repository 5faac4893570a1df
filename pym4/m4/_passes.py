"""The exact M4 solver as passes over shards (DESIGN.md §3b): the engine-agnostic driver.

One pass maps every shard to its stats and adds them up; the driver step turns the merged
stats into the next duals (and the request for the next pass)::

    state = init(problem, m, c, rows)
    repeat:  stats = sum(partial(shard, state) for shard in shards())     # any order, any split
             done = step(state, stats)

``partial`` is the C++ core (``pym4._core.m4_partial``, GIL released); the stats are one flat
float64 vector of sums over rows (O(p) gradient and objective pieces per candidate step, and
in the dense-Hessian mode O(p^2) Hessian blocks, p = m (c + 1); never O(N)), so :func:`merge`
is elementwise addition
and the result does not depend on how the rows are split into shards or in which order the
shards are read, up to rounding. The state (duals, the Newton direction, a cached Hessian)
is a flat float64 vector too: checkpointing is saving it.

Two modes, fixed per solve (``hessian=``; include/pym4/m4.h): ``"dense"`` builds the Hessian's
Kronecker blocks in the passes that need them and solves the Newton model on a p x p matrix
(few passes; memory and time grow as p^2), ``"free"`` solves the Newton system by conjugate
gradients, each Hessian-vector product being one more pass with O(p) stats (memory O(p);
more, cheaper passes). ``"auto"`` picks dense while its arrays stay small (p <= 2048 and
128 MB). Either way the solver's arrays are checked against ``max_bytes`` up front: a
configuration past it is a ValueError giving the bytes it would need, before any pass.

A shard is the data tuple the core's M4 entries take, ``(s, y, y_indptr, y_indices, c, u)``
(see :func:`shard_data`), optionally with per-row integer counts (the rows of a pattern
table): pass ``(data, counts)`` or a :class:`Shard`. ``shards`` is a callable returning a
fresh iterable of shards, called once per pass. No torch here: executors that only balance
metadata import numpy and the core.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional, Tuple

import numpy as np

from .. import _backend
from . import _inputs

__all__ = ["Shard", "PassesResult", "shard_data", "solve", "run", "merge", "pattern_table", "merge_tables", "STATUS"]

STATUS = {0: "optimal", 1: "infeasible", 2: "max_iter"}


@dataclass
class Shard:
    """One shard: ``data`` (the core's data tuple), ``counts`` ((n,) int64 row weights or None)
    and ``offset``, the global number of its first row (None: rows are numbered in the order
    the shards come; it only places the warm-start sample, so any fixed numbering works)."""
    data: tuple
    counts: Optional[np.ndarray] = None
    offset: Optional[int] = None

    @property
    def rows(self) -> int:
        return int(self.data[0].shape[0])


@dataclass
class PassesResult:
    """Duals and report of an exact solve: w (p,) float64 (v+ - v-, layout of DESIGN.md §3),
    mu, status ("optimal", "infeasible", "max_iter"), Newton ``iterations`` and ``passes``
    over the full data, ``sample_passes`` of the warm start, ``hessian_passes``, the final
    ``max_violation`` (budget included), duality ``gap``, best ``recession`` value (> 0 certifies
    infeasibility) and the dual ``objective``; (dw, dmu) the last Newton direction (the
    recession may have been certified along it); ``state`` is the final solver state;
    ``hessian`` the mode ("dense" or "free") and ``product_passes`` how many of the passes
    (full data and sample) were Hessian-vector products."""
    w: np.ndarray
    mu: float
    status: str
    iterations: int
    passes: int
    sample_passes: int
    hessian_passes: int
    max_violation: float
    gap: float
    recession: float
    objective: float
    dw: np.ndarray
    dmu: float
    state: np.ndarray
    hessian: str = "dense"
    product_passes: int = 0


def _core():
    core = _backend.core()
    if core is None:
        raise RuntimeError("pym4._core is not built; the exact M4 solver needs the compiled core")
    return core


def shard_data(s: np.ndarray, y: Optional[np.ndarray] = None, *, y_indptr: Optional[np.ndarray] = None,
               y_indices: Optional[np.ndarray] = None, c: Optional[int] = None,
               u: Optional[np.ndarray] = None) -> tuple:
    """The core's data tuple from s (n, m) uint8 and dense y (n, c) uint8, or CSR labels
    (y_indptr (n + 1,) int64, y_indices int32, c labels), and u (n,) float64 or None."""
    s = np.ascontiguousarray(s, dtype=np.uint8)
    if s.ndim != 2:
        raise ValueError(f"s: expected a 2-D array (rows, groups), got shape {s.shape}")
    if y is not None:
        y = np.ascontiguousarray(y, dtype=np.uint8)
        if y.ndim != 2:
            raise ValueError(f"y: expected a 2-D array (rows, labels), got shape {y.shape}")
        c = y.shape[1]
    elif y_indptr is not None:
        if c is None:
            raise ValueError("c: required with CSR labels (the number of labels)")
        y_indptr = np.ascontiguousarray(y_indptr, dtype=np.int64)
        y_indices = np.ascontiguousarray(y_indices, dtype=np.int32)
    else:
        y, c = np.zeros((s.shape[0], 0), np.uint8), 0
    if u is not None:
        u = np.ascontiguousarray(u, dtype=np.float64)
    return (s, y, y_indptr, y_indices, int(c), u)


def _as_shard(item: Any) -> Shard:
    if isinstance(item, Shard):
        return item
    if isinstance(item, tuple) and len(item) == 2:
        data, counts = item
        return Shard(tuple(data), None if counts is None else np.ascontiguousarray(counts, dtype=np.int64))
    if isinstance(item, tuple) and len(item) == 6:
        return Shard(item)
    raise TypeError("shards: each shard must be a data tuple (s, y, y_indptr, y_indices, c, u), "
                    f"a (data, counts) pair or a Shard, got {type(item).__name__}")


def merge(a: Optional[np.ndarray], b: np.ndarray) -> np.ndarray:
    """Merged stats of two parts of a pass: their elementwise sum (float64, associative and
    commutative up to rounding). ``a`` may be None (nothing merged yet)."""
    return b.copy() if a is None else a + b


def _check_problem(problem, m: int) -> tuple:
    if not (isinstance(problem, tuple) and len(problem) == 4):
        raise ValueError("problem: expected (target (m,) float64, budget, eps_rep, eps_assoc)")
    pi = np.ascontiguousarray(problem[0], dtype=np.float64).reshape(-1)
    if pi.shape[0] != m:
        raise ValueError(f"problem: target has {pi.shape[0]} proportions, expected {m} (one per group)")
    return (pi, float(problem[1]), float(problem[2]), float(problem[3]))


def solve(shards: Callable[[], Iterable[Any]], problem: tuple, m: int, c: int, *, rows: Optional[int] = None,
          max_iter: int = 100, tol: float = 1e-10, rho: float = 1e6, w0: Optional[np.ndarray] = None,
          sample_rows: int = 1 << 17, on_pass: Optional[Callable[[int, np.ndarray], None]] = None,
          hessian: str = "auto", max_bytes: int = 1 << 32) -> PassesResult:
    """Solve the M4 dual exactly by passes over ``shards()`` (see the module docstring).

    problem : (target (m,), budget eta, eps_rep, eps_assoc) as in :func:`pym4.m4.balance`.
    m, c : groups and labels of every shard. rows : rows in all shards (None: counted by
    one look at the shards' lengths). max_iter : Newton steps over the full data; tol :
    on every constraint's violation (budget included) relative to the budget, and on the
    duality gap relative to max(budget^2, |dual value|) (every term of the problem scales
    with the budget, so tiny budgets converge as large ones do). w0 : (p,) start.
    sample_rows : size of the warm-start sample (0: none). on_pass(k, state) is called after
    each driver step (a checkpoint hook). hessian : "auto", "dense" or "free" (module
    docstring); max_bytes : bound on the solver's arrays (a ValueError giving the bytes
    needed past it, before any pass). Returns :class:`PassesResult`.
    """
    core = _core()
    problem = _check_problem(problem, m)
    if hessian not in ("auto", "dense", "free"):
        raise ValueError(f"hessian: expected 'auto', 'dense' or 'free', got {hessian!r}")
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, (int, np.integer)) or max_bytes < 1:
        raise ValueError(f"max_bytes: must be an integer >= 1, got {max_bytes!r}")
    core.m4_exact_check_memory(int(m), int(c), hessian, int(max_bytes))  # before reading any shard
    if rows is None:
        rows = sum(_as_shard(x).rows for x in shards())
    if rows < 1:
        raise ValueError("shards: no rows in any shard")
    max_iter = _inputs.positive_int(max_iter, "max_iter")
    tol = _inputs.positive_number(tol, "tol")
    w0 = None if w0 is None else np.ascontiguousarray(w0, dtype=np.float64)

    def stats_of(state):
        stats, offset = None, 0
        for item in shards():
            sh = _as_shard(item)
            if sh.data[0].shape[1] != m or int(sh.data[4]) != c:
                raise ValueError(f"shards: a shard has m={sh.data[0].shape[1]} groups and c={sh.data[4]} labels, "
                                 f"expected m={m}, c={c}")
            start = offset if sh.offset is None else int(sh.offset)
            offset += sh.rows
            if sh.rows == 0:
                continue
            stats = merge(stats, core.m4_partial(sh.data, sh.counts, problem, state, start))
        return stats

    state = core.m4_exact_init(problem, m, c, int(rows), int(max_iter), float(tol), float(rho), w0, int(sample_rows),
                               hessian, int(max_bytes))
    return run(stats_of, problem, m, c, state, on_pass=on_pass)


def run(stats_of: Callable[[np.ndarray], Optional[np.ndarray]], problem: tuple, m: int, c: int, state: np.ndarray,
        *, passes_done: int = 0, on_pass: Optional[Callable[[int, np.ndarray], None]] = None) -> PassesResult:
    """The driver loop over any executor: ``stats_of(state)`` is one pass, the merged
    ``m4_partial`` stats of every row at ``state`` (None: no rows). ``state`` comes from
    ``m4_exact_init``, or from a checkpoint written by ``on_pass`` after ``passes_done``
    passes (it holds everything the next step needs, so a resumed run takes the same steps)."""
    core = _core()
    k = int(passes_done)
    while True:
        stats = stats_of(state)
        if stats is None:
            raise ValueError("shards: no rows in any shard")
        done = core.m4_step(problem, m, c, state, stats)
        k += 1
        if on_pass is not None:
            on_pass(k, state)
        if done:
            break
    return result(m, c, state)


def result(m: int, c: int, state: np.ndarray) -> PassesResult:
    """The duals and report held in a solver state."""
    r = _core().m4_exact_result(m, c, state)
    return PassesResult(w=r["w"], mu=float(r["mu"]), status=STATUS[int(r["status"])],
                        iterations=int(r["iterations"]), passes=int(r["passes"]),
                        sample_passes=int(r["sample_passes"]), hessian_passes=int(r["hessian_passes"]),
                        max_violation=float(r["max_violation"]), gap=float(r["gap"]),
                        recession=float(r["recession"]), objective=float(r["objective"]), dw=r["dw"],
                        dmu=float(r["dmu"]), state=state, hessian=str(r["hessian"]),
                        product_passes=int(r["product_passes"]))


def pattern_table(shards: Iterable[Any], max_patterns: int) -> Optional[Tuple[tuple, np.ndarray]]:
    """The distinct (s, y) rows of all shards with their counts, ``(data, counts)``, or None
    when there are more than ``max_patterns`` (or a shard has utilities). One hash aggregate
    per shard in the core, then the shards' tables merged (:func:`merge_tables`)."""
    table = None
    for item in shards:
        sh = _as_shard(item)
        if sh.data[5] is not None:
            return None
        if sh.rows == 0:
            continue
        part = _core().m4_pattern_table(sh.data, sh.counts, int(max_patterns))
        if part is None:
            return None
        table = part if table is None else merge_tables(table, part, max_patterns)
        if table is None:
            return None
    return table


def merge_tables(a: Tuple[tuple, np.ndarray], b: Tuple[tuple, np.ndarray],
                 max_patterns: int) -> Optional[Tuple[tuple, np.ndarray]]:
    """One pattern table from two (their concatenation, aggregated again with its counts);
    None past max_patterns."""
    (da, ca), (db, cb) = a, b
    s = np.concatenate([da[0], db[0]])
    counts = np.concatenate([ca, cb])
    if da[1] is not None and db[1] is not None:
        data = (s, np.concatenate([da[1], db[1]]), None, None, da[4], None)
    else:
        ia, ib = _csr(da), _csr(db)
        indptr = np.concatenate([ia[0], ib[0][1:] + ia[0][-1]])
        data = (s, None, indptr, np.concatenate([ia[1], ib[1]]), da[4], None)
    return _core().m4_pattern_table(data, counts, int(max_patterns))


def _csr(data: tuple) -> Tuple[np.ndarray, np.ndarray]:
    """(indptr, indices) of a data tuple's labels, dense rows converted."""
    if data[1] is None:
        return data[2], data[3]
    rows, cols = np.nonzero(data[1])
    indptr = np.zeros(data[1].shape[0] + 1, dtype=np.int64)
    np.cumsum(np.bincount(rows, minlength=data[1].shape[0]), out=indptr[1:])
    return indptr, cols.astype(np.int32)
