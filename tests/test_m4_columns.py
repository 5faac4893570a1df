"""pym4.m4._columns: pyarrow batches to the core's data tuple, tag columns, and the checks
that name the shard and the column."""
import numpy as np
import pyarrow as pa
import pytest

from m4_datasets import VOCAB, counts_reference, dense, metadata, tags_dense
from pym4 import _backend
from pym4.m4._columns import ColumnSpec, DataError, TagSpec, binary_matrix, parse_tags


def _counts(data):
    s, c = data[0], data[4]
    out = np.zeros(1 + s.shape[1] + c + s.shape[1] * c)
    _backend.core().m4_weighted_counts(data[:5] + (None,), None, out)
    return out


def _csr_dense(data):
    s, y, indptr, indices, c, _ = data
    if y is not None:
        return y.astype(np.float64)
    out = np.zeros((s.shape[0], c))
    rows = np.repeat(np.arange(s.shape[0]), np.diff(indptr))
    out[rows, indices] = 1
    return out


def test_parse_tags():
    assert parse_tags("tags", "labels_from") == TagSpec("tags")
    assert parse_tags(" tags : doctor, nurse ,pilot", "labels_from") == TagSpec("tags", ("doctor", "nurse", "pilot"))
    assert parse_tags(None, "labels_from") is None
    with pytest.raises(ValueError, match="labels_from: no values"):
        parse_tags("tags:", "labels_from")
    with pytest.raises(ValueError, match="labels_from: values listed twice: 'a'"):
        parse_tags("tags:a,b,a", "labels_from")
    with pytest.raises(ValueError, match="sensitive_from: no column name"):
        parse_tags(":a", "sensitive_from")


def test_spec_checks():
    with pytest.raises(ValueError, match="sensitive: give at least one"):
        ColumnSpec.make(labels=["l0"])
    with pytest.raises(ValueError, match="labels: column 'g0' is already used as sensitive"):
        ColumnSpec.make(sensitive=["g0"], labels=["g0"])
    with pytest.raises(ValueError, match="sensitive: columns listed twice"):
        ColumnSpec.make(sensitive=["g0", "g0"])


def test_binary_columns_match_numpy():
    t = metadata(300)
    rs = ColumnSpec.make(sensitive=["g0", "g1"], labels=["l0", "l1", "l2"], utility="u").resolve()
    data = rs.data_tuple(t, "t.parquet")
    s, y = dense(t, ["g0", "g1"]), dense(t, ["l0", "l1", "l2"])
    np.testing.assert_array_equal(data[0], s)
    np.testing.assert_array_equal(data[1], y)
    np.testing.assert_array_equal(data[5], t.column("u").to_numpy())
    assert rs.group_names == ["g0", "g1"] and rs.label_names == ["l0", "l1", "l2"]
    np.testing.assert_allclose(_counts(data), counts_reference(s, y), rtol=0, atol=1e-9)


@pytest.mark.parametrize("as_string", [False, True])
def test_tag_labels_equal_dense_columns(as_string):
    t = metadata(400, seed=1)
    if as_string:  # one tag per row, as a string column (rows without tags get "none")
        t = t.set_column(t.schema.get_field_index("tags"), "tags",
                         pa.array([v[0] if v else "none" for v in t.column("tags").to_pylist()]))
    vocab = sorted(set(sum(([v] if isinstance(v, str) else v for v in t.column("tags").to_pylist()), [])))
    spec = ColumnSpec.make(sensitive=["g0", "g1"], labels=["l1"], labels_from="tags")
    rs = spec.resolve({"tags": set(vocab)})
    assert rs.label_names == ["l1"] + [f"tags={v}" for v in vocab]
    data = rs.data_tuple(t, "t.parquet")
    assert data[1] is None and data[2].dtype == np.int64 and data[3].dtype == np.int32  # CSR
    y_ref = np.concatenate([dense(t, ["l1"]), tags_dense(t, "tags", vocab)], axis=1)
    np.testing.assert_array_equal(_csr_dense(data), y_ref)
    # indices sorted and unique within each row (a tag repeated in a row is one label)
    for b, e in zip(data[2][:-1], data[2][1:]):
        assert np.all(np.diff(data[3][b:e]) > 0)
    np.testing.assert_allclose(_counts(data), counts_reference(dense(t, ["g0", "g1"]), y_ref), atol=1e-9)


def test_tag_subset_and_sensitive_from():
    t = metadata(200, seed=2)
    rs = ColumnSpec.make(sensitive_from="region:west,east", labels_from="tags:pilot,doctor,absent").resolve()
    assert rs.group_names == ["region=west", "region=east"]
    assert rs.label_names == ["tags=pilot", "tags=doctor", "tags=absent"]
    data = rs.data_tuple(t, "t")
    np.testing.assert_array_equal(data[0], tags_dense(t, "region", ["west", "east"]))
    np.testing.assert_array_equal(_csr_dense(data), tags_dense(t, "tags", ["pilot", "doctor", "absent"]))


