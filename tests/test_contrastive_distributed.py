"""Distributed CLIP/SigLIP losses: 2 and 3 gloo processes against one process on the whole batch.

Every rank holds a slice of one global batch (the 3-rank run has unequal slices). With
``group``, rank r's loss is its share of the global loss times W, and its feature gradients
are those of sum_r' g_r' loss_r' (g_r' = rank r''s upstream gradient): the reference is
autograd through that sum, in float64 plain torch on the concatenated batch. The nn modules
are also compared with open_clip's own ClipLoss/SigLipLoss in all distributed modes when
open_clip_torch is installed.
"""
import datetime
import importlib.util
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
import references
from references import open_clip_loss_module

pytestmark = pytest.mark.distributed

D = 24
SCALE, BIAS = 9.0, -2.0


def global_batch(total):
    g = torch.Generator().manual_seed(1234)
    x = F.normalize(torch.randn(total, D, generator=g, dtype=torch.float64), dim=1)
    y = F.normalize(torch.randn(total, D, generator=g, dtype=torch.float64) + x, dim=1)
    return x, y


def _grads(loss_fn, x, y, with_bias, upstream):
    x = x.clone().requires_grad_()
    y = y.clone().requires_grad_()
    s = torch.tensor(SCALE, requires_grad=True)
    b = torch.tensor(BIAS, requires_grad=True) if with_bias else None
    loss = loss_fn(x, y, s, b)
    (loss * upstream).backward()
    return [loss.detach(), x.grad, y.grad, s.grad, None if b is None else b.grad]


def _worker(rank, world, init_file, out_dir, sizes, cases, compare_open_clip):
    import pym4
    # A timeout, so that a rank left waiting in a collective fails the test instead of hanging it.
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        x_all, y_all = global_batch(sum(sizes))
        lo, hi = sum(sizes[:rank]), sum(sizes[:rank + 1])
        x, y = x_all[lo:hi].float(), y_all[lo:hi].float()
        results = {}
        for kind, backend, with_bias in cases:
            fn = pym4.clip_loss if kind == "clip" else pym4.siglip_loss
            results[(kind, backend, with_bias)] = _grads(
                lambda *a: fn(*a, group=dist.group.WORLD, backend=backend), x, y, with_bias, 1.0 + rank)
        # A NaN on one rank stops every rank with a ValueError (no rank hangs in a collective).
        bad = x.clone()
        if rank == 1:
            bad[0, 0] = float("nan")
        try:
            pym4.clip_loss(bad, y, SCALE, group=dist.group.WORLD)
            results["nan"] = "no error"
        except ValueError as e:
            results["nan"] = str(e)
        # So does a bad shape on one rank (it used to raise there before the collective check,
        # leaving the other ranks waiting).
        try:
            pym4.siglip_loss(x, y[:-1] if rank == 1 else y, SCALE, BIAS, group=dist.group.WORLD)
            results["shape"] = "no error"
        except ValueError as e:
            results["shape"] = str(e)
        # Rank 0's images and rank 1's texts at 1e20: each rank's own logits are within
        # float32, rank 0's against rank 1's texts (1e40) are not. Every rank refuses them
        # (the reach once came from each rank's own features only, and the loss was NaN).
        try:
            big_x = x * 1e20 if rank == 0 else x
            big_y = y * 1e20 if rank == 1 else y
            pym4.clip_loss(big_x, big_y, SCALE, group=dist.group.WORLD, backend="chunked")
            results["reach"] = "no error"
        except ValueError as e:
            results["reach"] = str(e)
        # A float16 loss past 65504 on rank 0 only (its features x 300, texts anti-aligned: a
        # loss of 2.5e5 for CLIP and 4.7e5 for SigLIP; rank 1's 7e2 and 1.3e3): every rank
        # refuses, rank 1 too (its own loss is finite; raising on rank 0 alone would leave
        # rank 1 waiting in the backward pass's collectives).
        for kind in ("clip", "siglip"):
            half_x = (x * 300 if rank == 0 else x).half()
            half_y = (y * -300 if rank == 0 else y).half()
            fn, scalars = (pym4.clip_loss, (SCALE,)) if kind == "clip" else (pym4.siglip_loss, (SCALE, 0.0))
            try:
                loss = fn(half_x, half_y, *scalars, group=dist.group.WORLD, backend="chunked")
                results[("float16", kind)] = f"no error: loss {float(loss)}"
            except ValueError as e:
                results[("float16", kind)] = str(e)
        # Features of another dtype on the last rank: every rank refuses before any gather
        # (the float16 ranks alone would otherwise enter one more all-reduce).
        try:
            last = rank == world - 1
            pym4.clip_loss(x.half() if last else x, y.half() if last else y, SCALE, group=dist.group.WORLD)
            results["dtype"] = "no error"
        except ValueError as e:
            results["dtype"] = str(e)
        oc = open_clip_loss_module() if compare_open_clip else None
        if oc is not None:
            for local_loss in (False, True):
                for with_grad in (False, True):
                    pair = []
                    for cls in (pym4.nn.ClipLoss, oc.ClipLoss):
                        mod = cls(local_loss=local_loss, gather_with_grad=with_grad, rank=rank, world_size=world)
                        pair.append(_grads(mod, x, y, True, 1.0))
                    results[("open_clip", local_loss, with_grad)] = pair
            for impl in ("bidir", "gather"):
                pair = [_grads(cls(rank=rank, world_size=world, dist_impl=impl), x, y, True, 1.0)
                        for cls in (pym4.nn.SigLipLoss, oc.SigLipLoss)]
                results[("open_clip_siglip", impl)] = pair
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        # Every rank done with every collective (open_clip's "bidir" SigLIP sends and receives
        # asynchronously) before any rank tears its group down: once, rank 0 aborted at exit
        # ("terminate called without an active exception") under a loaded CI machine.
        dist.barrier()
    finally:
        dist.destroy_process_group()


