"""M4 data balancing: the exact solver against cvxpy (CLARABEL), the streaming solver against
the exact objective and a plain numpy implementation of its update, metrics, errors."""
import warnings

import numpy as np
import pytest
import torch

from pym4 import m4
from references import m4_stream  # the streaming update written out in numpy


def make_data(n, m=2, c=8, seed=0, utility=False, prev=(0.3, 0.45), coupling=0.4):
    """Overlapping groups tied to a latent factor; labels associated with the groups."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=n)
    p = np.linspace(prev[0], prev[1], m)
    s = (rng.random((n, m)) < p * (1 + 0.5 * np.tanh(z))[:, None]).astype(np.uint8)
    base = rng.uniform(0.05, 0.4, size=c)
    logit = np.log(base / (1 - base)) + s @ rng.normal(scale=coupling, size=(m, c))
    y = (rng.random((n, c)) < 1 / (1 + np.exp(-logit))).astype(np.uint8)
    u = rng.normal(scale=0.1, size=n) if utility else None
    return s, y, u


def bias_matrix(s, y, pi):
    """A (N, m (c + 1)): column k (c+1) is s_k - pi_k, column k (c+1) + 1 + r is (s_k - pi_k) y_r."""
    d = s.astype(np.float64) - pi
    blocks = []
    for k in range(s.shape[1]):
        blocks.append(d[:, [k]])
        blocks.append(d[:, [k]] * y)
    return np.concatenate(blocks, axis=1)


def bounds(m, c, eta, er, ea):
    return eta * np.tile(np.r_[er, np.full(c, ea)], m)


def cvxpy_solve(s, y, u, pi, eta, er, ea):
    cp = pytest.importorskip("cvxpy")
    n = s.shape[0]
    A = bias_matrix(s, y, pi)
    q = cp.Variable(n)
    uu = np.zeros(n) if u is None else u
    lim = bounds(s.shape[1], y.shape[1], eta, er, ea)
    prob = cp.Problem(cp.Minimize((0.5 * cp.sum_squares(q - eta) - uu @ q) / n),
                      [cp.sum(q) / n == eta, cp.abs(A.T @ q / n) <= lim, q >= 0, q <= 1])
    prob.solve(solver="CLARABEL")
    return prob.status, prob.value, q.value


def objective(q, u, eta):
    return float(np.mean(0.5 * (q - eta) ** 2 - (0.0 if u is None else u) * q))


CASES = [  # n, m, c, eta, eps_rep, eps_assoc, utility, seed
    (3000, 1, 0, 0.8, 0.01, 0.01, False, 1),
    (4000, 2, 8, 0.5, 0.01, 0.01, False, 2),
    (4000, 2, 8, 0.5, 0.01, 0.01, True, 3),
    (3000, 4, 5, 0.6, 0.02, 0.03, True, 4),
    (2500, 3, 32, 0.6, 0.01, 0.05, False, 5),
    (20000, 2, 32, 0.7, 0.01, 0.05, True, 6),
    (3000, 2, 8, 0.9, 0.01, 0.01, False, 7),   # budget too high for the constraints: infeasible
    (3000, 4, 5, 0.7, 0.0, 0.0, True, 8),      # exact balance with 4 overlapping groups
]


@pytest.mark.parametrize("n,m,c,eta,er,ea,util,seed", CASES)
def test_exact_matches_cvxpy(n, m, c, eta, er, ea, util, seed):
    s, y, u = make_data(n, m, c, seed, util)
    # One group: the default target is its own share, so ask for another one.
    pi = np.full(m, s.mean(axis=0).mean()) if m > 1 else np.array([0.45])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = m4.balance(s, y, target=None if m > 1 else 0.45, budget=eta, eps_rep=er, eps_assoc=ea, utility=u)
    status, value, _ = cvxpy_solve(s, y, u, pi, eta, er, ea)
    assert status in ("optimal", "infeasible")
    assert res.status == status, res.message
    # A status other than "optimal" is also a RuntimeWarning; an optimal solve is silent.
    assert [str(w.message) for w in caught if w.category is RuntimeWarning] == \
        ([] if status == "optimal" else [f"pym4.m4.balance: {res.message}"])
    if status == "infeasible":
        assert res.infeasible_constraints and "infeasible" in res.message
        return
    q = res.q
    assert q.shape == (n,) and q.dtype == np.float64
    assert q.min() >= 0 and q.max() <= 1
    assert abs(q.mean() - eta) <= 1e-6
    viol = np.abs(bias_matrix(s, y, pi).T @ q / n) - bounds(m, c, eta, er, ea)
    assert viol.max() <= 1e-6
    assert abs(objective(q, u, eta) - value) <= 1e-4 * abs(value) + 1e-12
    # q is the closed form of the returned duals.
    w = (res.v_plus - res.v_minus).reshape(-1)
    closed = np.clip(eta + (0 if u is None else u) - bias_matrix(s, y, pi) @ w - res.mu, 0, 1)
    np.testing.assert_allclose(q, closed, atol=1e-9)
    assert res.rb_after <= er + 1e-6


def test_infeasible_empty_group_is_named():
    s, y, _ = make_data(2000, 3, 4, 10)
    s[:, 2] = 0
    with pytest.warns(RuntimeWarning, match="infeasible"):
        res = m4.balance(s, y, target=[0.3, 0.3, 0.3], budget=0.5, group_names=["a", "b", "nobody"])
    assert res.status == "infeasible"
    assert "representation[nobody]" in res.infeasible_constraints
    assert "nobody" in res.message and "no example" in res.message
    status, _, _ = cvxpy_solve(s, y, None, np.full(3, 0.3), 0.5, 0.01, 0.01)
    assert status == "infeasible"


def test_max_iter_is_reported_and_warned():
    s, y, u = make_data(3000, 4, 5, 8, True)
    with pytest.warns(RuntimeWarning, match="max_iter=1"):
        res = m4.balance(s, y, budget=0.7, eps_rep=0.0, eps_assoc=0.0, utility=u, max_iter=1)
    assert res.status == "max_iter" and res.iterations == 1
    # The reported violation is the one of q, measured here independently. The budget's dual
    # is a Newton variable like the others, so a stopped solve can miss the budget too.
    viol = max(np.abs(bias_matrix(s, y, res.target).T @ res.q / 3000).max(), abs(res.q.mean() - 0.7))
    assert res.max_violation == pytest.approx(viol, rel=1e-9) and viol > 1e-6
    assert res.message.startswith("exact: stopped at max_iter=1 iterations short of the tolerance")


def test_a_solve_that_stops_before_max_iter_says_so(monkeypatch):
    """The exact solve can stop with no further progress before max_iter: it said "stopped
    at max_iter=14 ... raise max_iter" with max_iter=100. A utility of +-1e10 centred at its
    midrange (the rule center_utility had before it centred at the budget's mu) starts it
    with every q pinned, where it has no step to take."""
    from pym4.m4 import _balance

    def midrange(u, budget, clamp=None):
        shift = float(u.min()) / 2 + float(u.max()) / 2
        return u - shift, shift, None

    monkeypatch.setattr(_balance, "center_utility", midrange)
    s = np.random.default_rng(0).random((200, 2)) < 0.4
    with pytest.warns(RuntimeWarning):
        res = m4.balance(s, utility=np.where(np.arange(200) % 2 == 0, 1e10, -1e10), eps_rep=0.5, max_iter=100)
    assert res.status == "max_iter" and res.iterations < 100
    assert f"stopped after {res.iterations} of max_iter=100 iterations, making no further progress" in res.message
    assert "raise max_iter" not in res.message


@pytest.mark.parametrize("indices,indptr,match", [
    ([0, 1, 7, 2], [0, 1, 2, 3, 4], r"indices must be in \[0, 3\)"),
    ([0, 1, -2, 2], [0, 1, 2, 3, 4], r"indices must be in \[0, 3\)"),
    ([0, 1, 1, 2], [0, 2, 1, 3, 4], "inconsistent indptr"),
])
def test_sparse_labels_out_of_range_rejected(indices, indptr, match):
    # scipy accepts these raw CSR arrays unchecked; the core used to index with them (segfault).
    sp = pytest.importorskip("scipy.sparse")
    y = sp.csr_matrix((np.ones(4), np.array(indices), np.array(indptr)), shape=(4, 3))
    s = np.array([[1, 0], [0, 1], [1, 1], [0, 0]], np.uint8)
    with pytest.raises(ValueError, match=match):
        m4.association_bias(s, y)
    with pytest.raises(ValueError, match=match):
        m4.balance(s, y, target=0.4)


def test_sparse_labels_match_dense():
    sp = pytest.importorskip("scipy.sparse")
    s, y, u = make_data(3000, 2, 200, 11, True, coupling=0.2)
    dense = m4.balance(s, y, budget=0.6, eps_rep=0.02, eps_assoc=0.05, utility=u)
    sparse = m4.balance(s, sp.csr_matrix(y), budget=0.6, eps_rep=0.02, eps_assoc=0.05, utility=u)
    assert dense.status == sparse.status == "optimal"
    np.testing.assert_allclose(sparse.q, dense.q, atol=1e-8)
    # c = 200 > the dense-row limit: dense input went through index lists too; check constraints directly.
    pi = dense.target
    viol = np.abs(bias_matrix(s, y, pi).T @ dense.q / 3000) - bounds(2, 200, 0.6, 0.02, 0.05)
    assert viol.max() <= 1e-6


@pytest.mark.slow
def test_stream_one_pass_million():
    n = 1_000_000
    s, y, u = make_data(n, 2, 32, 12, coupling=0.6)
    kw = dict(budget=0.7, eps_rep=0.01, eps_assoc=0.05)
    exact = m4.balance(s, y, **kw)
    assert exact.status == "optimal"
    stream = m4.balance(s, y, method="stream", seed=0, **kw)
    assert stream.status == "optimal", stream.message
    pi = exact.target
    # Constraint values computed here from q, independently of the solver's report.
    q = stream.q
    A_q = np.empty(2 * 33)
    d = s.astype(np.float64) - pi
    for k in range(2):
        A_q[k * 33] = d[:, k] @ q / n
        A_q[k * 33 + 1:(k + 1) * 33] = (q * d[:, k]) @ y / n
    lim = bounds(2, 32, 0.7, 0.01, 0.05)
    assert np.all(np.abs(A_q) <= 2 * lim)            # within their tolerance once more
    assert abs(q.mean() - 0.7) <= 0.01 * 0.7
    assert abs(stream.objective - exact.objective) <= 0.02 * exact.objective


def test_stream_seed_reproducible():
    s, y, u = make_data(20000, 2, 8, 13, True)
    with warnings.catch_warnings():  # the pass alone is not within tolerance here ("approximate")
        warnings.simplefilter("ignore", RuntimeWarning)
        a = m4.balance(s, y, budget=0.6, method="stream", seed=5, utility=u, refine=0)
        b = m4.balance(s, y, budget=0.6, method="stream", seed=5, utility=u, refine=0)
        c = m4.balance(s, y, budget=0.6, method="stream", seed=6, utility=u, refine=0)
    np.testing.assert_array_equal(a.q, b.q)
    assert np.abs(a.q - c.q).max() > 1e-6
    # The Newton passes after the stream's pass take both orders close to the same optimum
    # (up to the remainder of two Newton steps), far closer than the passes alone.
    ra = m4.balance(s, y, budget=0.6, method="stream", seed=5, utility=u)
    rc = m4.balance(s, y, budget=0.6, method="stream", seed=6, utility=u)
    assert ra.status == rc.status == "optimal"
    assert np.abs(ra.q - rc.q).max() <= 1e-5 < np.abs(a.q - c.q).max()


def test_solver_matches_numpy_update_and_resumes():
    s, y, u = make_data(5000, 3, 6, 14, True)
    pi = np.array([0.3, 0.35, 0.4])
    kw = dict(budget=0.6, eps_rep=0.01, eps_assoc=0.02, lr=0.1, gamma=3.0, batch_size=64)
    one = m4.M4Solver(pi, **kw).partial_fit(s, y, u)
    vp, vm, avg, amu = m4_stream(s, y, pi, 0.6, 0.01, 0.02, lr=0.1, gamma=3.0, batch=64, utility=u)
    np.testing.assert_allclose(one.state.v_plus, vp, atol=1e-9)
    np.testing.assert_allclose(one.state.v_minus, vm, atol=1e-9)
    np.testing.assert_allclose(one.v_plus.reshape(-1) - one.v_minus.reshape(-1), avg, atol=1e-9)
    assert one.mu == pytest.approx(amu, abs=1e-9)
    # Chunks that are multiples of batch_size, with a checkpoint in the middle, give the same state.
    first = m4.M4Solver(pi, **kw).partial_fit(s[:1280], y[:1280], u[:1280])
    resumed = m4.M4Solver(0.5).load_state_dict(first.state_dict())
    resumed.partial_fit(s[1280:], y[1280:], u[1280:])
    np.testing.assert_allclose(resumed.state.avg_w, one.state.avg_w, atol=1e-12)
    assert resumed.n_seen == 5000 and resumed.steps == one.steps
    # keep_probability is the closed form of the averaged duals.
    q = resumed.keep_probability(s, y, u)
    np.testing.assert_allclose(q, np.clip(0.6 + u - bias_matrix(s, y, pi) @ avg - amu, 0, 1), atol=1e-8)
    qt = resumed.keep_probability(torch.from_numpy(s), torch.from_numpy(y), torch.from_numpy(u))
    assert isinstance(qt, torch.Tensor)
    np.testing.assert_allclose(qt.numpy(), q)


def test_torch_path_matches_core():
    s, y, u = make_data(3000, 2, 5, 15, True)
    pi = np.array([0.35, 0.4])
    a = m4.M4Solver(pi, budget=0.6, batch_size=100).partial_fit(s, y, u)
    b = m4.M4Solver(pi, budget=0.6, batch_size=100, backend="torch")
    b.partial_fit(torch.from_numpy(s), torch.from_numpy(y), torch.from_numpy(u))
    np.testing.assert_allclose(b.state.avg_w, a.state.avg_w, atol=1e-9)
    np.testing.assert_allclose(b.state.scalars(), a.state.scalars(), atol=1e-9)


@pytest.mark.parametrize("y_rows,u_len,match", [(2999, 3000, "y: expected 3000 rows"),
                                                 (3000, 1, r"utility: expected shape \(3000,\)")])
def test_torch_path_checks_shapes(y_rows, u_len, match):
    # The device path hands raw pointers to the CUDA kernel: short y or u must fail first.
    s, y, u = make_data(3000, 2, 5, 15, True)
    solver = m4.M4Solver([0.35, 0.4], budget=0.6, batch_size=100, backend="torch")
    with pytest.raises(ValueError, match=match):
        solver.partial_fit(torch.from_numpy(s), torch.from_numpy(y[:y_rows]), torch.from_numpy(u[:u_len]))


def test_metrics_against_numpy():
    s, y, _ = make_data(4000, 3, 7, 16)
    w = np.random.default_rng(0).random(4000)
    pi = np.array([0.2, 0.3, 0.4])
    shares = (w @ s) / w.sum()
    assert m4.representation_bias(s, w, pi) == pytest.approx(np.abs(shares - pi).max(), abs=1e-12)
    best = 0.0
    for k in range(3):
        g1, g0 = s[:, k] == 1, s[:, k] == 0
        p1 = (w[g1] @ y[g1]) / w[g1].sum()
        p0 = (w[g0] @ y[g0]) / w[g0].sum()
        best = max(best, np.abs(p1 - p0).max())
    assert m4.association_bias(s, y, w) == pytest.approx(best, abs=1e-12)
    uniform = np.abs(s.mean(0) - s.mean(0).mean()).max()
    assert m4.representation_bias(torch.from_numpy(s)) == pytest.approx(uniform, abs=1e-12)


def test_balance_reduces_bias_and_returns_tensors():
    s, y, _ = make_data(5000, 2, 6, 17, coupling=0.8)
    res = m4.balance(torch.from_numpy(s).bool(), torch.from_numpy(y).float(), budget=0.6, eps_assoc=0.01)
    assert res.status == "optimal"
    assert isinstance(res.q, torch.Tensor)
    assert res.rb_after < res.rb_before and res.ab_after < res.ab_before
    summary = res.summary()
    assert summary["status"] == "optimal" and summary["kept_fraction"] == pytest.approx(0.6)


def test_sample():
    q = np.linspace(0, 1, 100000)
    a, b = m4.sample(q, seed=3), m4.sample(q, seed=3)
    np.testing.assert_array_equal(a, b)
    assert a.dtype == bool and not a[0] and a[-1]
    assert abs(a.mean() - 0.5) < 0.01
    t = m4.sample(torch.from_numpy(q), seed=3)
    assert isinstance(t, torch.Tensor) and bool((t.numpy() == a).all())
    with pytest.raises(ValueError, match="q: probabilities"):
        m4.sample(np.array([0.5, 1.5]))


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(s=np.array([[0, 2], [1, 0]])), ValueError, r"s: values must be 0 or 1"),
    (dict(s=np.array([[0.0, np.nan], [1, 0]])), ValueError, r"s: column 1 has missing values"),
    (dict(y=np.ones((3, 2))), ValueError, r"y: expected 2 rows"),
    (dict(target=1.5), ValueError, r"target: proportions must be in \(0, 1\)"),
    (dict(target=[0.2, 0.3, 0.4]), ValueError, r"target: expected a scalar or 2 proportions"),
    (dict(budget=0.0), ValueError, r"budget: must be in"),
    (dict(eps_rep=-1), ValueError, r"eps_rep: must be in"),
    (dict(method="fast"), ValueError, r"method: expected"),
    (dict(shuffle="no"), TypeError, r"shuffle: expected True or False, got 'no'"),
    (dict(group_names=["a", "a"]), ValueError, r"group_names: 'a' names two groups"),  # the report merged them
    (dict(group_names="ab"), TypeError, r"group_names: expected a sequence of 2 names, got the str 'ab'"),
    (dict(utility=np.array([np.inf, 0.0])), ValueError, r"utility: contains NaN or Inf"),
    (dict(s="abc"), TypeError, r"s: expected a numpy array or a torch tensor"),
])
def test_bad_input(kwargs, exc, match):
    args = dict(s=np.array([[0, 1], [1, 0]]), y=np.array([[1], [0]]))
    args.update(kwargs)
    s, y = args.pop("s"), args.pop("y")
    with pytest.raises(exc, match=match):
        m4.balance(s, y, **args)


def test_solver_rejects_shape_change():
    solver = m4.M4Solver(0.4).partial_fit(np.eye(2, dtype=np.uint8), np.ones((2, 3)))
    with pytest.raises(ValueError, match="m=2 groups and c=3 labels"):
        solver.partial_fit(np.eye(2, dtype=np.uint8), np.ones((2, 4)))
    with pytest.raises(RuntimeError, match="partial_fit"):
        m4.M4Solver(0.4).keep_probability(np.eye(2))

def test_solver_checks_its_target_when_built():
    """A target of 1.5 or [0.2, 1.2] was accepted by the constructor and refused only at
    the first partial_fit, far from the line that passed it."""
    for bad, exc in ((1.5, ValueError), ([0.2, 1.2], ValueError), ("a", TypeError), (float("nan"), ValueError)):
        with pytest.raises(exc, match="^target: "):
            m4.M4Solver(bad)
    solver = m4.M4Solver(torch.tensor([0.3, 0.4]))  # its length is checked against the data's groups
    with pytest.raises(ValueError, match=r"target: expected a scalar or 3 proportions"):
        solver.partial_fit(np.eye(3, dtype=np.uint8))


def _distributed_worker(rank, world, init, s, y, u, out_dir):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        solver = m4.M4Solver([0.35, 0.4], budget=0.6, batch_size=50, group=dist.group.WORLD)
        # Rank r holds rows r*50 .. r*50+49 of every block of 100: its i-th mini-batch is
        # its half of the i-th global mini-batch of 100.
        idx = np.concatenate([np.arange(b + rank * 50, b + rank * 50 + 50) for b in range(0, len(s), 100)])
        mine = idx[:1950 - rank * 100]  # unequal shards
        solver.partial_fit(s[mine], y[mine], None if u is None else u[mine])
        np.save(f"{out_dir}/rank{rank}.npy", np.r_[solver.state.avg_w, solver.state.scalars()])
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
@pytest.mark.parametrize("with_utility", [False, True])
def test_two_process_gloo_matches_single(tmp_path, with_utility):
    """With a utility (offset by 100), the ranks start mu where the budget holds on the
    union of their first mini-batches: the single process's start on its first one."""
    import torch.multiprocessing as mp
    s, y, u = make_data(4000, 2, 5, 18, with_utility)
    u = None if u is None else u + 100.0
    mp.spawn(_distributed_worker, args=(2, f"file://{tmp_path}/init", s, y, u, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = np.load(tmp_path / "rank0.npy"), np.load(tmp_path / "rank1.npy")
    np.testing.assert_array_equal(r0, r1)
    # Single process: the same global mini-batches (rank 0's part then rank 1's part).
    parts = []
    for j in range(39):
        b = j * 100
        parts.append(np.arange(b, b + 50))
        if (j + 1) * 50 <= 1850:
            parts.append(np.arange(b + 50, b + 100))
    # rank 0 holds 1950 rows (39 batches of 50), rank 1 holds 1850 (37 batches): the last two
    # global mini-batches contain rank 0's rows only.
    single = m4.M4Solver([0.35, 0.4], budget=0.6, batch_size=100)
    for part in parts_by_batch(parts):
        single.partial_fit(s[part], y[part], None if u is None else u[part])
    np.testing.assert_allclose(r0, np.r_[single.state.avg_w, single.state.scalars()], atol=1e-10)
    if u is not None:  # mu is near the offset, not where a start at 0 leaves it after one pass
        assert abs(single.mu - 100.0) < 1.0


def parts_by_batch(parts):
    """Group the index runs into the global mini-batches (one partial_fit call each)."""
    batches, cur = [], []
    for run in parts:
        if cur and run[0] // 100 != cur[0][0] // 100:
            batches.append(np.concatenate(cur))
            cur = []
        cur.append(run)
    batches.append(np.concatenate(cur))
    return batches


@pytest.mark.gpu
@pytest.mark.memcheck
def test_cuda_stream_and_keep_probability_match_cpu():
    s, y, u = make_data(5000, 2, 32, 19, True)
    cpu = m4.M4Solver([0.35, 0.4], budget=0.6, batch_size=256).partial_fit(s, y, u)
    gpu = m4.M4Solver([0.35, 0.4], budget=0.6, batch_size=256)
    dev = torch.device("cuda")
    gpu.partial_fit(torch.from_numpy(s).to(dev), torch.from_numpy(y).to(dev), torch.from_numpy(u).to(dev))
    np.testing.assert_allclose(gpu.state.avg_w, cpu.state.avg_w, atol=1e-8)
    np.testing.assert_allclose(gpu.state.scalars(), cpu.state.scalars(), atol=1e-8)
    q_gpu = gpu.keep_probability(torch.from_numpy(s).to(dev), torch.from_numpy(y).to(dev), torch.from_numpy(u).to(dev))
    assert q_gpu.device.type == "cuda"
    np.testing.assert_allclose(q_gpu.cpu().numpy(), cpu.keep_probability(s, y, u), atol=1e-8)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.bool, torch.float32, torch.float64])
def test_rows_for_the_cuda_kernel_come_straight_in_its_layout(dtype):
    # The kernel's rows (contiguous uint8 s and y) from the values as given, with the same
    # checks as the torch path's float64 rows: no float64 copy on the way (8 bytes per entry).
    from pym4.m4 import _device

    s, y, u = make_data(300, 2, 5, 3, True)
    st, yt = torch.from_numpy(s).to(dtype), torch.from_numpy(y).to(dtype).t().contiguous().t()  # y column-major
    s8, y8, u8 = _device.as_rows(st, yt, torch.from_numpy(u), torch.device("cpu"), for_kernel=True)
    assert s8.dtype == y8.dtype == torch.uint8 and s8.is_contiguous() and y8.is_contiguous()
    assert np.array_equal(s8.numpy(), s.astype(np.uint8)) and np.array_equal(y8.numpy(), y.astype(np.uint8))
    assert u8.dtype == torch.float64 and np.array_equal(u8.numpy(), u)
    s64, y64, _ = _device.as_rows(st, yt, None, torch.device("cpu"))
    assert s64.dtype == y64.dtype == torch.float64 and np.array_equal(s64.numpy(), s.astype(np.float64))
    if dtype.is_floating_point:
        bad = yt.clone()
        bad[7, 1] = 0.5
        for for_kernel in (False, True):
            with pytest.raises(ValueError, match=r"^y: values must be 0 or 1"):
                _device.as_rows(st, bad, None, torch.device("cpu"), for_kernel=for_kernel)