def test_vocabulary_needed():
    with pytest.raises(ValueError, match="vocabulary has not been found"):
        ColumnSpec.make(sensitive=["g0"], labels_from="tags").resolve()


@pytest.mark.parametrize("case, match", [
    ("missing", r"shard-3\.parquet: missing column 'g9'"),
    ("duplicate", r"shard-3\.parquet: column name 'g0' appears 2 times"),
    ("nonbinary", r"shard-3\.parquet: column 'g1' is not binary: row 17 has value 2"),
    ("null", r"shard-3\.parquet: column 'l0' has a missing value \(null\) at row 17"),
    ("nan", r"shard-3\.parquet: column 'l0' is not binary: row 17 has value nan"),
    ("string_group", r"shard-3\.parquet: column 'region' has type string; expected 0/1"),
    ("tag_type", r"shard-3\.parquet: column 'u' \(labels_from\) has type double; expected a tag column"),
    ("tag_null", r"shard-3\.parquet: column 'tags' has a missing value \(null\) at row 17"),
    ("tag_null_value", r"shard-3\.parquet: column 'tags' has a missing tag \(null\) at row 17"),
    ("utility_nan", r"shard-3\.parquet: column 'u' \(utility\) has nan at row 17"),
])
def test_bad_input_names_shard_and_column(case, match):
    t = metadata(40, seed=3)
    kw = dict(sensitive=["g0", "g1"], labels=["l0"], labels_from="tags:doctor")
    if case == "missing":
        kw["sensitive"] = ["g0", "g9"]
    elif case == "duplicate":
        t = t.append_column("g0", pa.array(np.zeros(40, bool)))
    elif case == "nonbinary":
        g1 = t.column("g1").to_numpy().copy()
        g1[17] = 2
        t = t.set_column(t.schema.get_field_index("g1"), "g1", pa.array(g1))
    elif case in ("null", "nan"):
        l0 = t.column("l0").to_pylist()
        l0[17] = None if case == "null" else float("nan")
        t = t.set_column(t.schema.get_field_index("l0"), "l0", pa.array(l0, pa.float64()))
    elif case == "string_group":
        kw["sensitive"] = ["g0", "region"]
    elif case == "tag_type":
        kw["labels_from"] = "u:1"
        kw["utility"] = None
    elif case in ("tag_null", "tag_null_value"):
        tags = t.column("tags").to_pylist()
        tags[17] = None if case == "tag_null" else ["doctor", None]
        t = t.set_column(t.schema.get_field_index("tags"), "tags", pa.array(tags, pa.list_(pa.string())))
    elif case == "utility_nan":
        u = t.column("u").to_numpy().copy()
        u[17] = np.nan
        t = t.set_column(t.schema.get_field_index("u"), "u", pa.array(u))
        kw["utility"] = "u"
    rs = ColumnSpec.make(**kw).resolve()
    with pytest.raises(DataError, match=match):
        rs.data_tuple(t.to_batches()[0] if case != "duplicate" else t, "shard-3.parquet")


def test_binary_matrix():
    np.testing.assert_array_equal(binary_matrix([[True, False]], "s"), [[1, 0]])
    assert binary_matrix(np.array([0.0, 1.0]), "s").shape == (2, 1)
    with pytest.raises(ValueError, match=r"s: values must be 0 or 1, got 0.5 in column 1 \(row 0\)"):
        binary_matrix([[1.0, 0.5]], "s")
    with pytest.raises(TypeError, match="y: expected 0/1 numbers"):
        binary_matrix(np.array([["a"]]), "y")
    with pytest.raises(ValueError, match="s: expected 3 rows"):
        binary_matrix(np.zeros((2, 1)), "s", 3)


@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 1023, 4097, 8200])
@pytest.mark.parametrize("k", [1, 7, 8, 9, 34])
def test_unpack_bit_columns_matches_numpy(n, k):
    """The core's bitmap-to-rows transpose: odd row counts (tiles of 8 rows and the tail),
    odd column counts (tiles of 8 columns and the rest), and columns that start at
    different bit offsets (slices of longer arrays, as Arrow hands out batches)."""
    rng = np.random.default_rng(n * 100 + k)
    ref = (rng.random((n, k)) < 0.4).astype(np.uint8)
    cols = []
    for j in range(k):
        pad = int(rng.integers(0, 20))  # the slice starts at bit `pad` of its bitmap
        full = np.concatenate([rng.random(pad) < 0.5, ref[:, j].astype(bool), rng.random(5) < 0.5])
        cols.append(pa.array(full).slice(pad, n))
    got = _backend.core().unpack_bit_columns([c.buffers()[1] for c in cols], [c.offset for c in cols], n)
    assert got.shape == (n, k) and got.dtype == np.uint8 and got.flags.c_contiguous
    np.testing.assert_array_equal(got, ref)


