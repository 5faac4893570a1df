"""GPU tests of the CUDA Sinkhorn kernel (kernels/cuda/sinkhorn.cu), backend="cuda".

References are written here from the formulas, in float64 torch: SwAV's
``distributed_sinkhorn`` (Caron et al. 2020, one process) and the fixed-iteration
Sinkhorn-Knopp scaling of entropic OT (Cuturi 2013). Every test is marked ``gpu`` and is
skipped where no GPU is present; nothing here touches the GPU at import.
"""
import math

import pytest
import torch

import pym4
from pym4 import _backend
from references import swav_sinkhorn
from test_sinkhorn_vs_swav import swav_distributed_sinkhorn

pytestmark = pytest.mark.gpu
# The small cases that gpu_check.sh runs again under compute-sanitizer (memcheck, racecheck):
# every kernel of the launcher and of the group= passes, each launch path, shared memory and not.
MEMCHECK = pytest.mark.memcheck

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# (rtol, atol, row-sum tolerance): float32 math inside; half-precision outputs are rounded
# to 11 (float16) or 8 (bfloat16) significant bits, float16 subnormals below 6e-5.
TOLERANCES = {
    torch.float32: (5e-4, 1e-8, 1e-4),
    torch.float16: (3e-3, 1e-7, 2e-3),
    torch.bfloat16: (1.6e-2, 1e-7, 1e-2),
}


@pytest.fixture(autouse=True)
def _cuda_core():
    if not _backend.core_has_cuda():
        pytest.skip("pym4 core built without CUDA (build with PYM4_CUDA=ON)")


def ot_sinkhorn_reference(cost: torch.Tensor, reg: float, a: torch.Tensor, b: torch.Tensor, n_iters: int):
    """Fixed-iteration Sinkhorn-Knopp in float64: P = exp(-C/reg), then n_iters times scale
    columns to b (zero-mass columns to 0), then rows to a."""
    c = cost.double()
    p = torch.exp(-(c - c.min()) / reg)
    for _ in range(n_iters):
        col = p.sum(dim=0)
        p *= torch.where(b > 0, b / col, torch.zeros_like(b))
        p *= (a / p.sum(dim=1))[:, None]
    return p


