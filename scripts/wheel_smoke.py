"""The Python half of scripts/wheel-smoke.sh: run in a fresh venv where the wheel is installed,
from a folder without a pym4/ source tree. Checks the build and runs each op once on the CPU
against the tests' references (tests/references.py, found through $PYM4_REFERENCES).
Exits non-zero (an AssertionError) on the first check that fails."""
import os
import sys

import numpy as np
import torch

import pym4

sys.path.insert(0, os.environ["PYM4_REFERENCES"])
import references  # noqa: E402  (plain torch/numpy, never through pym4)

info = pym4.build_info()
print({k: info[k] for k in ("version", "core", "openmp", "simd", "cuda", "cuda_archs", "torch")})
site = os.path.dirname(os.path.dirname(torch.__file__))
assert pym4.__file__.startswith(site), f"pym4 imported from {pym4.__file__}, not from the venv ({site})"
assert info["core"], "pym4._core did not load"
assert info["openmp"], "the core was built without OpenMP"
assert info["cuda"] and info["cuda_archs"] == os.environ.get("PYM4_WHEEL_ARCHS", "80,90"), info

g = torch.Generator().manual_seed(0)
F = torch.nn.functional

# Sinkhorn-Knopp on the C++ core, against SwAV's iteration in float64.
scores = F.normalize(torch.randn(64, 16, generator=g), dim=1) @ F.normalize(torch.randn(10, 16, generator=g), dim=1).T
q = pym4.sinkhorn(scores, epsilon=0.05, n_iters=3, backend="cpu")
err = float((q.double() - references.swav_sinkhorn(scores, 0.05, 3)).abs().max())
assert err < 1e-5, f"sinkhorn: max |error| {err:.2e}"

# CLIP and SigLIP losses with their backward, against the float64 formulas.
x = F.normalize(torch.randn(32, 8, generator=g), dim=1)
y = F.normalize(torch.randn(32, 8, generator=g) + x, dim=1)
for name, ours, ref in (("clip", pym4.clip_loss, references.clip_loss),
                        ("siglip", pym4.siglip_loss, references.siglip_loss)):
    xg, xr = x.clone().requires_grad_(), x.double().requires_grad_()
    loss, want = ours(xg, y, 10.0, -5.0), ref(xr, y.double(), 10.0, -5.0)
    loss.backward()
    want.backward()
    got, ref_value = loss.item(), want.item()
    assert abs(got - ref_value) < 1e-5 * max(1.0, abs(ref_value)), (name, got, ref_value)
    assert torch.allclose(xg.grad.double(), xr.grad, atol=1e-5), f"{name}: d image_features"

# M4 on the C++ core: status, budget and every constraint, recomputed from q.
rng = np.random.default_rng(0)
s = (rng.random((5000, 2)) < [0.3, 0.5]).astype(np.uint8)
labels = (rng.random((5000, 4)) < 0.2 + 0.3 * s[:, :1]).astype(np.uint8)
res = pym4.m4.balance(s, labels, budget=0.6, eps_rep=0.01, eps_assoc=0.05)
assert res.status == "optimal", res.message
viol = references.m4_max_violation(s, labels, np.asarray(res.q), res.target, 0.6, 0.01, 0.05)
assert viol < 1e-6, f"m4: constraint violation {viol:.2e}"
print(f"wheel smoke test passed: sinkhorn (err {err:.1e}), clip_loss, siglip_loss, m4.balance "
      f"(violation {viol:.1e})")
