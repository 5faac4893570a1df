"""The Triton Sinkhorn kernels (kernels/sinkhorn.py), through ``pym4.sinkhorn(backend="triton")``.

Without a GPU they run through Triton's interpreter (conftest sets TRITON_INTERPRET=1) at
small odd shapes, in both forms of the solve (kernel form and log domain), against the
float64 SwAV reference of tests/references.py; the `gpu` tests repeat the checks natively,
with bfloat16 and SwAV/SEER shapes.
"""
import importlib.util

import pytest
import torch

import pym4
from references import swav_sinkhorn as swav_reference

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")

SHAPES = [(1, 1), (7, 5), (37, 129), (64, 3000)]
# The same tests run natively where there is a GPU (through the interpreter otherwise).
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def uniform_scores(b, k, seed=0, device=DEVICE):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(b, k, generator=g, dtype=torch.float64) * 2 - 1).float().to(device)


def kernels():
    from pym4.kernels import sinkhorn

    return sinkhorn


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("epsilon", [0.05, 0.01])  # spread 40: kernel form; 200: log domain
def test_matches_swav_reference(shape, epsilon):
    s = uniform_scores(*shape)
    q = pym4.sinkhorn(s, epsilon, 3, backend="triton")
    assert q.shape == shape and q.dtype == torch.float32
    torch.testing.assert_close(q.double(), swav_reference(s, epsilon, 3), rtol=5e-5, atol=1e-7)


@pytest.mark.parametrize("epsilon", [0.05, 0.01])  # the kernel form; the log domain
def test_many_partials(epsilon):
    # BLOCK_M (2 COMBINE_P + 1) + 1 rows: 2 COMBINE_P + 2 partial rows after each row pass,
    # which the combine sums COMBINE_P at a time: two full steps and a tail. Taken from the
    # launch configuration, as the block sizes differ natively (1041 rows) and under the
    # interpreter (161 rows: 6 partials after a row pass, 3 after the first column pass).
    cfg = kernels().launch_config(torch.float32, 7)
    b = cfg["BLOCK_M"] * (2 * cfg["COMBINE_P"] + 1) + 1
    s = uniform_scores(b, 7, seed=4)
    q = pym4.sinkhorn(s, epsilon, 3, backend="triton")
    torch.testing.assert_close(q.double(), swav_reference(s, epsilon, 3), rtol=5e-5, atol=1e-7)


@pytest.mark.parametrize("kernel_form", [True, False])
@pytest.mark.parametrize("n_iters", [1, 2, 7])
def test_both_forms_and_iteration_counts(kernel_form, n_iters):
    s = uniform_scores(37, 129, seed=1)
    b, k = s.shape
    log_a = torch.full((b,), -torch.log(torch.tensor(float(b))).item(), device=DEVICE)
    log_b = torch.full((k,), -torch.log(torch.tensor(float(k))).item(), device=DEVICE)
    q, form, _, _ = kernels().sinkhorn(s, 20.0, n_iters, log_a, log_b, float(torch.log(torch.tensor(float(b)))),
                                       kernel_form=kernel_form)
    assert form == ("kernel" if kernel_form else "log")
    torch.testing.assert_close(q.double(), swav_reference(s, 0.05, n_iters), rtol=5e-5, atol=1e-7)


def test_form_follows_the_spread():
    s = uniform_scores(7, 5)
    b, k = s.shape
    la, lb = torch.full((b,), -1.0, device=DEVICE), torch.full((k,), -1.0, device=DEVICE)
    assert kernels().sinkhorn(s, 20.0, 1, la, lb)[1] == "kernel"  # spread < 2 * 20 = 40
    assert kernels().sinkhorn(s, 100.0, 1, la, lb)[1] == "log"  # spread up to 200


def test_float16_input_float32_accumulation():
    s = uniform_scores(37, 129).half()
    q = pym4.sinkhorn(s, 0.01, 3, backend="triton")
    assert q.dtype == torch.float16 and torch.isfinite(q).all()
    torch.testing.assert_close(q.double(), swav_reference(s.double(), 0.01, 3), rtol=2e-3, atol=1e-4)


