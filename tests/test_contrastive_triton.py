"""The fused Triton kernels of the contrastive losses.

Without a GPU they run through Triton's interpreter (conftest sets TRITON_INTERPRET=1) on
small odd shapes; the `gpu` tests run the same checks natively on CUDA, plus bfloat16 (which
the interpreter cannot represent) and a larger batch. References are float64 plain torch,
written from the formulas, in references.py.
"""
import importlib.util
import math

import pytest
import torch
import torch.nn.functional as F

import pym4
import references

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")


def ref_loss(kind, x, y, s, b):
    return (references.clip_loss if kind == "clip" else references.siglip_loss)(x, y, s, b)


def features(n, d, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    y = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64) + 1.5 * x, dim=1)
    return x.to(device=device, dtype=dtype), y.to(device=device, dtype=dtype)


def losses_and_grads(fn, x, y, s, b):
    leaves = [x.detach().clone().requires_grad_(), y.detach().clone().requires_grad_(),
              s.detach().clone().requires_grad_()] + ([] if b is None else [b.detach().clone().requires_grad_()])
    loss = fn(*leaves[:3], leaves[3] if b is not None else None)
    grads = torch.autograd.grad(loss, leaves)
    return [loss.detach()] + list(grads)


def check(kind, n, d, dtype, device, with_bias, rtol, s_value=12.0):
    x, y = features(n, d, dtype, device)
    s = torch.tensor(s_value, device=device)
    b = torch.tensor(-3.0, device=device) if with_bias else None
    loss_fn = pym4.clip_loss if kind == "clip" else pym4.siglip_loss
    got = losses_and_grads(lambda *a: loss_fn(*a, backend="triton"), x, y, s, b)
    want = losses_and_grads(lambda xx, yy, ss, bb: ref_loss(kind, xx.double(), yy.double(), ss.double(),
                                                           None if bb is None else bb.double()), x, y, s, b)
    assert got[0].dtype == dtype and got[1].dtype == dtype and got[2].dtype == dtype
    for name, g, w in zip(("loss", "dx", "dy", "ds", "db"), got, want):
        atol = rtol * max(float(w.abs().max()), 1.0)
        torch.testing.assert_close(g.double(), w.double(), rtol=rtol, atol=atol,
                                   msg=lambda m: f"{kind} B={n} D={d} {dtype}: {name}: {m}")


SHAPES = [(1, 16), (7, 24), (37, 72), (130, 16)]


@pytest.mark.parametrize("kind", ["clip", "siglip"])
@pytest.mark.parametrize("n,d", SHAPES)
@pytest.mark.parametrize("with_bias", [False, True])
def test_triton_float32_interpreted(kind, n, d, with_bias):
    if torch.cuda.is_available():
        pytest.skip("runs natively in test_triton_gpu")
    check(kind, n, d, torch.float32, "cpu", with_bias, 1e-5)


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_triton_float16_interpreted(kind):
    if torch.cuda.is_available():
        pytest.skip("runs natively in test_triton_gpu")
    # float16 inputs, float32 accumulation: G is rounded to float16 for the gradient matmul,
    # as flash-attention does, so gradients carry float16 rounding.
    check(kind, 37, 24, torch.float16, "cpu", True, 3e-3)


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_triton_column_major_features(kind):
    # Features whose columns are not contiguous (a transposed buffer) are read row-contiguous
    # (the kernels' column offsets are int32): the same loss and gradients as the plain ones.
    device = "cuda" if torch.cuda.is_available() else "cpu"
    x, y = features(37, 24, torch.float32, device, seed=3)
    s = torch.tensor(10.0, device=device)
    loss_fn = pym4.clip_loss if kind == "clip" else pym4.siglip_loss
    plain = losses_and_grads(lambda *a: loss_fn(*a, backend="triton"), x, y, s, None)
    xt, yt = x.t().contiguous().t(), y.t().contiguous().t()
    assert xt.stride(1) != 1 and torch.equal(xt, x)
    strided = losses_and_grads(lambda *a: loss_fn(*a, backend="triton"), xt, yt, s, None)
    for p_, s_ in zip(plain, strided):
        torch.testing.assert_close(s_, p_, rtol=1e-6, atol=1e-7)
    want = ref_loss(kind, x.double(), y.double(), s.double(), None)
    torch.testing.assert_close(strided[0].double(), want, rtol=1e-5, atol=1e-6)


