"""Training layer: SwAV pieces against a plain SwAV reference, short training runs, the
CLIP/SigLIP two-tower loop (samplers, DDP). The networks and data are the demo's."""
import os
import socket

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pym4 import train as tr
from pym4.demo.digits import load_digits
from pym4.demo.networks import DigitsNet, ImageTower, TextTower
from pym4.demo.synthetic import make_biased_captions
from references import swav_sinkhorn


# ----- SwAV ----------------------------------------------------------------------------------

def _swav_loss_reference(scores, n_global, temperature, epsilon, n_iters):
    total = 0.0
    for i in range(n_global):
        q = swav_sinkhorn(scores[i].detach(), epsilon, n_iters)
        sub = 0.0
        for v in range(len(scores)):
            if v != i:
                sub -= (q * F.log_softmax(scores[v].double() / temperature, dim=1)).sum(1).mean()
        total += sub / (len(scores) - 1)
    return total / n_global


@pytest.mark.parametrize("n_crops,n_global", [(2, 2), (4, 2), (3, 1)])
def test_swav_loss_matches_reference(n_crops, n_global):
    scores = [F.normalize(torch.randn(24, 16), dim=1) @ F.normalize(torch.randn(10, 16), dim=1).T
              for _ in range(n_crops)]
    got = tr.swav_loss(scores, n_global, temperature=0.1, epsilon=0.05, n_iters=3)
    want = _swav_loss_reference(scores, n_global, 0.1, 0.05, 3)
    assert float(got) == pytest.approx(float(want), rel=1e-5)


def test_swav_loss_gradient_is_swapped_prediction_only():
    # Codes carry no gradient: d/ds_v of the loss is (softmax(s_v/T) - q_i) / (T B (V-1) n_global)
    # summed over the global crops i != v.
    b, k, t = 8, 5, 0.1
    scores = [(torch.rand(b, k) * 2 - 1).requires_grad_() for _ in range(2)]
    tr.swav_loss(scores, 2, temperature=t).backward()
    q = [swav_sinkhorn(s.detach(), 0.05, 3).float() for s in scores]
    for v in range(2):
        want = (torch.softmax(scores[v].detach() / t, 1) - q[1 - v]) / (t * b * 2)
        assert torch.allclose(scores[v].grad, want, atol=1e-6)


def test_swav_loss_with_queue_uses_more_samples_for_codes():
    b, k = 6, 4
    scores = [torch.rand(b, k) for _ in range(2)]
    queue = [torch.rand(30, k) for _ in range(2)]
    got = tr.swav_loss(scores, 2, queue_scores=queue)
    # reference: codes from the stacked (queue + batch) scores, last b rows kept
    total = 0.0
    for i in range(2):
        q = swav_sinkhorn(torch.cat([queue[i], scores[i]]), 0.05, 3)[-b:]
        total += -(q * F.log_softmax(scores[1 - i].double() / 0.1, 1)).sum(1).mean()
    assert float(got) == pytest.approx(float(total / 2), rel=1e-5)
    assert float(got) != pytest.approx(float(tr.swav_loss(scores, 2)), rel=1e-3)


def test_swav_loss_bad_input():
    with pytest.raises(ValueError, match="scores"):
        tr.swav_loss([torch.rand(4, 3)], 1)
    with pytest.raises(ValueError, match=r"scores\[1\]"):
        tr.swav_loss([torch.rand(4, 3), torch.rand(5, 3)], 2)
    with pytest.raises(ValueError, match="n_global"):
        tr.swav_loss([torch.rand(4, 3)] * 2, 3)


def test_swav_head_and_queue():
    head = tr.SwAVHead(12, 16, 8, 5)
    w = head.prototypes.weight.detach()
    assert torch.allclose(w.norm(dim=1), torch.ones(5), atol=1e-6)
    z, s = head(torch.randn(7, 12))
    assert torch.allclose(z.norm(dim=1), torch.ones(7), atol=1e-5)
    assert torch.allclose(s, z @ w.T, atol=1e-6)
    q = tr.SwAVQueue(2, 5, 3)
    assert q.scores(0, torch.eye(3)) is None
    a, b = torch.arange(9.0).reshape(3, 3), torch.arange(9.0, 15.0).reshape(2, 3)
    q.push([a, a + 100])
    q.push([b, b + 100])
    # newest first, oldest dropped once full
    assert torch.equal(q.features[0], torch.cat([b, a]))
    assert torch.equal(q.scores(1, torch.eye(3)), torch.cat([b, a]) + 100)
    q.push([b, b])
    assert q.filled == 5
    assert torch.equal(q.features[0], torch.cat([b, b, a[:1]]))


def test_multi_crop_identity_and_shapes():
    x = torch.rand(5, 1, 8, 8)
    (same,) = tr.multi_crop(x, 1, 8, (1.0, 1.0))
    assert torch.allclose(same, x, atol=1e-5)
    crops = tr.multi_crop(x, 3, 6, (0.2, 0.5), max_rotation=10, noise=0.1, contrast=0.2)
    assert len(crops) == 3 and all(c.shape == (5, 1, 6, 6) for c in crops)
    with pytest.raises(ValueError, match="scale"):
        tr.multi_crop(x, 1, 8, (0.5, 1.5))


def test_train_swav_few_steps_lowers_loss():
    x, y = load_digits()
    assert x.shape == (1797, 1, 8, 8) and float(x.max()) == 1.0 and y.shape == (1797,)
    net = DigitsNet(width=8, out_dim=16)
    cfg = tr.SwAVConfig(epochs=4, batch_size=64, n_prototypes=10, warmup_steps=2, freeze_prototypes_steps=2,
                        queue_length=128, queue_start_epoch=1)
    before = [p.detach().clone() for p in net.parameters()]
    out = tr.train_swav(net, x[:256], cfg, progress=False)
    losses = out["loss"]
    assert len(losses) == 16 and all(np.isfinite(losses))
    assert np.mean(losses[-4:]) < np.mean(losses[:4])
    assert any(not torch.equal(a, b) for a, b in zip(before, net.parameters()))
    w = out["head"].prototypes.weight.detach()
    assert torch.allclose(w.norm(dim=1), torch.ones(10), atol=1e-5)
    assert not net.training