def test_non_contiguous_and_out_and_features_form():
    s = uniform_scores(129, 37).t()  # (37, 129), column stride != 1
    ref = swav_reference(s, 0.05, 3)
    torch.testing.assert_close(pym4.sinkhorn(s, backend="triton").double(), ref, rtol=5e-5, atol=1e-7)
    buf = torch.empty(37, 129, device=DEVICE)
    assert pym4.sinkhorn(s, out=buf, backend="triton") is buf
    torch.testing.assert_close(buf.double(), ref, rtol=5e-5, atol=1e-7)
    g = torch.Generator().manual_seed(2)
    z = torch.nn.functional.normalize(torch.randn(37, 16, generator=g), dim=1)
    c = torch.nn.functional.normalize(torch.randn(129, 16, generator=g), dim=1)
    q = pym4.sinkhorn(z.to(DEVICE), 0.05, 3, prototypes=c.to(DEVICE), backend="triton")
    torch.testing.assert_close(q.double().cpu(), swav_reference(z.double() @ c.double().t(), 0.05, 3), rtol=5e-5,
                               atol=1e-7)


@pytest.mark.parametrize("epsilon", [0.05, 0.01])  # the kernel form; the log domain
@pytest.mark.parametrize("use_out", [False, True])
def test_float64_features_form(epsilon, use_out):
    # Triton stores float32/16 and bfloat16: float64 features are solved in float32 and the
    # codes copied into the float64 result (which once came back holding the scores).
    g = torch.Generator().manual_seed(5)
    z = torch.nn.functional.normalize(torch.randn(37, 16, generator=g, dtype=torch.float64), dim=1).to(DEVICE)
    c = torch.nn.functional.normalize(torch.randn(129, 16, generator=g, dtype=torch.float64), dim=1).to(DEVICE)
    ref = swav_reference(z.cpu() @ c.cpu().t(), epsilon, 3)
    out = torch.full((37, 129), float("nan"), dtype=torch.float64, device=DEVICE) if use_out else None
    q = pym4.sinkhorn(z, epsilon, 3, prototypes=c, backend="triton", out=out)
    assert q.dtype == torch.float64 and (q is out if use_out else True)
    torch.testing.assert_close(q.cpu(), ref, rtol=5e-5, atol=1e-6)
    scores_out = torch.full((37, 129), float("nan"), dtype=torch.float64, device=DEVICE)
    assert pym4.sinkhorn(z @ c.t(), epsilon, 3, backend="triton", out=scores_out) is scores_out
    torch.testing.assert_close(scores_out.cpu(), ref, rtol=5e-5, atol=1e-6)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_scores_raise(bad):
    s = uniform_scores(7, 5)
    s[3, 2] = bad
    with pytest.raises(ValueError, match="scores: contains NaN or Inf"):
        pym4.sinkhorn(s, backend="triton")


def test_compile_configs_follow_the_launcher():
    mod = kernels()
    configs = list(mod.compile_configs())
    names = [c["name"] for c in configs]
    assert len(names) == len(set(names)) and len(configs) > 0
    for c in configs:
        assert set(c) - {"divisible"} == {"name", "fn", "signature", "constexprs", "num_warps", "num_stages"}
        params = list(c["fn"].arg_names)
        assert [p for p in params if p not in c["constexprs"]] == list(c["signature"]), c["name"]
        assert set(c.get("divisible", ())) <= {p for p, ty in c["signature"].items() if ty == "i32"}, c["name"]
    # Every kernel both as launched at K = 3000 and at K = 16000 (K, strides divisible by 16).
    assert sum("divisible" in c for c in configs) * 2 == len(configs)
    # The SwAV shape's launch (float32, K = 3000) is one of them.
    cfg = mod.launch_config(torch.float32, 3000, interpret=False)
    assert any(c["fn"] is mod._row_kernel and c["constexprs"]["BLOCK_K"] == cfg["BLOCK_K"]
               and c["constexprs"]["BLOCK_M"] == cfg["BLOCK_M"] and c["num_warps"] == cfg["num_warps"]
               for c in configs)


# ----- native (GPU) -----------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(1, 1), pytest.param((7, 5), marks=pytest.mark.memcheck),
                                   pytest.param((37, 129), marks=pytest.mark.memcheck), (3000, 64), (4096, 3000),
                                   (16, 16000)])  # (memcheck: the small ones again under compute-sanitizer)
@pytest.mark.parametrize("epsilon", [0.05, 0.01])
@pytest.mark.parametrize("dtype,rtol,atol", [(torch.float32, 5e-5, 1e-7), (torch.float16, 2e-3, 1e-4),
                                             (torch.bfloat16, 2e-2, 1e-3)])
def test_native_matches_reference(shape, epsilon, dtype, rtol, atol):
    s = uniform_scores(*shape, device="cuda").to(dtype)
    q = pym4.sinkhorn(s, epsilon, 3, backend="triton")
    assert q.dtype == dtype and q.device.type == "cuda"
    torch.testing.assert_close(q.double().cpu(), swav_reference(s.double().cpu(), epsilon, 3), rtol=rtol, atol=atol)