def reference(kind, sizes, with_bias, upstream):
    """Per rank: loss_r, and the gradients a rank must get (float64, whole batch)."""
    x_all, y_all = global_batch(sum(sizes))
    world, total = len(sizes), sum(sizes)

    def rank_losses(x, y, s, b):
        if kind == "clip":
            per_example = references.clip_loss_terms(x, y, s, b) * world / (2 * total)
        else:
            per_example = references.siglip_loss_rows(x, y, s, b) * world / total
        return torch.stack([chunk.sum() for chunk in per_example.split(sizes)])

    out = []
    for r in range(world):
        x, y = x_all.clone().requires_grad_(), y_all.clone().requires_grad_()
        s = torch.tensor(SCALE, dtype=torch.float64, requires_grad=True)
        b = torch.tensor(BIAS, dtype=torch.float64, requires_grad=True) if with_bias else None
        losses = rank_losses(x, y, s, b)
        # Features: the sum over every rank's loss with its upstream gradient.
        dx, dy = torch.autograd.grad((losses * upstream).sum(), [x, y], retain_graph=True)
        # Scalars: this rank's own loss only (they are replicated, not gathered).
        scalars = torch.autograd.grad(losses[r] * upstream[r], [s] + ([b] if b is not None else []))
        lo, hi = sum(sizes[:r]), sum(sizes[:r + 1])
        out.append([losses[r].detach(), dx[lo:hi], dy[lo:hi], scalars[0], scalars[1] if with_bias else None])
    return out


def run_world(tmp_path, sizes, cases, compare_open_clip):
    world = len(sizes)
    init = tmp_path / "init"
    mp.spawn(_worker, args=(world, str(init), str(tmp_path), sizes, cases, compare_open_clip), nprocs=world, join=True)
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]


def assert_grads_close(got, want, what, rtol=1e-5):
    for name, g, w in zip(("loss", "dx", "dy", "ds", "db"), got, want):
        if w is None:
            assert g is None, f"{what}: {name}"
            continue
        atol = rtol * max(float(w.abs().max()), 1.0)
        torch.testing.assert_close(g.double(), w.double().reshape(g.shape), rtol=rtol, atol=atol,
                                   msg=lambda m: f"{what}: {name}: {m}")


def _cases():
    cases = [(k, "chunked", wb) for k in ("clip", "siglip") for wb in (False, True)]
    cases += [("clip", "torch", True), ("siglip", "torch", True)]
    if importlib.util.find_spec("triton") is not None and os.environ.get("TRITON_INTERPRET", "0") != "0":
        cases += [("clip", "triton", True), ("siglip", "triton", True)]
    return cases


@pytest.mark.parametrize("sizes", [[6, 6], [5, 8, 3]], ids=["2ranks", "3ranks-unequal"])
def test_distributed_equals_one_process(tmp_path, sizes):
    cases = _cases()
    equal = len(set(sizes)) == 1
    ranks = run_world(tmp_path, sizes, cases, compare_open_clip=equal)
    world, upstream = len(sizes), torch.tensor([1.0 + r for r in range(len(sizes))], dtype=torch.float64)
    for kind, backend, with_bias in cases:
        want = reference(kind, sizes, with_bias, upstream)
        for r in range(world):
            assert_grads_close(ranks[r][(kind, backend, with_bias)], want[r], f"{kind}/{backend}/bias={with_bias} rank {r}")
        # The mean of the ranks' losses is the loss of the concatenated batch.
        x, y = global_batch(sum(sizes))
        logits = SCALE * x @ y.T + (BIAS if with_bias else 0.0)
        if kind == "clip":
            labels = torch.arange(sum(sizes))
            whole = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
        else:
            whole = -F.logsigmoid((2 * torch.eye(sum(sizes), dtype=torch.float64) - 1) * logits).sum() / sum(sizes)
        mean = sum(float(ranks[r][(kind, backend, with_bias)][0]) for r in range(world)) / world
        assert abs(mean - float(whole)) <= 1e-5 * abs(float(whole))
    assert all("NaN" in ranks[r]["nan"] or "another rank" in ranks[r]["nan"] for r in range(world)), \
        [ranks[r]["nan"] for r in range(world)]
    assert "text_features: expected shape" in ranks[1]["shape"], ranks[1]["shape"]
    assert all("the logits can reach" in ranks[r]["reach"] and "over every rank's features" in ranks[r]["reach"]
               for r in range(world)), [ranks[r]["reach"] for r in range(world)]
    assert all("another rank" in ranks[r]["shape"] for r in range(world) if r != 1), \
        [ranks[r]["shape"] for r in range(world)]
    said = [ranks[r]["dtype"] for r in range(world)]
    assert all("the ranks' features differ in dtype" in m for m in said), said
    for kind in ("clip", "siglip"):
        said = [ranks[r][("float16", kind)] for r in range(world)]
        assert all("the loss exceeds float16's range (65504) on at least one rank" in m for m in said), said
    if equal and open_clip_loss_module() is not None:
        compared = [key for key in ranks[0] if isinstance(key, tuple) and str(key[0]).startswith("open_clip")]
        assert len(compared) == 6
        for key in compared:
            for r in range(world):
                ours, theirs = ranks[r][key]
                assert_grads_close(ours, theirs, f"{key} rank {r} vs open_clip")
