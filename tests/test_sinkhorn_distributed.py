"""Sinkhorn across torch.distributed ranks (gloo): B is the global batch and the prototype
sums are all-reduced, so the ranks together must give what one process gives on the
concatenated batch."""
import os
import traceback

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import pym4

pytestmark = pytest.mark.distributed


def _worker(rank, world, init_file, shards, kwargs, out_dir):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        q = pym4.sinkhorn(shards[rank], group=dist.group.WORLD, **kwargs)
        torch.save({"q": q}, os.path.join(out_dir, f"{rank}.pt"))
    except Exception as e:  # reported to the test through the file system
        torch.save({"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()},
                   os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


def run_ranks(tmp_path, shards, **kwargs):
    world = len(shards)
    mp.spawn(_worker, args=(world, str(tmp_path / "init"), shards, kwargs, str(tmp_path)), nprocs=world, join=True)
    return [torch.load(tmp_path / f"{r}.pt") for r in range(world)]


def scores(b, k, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, k, generator=g) * 2 - 1


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_two_ranks_equal_one_process(tmp_path, backend):
    full = scores(13, 40, seed=1)
    shards = [full[:5].clone(), full[5:].clone()]  # uneven split on purpose
    results = run_ranks(tmp_path, shards, epsilon=0.05, n_iters=3, backend=backend)
    assert all("q" in r for r in results), [r.get("trace") for r in results]
    q = torch.cat([r["q"] for r in results])
    torch.testing.assert_close(q, pym4.sinkhorn(full, epsilon=0.05, n_iters=3), rtol=1e-5, atol=1e-7)
    # Every row sums to 1, and the global column sums are about B/K.
    torch.testing.assert_close(q.sum(1), torch.ones(13), rtol=0, atol=1e-5)


def test_three_ranks_small_epsilon(tmp_path):
    full = scores(30, 17, seed=2)
    shards = list(full.chunk(3))
    results = run_ranks(tmp_path, shards, epsilon=0.01, n_iters=5)
    assert all("q" in r for r in results), [r.get("trace") for r in results]
    q = torch.cat([r["q"] for r in results])
    assert torch.isfinite(q).all()
    torch.testing.assert_close(q, pym4.sinkhorn(full, epsilon=0.01, n_iters=5), rtol=2e-5, atol=1e-7)


def test_bad_shard_raises_on_every_rank(tmp_path):
    full = scores(8, 6, seed=3)
    shards = [full[:4].clone(), full[4:].clone()]
    shards[1][0, 0] = float("nan")
    results = run_ranks(tmp_path, shards)
    for r in results:
        assert "error" in r and "scores: contains NaN or Inf" in r["error"]


def _features_worker(rank, world, init_file, shards, prototypes, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        q = pym4.sinkhorn(shards[rank], 0.05, 3, prototypes=prototypes, chunk=3, group=dist.group.WORLD)
        torch.save({"q": q}, os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_features_form_two_ranks(tmp_path):
    g = torch.Generator().manual_seed(4)
    z = torch.nn.functional.normalize(torch.randn(11, 8, generator=g), dim=1)
    c = torch.nn.functional.normalize(torch.randn(9, 8, generator=g), dim=1)
    shards = [z[:6].clone(), z[6:].clone()]
    mp.spawn(_features_worker, args=(2, str(tmp_path / "init"), shards, c, str(tmp_path)), nprocs=2, join=True)
    q = torch.cat([torch.load(tmp_path / f"{r}.pt")["q"] for r in range(2)])
    torch.testing.assert_close(q, pym4.sinkhorn(z @ c.t(), 0.05, 3), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_the_cuda_kernels_range_check_names_what_it_cannot_take(dtype):
    """The check group= runs on CUDA before its first pass (the kernel computes alpha * x in
    float32), run here on CPU tensors: it is device-neutral torch."""
    from pym4._sinkhorn_passes import _beyond_cuda_kernel

    def refused(values, alpha):
        return bool(_beyond_cuda_kernel(torch.tensor(values, dtype=torch.float32).to(dtype), alpha))

    assert not refused([[0.5, -1.0], [0.25, 1.0]], 100.0)
    assert not refused([[-1.0, 1.0]], 3.0e38)        # 3e38: still inside float32
    assert refused([[-1.0, 1.0]], 3.5e38)            # alpha * 1 past 3.4e38
    assert refused([[1e4, 0.0]], 1e35)               # 1e39
    assert refused([[0.0, 0.0]], 1e39)               # alpha itself past float32 (0 * inf = NaN there)
    assert refused([[0.0, float("nan")]], 1.0)
    assert refused([[float("-inf"), 0.0]], 1.0)
    # At the edge, in the kernel's arithmetic (float32(alpha) * x rounded to float32), not in
    # float64: both products are within FLT_MAX in float64, the first overflows in float32.
    with np.errstate(over="ignore"):
        for alpha, x in ((1.2818281063347259, 2.654664397918525e+38), (157.33141375957842, 2.16283788270885e+36),
                         (331908.4540997908, 1.0252295219813732e+33), (3.0, 1.1e38)):
            in_float32 = bool(np.isfinite(np.float32(x) * np.float32(alpha)))
            if dtype == torch.float32:
                assert refused([[x, 0.0]], alpha) is not in_float32, (alpha, x)
        assert not np.isfinite(np.float32(2.654664397918525e+38) * np.float32(1.2818281063347259))
    assert 2.654664397918525e+38 * 1.2818281063347259 <= float(np.finfo(np.float32).max)
