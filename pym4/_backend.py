"""Backend dispatch: which implementation of an op runs for a given call.

Backends:
  ``cpu``    the compiled C++ core (``pym4._core``), OpenMP on the host;
  ``cuda``   CUDA kernels compiled into the core (only when built with CUDA);
  ``triton`` Triton kernels from ``pym4.kernels`` (GPU, or the CPU under TRITON_INTERPRET=1);
  ``torch``  a plain PyTorch implementation, always available.

Each op lists the backends it has, in order of preference for each device. ``backend=``
or the ``PYM4_BACKEND`` environment variable forces one: a forced backend that cannot
run raises; an automatic choice falls back to the next one. Nothing here touches the GPU
or imports triton at import time.
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import os
from typing import Optional, Sequence

BACKENDS = ("cpu", "cuda", "triton", "torch")


@functools.lru_cache(maxsize=None)
def core():
    """The compiled core module, or None when it was not built (pure-Python checkout)."""
    # torch ships its own OpenMP runtime and the core links the system's, so two thread
    # pools share the cores. By default a libgomp worker spins for milliseconds after each
    # parallel region, starving torch ops that run in between (seen: a 16000-element
    # torch.log taking 8 ms); sleeping at once (OMP_WAIT_POLICY=PASSIVE) instead made
    # solvers with many short regions far slower. A short spin (about 0.1 ms) covers
    # back-to-back regions and then yields. libgomp reads this once, when it is loaded with
    # the core; a user's own OMP_WAIT_POLICY/GOMP_SPINCOUNT wins, and the environment is
    # restored afterwards so torch's runtime is unaffected.
    saved = {k: os.environ.get(k) for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    if all(v is None for v in saved.values()):
        os.environ["GOMP_SPINCOUNT"] = "20000"
    try:
        return importlib.import_module("pym4._core")
    except ImportError:
        return None
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)


def core_has_cuda() -> bool:
    c = core()
    return c is not None and bool(c.build_info()["cuda"])


@functools.lru_cache(maxsize=None)
def _triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_interpret() -> bool:
    """True when Triton kernels run on the CPU through its interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def available(backend: str, device_type: str, *, needs_core: bool = True) -> bool:
    """Whether ``backend`` can run an op on tensors of ``device_type`` ("cpu" or "cuda").

    ``needs_core=False`` is for ops whose ``cpu`` backend is plain torch code (the chunked
    contrastive losses), so it does not depend on the compiled core.
    """
    if backend == "torch":
        return True
    if backend == "cpu":
        return device_type == "cpu" and (core() is not None or not needs_core)
    if backend == "cuda":
        return device_type == "cuda" and core_has_cuda()
    if backend == "triton":
        if not _triton_importable():
            return False
        return device_type == "cuda" or (device_type == "cpu" and triton_interpret())
    raise ValueError(f"backend: unknown backend {backend!r}; expected one of {BACKENDS}")


def choose(op: str, device_type: str, preference: Sequence[str], backend: Optional[str] = None,
           *, needs_core: bool = True) -> str:
    """Pick the backend for one call of ``op`` on ``device_type``.

    ``preference`` lists the op's backends, best first. ``backend`` (or PYM4_BACKEND when
    it is None) forces one.
    """
    forced = backend if backend is not None else (os.environ.get("PYM4_BACKEND") or None)
    if forced is not None:
        if forced not in BACKENDS:
            raise ValueError(f"backend: unknown backend {forced!r}; expected one of {BACKENDS}")
        if forced not in preference:
            raise ValueError(f"backend: {op} has no {forced!r} backend; it has {tuple(preference)}")
        if not available(forced, device_type, needs_core=needs_core):
            raise RuntimeError(f"backend: {forced!r} cannot run {op} on {device_type} tensors here "
                               f"({_why_unavailable(forced, device_type)})")
        return forced
    for name in preference:
        if available(name, device_type, needs_core=needs_core):
            return name
    return "torch"


def _why_unavailable(backend: str, device_type: str) -> str:
    if backend == "cpu":
        return "the input is not on the CPU" if device_type != "cpu" else "pym4._core is not built"
    if backend == "cuda":
        return ("the input is not on a CUDA device" if device_type != "cuda"
                else "pym4._core was built without CUDA (see pym4.build_info())")
    if backend == "triton":
        if not _triton_importable():
            return "triton is not installed"
        return "Triton needs a CUDA device, or TRITON_INTERPRET=1 for CPU tensors"
    return "unavailable"
