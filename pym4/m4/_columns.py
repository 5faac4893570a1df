"""The M4 stage input: which columns of a dataset are groups, labels, utility and id, and
how a pyarrow batch of them becomes the core's data tuple.

A column spec names the sensitive groups and the labels in two ways, which may be mixed:

- 0/1 columns (boolean, or integer / float holding only 0 and 1), one per group or label,
  as ``pym4 balance --sensitive a,b --labels x,y`` reads them;
- a tag column (``list<string>`` or ``string``): ``labels_from="tags"`` makes every distinct
  value of column ``tags`` a label (the vocabulary is found by one pass over the data and
  sorted, so it is the same whatever the shard order or engine); ``labels_from=
  "tags:doctor,nurse,pilot"`` takes only those values, in that order, and ignores the others.
  ``sensitive_from`` works the same way for groups.

The data tuple is what ``pym4._core``'s M4 entry points read::

    (s, y, y_indptr, y_indices, c, u)
    s         (n, m) uint8 0/1            groups (0/1 columns first, then tag values)
    y         (n, c) uint8 0/1 or None    labels, dense when they come only from 0/1 columns
    y_indptr  (n + 1,) int64 or None      labels as CSR rows (when a tag column gives labels)
    y_indices (nnz,) int32 or None        label numbers, sorted and unique within a row
    c         int                         number of labels
    u         (n,) float64 or None        utility

Every check raises :class:`DataError` (a ValueError) naming the shard (file path or
partition) and the column, so that a data-lake job says where the bad row is. Nothing
here imports torch (DESIGN.md §3b).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

__all__ = ["DataError", "TagSpec", "ColumnSpec", "PackedLayout", "parse_tags", "binary_matrix", "ROW", "WORD"]

# Name of the row-number column engines attach when the user gives no id column.
ROW = "row"
# Names of the packed word columns (PackedLayout): WORD + "0", WORD + "1", ...
WORD = "__pym4_bits"


class DataError(ValueError):
    """Bad input data: the message names the shard and the column."""


@dataclass(frozen=True)
class TagSpec:
    """A tag column and, optionally, the values taken from it (None: every distinct value)."""
    column: str
    values: Optional[Tuple[str, ...]] = None


def parse_tags(text: Optional[str], arg: str) -> Optional[TagSpec]:
    """``"COL"`` or ``"COL:V1,V2,..."`` (the form of ``labels_from`` / ``sensitive_from``)."""
    if text is None:
        return None
    if isinstance(text, TagSpec):
        return text
    if not isinstance(text, str):
        raise TypeError(f"{arg}: expected a string 'COLUMN' or 'COLUMN:V1,V2,...', got {type(text).__name__}")
    col, sep, rest = text.partition(":")
    col = col.strip()
    if not col:
        raise ValueError(f"{arg}: no column name in {text!r}; expected 'COLUMN' or 'COLUMN:V1,V2,...'")
    if not sep:
        return TagSpec(col)
    values = [v.strip() for v in rest.split(",") if v.strip()]
    if not values:
        raise ValueError(f"{arg}: no values after ':' in {text!r}")
    dup = sorted({v for v in values if values.count(v) > 1})
    if dup:
        raise ValueError(f"{arg}: values listed twice: {', '.join(map(repr, dup))}")
    return TagSpec(col, tuple(values))


def _names(cols, arg: str) -> Tuple[str, ...]:
    if cols is None:
        return ()
    if isinstance(cols, str):
        cols = [c for c in cols.split(",") if c.strip()]
    out = tuple(str(c).strip() for c in cols)
    dup = sorted({c for c in out if out.count(c) > 1})
    if dup:
        raise ValueError(f"{arg}: columns listed twice: {', '.join(map(repr, dup))}")
    return out


@dataclass(frozen=True)
class ColumnSpec:
    """Which columns hold what. ``sensitive_from`` / ``labels_from`` accept ``"COL"`` or
    ``"COL:V1,V2"`` strings; :meth:`resolve` fixes the vocabulary of ``"COL"`` tags."""
    sensitive: Tuple[str, ...] = ()
    labels: Tuple[str, ...] = ()
    sensitive_from: Optional[TagSpec] = None
    labels_from: Optional[TagSpec] = None
    utility: Optional[str] = None
    id: Optional[str] = None

    @classmethod
    def make(cls, *, sensitive=(), labels=(), sensitive_from=None, labels_from=None, utility=None,
             id=None) -> "ColumnSpec":
        spec = cls(_names(sensitive, "sensitive"), _names(labels, "labels"),
                   parse_tags(sensitive_from, "sensitive_from"), parse_tags(labels_from, "labels_from"),
                   None if utility is None else str(utility), None if id is None else str(id))
        if not spec.sensitive and spec.sensitive_from is None:
            raise ValueError("sensitive: give at least one group column (or sensitive_from='COLUMN[:V1,...]')")
        roles: Dict[str, str] = {}
        for role, cols in (("sensitive", spec.sensitive), ("labels", spec.labels),
                           ("sensitive_from", [t.column for t in (spec.sensitive_from,) if t]),
                           ("labels_from", [t.column for t in (spec.labels_from,) if t]),
                           ("utility", [spec.utility] if spec.utility else [])):
            for c in cols:
                if c in roles and roles[c] != role:
                    raise ValueError(f"{role}: column {c!r} is already used as {roles[c]}")
                roles[c] = role
        return spec

    @property
    def needs_vocabulary(self) -> List[str]:
        """Tag columns whose values must be found by a pass over the data."""
        return [t.column for t in (self.sensitive_from, self.labels_from) if t is not None and t.values is None]

    def columns(self) -> List[str]:
        """The columns a pass reads (id last, so a transform can copy it)."""
        cols = list(self.sensitive) + list(self.labels)
        cols += [t.column for t in (self.sensitive_from, self.labels_from) if t is not None]
        cols += [c for c in (self.utility, self.id) if c]
        return list(dict.fromkeys(cols))

    def resolve(self, vocab: Optional[Dict[str, Iterable[str]]] = None) -> "ResolvedSpec":
        """Fix the tag vocabularies: ``vocab[col]`` is the set of distinct values found in
        tag column ``col`` (needed for each of :attr:`needs_vocabulary`)."""
        tags = {}
        for t in (self.sensitive_from, self.labels_from):
            if t is None:
                continue
            if t.values is not None:
                tags[t.column] = t.values
            else:
                if vocab is None or t.column not in vocab:
                    raise ValueError(f"column {t.column!r}: its vocabulary has not been found (one pass first)")
                tags[t.column] = tuple(sorted(str(v) for v in vocab[t.column]))
        return ResolvedSpec(self, tags)

    def to_json(self) -> dict:
        def tag(t):
            return None if t is None else {"column": t.column, "values": None if t.values is None else list(t.values)}
        return {"sensitive": list(self.sensitive), "labels": list(self.labels),
                "sensitive_from": tag(self.sensitive_from), "labels_from": tag(self.labels_from),
                "utility": self.utility, "id": self.id}

    @classmethod
    def from_json(cls, d: dict) -> "ColumnSpec":
        def tag(t):
            return None if t is None else TagSpec(str(t["column"]), None if t["values"] is None
                                                  else tuple(str(v) for v in t["values"]))
        return cls(tuple(d["sensitive"]), tuple(d["labels"]), tag(d["sensitive_from"]), tag(d["labels_from"]),
                   d["utility"], d["id"])


@dataclass(frozen=True)
class PackedLayout:
    """The 0/1 columns of a spec packed into int64 words, as an engine may hand them over
    instead of one column each (Spark packs them in the JVM: Arrow then carries a word a
    row, not 34 boolean columns, and the conversion Spark does row by row is the cost).

    ``columns``: the 0/1 columns in data-tuple order (the ``m`` groups, then the labels);
    column ``b`` is bit ``b % 63`` of word column ``WORD + str(b // 63)`` (int64); bit 63 of
    a word is set when one of its columns has a null or a value other than 0/1 in that row
    (the packing cannot say which: the engine then reads the raw columns for the error).
    :meth:`ResolvedSpec.data_tuple` takes such a batch (the words, and the spec's other
    columns as they are) and unpacks the words in the core (``unpack_bit_words``)."""
    columns: Tuple[str, ...]
    m: int

    BITS = 63

    @property
    def words(self) -> List[str]:
        return [f"{WORD}{i}" for i in range(-(-len(self.columns) // self.BITS))]

    def word_columns(self, i: int) -> List[Tuple[str, int]]:
        """(column, bit) of word ``i``."""
        cols = self.columns[i * self.BITS:(i + 1) * self.BITS]
        return [(c, b) for b, c in enumerate(cols)]


# ----- schema checks ------------------------------------------------------------------------------

def _is_binary_type(t) -> bool:
    import pyarrow as pa
    return pa.types.is_boolean(t) or pa.types.is_integer(t) or pa.types.is_floating(t)


def _is_string(t) -> bool:
    import pyarrow as pa
    if pa.types.is_dictionary(t):
        t = t.value_type
    return pa.types.is_string(t) or pa.types.is_large_string(t)


def _is_tag_type(t) -> bool:
    import pyarrow as pa
    if _is_string(t):
        return True
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        return _is_string(t.value_type)
    return False


def _field(schema, name: str, shard: str):
    """The field ``name`` of ``schema``; refuses a missing or an ambiguous (duplicated) name.
    (pyarrow's get_field_index gives -1 for both, and column(-1) would be the last column.)"""
    n = schema.names.count(name)
    if n == 0:
        raise DataError(f"{shard}: missing column {name!r}; it has {', '.join(map(repr, schema.names))}")
    if n > 1:
        raise DataError(f"{shard}: column name {name!r} appears {n} times; it is ambiguous")
    return schema.field(schema.names.index(name))


@dataclass(frozen=True)
class ResolvedSpec:
    """A column spec with every tag vocabulary fixed: the group and label names are known.

    ``utility_shift``: subtracted from the utility column in :meth:`data_tuple` (a fit sets
    it to the utility's mean over the dataset: adding a constant to every u_i only shifts mu,
    since sum q = N eta, and a large common part would swamp eta in eta + u_i - a_i^T w - mu;
    the rule of ``pym4.m4._balance.center_utility``). A batch whose shifted utility is all
    zero (a constant utility) gets u = None, as center_utility gives for a constant one."""
    spec: ColumnSpec
    tags: Dict[str, Tuple[str, ...]] = field(default_factory=dict)
    utility_shift: float = 0.0

    def with_utility_shift(self, shift: float) -> "ResolvedSpec":
        return ResolvedSpec(self.spec, self.tags, float(shift))

    @property
    def group_names(self) -> List[str]:
        t = self.spec.sensitive_from
        return list(self.spec.sensitive) + ([] if t is None else [f"{t.column}={v}" for v in self.tags[t.column]])

    @property
    def label_names(self) -> List[str]:
        t = self.spec.labels_from
        return list(self.spec.labels) + ([] if t is None else [f"{t.column}={v}" for v in self.tags[t.column]])

    @property
    def m(self) -> int:
        return len(self.group_names)

    @property
    def c(self) -> int:
        return len(self.label_names)

    def check_schema(self, schema, shard: str) -> None:
        check_schema(self.spec, schema, shard)

    def packed_layout(self) -> Optional[PackedLayout]:
        """How an engine may pack this spec's 0/1 columns (:class:`PackedLayout`); None when
        a tag column gives groups or labels (those travel as they are: no packing then)."""
        sp = self.spec
        if sp.sensitive_from is not None or sp.labels_from is not None:
            return None
        return PackedLayout(tuple(sp.sensitive) + tuple(sp.labels), len(sp.sensitive))

    def _utility(self, col, shard: str, row0: int) -> Optional[np.ndarray]:
        """The utility column, shifted; None when it is all zero after the shift."""
        u = _utility_column(col, self.spec.utility, shard, row0)
        u = u - self.utility_shift if self.utility_shift else u
        return u if np.any(u) else None

    def _unpacked(self, batch, shard: str, row0: int):
        """(s, y) of a batch of packed words (:class:`PackedLayout`)."""
        layout = self.packed_layout()
        if layout is None:
            raise DataError(f"{shard}: packed 0/1 columns, but the spec reads tag columns")
        names = batch.schema.names
        missing = [w for w in layout.words if w not in names]
        if missing:
            raise DataError(f"{shard}: missing packed column {missing[0]!r}")
        words = [np.ascontiguousarray(_column(batch, batch.schema, w, shard).to_numpy(zero_copy_only=False),
                                      dtype=np.int64) for w in layout.words]
        for w in words:
            if len(w) and w.min() < 0:
                i = int(np.argmax(w < 0))
                raise DataError(f"{shard}: one of the columns {', '.join(map(repr, layout.columns))} has a "
                                f"missing (null) or non-0/1 value at row {row0 + i}")
        n, core, m = batch.num_rows, _core(), layout.m
        return (core.unpack_bit_words(words, n, 0, m),
                core.unpack_bit_words(words, n, m, len(layout.columns) - m))

    def data_tuple(self, batch, shard: str, row0: int = 0):
        """The core's data tuple of ``batch`` (a pyarrow RecordBatch or Table); ``row0`` is
        the row number of its first row within ``shard``, for error messages. The 0/1
        columns may come packed (:class:`PackedLayout`: the word columns instead)."""
        sp = self.spec
        schema = batch.schema
        n = batch.num_rows
        if WORD + "0" in schema.names:
            s, y_dense = self._unpacked(batch, shard, row0)
            u = self._utility(_column(batch, schema, _field(schema, sp.utility, shard).name, shard), shard, row0) \
                if sp.utility else None
            return (s, y_dense, None, None, y_dense.shape[1], u)
        check_schema(sp, schema, shard, with_id=False)
        cols = {name: _column(batch, schema, name, shard) for name in sp.columns() if name != sp.id}
        s = _binary_matrix([cols[c] for c in sp.sensitive], sp.sensitive, shard, row0, n)
        if sp.sensitive_from is not None:
            col = sp.sensitive_from.column
            rows, idx = _tag_indices(cols[col], self.tags[col], col, shard, row0)
            dense = np.zeros((n, len(self.tags[col])), np.uint8)
            dense[rows, idx] = 1
            s = np.concatenate([s, dense], axis=1) if s.shape[1] else dense
        s = np.ascontiguousarray(s)
        y_dense = _binary_matrix([cols[c] for c in sp.labels], sp.labels, shard, row0, n)
        c0 = y_dense.shape[1]
        u = self._utility(cols[sp.utility], shard, row0) if sp.utility else None
        if sp.labels_from is None:
            return (s, y_dense, None, None, c0, u)
        col = sp.labels_from.column
        rows, idx = _tag_indices(cols[col], self.tags[col], col, shard, row0)
        c = c0 + len(self.tags[col])
        if c0:
            # 0/1 label columns come first: their nonzeros join the tag numbers (shifted by c0).
            r0, k0 = np.nonzero(y_dense)
            rows = np.concatenate([r0, rows])
            idx = np.concatenate([k0, idx + c0])
            order = np.lexsort((idx, rows))
            rows, idx = rows[order], idx[order]
        indptr = np.zeros(n + 1, np.int64)
        np.cumsum(np.bincount(rows, minlength=n), out=indptr[1:])
        return (s, None, indptr, np.ascontiguousarray(idx, dtype=np.int32), c, u)


def check_schema(spec: ColumnSpec, schema, shard: str, with_id: bool = True) -> None:
    """Every column the spec reads (the id column too, unless ``with_id`` is False) is
    present once and has a usable type."""
    import pyarrow as pa
    for name in list(spec.sensitive) + list(spec.labels):
        f = _field(schema, name, shard)
        if not _is_binary_type(f.type):
            raise DataError(f"{shard}: column {name!r} has type {f.type}; expected 0/1 values "
                            f"(boolean, integer or float)")
    for arg, t in (("sensitive_from", spec.sensitive_from), ("labels_from", spec.labels_from)):
        if t is not None:
            f = _field(schema, t.column, shard)
            if not _is_tag_type(f.type):
                raise DataError(f"{shard}: column {t.column!r} ({arg}) has type {f.type}; expected a tag column: "
                                f"list<string> or string")
    if spec.utility:
        f = _field(schema, spec.utility, shard)
        if not (pa.types.is_integer(f.type) or pa.types.is_floating(f.type)):
            raise DataError(f"{shard}: column {spec.utility!r} (utility) has type {f.type}; expected numbers")
    if spec.id and with_id:
        _field(schema, spec.id, shard)


def check_same_schema(spec: ColumnSpec, schemas: Sequence[Tuple[str, object]]) -> None:
    """Shards ``[(name, schema), ...]`` agree on the type of every column the spec reads (a
    column that is int in one shard and string in another is a different dataset)."""
    if not schemas:
        return
    first_name, first = schemas[0]
    for name, schema in schemas:
        check_schema(spec, schema, name)
    for col in spec.columns():
        t0 = first.field(first.names.index(col)).type
        for name, schema in schemas[1:]:
            t = schema.field(schema.names.index(col)).type
            if not t.equals(t0):
                raise DataError(f"{name}: column {col!r} has type {t}, but {t0} in {first_name}; "
                                f"the shards' schemas differ")


# ----- columns to arrays ---------------------------------------------------------------------------

def _column(batch, schema, name: str, shard: str):
    import pyarrow as pa
    i = schema.names.index(name)
    col = batch.column(i)
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks() if col.num_chunks != 1 else col.chunk(0)
    return col


def _first_null(col) -> int:
    import pyarrow.compute as pc
    return int(pc.index(pc.is_null(col), True).as_py())


def _binary_column(col, name: str, shard: str, row0: int) -> np.ndarray:
    import pyarrow as pa
    if col.null_count:
        raise DataError(f"{shard}: column {name!r} has a missing value (null) at row {row0 + _first_null(col)}; "
                        f"M4 needs 0 or 1 everywhere")
    if pa.types.is_boolean(col.type):
        # Arrow unpacks the bits straight into bytes (to_numpy would make bools, then a copy).
        return col.cast(pa.uint8()).to_numpy()
    arr = col.to_numpy(zero_copy_only=False)
    bad = ~((arr == 0) | (arr == 1))  # NaN fails both
    if bad.any():
        i = int(np.argmax(bad))
        raise DataError(f"{shard}: column {name!r} is not binary: row {row0 + i} has value {arr[i].item()!r} "
                        f"(expected 0 or 1)")
    return arr.astype(np.uint8)


def _binary_matrix(cols, names, shard: str, row0: int, n: int) -> np.ndarray:
    """(n, k) C-contiguous uint8 0/1 of k columns. Boolean columns without nulls go the fast
    way: their bitmaps transposed into rows by the core (``unpack_bit_columns``: ~3x numpy's
    unpackbits of the stacked bitmaps, measured at 34 columns; that conversion was a third
    of a pass over Parquet)."""
    import pyarrow as pa
    if not cols or n == 0:
        return np.zeros((n, len(cols)), np.uint8)
    core = _core()
    if core is not None and all(pa.types.is_boolean(c.type) and not c.null_count for c in cols):
        return core.unpack_bit_columns([c.buffers()[1] for c in cols], [c.offset for c in cols], n)
    return np.ascontiguousarray(np.stack([_binary_column(c, name, shard, row0) for c, name in zip(cols, names)],
                                         axis=1))


def _core():
    from .. import _backend
    return _backend.core()


def _utility_column(col, name: str, shard: str, row0: int) -> np.ndarray:
    if col.null_count:
        raise DataError(f"{shard}: column {name!r} (utility) has a missing value (null) at row "
                        f"{row0 + _first_null(col)}")
    arr = np.ascontiguousarray(col.to_numpy(zero_copy_only=False), dtype=np.float64)
    bad = ~np.isfinite(arr)
    if bad.any():
        i = int(np.argmax(bad))
        raise DataError(f"{shard}: column {name!r} (utility) has {arr[i].item()!r} at row {row0 + i}; expected finite numbers")
    return arr


def _tag_values(col, name: str, shard: str, row0: int):
    """(row of each tag, tag strings as an arrow array) of a list<string> or string column."""
    import pyarrow as pa
    import pyarrow.compute as pc
    if col.null_count:
        raise DataError(f"{shard}: column {name!r} has a missing value (null) at row {row0 + _first_null(col)}; "
                        f"an example without tags needs an empty list")
    if pa.types.is_list(col.type) or pa.types.is_large_list(col.type):
        values = col.flatten()
        rows = np.asarray(pc.list_parent_indices(col), dtype=np.int64)
    else:
        values = col
        rows = np.arange(len(col), dtype=np.int64)
    if pa.types.is_dictionary(values.type):
        values = values.cast(values.type.value_type)
    if values.null_count:
        i = _first_null(values)
        raise DataError(f"{shard}: column {name!r} has a missing tag (null) at row {row0 + int(rows[i])}")
    return rows, values


def distinct_tags(batch, name: str, shard: str, row0: int = 0) -> set:
    """The distinct values of tag column ``name`` in ``batch`` (a Python set of str)."""
    import pyarrow.compute as pc
    col = _column(batch, batch.schema, name, shard)
    _, values = _tag_values(col, name, shard, row0)
    return set(pc.unique(values).to_pylist())


def _tag_indices(col, vocab: Tuple[str, ...], name: str, shard: str, row0: int):
    """(rows, indices) of the vocabulary values present in each row: sorted by row then
    index, duplicates within a row removed (labels are 0/1, not counts)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    rows, values = _tag_values(col, name, shard, row0)
    pos = pc.index_in(values, value_set=pa.array(vocab, type=values.type))
    keep = pos.is_valid()
    rows = rows[np.asarray(keep, dtype=bool)]
    idx = np.asarray(pos.drop_null(), dtype=np.int64)
    if len(idx):
        key = np.unique(rows * len(vocab) + idx)  # sorted by row, then index
        rows, idx = key // len(vocab), key % len(vocab)
    return rows.astype(np.int64), idx.astype(np.int64)


# ----- arrays handed in directly (M4Model.keep_probability) ------------------------------------------

def binary_matrix(x, name: str, n: Optional[int] = None) -> np.ndarray:
    """A C-contiguous (n, k) uint8 0/1 array from a bool / integer / float array-like
    (1-D means one column); raises naming ``name`` when a value is not 0 or 1."""
    a = np.asarray(x)
    if a.ndim == 1:
        a = a[:, None]
    if a.ndim != 2:
        raise ValueError(f"{name}: expected a 1-D or 2-D array (examples, columns), got shape {a.shape}")
    if n is not None and a.shape[0] != n:
        raise ValueError(f"{name}: expected {n} rows (one per example), got {a.shape[0]}")
    if a.dtype == np.bool_:
        return np.ascontiguousarray(a.view(np.uint8))
    if a.dtype.kind not in "iuf":
        raise TypeError(f"{name}: expected 0/1 numbers or booleans, got dtype {a.dtype}")
    bad = ~((a == 0) | (a == 1))
    if bad.any():
        i, j = (int(v) for v in np.argwhere(bad)[0])
        raise ValueError(f"{name}: values must be 0 or 1, got {a[i, j].item()!r} in column {j} (row {i})")
    return np.ascontiguousarray(a, dtype=np.uint8)
