"""pym4.m4.model.M4Model: keep_probability against the closed form in numpy, JSON and
pickle round trips, transform on Arrow and pandas batches, and no torch on the data side."""
import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pytest

from m4_datasets import dense, metadata, tags_dense
from pym4.m4._columns import ColumnSpec
from pym4.m4.model import M4Model

VOCAB3 = ("doctor", "nurse", "pilot")


def _model(seed=0, utility=None):
    rs = ColumnSpec.make(sensitive=["g0", "g1"], labels=["l0"], labels_from="tags:" + ",".join(VOCAB3),
                         utility=utility, id="id").resolve()
    rng = np.random.default_rng(seed)
    return M4Model(np.array([0.3, 0.35]), 0.8, 0.01, 0.02, rng.normal(0, 0.3, 2 * 5), 0.05, rs,
                   {"status": "optimal", "passes": np.int64(3), "violations": np.zeros(2)})


def _closed_form(s, y, u, pi, eta, w, mu):
    """q_i = clip(eta + u_i - sum_k (s_ik - pi_k) (w_k0 + sum_r w_kr y_ir) - mu, 0, 1)."""
    W = w.reshape(len(pi), -1)
    ytil = np.concatenate([np.ones((s.shape[0], 1)), y], axis=1)
    margin = ((s - pi) * (ytil @ W.T)).sum(axis=1)
    return np.clip(eta + u - margin - mu, 0.0, 1.0)


def _arrays(t):
    s = dense(t, ["g0", "g1"])
    y = np.concatenate([dense(t, ["l0"]), tags_dense(t, "tags", VOCAB3)], axis=1)
    return s, y


def test_keep_probability_closed_form():
    t = metadata(500, seed=4)
    model = _model()
    s, y = _arrays(t)
    ref = _closed_form(s, y, 0.0, model.target, model.budget, model.w, model.mu)
    assert 0 < ref.min() < ref.max() <= 1  # the clip and the margins both matter here
    np.testing.assert_allclose(model.keep_probability(s.astype(bool), y), ref, rtol=0, atol=1e-12)
    u = t.column("u").to_numpy()
    with_u = _model(utility="u")  # (the same duals, fitted with a utility column)
    np.testing.assert_allclose(with_u.keep_probability(s, y, utility=u),
                               _closed_form(s, y, u, model.target, model.budget, model.w, model.mu), atol=1e-12)
    with pytest.raises(ValueError, match="utility: this model was fitted without a utility"):
        model.keep_probability(s, y, utility=u)  # (it moved q off the budget in silence)
    scipy_sparse = pytest.importorskip("scipy.sparse")
    np.testing.assert_allclose(model.keep_probability(s, scipy_sparse.csr_matrix(y)), ref, atol=1e-12)


def test_a_malformed_label_csr_is_an_error_not_a_crash():
    """The core indexes label tables by the CSR without bounds checks; its bindings check
    it first (a label index past c read memory out of bounds: a segfault)."""
    model = _model()  # m = 2 groups, c = 4 labels
    s = np.array([[0, 1], [1, 0], [1, 1]], np.uint8)
    indptr = np.array([0, 1, 2, 3], np.int64)
    for indices, what in ((np.array([0, 99999999, 3], np.int32), "y_indices: entry 1 is 99999999, outside"),
                          (np.array([0, -1, 3], np.int32), "y_indices: entry 1 is -1, outside"),
                          (np.array([0, 4, 3], np.int32), r"y_indices: entry 1 is 4, outside \[0, c = 4\)")):
        with pytest.raises(ValueError, match=what):
            model.keep_probability_data((s, None, indptr, indices, 4, None))
    with pytest.raises(ValueError, match="y_indptr: must be non-decreasing, but entry 2 < entry 1"):
        model.keep_probability_data((s, None, np.array([0, 2, 1, 3], np.int64), np.zeros(3, np.int32), 4, None))
    q = model.keep_probability_data((s, None, indptr, np.array([0, 3, 1], np.int32), 4, None))
    assert np.all((0 <= q) & (q <= 1))  # a well-formed one still runs


