"""The M4 stages that engines run (see pym4/engines/__init__.py for the stage interface),
and the driver functions that run them. Engine-agnostic: the same objects are pickled
into local threads, Ray tasks and Spark's mapInArrow.

- :class:`VocabularyStage`: the distinct values of tag columns (``labels_from="tags"``);
- :class:`CountsStage`: ``[sum q | sum q s_k | sum q y_r | sum q s_k y_r]`` (float64,
  ``1 + m + c + m c``) with ``q = 1`` or the model's keep probabilities: the sufficient
  statistics of the bias metrics, merged by addition;
- :class:`PatternStage`: the distinct (s, y) rows with their counts (a hash aggregate in the
  core per batch, tables merged), or :data:`TOO_MANY` past a bound; and the counts;
- :class:`PartialStage`: one pass of the exact solver, ``m4_partial`` at the driver's state,
  merged by addition (pym4/m4/_passes.py);
- :class:`KeepProbabilityStage`: the final pass, ``(id or row, q[, keep])`` per row.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Tuple

import numpy as np

from .. import _backend
from ._columns import ROW, ColumnSpec, DataError, ResolvedSpec, distinct_tags

__all__ = ["VocabularyStage", "CountsStage", "PatternStage", "PartialStage", "KeepProbabilityStage", "TOO_MANY", "resolve_columns", "utility_shift", "weighted_counts",
           "write_keep_probability"]


class VocabularyStage:
    """{tag column: set of values} of a batch; merged by union."""
    needs_rows = False

    def __init__(self, tag_columns: List[str]):
        self.columns = list(tag_columns)

    def partial(self, batch, where: str, row0: int) -> Dict[str, set]:
        return {c: distinct_tags(batch, c, where, row0) for c in self.columns}

    @staticmethod
    def merge(a: Dict[str, set], b: Dict[str, set]) -> Dict[str, set]:
        return {k: a[k] | b[k] for k in a}


class CountsStage:
    """Weighted counts of a batch (q = 1, or the model's q); merged by addition (float64)."""
    needs_rows = False

    def __init__(self, columns: ResolvedSpec, model=None):
        self.spec = columns
        self.model = model
        self.columns = [c for c in columns.spec.columns() if c != columns.spec.id]
        self.packing = columns.packed_layout()  # an engine may hand the 0/1 columns over packed

    def partial(self, batch, where: str, row0: int) -> np.ndarray:
        data = self.spec.data_tuple(batch, where, row0)
        m, c = data[0].shape[1], data[4]
        out = np.zeros(1 + m + c + m * c)
        q = None if self.model is None else self.model.keep_probability_data(data)
        if data[0].shape[0]:
            _backend.core().m4_weighted_counts(data[:5] + (None,), q, out)
        return out

    @staticmethod
    def merge(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return a + b


class _TooMany:
    """The pattern table passed its bound somewhere (pickles to an equal marker)."""

    def __eq__(self, other):
        return isinstance(other, _TooMany)

    def __hash__(self):
        return 0


TOO_MANY = _TooMany()


class PatternStage:
    """``(tables, counts, utility)`` of a batch: the distinct (s, y) rows and their int64
    counts (the core's ``(data, counts)``; utility left out, since a pattern does not depend
    on it), or :data:`TOO_MANY` past ``max_patterns``; the batch's unweighted counts, added;
    and, with a utility column, its :func:`utility_summary` (sum, range and a sample; None
    without one), from which the fit centres the utility (:func:`utility_shift`). :meth:`table` gives the one
    table of a merged result.

    Tables are merged like a binary counter (an LSM tree): a result holds a few tables of
    decreasing size, and two are aggregated into one only when the smaller is at least
    half the larger, so each row is re-aggregated O(log) times, not once per batch
    (merging every batch into one growing table cost O(rows x batches): measured at
    N = 4e6, c = 32, the counting pass took 37 s against 4 s for a solver pass)."""
    needs_rows = False

    def __init__(self, columns: ResolvedSpec, max_patterns: int, rows: Optional[int] = None):
        self.spec = columns
        self.max_patterns = int(max_patterns)
        self.rows = rows  # rows of the whole dataset, when known (for the early give-up below)
        self.columns = [c for c in columns.spec.columns() if c != columns.spec.id]
        self.packing = columns.packed_layout()
        # Set once this process saw the bound passed: the pass's table is TOO_MANY whatever
        # comes next, so later batches only count.
        self.over = False

    def partial(self, batch, where: str, row0: int):
        data = self.spec.data_tuple(batch, where, row0)
        m, c = data[0].shape[1], data[4]
        counts = np.zeros(1 + m + c + m * c)
        if not data[0].shape[0]:
            return None
        core = _backend.core()
        plain = data[:5] + (None,)
        core.m4_weighted_counts(plain, None, counts)
        u = None
        if self.spec.spec.utility:
            # data_tuple gives None for an all-zero utility (u = 0 here: the spec is not shifted yet)
            values = np.zeros(data[0].shape[0]) if data[5] is None else data[5]
            u = utility_summary(values, row0, self._utility_stride())
        table = None if self.over else core.m4_pattern_table(plain, None, self.max_patterns)
        if table is None or self._hopeless(table[1]):
            self.over = True
            return TOO_MANY, counts, u
        return [table], counts, u

    def _utility_stride(self) -> int:
        """Rows between two sampled utilities: about UTILITY_SAMPLE of the dataset's rows
        when their number is known (else every row, thinned as the batches merge)."""
        return 1 if self.rows is None else max(1, self.rows // UTILITY_SAMPLE)

    def _hopeless(self, counts: np.ndarray) -> bool:
        """Whether one batch already shows the dataset's table would pass the bound: more
        than half of its (>= 4096) rows are patterns seen once (Good-Turing: the chance that
        the next row is new is about that fraction), and that rate over the dataset's rows
        is 4x the bound. Each task then gives up after its first batch: the bound is only
        found passed when tables are merged, and a Spark or Ray task cannot see another's
        (measured at N = 1e7, c = 32, nearly every row distinct: Spark's counting pass built
        and shipped a 1e6-pattern table per file, 34 s against 4.5 s for counts alone).
        A wrong guess costs speed only: passes over the data give the same duals."""
        n = int(counts.sum())
        if self.rows is None or n < 4096:
            return False
        once = int(np.count_nonzero(counts == 1))
        return 2 * once > n and once / n * self.rows > 4 * self.max_patterns

    def _merge_two(self, a, b):
        from ._passes import merge_tables
        t = merge_tables(a, b, self.max_patterns)
        if t is None:
            self.over = True
        return t

    def merge(self, a, b):
        if a is None or b is None:  # an empty batch
            return b if a is None else a
        (ta, ca, ua), (tb, cb, ub) = a, b
        u = None if ua is None else merge_utility_summaries(ua, ub)
        if ta == TOO_MANY or tb == TOO_MANY or self.over:
            self.over = True
            return TOO_MANY, ca + cb, u
        tables = sorted(ta + tb, key=lambda t: -len(t[1]))
        while len(tables) >= 2 and 2 * len(tables[-1][1]) >= len(tables[-2][1]):
            t = self._merge_two(tables[-2], tables[-1])
            if t is None:
                return TOO_MANY, ca + cb, u
            tables = sorted(tables[:-2] + [t], key=lambda t: -len(t[1]))
        return tables, ca + cb, u

    def table(self, merged):
        """The one pattern table ``(data, counts)`` of a merged result, or None past the bound."""
        if merged == TOO_MANY:
            return None
        tables = sorted(merged, key=lambda t: -len(t[1]))
        while len(tables) >= 2:
            t = self._merge_two(tables[-2], tables[-1])
            if t is None:
                return None
            tables = tables[:-2] + [t]
        return tables[0]


# The utilities the counting pass keeps to centre the utility by (see utility_shift): those of
# rows whose number is a multiple of a stride, about this many (at most twice as many).
UTILITY_SAMPLE = 1 << 16


def utility_summary(u: np.ndarray, row0: int, stride: int) -> np.ndarray:
    """A batch's utility ``[sum, min, max, stride, rows..., values...]`` (float64): its sum
    and range, and the values of its rows numbered (from ``row0``) a multiple of ``stride``,
    with those numbers; :func:`merge_utility_summaries` adds two of them."""
    rows = np.arange(row0, row0 + u.shape[0], dtype=np.float64)
    return _summary(float(u.sum()), float(u.min()), float(u.max()), stride, rows, u)


def merge_utility_summaries(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The summary of two parts: sums added, ranges joined, and the sampled rows of both at
    the coarser stride, doubled while more than 2 UTILITY_SAMPLE remain (rows numbered
    alike on every engine give the same sample in any merge order)."""
    stride = max(int(a[3]) if a.shape[0] > 3 else 1, int(b[3]) if b.shape[0] > 3 else 1)
    rows = np.concatenate([_sampled(a)[0], _sampled(b)[0]])
    vals = np.concatenate([_sampled(a)[1], _sampled(b)[1]])
    return _summary(a[0] + b[0], min(a[1], b[1]), max(a[2], b[2]), stride, rows, vals)


def _summary(total, lo, hi, stride: int, rows: np.ndarray, vals: np.ndarray) -> np.ndarray:
    """The packed summary, its sample the rows at a multiple of ``stride``, doubled while
    more than 2 UTILITY_SAMPLE remain (a batch of unknown stride ships no more either)."""
    while True:
        keep = rows % stride == 0
        if np.count_nonzero(keep) <= 2 * UTILITY_SAMPLE:
            break
        stride *= 2
    return np.concatenate([[total, lo, hi, stride], rows[keep], vals[keep]])


def _sampled(summary: np.ndarray):
    """(row numbers, values) of a summary's sample (none in a checkpoint's [sum, min, max])."""
    k = (summary.shape[0] - 4) // 2 if summary.shape[0] > 3 else 0
    return summary[4:4 + k], summary[4 + k:4 + 2 * k]


def utility_shift(stats: Optional[np.ndarray], rows: int, budget: Optional[float] = None) -> Tuple[float, bool]:
    """(the shift the fit subtracts from the utility, whether it is constant) from the
    counting pass's summary (:func:`utility_summary`) over ``rows`` rows; (0, False) without
    a utility. A constant utility drops out of the problem (it may then use the pattern
    table). Otherwise the shift is ``pym4.m4._balance.center_utility``'s (where the budget
    holds without constraints, ``budget``, 0.5 when "max" is searched) on the sampled
    utilities, so that the bulk of the utility sits near mu = 0 whatever its outliers: at
    the midrange, one u = 1e3 among values in [0, 0.1) left every q at 0 and the solve at
    max_passes. A summary with no sample (a checkpoint of an earlier version) gives the
    midrange."""
    if stats is None:
        return 0.0, False
    if stats[1] == stats[2]:
        return float(stats[1]), True
    sample = _sampled(stats)[1]
    if sample.shape[0] >= 2 and sample.min() < sample.max():
        from ._balance import center_utility
        eta = 0.5 if budget is None or isinstance(budget, str) else float(budget)
        return float(center_utility(sample, eta)[1]), False
    return float(stats[1]) / 2 + float(stats[2]) / 2, False


class PartialStage:
    """One pass of the exact solver: ``m4_partial`` of each batch at the driver's ``state``
    (float64 stats, merged by addition). ``offsets`` {file path: first row} numbers the
    rows within the dataset (it places the warm-start sample: the same rows on every
    engine); batches with no known file are numbered from 0 within their block."""
    needs_rows = False

    def __init__(self, columns: ResolvedSpec, problem: tuple, state: np.ndarray, offsets: Optional[Dict[str, int]]):
        self.spec, self.problem, self.state, self.offsets = columns, problem, state, offsets or {}
        self.columns = [c for c in columns.spec.columns() if c != columns.spec.id]
        self.packing = columns.packed_layout()

    def partial(self, batch, where: str, row0: int):
        data = self.spec.data_tuple(batch, where, row0)
        if not data[0].shape[0]:
            return None
        if not self.state.flags.writeable:  # Ray hands numpy arrays over read-only; the core takes a plain buffer
            self.state = self.state.copy()
        return _backend.core().m4_partial(data, None, self.problem, self.state, self.offsets.get(where, 0) + row0)

    @staticmethod
    def merge(a: Optional[np.ndarray], b: Optional[np.ndarray]) -> Optional[np.ndarray]:
        if a is None or b is None:  # an empty batch
            return b if a is None else a
        return a + b


def uniform_of(keys: np.ndarray, seed: int) -> np.ndarray:
    """(n,) float64 in [0, 1) from int64 keys: splitmix64 of (key, seed). The draw of a row
    depends on its key alone, so every engine and every shard layout draws the same."""
    with np.errstate(over="ignore"):
        z = keys.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15) * np.uint64(seed + 1)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) / float(1 << 53)


class KeepProbabilityStage:
    """The output rows of a batch: the id column (or ``row``), ``q`` (float64) and, with
    ``seed`` given, ``keep ~ Bernoulli(q)`` (bool; the draw keyed by the row number, or by
    an integer id column)."""

    def __init__(self, model, id_field, seed: Optional[int] = None):
        import pyarrow as pa
        self.model = model
        self.id = model.columns.spec.id
        self.seed = seed
        self.key_by_id = self.id is not None and pa.types.is_integer(id_field.type)
        self.needs_rows = self.id is None or (seed is not None and not self.key_by_id)
        self.columns = [c for c in model.columns.spec.columns()]
        fields = [id_field if self.id else pa.field(ROW, pa.int64()), pa.field("q", pa.float64())]
        if seed is not None:
            fields.append(pa.field("keep", pa.bool_()))
        self.output_schema = pa.schema(fields)

    def transform(self, batch, where: str, row0: int):
        import pyarrow as pa
        q = self.model.keep_probability_data(self.model.columns.data_tuple(batch, where, row0))
        ids = batch.column(batch.schema.names.index(self.id or ROW))
        cols = [ids, pa.array(q)]
        if self.seed is not None:
            key = ids if self.key_by_id else batch.column(batch.schema.names.index(ROW))
            keys = np.asarray(key.to_numpy(zero_copy_only=False), dtype=np.int64)
            cols.append(pa.array(uniform_of(keys, self.seed) < q))
        return pa.Table.from_arrays(cols, schema=self.output_schema)


# ----- driver -------------------------------------------------------------------------------------

def resolve_columns(engine, spec: ColumnSpec, vocab: Optional[Dict[str, List[str]]] = None,
                    reduce=None) -> ResolvedSpec:
    """Schema checks on every shard, then (if a tag column takes all its values) one pass
    that finds the vocabulary, unless ``vocab`` gives it ({tag column: values}, as a
    checkpoint saved it). ``reduce(stage, desc)`` runs that pass (default ``engine.reduce``)."""
    engine.check(spec)
    need = spec.needs_vocabulary
    if need and vocab is not None:
        return spec.resolve(vocab)
    if need:
        run = reduce or (lambda stage, desc: engine.reduce(stage))
        vocab = run(VocabularyStage(need), "vocabulary") or {c: set() for c in need}
        if not all(vocab.values()):
            # Say "no rows" rather than "no tags" when that is why (one more pass, on this error only).
            weighted_counts(engine, spec.resolve(vocab))
        for col in need:
            if not vocab[col]:
                raise DataError(f"{getattr(engine, 'source', engine.name)}: column {col!r} has no tag values "
                                f"in any row; there is nothing to balance on")
    return spec.resolve(vocab)


def weighted_counts(engine, columns: ResolvedSpec, model=None) -> np.ndarray:
    """``[sum q | sum q s_k | sum q y_r | sum q s_k y_r]`` over the dataset, float64
    ``1 + m + c + m c``; q = 1 without a model. Raises on a dataset with no rows."""
    counts = engine.reduce(CountsStage(columns, model))
    if counts is None or (model is None and counts[0] == 0):
        raise DataError(f"{getattr(engine, 'source', engine.name)}: the dataset has no rows")
    return counts


def write_keep_probability(engine, model, out: str, seed: Optional[int] = None,
                           progress: Optional[Callable[[int], None]] = None) -> List[str]:
    """The final pass: ``(id or row, q)`` per row (and ``keep`` with ``seed``), Parquet
    parts in folder ``out``; ``progress(rows)`` as rows are written (where the engine can tell)."""
    id_col = model.columns.spec.id
    id_field = engine.field(id_col) if id_col else None
    return engine.write(KeepProbabilityStage(model, id_field, seed), out, progress)
