"""The dispatch table (pym4._backend): automatic choices, forced backends, and M4 and the
losses asking it (no core, float64 or no Triton on CUDA, PYM4_BACKEND)."""
import subprocess
import sys

import numpy as np
import pytest
import torch

import pym4
from pym4 import _backend, m4


def test_every_op_lists_backends_per_device_best_first():
    for op, table in _backend.OPS.items():
        assert table, op
        for device, names in table.items():
            assert device in ("cpu", "cuda") and names, (op, device)
            assert set(names) <= set(_backend.BACKENDS), (op, names)
    # Names mean one thing: the core is "cpu"/"cuda", tiled torch code "chunked".
    assert _backend.OPS["clip_loss"]["cpu"][0] == "chunked"
    assert "cpu" not in _backend.OPS["siglip_loss"]["cpu"]
    assert _backend.OPS["m4_fit"] == {"cpu": ("cpu", "torch"), "cuda": ("cuda", "torch")}


def test_import_pym4_loads_torch_only_when_an_op_is_used():
    # A fresh interpreter: `import pym4` must not import torch (Ray/Spark workers that run only
    # pym4.m4's data side pay nothing for it), and loading the modules that import the Sinkhorn
    # module (pym4.ot, pym4.train) must leave `pym4.sinkhorn` the function, not a module.
    code = """
import sys, types
import pym4
assert "torch" not in sys.modules, "import pym4 imported torch"
assert {"sinkhorn", "clip_loss", "nn", "m4"} <= set(dir(pym4))
import pym4.ot, pym4.train, pym4.nn
assert "torch" in sys.modules
assert isinstance(pym4.sinkhorn, types.FunctionType), pym4.sinkhorn
from pym4 import sinkhorn, sinkhorn_ot, ConvergenceWarning, clip_loss, siglip_loss, similarity_topk
assert pym4.sinkhorn is sinkhorn and pym4.ot.sinkhorn_ot is sinkhorn_ot and issubclass(ConvergenceWarning, Warning)
q = sinkhorn(__import__("torch").zeros(4, 3), epsilon=0.5, n_iters=3)
assert abs(float(q.sum()) - 4.0) < 1e-5, q.sum()  # each sample's codes sum to one: B = 4 in all
print("ok")
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "ok"
    with pytest.raises(AttributeError, match="has no attribute 'no_such_op'"):
        pym4.no_such_op


def test_losses_never_fall_back_to_the_b_by_b_reference(monkeypatch):
    # On CUDA: float64 (Triton cannot take it) and a machine without triton both get the
    # tiled engine, not the torch formula.
    assert _backend.choose("clip_loss", "cuda", dtype="float64") == "chunked"
    monkeypatch.setattr(_backend, "_triton_importable", lambda: False)
    assert _backend.choose("siglip_loss", "cuda", dtype="float32") == "chunked"
    assert _backend.choose("clip_loss", "cpu") == "chunked"
    assert _backend.choose("clip_loss", "mps") == "chunked"  # other devices: the portable backends


def test_forced_backend_runs_exactly_or_raises(monkeypatch):
    monkeypatch.delenv("PYM4_BACKEND", raising=False)
    assert _backend.choose("clip_loss", "cpu", "torch") == "torch"
    with pytest.raises(ValueError, match="clip_loss has no 'cpu' backend"):
        _backend.choose("clip_loss", "cpu", "cpu")
    with pytest.raises(TypeError, match="the triton backend takes float32, float16, bfloat16, got float64"):
        _backend.choose("clip_loss", "cuda", "triton", dtype="float64")
    with pytest.raises(RuntimeError, match="'cuda' cannot run sinkhorn on cpu"):
        _backend.choose("sinkhorn", "cpu", "cuda")
    # group=: the Triton kernel has no per-pass form, so forcing it raises instead of running torch.
    with pytest.raises(ValueError, match="sinkhorn_distributed has no 'triton' backend"):
        _backend.choose("sinkhorn_distributed", "cuda", "triton")
    with pytest.raises(ValueError, match="unknown backend"):
        _backend.choose("sinkhorn", "cpu", "numpy")
    with pytest.raises(ValueError, match="unknown op"):
        _backend.choose("sinkhorn_gpu", "cpu")
    monkeypatch.setattr(_backend, "core", lambda: None)
    with pytest.raises(RuntimeError, match="pym4._core is not built"):
        _backend.choose("m4_fit", "cpu", "cpu")
    assert _backend.choose("m4_fit", "cpu") == "torch"


def test_environment_forces_every_op(monkeypatch):
    monkeypatch.setenv("PYM4_BACKEND", "torch")
    assert _backend.choose("m4_keep_probability", "cpu") == "torch"
    assert _backend.choose("clip_loss", "cpu") == "torch"
    x = torch.randn(6, 4)
    loss = pym4.clip_loss(x, x.flip(0), 3.0)
    assert not type(loss.grad_fn).__name__.startswith("_ContrastiveLoss")  # the plain formula ran
    # M4 asks too: the exact solve has no torch backend, so forcing it raises, and the
    # automatic method is the stream, in torch.
    s, y = _data()
    with pytest.raises(ValueError, match="m4_exact has no 'torch' backend"):
        m4.balance(s, y, target=0.5, method="exact")
    kw = dict(target=[0.35, 0.4], budget=0.6, eps_rep=0.05, eps_assoc=0.1, seed=1)
    res = m4.balance(s, y, **kw)
    assert res.method == "stream"
    monkeypatch.delenv("PYM4_BACKEND")
    np.testing.assert_allclose(res.q, m4.balance(s, y, method="stream", **kw).q, atol=1e-9)


def test_triton_interpret_is_read_in_one_place(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert _backend.triton_interpret()
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not _backend.triton_interpret()


def _data(n=2000, seed=0):
    rng = np.random.default_rng(seed)
    s = (rng.random((n, 2)) < [0.3, 0.5]).astype(np.uint8)
    y = (rng.random((n, 3)) < 0.2 + 0.3 * s[:, :1]).astype(np.uint8)
    return s, y


def test_m4_torch_backend_equals_the_core():
    s, y = _data()
    kw = dict(budget=0.6, batch_size=128)
    core = m4.M4Solver([0.35, 0.4], **kw).partial_fit(s, y)
    ref = m4.M4Solver([0.35, 0.4], backend="torch", **kw).partial_fit(s, y)
    np.testing.assert_allclose(ref.state.avg_w, core.state.avg_w, atol=1e-9)
    np.testing.assert_allclose(ref.state.scalars(), core.state.scalars(), atol=1e-9)
    q_ref = ref.keep_probability(s, y)
    assert isinstance(q_ref, np.ndarray)
    np.testing.assert_allclose(q_ref, core.keep_probability(s, y), atol=1e-9)
    with pytest.raises(RuntimeError, match="'cuda' cannot run m4_fit on cpu"):
        m4.M4Solver(0.4, backend="cuda").partial_fit(s, y)


def test_balance_without_the_core_streams_in_torch(monkeypatch):
    s, y = _data()
    kw = dict(target=[0.35, 0.4], budget=0.6, eps_rep=0.05, eps_assoc=0.1, method="stream", seed=1)
    with_core = m4.balance(s, y, **kw)
    monkeypatch.setattr(_backend, "core", lambda: None)
    without = m4.balance(s, y, **kw)
    np.testing.assert_allclose(without.q, with_core.q, atol=1e-9)
    assert without.summary()["rb_after"] == pytest.approx(with_core.summary()["rb_after"], abs=1e-9)
    # Counts (and so the biases) have their torch reference too.
    assert m4.association_bias(s, y, without.q) == pytest.approx(without.ab_after, abs=1e-12)
    with pytest.raises(RuntimeError, match="method='exact' runs in the compiled core"):
        m4.balance(s, y, target=[0.35, 0.4], method="exact")
    # Without a method, the automatic choice streams instead of raising.
    auto = m4.balance(s, y, **{k: v for k, v in kw.items() if k != "method"})
    assert auto.method == "stream"
    np.testing.assert_allclose(auto.q, with_core.q, atol=1e-9)


@pytest.mark.parametrize("has_cuda,has_triton,want", [(True, True, "cuda"), (False, True, "triton"),
                                                      (False, False, "torch")])
def test_sinkhorn_on_cuda_takes_the_core_then_triton_then_torch(monkeypatch, has_cuda, has_triton, want):
    # The dispatch alone (no GPU needed): a CPU-only wheel on a GPU machine runs the Triton kernel.
    monkeypatch.delenv("PYM4_BACKEND", raising=False)
    monkeypatch.setattr(_backend, "core_has_cuda", lambda: has_cuda)
    monkeypatch.setattr(_backend, "_triton_importable", lambda: has_triton)
    assert _backend.choose("sinkhorn", "cuda") == want
    assert _backend.choose("sinkhorn_features", "cuda") == want
    # group=: the Triton kernel has no per-pass form, so the CUDA kernel's passes or torch's.
    assert _backend.choose("sinkhorn_distributed", "cuda") == ("cuda" if has_cuda else "torch")
    # The CPU never picks the interpreter by itself.
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert _backend.choose("sinkhorn", "cpu") == ("cpu" if _backend.core() is not None else "torch")