def test_keep_probability_errors():
    model = _model()
    with pytest.raises(ValueError, match="s: this model has 2 groups, got 3 columns"):
        model.keep_probability(np.zeros((4, 3)), np.zeros((4, 4)))
    with pytest.raises(ValueError, match="y: this model has 4 labels; pass them"):
        model.keep_probability(np.zeros((4, 2)))
    with pytest.raises(ValueError, match="y: values must be 0 or 1"):
        model.keep_probability(np.zeros((4, 2)), np.full((4, 4), 2.0))
    with pytest.raises(ValueError, match=r"utility: expected shape \(4,\)"):
        _model(utility="u").keep_probability(np.zeros((4, 2)), np.zeros((4, 4)), utility=np.zeros(3))
    with pytest.raises(ValueError, match="w: expected 10 finite duals"):
        M4Model(model.target, 0.8, 0.01, 0.01, np.zeros(9), 0.0, model.columns)
    with pytest.raises(ValueError, match="budget: must be in"):
        M4Model(model.target, 1.5, 0.01, 0.01, model.w, 0.0, model.columns)
    # The core's data tuple, as the engines hand it: anything else is named (was: IndexError).
    for data, what in ((np.zeros((4, 2)), "ndarray"), ((np.zeros((4, 2), np.uint8),), "a tuple of 1")):
        with pytest.raises(TypeError, match=rf"^data: expected the core's data tuple .* got {what}"):
            model.keep_probability_data(data)


def test_json_and_pickle_round_trip(tmp_path):
    model = _model(seed=1)
    path = str(tmp_path / "model.json")
    model.save(path)
    assert [f for f in os.listdir(tmp_path)] == ["model.json"]  # no temporary file left behind
    with open(path) as f:
        assert json.load(f)["label_names"] == ["l0", "tags=doctor", "tags=nurse", "tags=pilot"]
    for back in (M4Model.load(path), pickle.loads(pickle.dumps(model))):
        np.testing.assert_array_equal(back.w, model.w)  # bit for bit
        assert back.mu == model.mu and back.budget == model.budget
        assert back.info["passes"] == 3 and list(back.info["violations"]) == [0.0, 0.0]
        assert back.columns == model.columns
        np.testing.assert_array_equal(back.v_plus - back.v_minus, model.w.reshape(2, 5))
    with open(path, "w") as f:
        json.dump({"format": "something else"}, f)
    with pytest.raises(ValueError, match="not an M4Model file"):
        M4Model.load(path)


def test_transform_arrow_and_pandas():
    t = metadata(300, seed=5)
    model = _model()
    s, y = _arrays(t)
    ref = _closed_form(s, y, 0.0, model.target, model.budget, model.w, model.mu)
    out = model.transform(t)
    assert isinstance(out, pa.Table) and out.column_names == t.column_names + ["q"]
    np.testing.assert_allclose(out.column("q").to_numpy(), ref, atol=1e-12)
    batch = t.to_batches(max_chunksize=100)[1]
    outb = model.transform(batch)
    assert isinstance(outb, pa.RecordBatch)
    np.testing.assert_allclose(outb.column("q").to_numpy(), ref[100:200], atol=1e-12)
    pd = pytest.importorskip("pandas")
    df = t.to_pandas()
    outp = model.transform(df)
    assert isinstance(outp, pd.DataFrame) and "q" not in df.columns
    np.testing.assert_allclose(outp["q"].to_numpy(), ref, atol=1e-12)
    with pytest.raises(ValueError, match="already has a column 'q'"):
        model.transform(out)
    with pytest.raises(ValueError, match="batch: missing column 'tags'"):
        model.transform(t.drop_columns(["tags"]))
    with pytest.raises(TypeError, match="batch: expected a pyarrow"):
        model.transform({"g0": [1]})
    for column in ("", None, 3):  # (was: an Arrow column named "" appended)
        with pytest.raises(ValueError, match=r"^column: expected a non-empty column name"):
            model.transform(t, column=column)


def test_data_side_imports_no_torch():
    """The package, the data-side modules and fit_dataset load and run with torch made unimportable: a worker
    that only balances metadata must not need torch (``import pym4`` loads the ops lazily)."""
    code = """
import sys
class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is blocked in this test")
sys.meta_path.insert(0, NoTorch())
import pym4
import numpy as np
import pym4.m4.model, pym4.m4._stages, pym4.engines.local, pym4.engines.ray, pym4.engines.spark
import pym4.m4._dataset, pym4.m4._feasibility
from pym4.m4._columns import ColumnSpec
rs = ColumnSpec.make(sensitive=["a"]).resolve()
m = pym4.m4.model.M4Model(np.array([0.5]), 0.8, 0.01, 0.01, np.zeros(1), 0.0, rs)
import pyarrow as pa
print(m.transform(pa.table({"a": [True, False]})).column("q").to_pylist())
import os, tempfile, pyarrow.parquet as pq
path = os.path.join(tempfile.mkdtemp(), "d.parquet")
pq.write_table(pa.table({"a": [True, False] * 50, "b": [True] * 30 + [False] * 70}), path)
fitted = pym4.m4._dataset.fit_dataset(path, sensitive=["a", "b"], budget=0.5, eps_rep=0.05, progress=False)
assert fitted.info["status"] == "optimal", fitted.info
assert "torch" not in sys.modules
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[0.8, 0.8]"
