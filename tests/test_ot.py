"""pym4.ot.sinkhorn and sinkhorn_ot's POT options, against POT itself (``ot``, the test extra).

POT is the reference here: the same call goes to both, and plans, log dicts, iteration
counts and warnings must agree. POT's own default solver (``method="sinkhorn"``) underflows at
small reg; the cases stay where it is exact.
"""
import inspect
import warnings

import numpy as np
import pytest
import torch

import pym4
from pym4 import ot

pot = pytest.importorskip("ot")


def problem(n=17, m=23, seed=0):
    rng = np.random.default_rng(seed)
    a, b = rng.random(n) + 0.1, rng.random(m) + 0.1
    return a / a.sum(), b / b.sum(), rng.random((n, m))


def test_from_pym4_import_ot_and_signature():
    import pym4 as p

    assert p.ot is ot
    assert str(inspect.signature(ot.sinkhorn)) == str(inspect.signature(pot.sinkhorn))


@pytest.mark.parametrize("method", ["sinkhorn", "sinkhorn_log"])
@pytest.mark.parametrize("reg", [0.5, 0.05, 0.02])
def test_plan_and_log_match_pot(method, reg):
    a, b, M = problem()
    want, want_log = pot.sinkhorn(a, b, M, reg, method=method, log=True)
    got, got_log = ot.sinkhorn(a, b, M, reg, method=method, log=True)
    assert isinstance(got, np.ndarray) and got.dtype == np.float64
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
    assert sorted(got_log) == sorted(want_log)
    assert got_log["niter"] == want_log["niter"]
    np.testing.assert_allclose(got_log["err"], want_log["err"], rtol=1e-6, atol=1e-15)
    for key in ("u", "v") + (("log_u", "log_v") if method == "sinkhorn_log" else ()):
        np.testing.assert_allclose(got_log[key], want_log[key], rtol=1e-9, atol=0, err_msg=key)


@pytest.mark.parametrize("method", ["sinkhorn", "sinkhorn_log"])
def test_fixed_iterations_warn_like_pot(method):
    a, b, M = problem()
    with pytest.warns(UserWarning, match="Sinkhorn did not converge") as record:
        got = ot.sinkhorn(a, b, M, 0.05, method=method, numItermax=7, stopThr=0)
    assert all(issubclass(w.category, pym4.ConvergenceWarning) for w in record)
    with pytest.warns(UserWarning, match="Sinkhorn did not converge"):
        want = pot.sinkhorn(a, b, M, 0.05, method=method, numItermax=7, stopThr=0)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-14)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ot.sinkhorn(a, b, M, 0.05, method=method, numItermax=7, stopThr=0, warn=False)


@pytest.mark.parametrize("method", ["sinkhorn", "sinkhorn_log"])
def test_warmstart_matches_pot(method):
    a, b, M = problem(seed=1)
    _, log0 = pot.sinkhorn(a, b, M, 0.05, log=True)
    warm = (np.log(log0["u"]) + 0.3, np.log(log0["v"]))  # near, not at, the fixed point
    want, want_log = pot.sinkhorn(a, b, M, 0.05, method=method, numItermax=4, stopThr=0, warn=False,
                                  warmstart=warm, log=True)
    got, got_log = ot.sinkhorn(a, b, M, 0.05, method=method, numItermax=4, stopThr=0, warn=False,
                               warmstart=warm, log=True)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-14)
    np.testing.assert_allclose(got_log["u"], want_log["u"], rtol=1e-10)
    # A warm start at the solution converges at the first check; a cold one needs more.
    _, log_warm = ot.sinkhorn(a, b, M, 0.05, warmstart=(np.log(log0["u"]), np.log(log0["v"])), log=True)
    assert log_warm["niter"] == 0 < log0["niter"]


@pytest.mark.parametrize("method", ["sinkhorn", "sinkhorn_log"])
def test_multiple_target_histograms_match_pot(method):
    a, b, M = problem(seed=2)
    rng = np.random.default_rng(3)
    b2 = rng.random(b.shape[0])
    B = np.stack([b, b2 / b2.sum()], axis=1)
    with warnings.catch_warnings():
        # POT 0.9.7's sinkhorn_log drops warn= when it loops over the histograms, so it warns anyway.
        warnings.simplefilter("ignore", UserWarning)
        want, want_log = pot.sinkhorn(a, B, M, 0.1, method=method, numItermax=30, stopThr=0, warn=False, log=True)
    got, got_log = ot.sinkhorn(a, B, M, 0.1, method=method, numItermax=30, stopThr=0, warn=False, log=True)
    assert got.shape == (2,)
    np.testing.assert_allclose(got, want, rtol=1e-12)
    # The log dicts differ by method (sinkhorn_log's keeps only the potentials): the same keys as POT's.
    assert sorted(got_log) == sorted(want_log)
    for key in ("u", "v") + (("log_u", "log_v") if method == "sinkhorn_log" else ()):
        np.testing.assert_allclose(got_log[key], want_log[key], rtol=1e-10, err_msg=key)
    # Each column is the single-histogram solve's cost <P_k, M>.
    for k in range(2):
        plan = ot.sinkhorn(a, B[:, k], M, 0.1, method=method, numItermax=30, stopThr=0, warn=False)
        assert abs(float((plan * M).sum()) - got[k]) < 1e-12


