"""The M4 stages that engines run (see pym4/engines/__init__.py for the stage interface),
and the driver functions that run them. Engine-agnostic: the same objects are pickled
into local threads, Ray tasks and Spark's mapInArrow.

- :class:`VocabularyStage`: the distinct values of tag columns (``labels_from="tags"``);
- :class:`CountsStage`: ``[sum q | sum q s_k | sum q y_r | sum q s_k y_r]`` (float64,
  ``1 + m + c + m c``) with ``q = 1`` or the model's keep probabilities: the sufficient
  statistics of the bias metrics, merged by addition;
- :class:`KeepProbabilityStage`: the final pass, ``(id or row, q)`` per row.
"""
from __future__ import annotations

from typing import Dict, List, Optional

import numpy as np

from . import _backend
from ._m4_columns import ROW, ColumnSpec, DataError, ResolvedSpec, distinct_tags

__all__ = ["VocabularyStage", "CountsStage", "KeepProbabilityStage", "resolve_columns", "weighted_counts",
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


class KeepProbabilityStage:
    """The output rows of a batch: the id column (or ``row``) and ``q`` (float64)."""

    def __init__(self, model, id_field):
        import pyarrow as pa
        self.model = model
        self.id = model.columns.spec.id
        self.needs_rows = self.id is None
        self.columns = [c for c in model.columns.spec.columns()]
        self.output_schema = pa.schema([id_field if self.id else pa.field(ROW, pa.int64()),
                                        pa.field("q", pa.float64())])

    def transform(self, batch, where: str, row0: int):
        import pyarrow as pa
        q = self.model.keep_probability_data(self.model.columns.data_tuple(batch, where, row0))
        ids = batch.column(batch.schema.names.index(self.id or ROW))
        return pa.Table.from_arrays([ids, pa.array(q)], schema=self.output_schema)


# ----- driver -------------------------------------------------------------------------------------

def resolve_columns(engine, spec: ColumnSpec) -> ResolvedSpec:
    """Schema checks on every shard, then (if a tag column takes all its values) one pass
    that finds the vocabulary."""
    engine.check(spec)
    vocab = None
    need = spec.needs_vocabulary
    if need:
        vocab = engine.reduce(VocabularyStage(need)) or {c: set() for c in need}
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


def write_keep_probability(engine, model, out: str) -> List[str]:
    """The final pass: ``(id or row, q)`` per row, Parquet parts in folder ``out``."""
    id_col = model.columns.spec.id
    id_field = engine.field(id_col) if id_col else None
    return engine.write(KeepProbabilityStage(model, id_field), out)