# ----- CLIP / SigLIP -------------------------------------------------------------------------

def _clip_reference(x, y, scale, bias=None):
    logits = scale * x.double() @ y.double().T + (0.0 if bias is None else bias)
    labels = torch.arange(x.shape[0])
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def _siglip_reference(x, y, scale, bias):
    logits = scale * x.double() @ y.double().T + bias
    z = 2 * torch.eye(x.shape[0], dtype=torch.float64) - 1
    return -F.logsigmoid(z * logits).sum() / x.shape[0]


def _small_model(vocab, loss="clip"):
    return tr.TwoTower(ImageTower(16, 8, 16), TextTower(vocab, 16, 16), loss=loss)


@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_two_tower_loss_is_the_contrastive_formula(loss):
    data = make_biased_captions(12, seed=1)
    model = _small_model(data.tokenizer.vocab_size, loss)
    img, txt, scale, bias = model(data.images, data.tokens)
    assert torch.allclose(img.norm(dim=1), torch.ones(12), atol=1e-5)
    assert float(scale.detach()) == pytest.approx(1 / 0.07 if loss == "clip" else 10.0, rel=1e-5)
    got = model.loss(img, txt, scale, bias)
    want = (_clip_reference(img.detach(), txt.detach(), float(scale.detach())) if loss == "clip"
            else _siglip_reference(img.detach(), txt.detach(), float(scale.detach()), float(bias.detach())))
    assert float(got.detach()) == pytest.approx(float(want), rel=1e-5)
    got.backward()
    assert model.logit_scale.grad is not None and torch.isfinite(model.logit_scale.grad)
    if loss == "siglip":
        assert float(model.logit_bias.detach()) == -10.0 and model.logit_bias.grad is not None


@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_train_contrastive_learns(loss):
    data = make_biased_captions(512, noise=0.1, seed=2)
    model = _small_model(data.tokenizer.vocab_size, loss)
    scale0 = float(model.logit_scale.detach())
    hist = tr.train_contrastive(model, data, tr.ContrastiveConfig(epochs=3, batch_size=64, lr=3e-3, warmup_steps=2),
                                progress=False)
    assert len(hist["loss"]) == 3 * (512 // 64)
    assert np.mean(hist["loss"][-3:]) < np.mean(hist["loss"][:3])
    assert float(model.logit_scale.detach()) != scale0
    assert not model.training


def test_train_contrastive_uses_the_sampler_and_clamps_scale():
    data = make_biased_captions(64, seed=3)
    seen = []

    class Recording(torch.utils.data.Dataset):
        def __len__(self):
            return len(data)

        def __getitem__(self, i):
            seen.append(int(i))
            return data[i]

    allowed = list(range(0, 64, 4))  # 16 indices; 5 batches of 8 walk the sampler 2.5 times
    model = _small_model(data.tokenizer.vocab_size)
    model.max_log_scale = float(np.log(20.0))
    cfg = tr.ContrastiveConfig(epochs=1, batch_size=8, lr=1e-2, steps_per_epoch=5, warmup_steps=1)
    hist = tr.train_contrastive(model, Recording(), cfg, sampler=allowed, progress=False)
    assert len(seen) == 40 and set(seen) == set(allowed)
    assert max(hist["logit_scale"]) <= 20.0 + 1e-4  # clamped from 1/0.07 to the maximum
    with pytest.raises(ValueError, match="sampler"):
        tr.train_contrastive(model, data, cfg, sampler=[], progress=False)
    with pytest.raises(TypeError, match="model"):
        tr.train_contrastive(torch.nn.Linear(2, 2), data, cfg, progress=False)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, out_dir):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        data = make_biased_captions(32, seed=4)
        torch.manual_seed(0)
        model = _small_model(data.tokenizer.vocab_size)
        ddp = DistributedDataParallel(model)
        # Gradients of one DDP step on this rank's half equal one process on the whole batch.
        half = slice(rank * 16, (rank + 1) * 16)
        img, txt, scale, bias = ddp(data.images[half], data.tokens[half])
        model.loss(img, txt, scale, bias, group=dist.group.WORLD).backward()
        torch.save({n: p.grad for n, p in model.named_parameters()}, os.path.join(out_dir, f"grad{rank}.pt"))
        # And the training loop runs distributed: DistributedSampler shards, ranks stay in sync.
        hist = tr.train_contrastive(model, data, tr.ContrastiveConfig(epochs=2, batch_size=8), progress=False)
        torch.save({"params": [p.detach() for p in model.parameters()], "loss": hist["loss"]},
                   os.path.join(out_dir, f"train{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_train_contrastive_ddp_two_ranks(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    data = make_biased_captions(32, seed=4)
    torch.manual_seed(0)
    model = _small_model(data.tokenizer.vocab_size)
    model.loss(*model(data.images, data.tokens)).backward()
    for rank in range(2):
        grads = torch.load(tmp_path / f"grad{rank}.pt")
        for n, p in model.named_parameters():
            assert torch.allclose(grads[n], p.grad, rtol=1e-4, atol=1e-6), n
    t0, t1 = (torch.load(tmp_path / f"train{r}.pt") for r in range(2))
    assert len(t0["loss"]) == 2 * (16 // 8)
    for a, b in zip(t0["params"], t1["params"]):
        assert torch.equal(a, b)