def test_float32_torch_in_torch_out():
    a, b, M = problem()
    # float32 cannot reach POT's default stopThr (1e-9): a float32 one.
    got = ot.sinkhorn(torch.tensor(a), torch.tensor(b), torch.tensor(M, dtype=torch.float32), 0.1, stopThr=1e-6)
    assert isinstance(got, torch.Tensor) and got.dtype == torch.float32
    want = pot.sinkhorn(a, b, M, 0.1)
    np.testing.assert_allclose(got.double().numpy(), want, rtol=0, atol=1e-6)


def test_uniform_marginals_when_empty():
    _, _, M = problem()
    np.testing.assert_allclose(ot.sinkhorn([], [], M, 0.1), pot.sinkhorn([], [], M, 0.1), rtol=0, atol=1e-14)


@pytest.mark.parametrize("kwargs,exc,match", [
    ({"method": "greenkhorn"}, ValueError, "method: pym4.ot.sinkhorn supports"),
    ({"tau": 1e3}, TypeError, "unexpected keyword"),
    ({"warmstart": (np.zeros(3), np.zeros(23))}, ValueError, r"warmstart: log_u must have shape \(17,\)"),
    ({"warmstart": np.zeros(17)}, TypeError, "warmstart: expected a pair"),
    ({"warmstart": (np.full(17, -np.inf), np.zeros(23))}, ValueError,
     r"warmstart: log_u is -inf in every row \(no mass anywhere\)"),
    ({"reg": 0.0}, ValueError, "reg: must be a positive"),
])
def test_bad_input(kwargs, exc, match):
    a, b, M = problem()
    args = {"reg": 0.1, **kwargs}
    with pytest.raises(exc, match=match):
        ot.sinkhorn(a, b, M, **args)


# ----- sinkhorn_ot's own spelling of the same options ----------------------------------------

def test_a_warm_start_with_some_rows_at_minus_inf_still_solves():
    """-inf in log_u marks rows without mass (POT's log_u for a_i = 0); the others carry the
    first column step, and the solve ends at POT's plan."""
    a, b, M = problem()
    _, log0 = pot.sinkhorn(a, b, M, 0.1, log=True)
    log_u = np.log(log0["u"])
    log_u[[0, 5]] = -np.inf
    got = ot.sinkhorn(a, b, M, 0.1, warmstart=(log_u, np.log(log0["v"])))
    np.testing.assert_allclose(got, pot.sinkhorn(a, b, M, 0.1), rtol=0, atol=1e-9)


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_sinkhorn_ot_log_multi_b_and_warmstart(backend):
    a, b, M = problem(seed=4)
    plan, log = pym4.sinkhorn_ot(a, b, M, 0.05, tol=1e-11, log=True, backend=backend)
    want = pot.sinkhorn(a, b, M, 0.05, stopThr=1e-11)
    np.testing.assert_allclose(plan, want, rtol=0, atol=1e-11)
    assert set(log) == {"err", "niter", "u", "v", "log_u", "log_v"}
    # The scalings reproduce the plan: P = diag(u) exp(-M/reg) diag(v).
    np.testing.assert_allclose(log["u"][:, None] * np.exp(-M / 0.05) * log["v"][None, :], plan, rtol=1e-9)
    assert log["err"][-1] < 1e-11 and log["niter"] == len(log["err"]) - 1  # measured every iteration
    costs = pym4.sinkhorn_ot(a, np.stack([b, b], 1), M, 0.05, tol=1e-11, backend=backend)
    np.testing.assert_allclose(costs, [(plan * M).sum()] * 2, rtol=1e-9)
    _, warm_log = pym4.sinkhorn_ot(a, b, M, 0.05, tol=1e-11, log=True, backend=backend,
                                   warmstart=(log["log_u"], log["log_v"]))
    assert warm_log["niter"] < log["niter"]