def make_scores(b: int, k: int, dtype=torch.float32, seed: int = 0) -> torch.Tensor:
    """Scores spread over [-1, 1] (harder than cosine similarities of random features)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    return (2 * torch.rand(b, k, device="cuda", generator=g) - 1).to(dtype)


def assert_matches_reference(out: torch.Tensor, x: torch.Tensor, epsilon: float, n_iters: int):
    rtol, atol, row_tol = TOLERANCES[x.dtype]
    assert out.dtype == x.dtype and out.device == x.device and out.shape == x.shape
    assert bool(torch.isfinite(out).all())
    ref = swav_sinkhorn(x, epsilon, n_iters)
    torch.testing.assert_close(out.double(), ref, rtol=rtol, atol=atol)
    torch.testing.assert_close(out.double().sum(dim=1), torch.ones(x.shape[0], dtype=torch.float64, device="cuda"),
                               rtol=0, atol=row_tol)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("b,k,epsilon,n_iters", [
    (1, 1, 0.05, 3),
    pytest.param(7, 5, 0.05, 3, marks=MEMCHECK),
    pytest.param(64, 3000, 0.05, 3, marks=MEMCHECK),
    pytest.param(16, 16000, 0.03, 10, marks=MEMCHECK),   # SEER per-GPU shape
    (4096, 3000, 0.05, 3),
    (16384, 3000, 0.05, 3),  # the multi-launch path
])
def test_matches_swav_reference(b, k, epsilon, n_iters, dtype):
    x = make_scores(b, k, dtype)
    out = pym4.sinkhorn(x, epsilon=epsilon, n_iters=n_iters, backend="cuda")
    assert_matches_reference(out, x, epsilon, n_iters)


@pytest.mark.parametrize("path", ["fused", "multi"])
@pytest.mark.parametrize("b,k,epsilon,n_iters", [
    (1, 3000, 0.05, 3),
    pytest.param(7, 5, 0.05, 3, marks=MEMCHECK),
    pytest.param(517, 129, 0.05, 4, marks=MEMCHECK),
    (64, 3000, 0.05, 3),
    (16, 16000, 0.03, 10),
    pytest.param(2000, 700, 0.05, 3, marks=MEMCHECK),    # > 32 parts: block-wide combine of the partials
    pytest.param(64, 6000, 0.05, 3, marks=MEMCHECK),     # dynamic shared memory just under 48 KB next to the static part
])
def test_both_launch_paths(b, k, epsilon, n_iters, path, monkeypatch):
    monkeypatch.setenv("PYM4_SINKHORN_CUDA_PATH", path)
    x = make_scores(b, k)
    out = pym4.sinkhorn(x, epsilon=epsilon, n_iters=n_iters, backend="cuda")
    assert_matches_reference(out, x, epsilon, n_iters)


def test_unknown_path_override_raises(monkeypatch):
    monkeypatch.setenv("PYM4_SINKHORN_CUDA_PATH", "bogus")
    with pytest.raises(ValueError, match="PYM4_SINKHORN_CUDA_PATH"):
        pym4.sinkhorn(make_scores(4, 4), backend="cuda")


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("b,k", [pytest.param(256, 3000, marks=MEMCHECK), (4096, 3000)])
def test_epsilon_001(b, k, dtype):
    # exp(1/0.01) = e^100 overflows float32: only the log-domain iteration stays finite.
    x = make_scores(b, k, dtype, seed=1)
    out = pym4.sinkhorn(x, epsilon=0.01, n_iters=3, backend="cuda")
    assert_matches_reference(out, x, 0.01, 3)


@pytest.mark.parametrize("b,k", [pytest.param(8, 40000, marks=MEMCHECK), (520, 40000)])
def test_many_prototypes_without_shared_memory(b, k):
    # 8 bytes per column exceed every GPU's per-block shared memory at K = 40000, so the
    # column accumulators live in the workspace; (520, K) also has > 32 parts.
    x = make_scores(b, k, seed=2)
    for path in ("fused", "multi"):
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("PYM4_SINKHORN_CUDA_PATH", path)
            out = pym4.sinkhorn(x, epsilon=0.05, n_iters=3, backend="cuda")
        assert_matches_reference(out, x, 0.05, 3)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@MEMCHECK
def test_non_finite_scores_raise(bad, dtype):
    x = make_scores(300, 129, dtype)
    x[217, 77] = bad
    with pytest.raises(ValueError, match="NaN or Inf"):
        pym4.sinkhorn(x, backend="cuda")


def test_overflow_once_divided_by_epsilon_raises():
    x = torch.full((16, 8), 1e4, device="cuda")
    with pytest.raises(ValueError, match="NaN or Inf"):
        pym4.sinkhorn(x, epsilon=1e-35, backend="cuda")  # 1e4 / 1e-35 overflows float32


@MEMCHECK
def test_row_strided_input():
    base = make_scores(64, 3007, seed=3)
    x = base[:, :3000]
    assert x.stride() == (3007, 1)
    out = pym4.sinkhorn(x, backend="cuda")
    assert_matches_reference(out, x, 0.05, 3)
    # Same values, same launch: bit-identical to the contiguous copy.
    assert torch.equal(out, pym4.sinkhorn(x.contiguous(), backend="cuda"))


@MEMCHECK
def test_broadcast_rows_input():
    row = make_scores(1, 3000, seed=4)
    x = row.expand(64, 3000)  # row stride 0
    out = pym4.sinkhorn(x, backend="cuda")
    assert_matches_reference(out, x, 0.05, 3)


def test_deterministic():
    x = make_scores(4096, 3000, torch.bfloat16, seed=5)
    assert torch.equal(pym4.sinkhorn(x, backend="cuda"), pym4.sinkhorn(x, backend="cuda"))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_out_is_written_by_the_kernel_itself(dtype, monkeypatch):
    # out= is a training loop's reused buffer: the kernel writes the codes there (it once
    # solved into a fresh result and copied it over).
    x = make_scores(300, 129, dtype, seed=8)
    out = torch.full_like(x, float("nan"))
    core = _backend.core()
    real, written_to = core.sinkhorn_solve_cuda, []
    monkeypatch.setattr(core, "sinkhorn_solve_cuda", lambda *a: written_to.append(a[10]) or real(*a))
    q = pym4.sinkhorn(x, 0.05, 3, out=out, backend="cuda")
    assert q is out and written_to == [out.data_ptr()]
    assert_matches_reference(out, x, 0.05, 3)


@MEMCHECK
def test_float64_input_comes_back_float64():
    x = make_scores(33, 65).double()
    out = pym4.sinkhorn(x, backend="cuda")
    assert out.dtype == torch.float64 and out.device == x.device
    torch.testing.assert_close(out, swav_sinkhorn(x, 0.05, 3), rtol=5e-4, atol=1e-8)


def test_runs_on_callers_stream():
    # The input is only written on stream s after a long sleep there. A kernel queued on any
    # other stream would read the zeros instead and return the uniform plan.
    src = make_scores(64, 3000, seed=6)
    torch.cuda.synchronize()
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        x = torch.zeros_like(src)
        s.synchronize()
        torch.cuda._sleep(100_000_000)  # ~50 ms of GPU time on s
        x.copy_(src)
        out = pym4.sinkhorn(x, backend="cuda")
        out_copy = out.clone()
    s.synchronize()
    assert_matches_reference(out_copy, src, 0.05, 3)


@MEMCHECK
def test_general_marginals_through_the_launcher():
    # Entropic OT (alpha = -1/reg) with non-uniform column marginals, one of them zero,
    # straight through the launcher contract (log_b device pointer, log_a scalar).
    core = _backend.core()
    g = torch.Generator(device="cuda").manual_seed(7)
    n, m, reg, n_iters = 50, 37, 0.1, 20
    cost = torch.rand(n, m, device="cuda", generator=g)
    b = torch.rand(m, device="cuda", generator=g, dtype=torch.float64) + 0.1
    b[3] = 0.0
    b /= b.sum()
    log_b = torch.log(b).contiguous()
    out = torch.empty_like(cost)
    workspace = torch.empty(core.sinkhorn_workspace_bytes_cuda(n, m), dtype=torch.uint8, device="cuda")
    flag = torch.zeros(1, dtype=torch.int32, device="cuda")
    core.sinkhorn_solve_cuda(cost.data_ptr(), 0, n, m, cost.stride(0), -1.0 / reg, log_b.data_ptr(), -math.log(n),
                             n_iters, 0.0, out.data_ptr(), workspace.data_ptr(), flag.data_ptr(),
                             torch.cuda.current_stream().cuda_stream)
    assert int(flag.item()) == 0
    ref = ot_sinkhorn_reference(cost, reg, torch.full((n,), 1.0 / n, dtype=torch.float64, device="cuda"), b, n_iters)
    torch.testing.assert_close(out.double(), ref, rtol=5e-4, atol=1e-9)
    assert bool((out[:, 3] == 0).all())
    # Rows carry exactly a = 1/n after the final row step.
    torch.testing.assert_close(out.double().sum(dim=1), torch.full((n,), 1.0 / n, dtype=torch.float64, device="cuda"),
                               rtol=1e-5, atol=0)


def test_launcher_rejects_bad_arguments():
    core = _backend.core()
    x = make_scores(4, 4)
    out = torch.empty_like(x)
    ws = torch.empty(core.sinkhorn_workspace_bytes_cuda(4, 4), dtype=torch.uint8, device="cuda")
    flag = torch.zeros(1, dtype=torch.int32, device="cuda")
    stream = torch.cuda.current_stream().cuda_stream
    with pytest.raises(ValueError, match="n_iters"):
        core.sinkhorn_solve_cuda(x.data_ptr(), 0, 4, 4, 4, 20.0, 0, 0.0, 0, 0.0, out.data_ptr(), ws.data_ptr(),
                                 flag.data_ptr(), stream)
    with pytest.raises(ValueError, match="workspace"):
        core.sinkhorn_solve_cuda(x.data_ptr(), 0, 4, 4, 4, 20.0, 0, 0.0, 3, 0.0, out.data_ptr(), 0,
                                 flag.data_ptr(), stream)
    with pytest.raises(ValueError, match="alpha"):
        core.sinkhorn_solve_cuda(x.data_ptr(), 0, 4, 4, 4, float("inf"), 0, 0.0, 3, 0.0, out.data_ptr(),
                                 ws.data_ptr(), flag.data_ptr(), stream)
    with pytest.raises(ValueError, match="empty"):
        core.sinkhorn_workspace_bytes_cuda(0, 4)


# ----- issue 10: group=, prototypes= and the torch fallback's launches on CUDA ------------------

@pytest.fixture
def nccl_group_of_one(tmp_path):
    """A one-rank NCCL world (the machine may have one GPU): the group= path then runs its
    passes and all-reduces exactly as on many ranks."""
    import torch.distributed as dist

    if not dist.is_nccl_available():
        pytest.skip("NCCL not available")
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("nccl", store=store, rank=0, world_size=1, device_id=torch.device("cuda", 0))
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("b,k,epsilon", [pytest.param(7, 5, 0.05, marks=MEMCHECK),
                                        pytest.param(517, 129, 0.01, marks=MEMCHECK),
                                        (4096, 3000, 0.05), (16, 16000, 0.03)])
def test_group_uses_the_cuda_kernel(nccl_group_of_one, b, k, epsilon, dtype, monkeypatch):
    x = make_scores(b, k, dtype)
    calls = []
    core = _backend.core()
    real = core.sinkhorn_pass_cuda
    monkeypatch.setattr(core, "sinkhorn_pass_cuda", lambda *a: calls.append(a[0]) or real(*a))
    out = pym4.sinkhorn(x, epsilon, 3, group=nccl_group_of_one)
    assert calls == [0, 1, 1, 2]  # column LSE, two row passes, the write: all through the kernel
    assert_matches_reference(out, x, epsilon, 3)


@pytest.mark.parametrize("features", [False, True])
def test_group_refuses_scores_past_the_kernels_range_before_any_pass(nccl_group_of_one, features, monkeypatch):
    """The kernel computes alpha * x in float32; past its range the group= path raises on
    every rank before the first pass (its flag would say so only after the solve)."""
    core = _backend.core()
    calls = []
    monkeypatch.setattr(core, "sinkhorn_pass_cuda", lambda *a: calls.append(a[0]))
    x = torch.full((16, 8), 1e4, device="cuda")
    kwargs = {"prototypes": torch.full((5, 8), 1e4, device="cuda")} if features else {}
    # scores 1e4 (or z @ C^T = 8e8) over epsilon 1e-35: past 3.4e38
    with pytest.raises(ValueError, match=r"scores: contains NaN or Inf \(or overflows once divided by epsilon\) "
                                         r"on at least one rank"):
        pym4.sinkhorn(x, 1e-35, 3, group=nccl_group_of_one, **kwargs)
    assert calls == []


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("group", [False, True])
@MEMCHECK
def test_features_form_uses_the_cuda_kernel(request, group, dtype, monkeypatch):
    g = torch.Generator().manual_seed(3)
    z = torch.nn.functional.normalize(torch.randn(300, 64, generator=g), dim=1).to(dtype)
    c = torch.nn.functional.normalize(torch.randn(3000, 64, generator=g), dim=1).to(dtype)
    kwargs = {"group": request.getfixturevalue("nccl_group_of_one")} if group else {}
    calls = []
    core = _backend.core()
    for entry in ("sinkhorn_solve_cuda", "sinkhorn_pass_cuda"):  # whichever form serves it: the kernel
        real = getattr(core, entry)
        monkeypatch.setattr(core, entry, lambda *a, real=real, entry=entry: calls.append(entry) or real(*a))
    q = pym4.sinkhorn(z.cuda(), 0.05, 3, prototypes=c.cuda(), backend="cuda", **kwargs)
    assert calls == (["sinkhorn_pass_cuda"] * 4 if group else ["sinkhorn_solve_cuda"]), calls
    assert q.dtype == dtype and q.is_cuda
    rtol, atol, _ = TOLERANCES[dtype]  # the scores in float32 from the inputs as given, the codes rounded to dtype
    torch.testing.assert_close(q.double().cpu(), swav_sinkhorn(z.double() @ c.double().t(), 0.05, 3), rtol=rtol,
                               atol=atol)


@pytest.mark.parametrize("group", [False, True])
@pytest.mark.parametrize("use_out", [False, True])
def test_float64_features_form_on_the_cuda_kernel(request, group, use_out):
    # The kernel computes in float32: float64 features are solved on float32 scores and the
    # codes delivered in float64 (once written as float32 into half of the float64 buffer
    # without group=, and a KeyError with it).
    g = torch.Generator().manual_seed(4)
    z = torch.nn.functional.normalize(torch.randn(300, 64, generator=g, dtype=torch.float64), dim=1)
    c = torch.nn.functional.normalize(torch.randn(3000, 64, generator=g, dtype=torch.float64), dim=1)
    kwargs = {"group": request.getfixturevalue("nccl_group_of_one")} if group else {}
    out = torch.full((300, 3000), float("nan"), dtype=torch.float64, device="cuda") if use_out else None
    q = pym4.sinkhorn(z.cuda(), 0.05, 3, prototypes=c.cuda(), backend="cuda", out=out, **kwargs)
    assert q.dtype == torch.float64 and q.is_cuda and (q is out if use_out else True)
    rtol, atol, _ = TOLERANCES[torch.float32]
    torch.testing.assert_close(q.cpu(), swav_sinkhorn(z @ c.t(), 0.05, 3), rtol=rtol, atol=atol)


def _two_rank_worker(rank, init_file, shards, out_dir):
    import os

    import torch.distributed as dist

    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"file://{init_file}", rank=rank, world_size=2,
                            device_id=torch.device("cuda", rank))
    try:
        q = pym4.sinkhorn(shards[rank].cuda(rank), 0.05, 3, group=dist.group.WORLD)
        torch.save(q.cpu(), os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_group_over_two_gpus_equals_one_process_on_the_whole_batch(tmp_path):
    # Uneven shards (100 and 200 rows) over 2 NCCL ranks: the codes of one process on all 300.
    import torch.multiprocessing as mp

    g = torch.Generator().manual_seed(5)
    s = 2 * torch.rand(300, 129, generator=g) - 1
    shards = [s[:100].clone(), s[100:].clone()]
    mp.spawn(_two_rank_worker, args=(str(tmp_path / "init"), shards, str(tmp_path)), nprocs=2, join=True)
    q = torch.cat([torch.load(tmp_path / f"{r}.pt") for r in range(2)])
    rtol, atol, _ = TOLERANCES[torch.float32]
    torch.testing.assert_close(q.double(), swav_sinkhorn(s.double(), 0.05, 3), rtol=rtol, atol=atol)


def cuda_launches(fn) -> int:
    """The benchmark's launch counter (benchmarks/bench_sinkhorn.py, loaded by path): the
    test asserts what the benchmark prints."""
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "bench_sinkhorn.py"
    spec = importlib.util.spec_from_file_location("_bench_sinkhorn_for_tests", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench.count_launches(fn)


@pytest.mark.parametrize("b,k,n_iters", [(256, 3000, 3), (4096, 3000, 3), (16, 16000, 10)])
def test_torch_backend_launches_no_more_than_swav(b, k, n_iters):
    s = make_scores(b, k)
    ours = cuda_launches(lambda: pym4.sinkhorn(s, 0.05, n_iters, backend="torch"))
    theirs = cuda_launches(lambda: swav_distributed_sinkhorn([s], 0.05, n_iters))  # SwAV's code, one rank
    assert ours <= theirs, (ours, theirs)
    assert_matches_reference(pym4.sinkhorn(s, 0.05, n_iters, backend="torch"), s, 0.05, n_iters)