def test_triton_rejects_float64_when_forced():
    x, y = features(4, 16, torch.float64, "cpu")
    with pytest.raises(TypeError, match="triton backend takes"):
        pym4.clip_loss(x, y, 1.0, backend="triton")


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["clip", "siglip"])
@pytest.mark.parametrize("n,d", SHAPES + [(1000, 512)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_triton_gpu(kind, n, d, with_bias):
    check(kind, n, d, torch.float32, "cuda", with_bias, 1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["clip", "siglip"])
@pytest.mark.parametrize("dtype,rtol", [(torch.float16, 3e-3), (torch.bfloat16, 2e-2)])
@pytest.mark.memcheck  # (also under compute-sanitizer in gpu_check.sh)
def test_triton_gpu_low_precision(kind, dtype, rtol):
    check(kind, 257, 128, dtype, "cuda", True, rtol)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["clip", "siglip"])
@pytest.mark.memcheck  # (also under compute-sanitizer in gpu_check.sh)
def test_triton_gpu_tf32(kind):
    # float32 with TF32 matmuls switched on (torch's setting, read by _precision): the "tf32"
    # tiles, which run nowhere else; 10-bit mantissa products, so a loose tolerance.
    from pym4.kernels import contrastive as kc

    matmul = torch.backends.cuda.matmul
    new_api = getattr(matmul, "fp32_precision", None) is not None
    saved = matmul.fp32_precision if new_api else matmul.allow_tf32
    try:
        if new_api:
            matmul.fp32_precision = "tf32"
        else:
            matmul.allow_tf32 = True
        assert kc._precision(torch.zeros(1, device="cuda")) == "tf32"
        check(kind, 257, 128, torch.float32, "cuda", True, 1e-2)
    finally:
        if new_api:
            matmul.fp32_precision = saved
        else:
            matmul.allow_tf32 = saved


@pytest.mark.gpu
@pytest.mark.memcheck  # (also under compute-sanitizer in gpu_check.sh)
def test_triton_is_the_default_on_cuda_and_matches_cpu():
    x, y = features(300, 64, torch.float32, "cuda")
    loss = pym4.clip_loss(x.requires_grad_(), y, 20.0)
    assert type(loss.grad_fn).__name__.startswith("_ContrastiveLoss")
    x = x.detach()
    cpu = pym4.clip_loss(x.cpu(), y.cpu(), 20.0, backend="chunked")
    torch.testing.assert_close(loss.cpu(), cpu, rtol=1e-5, atol=1e-6)
    assert math.isfinite(float(pym4.siglip_loss(x, y, 20.0, -5.0)))


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_triton_float16_gradient_does_not_underflow(kind):
    # G = g (p - d) / 2B is rounded to float16 for the gradient matmul; with g / 2B small
    # (a large batch, or no loss scaler) it fell below float16's smallest subnormal (6e-8)
    # and the gradient came out 0. The engine now works on G / max|weight|.
    device = "cuda" if torch.cuda.is_available() else "cpu"
    from pym4.kernels.contrastive import TritonEngine
    x, y = features(37, 24, torch.float16, device)
    s, b, w = 12.0, -3.0, 1e-9
    weights = torch.full((37,), w, dtype=torch.float32, device=device)
    logits = s * x.double() @ y.double().T + b
    idx = torch.arange(37, device=device)
    eye = torch.zeros_like(logits)
    eye[idx, idx] = 1.0
    if kind == "clip":
        r, c = torch.logsumexp(logits, 1), torch.logsumexp(logits, 0)
        g = w * (torch.exp(logits - r[:, None]) - eye) + w * (torch.exp(logits - c[None, :]) - eye)
        dx, dy, _ = TritonEngine().clip_backward(x, y, s, b, r.float(), c.float(), weights, weights, 0, False)
    else:
        g = w * (torch.sigmoid(logits) - eye)
        dx, dy, _, _ = TritonEngine().siglip_backward(x, y, s, b, weights, 0)
    for name, got, want in (("dx", dx, s * g @ y.double()), ("dy", dy, s * g.T @ x.double())):
        torch.testing.assert_close(got.double(), want, rtol=3e-3, atol=3e-3 * float(want.abs().max()),
                                   msg=lambda m: f"{kind} {name}: {m}")


def test_compile_configs_are_what_the_launcher_chooses():
    # The native compile check (scripts/gpu_compile_check.py) compiles exactly these; every
    # GPU launch must be one of them, for every dtype, precision mode and D, or the check would
    # vouch for kernels that never run and miss those that do.
    from pym4.kernels import contrastive as kc
    configs = list(kc.compile_configs())
    names = [c["name"] for c in configs]
    assert len(names) == len(set(names)), "compile_configs names must be unique"
    listed = set()
    for c in configs:
        args = list(c["fn"].arg_names)  # typed or given once each, the typed ones in order
        assert sorted(list(c["signature"]) + list(c["constexprs"])) == sorted(args)
        assert list(c["signature"]) == [a for a in args if a in c["signature"]]
        assert c["signature"]["a_ptr"] == c["signature"]["b_ptr"]
        listed.add((c["fn"].__name__, c["signature"]["a_ptr"], tuple(sorted(c["constexprs"].items())),
                    c["num_warps"], c["num_stages"]))
    tl_dtype = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16"}
    kernels = [("_clip_lse_kernel", False, [{}]), ("_siglip_fwd_kernel", False, [{}]), ("_clip_grad_kernel", True, [{}]),
               ("_siglip_grad_kernel", True, [{"WEIGHT_ON_ROWS": True}, {"WEIGHT_ON_ROWS": False}])]
    modes = [(torch.float32, "ieee"), (torch.float32, "tf32"), (torch.float16, "ieee"), (torch.bfloat16, "ieee")]
    for name, grad, variants in kernels:
        for dtype, precision in modes:
            for d in (1, 16, 24, 100, 512, 768, 2048, 4096):
                cfg = kc._config(dtype, precision, d, grad)
                assert cfg["BLOCK_K"] <= max(16, 2 ** math.ceil(math.log2(d)))
                warps, stages = cfg.pop("num_warps"), cfg.pop("num_stages")
                for extra in variants:
                    # (column strides 1: Triton specialises them, prepare() guarantees them)
                    key = (name, tl_dtype[dtype],
                           tuple(sorted(dict(cfg, PRECISION=precision, sa1=1, sb1=1, **extra).items())), warps, stages)
                    assert key in listed, f"launch choice {key} is not in compile_configs()"
    assert kc.TritonEngine.prepare(None, torch.randn(5, 3).t()).stride(1) == 1
    # Interpreter-only blocks are not native configurations.
    assert kc._config(torch.float32, "ieee", 512, True, interpret=True) != kc._config(torch.float32, "ieee", 512, True)


def test_config_rejects_what_no_kernel_serves():
    from pym4.kernels import contrastive as kc
    with pytest.raises(ValueError, match="float64"):
        kc._config(torch.float64, "ieee", 64, False)
    with pytest.raises(ValueError, match="tf32x3"):
        kc._config(torch.float32, "tf32x3", 64, False)


@pytest.mark.parametrize("how", ["legacy", "matmul", "global"])
def test_float32_precision_follows_torch_settings_of_either_api(how, monkeypatch):
    # torch >= 2.9: once fp32_precision is set, reading the legacy allow_tf32 raises; the
    # kernels' choice of tl.dot precision must read the setting in either form.
    from pym4.kernels import contrastive as kc

    monkeypatch.setattr(kc, "_INTERPRET", False)  # (under the interpreter float32 is always ieee)
    t = torch.zeros(2, 2)
    backends, matmul = torch.backends, torch.backends.cuda.matmul
    saved = (getattr(backends, "fp32_precision", None), getattr(matmul, "fp32_precision", None))
    try:
        assert kc._precision(t) == "ieee" and kc._precision(t.half()) == "ieee"
        if how == "legacy":
            matmul.allow_tf32 = True
        elif saved[1] is None:
            pytest.skip("this torch has no fp32_precision setting")
        elif how == "matmul":
            matmul.fp32_precision = "tf32"
        else:
            backends.fp32_precision = "tf32"
        assert kc._precision(t) == "tf32"
        assert kc._precision(t.half()) == "ieee"  # (half precision is never TF32)
    finally:
        if saved[1] is None:
            matmul.allow_tf32 = False
        else:
            backends.fp32_precision = saved[0]
            matmul.fp32_precision = saved[1]
    assert kc._precision(t) == "ieee"