def test_unpack_bit_columns_checks():
    core = _backend.core()
    buf = pa.array([True] * 8).buffers()[1]
    with pytest.raises(ValueError, match=r"bitmaps: entry 0 has \d+ bytes; 100 rows from bit 0 need 13"):
        core.unpack_bit_columns([buf], [0], 100)
    with pytest.raises(ValueError, match="offsets: expected one per bitmap"):
        core.unpack_bit_columns([buf], [0, 0], 8)
    with pytest.raises(ValueError, match="offsets: entry 0 is negative"):
        core.unpack_bit_columns([buf], [-1], 8)


def test_sliced_boolean_batch_to_data_tuple():
    """A batch sliced at a bit offset that is not a multiple of 8 (its columns' bitmaps
    start mid-byte) gives the rows of the slice (g0, l1, l2 are the boolean columns)."""
    t = metadata(300)
    rs = ColumnSpec.make(sensitive=["g0"], labels=["l1", "l2"]).resolve()
    data = rs.data_tuple(t.slice(13, 250), "t.parquet")
    assert t.column("l1").type == pa.bool_() and t.slice(13, 250).column("l1").chunk(0).offset == 13
    np.testing.assert_array_equal(data[0], dense(t, ["g0"])[13:263])
    np.testing.assert_array_equal(data[1], dense(t, ["l1", "l2"])[13:263])


def _pack_words(bits):
    """Reference packing (plain Python ints): column b of (n, k) 0/1 rows is bit b % 63 of
    word b // 63; returns the int64 word columns."""
    n, k = bits.shape
    words = []
    for w in range(-(-k // 63)):
        vals = [sum(int(bits[r, b]) << (b - 63 * w) for b in range(63 * w, min(k, 63 * w + 63))) for r in range(n)]
        words.append(np.array(vals, dtype=np.int64))
    return words


@pytest.mark.parametrize("n", [0, 1, 7, 1023])
@pytest.mark.parametrize("k", [1, 9, 34, 63, 64, 130])
def test_unpack_bit_words_matches_numpy(n, k):
    """Bits of packed int64 words to rows, at any first bit and width: within one word, across
    the 63-bit word boundary, and with the flag bit 63 set (never read as a column)."""
    rng = np.random.default_rng(n * 1000 + k)
    ref = (rng.random((n, k)) < 0.4).astype(np.uint8)
    words = _pack_words(ref)
    flagged = [w | np.int64(-(1 << 63)) for w in words]
    core = _backend.core()
    for first, width in [(0, k), (0, min(k, 2)), (min(k, 2), k - min(k, 2)), (k // 2, k - k // 2)]:
        for ws in (words, flagged):
            got = core.unpack_bit_words(ws, n, first, width)
            assert got.shape == (n, width) and got.dtype == np.uint8 and got.flags.c_contiguous
            np.testing.assert_array_equal(got, ref[:, first:first + width])


def test_unpack_bit_words_checks():
    core = _backend.core()
    w = [np.zeros(5, np.int64)]
    with pytest.raises(ValueError, match=r"words: 1 words hold 63 bits; bits 60 \.\. 63 were asked for"):
        core.unpack_bit_words(w, 5, 60, 4)
    with pytest.raises(ValueError, match="words: entry 0 must be 1-D with 6 rows"):
        core.unpack_bit_words(w, 6, 0, 1)


def test_packed_batch_gives_the_same_data_tuple():
    """A batch whose 0/1 columns come packed into words (as the Spark engine hands them over)
    gives the data tuple of the raw columns; the utility travels as it is."""
    from pym4.m4._columns import WORD
    t = metadata(300, seed=5)
    rs = ColumnSpec.make(sensitive=["g0", "g1"], labels=["l0", "l1", "l2"], utility="u").resolve() \
        .with_utility_shift(0.25)
    layout = rs.packed_layout()
    assert layout.columns == ("g0", "g1", "l0", "l1", "l2") and layout.m == 2 and layout.words == [WORD + "0"]
    bits = np.concatenate([dense(t, ["g0", "g1"]), dense(t, ["l0", "l1", "l2"])], axis=1)
    packed = pa.table({WORD + "0": _pack_words(bits)[0], "u": t.column("u")})
    want = rs.data_tuple(t, "t")
    got = rs.data_tuple(packed, "t")
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])
    assert got[2] is None and got[3] is None and got[4] == want[4] == 3
    np.testing.assert_array_equal(got[5], t.column("u").to_numpy() - 0.25)
    # a row flagged by the packing (a null or a value not 0/1 somewhere in its word)
    flagged = pa.table({WORD + "0": np.where(np.arange(300) == 17, np.int64(-(1 << 63)), _pack_words(bits)[0]),
                        "u": t.column("u")})
    with pytest.raises(DataError, match=r"^t: one of the columns 'g0', 'g1', 'l0', 'l1', 'l2' has a missing "
                                        r"\(null\) or non-0/1 value at row 20"):
        rs.data_tuple(flagged, "t", row0=3)
    # tag columns are never packed
    assert ColumnSpec.make(sensitive=["g0"], labels_from="tags:a,b").resolve().packed_layout() is None
