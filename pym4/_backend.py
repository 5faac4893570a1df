"""Backend dispatch: which implementation of an op runs for a given call.

Backends (each name means one thing, for every op):
  ``cpu``      the compiled C++ core (``pym4._core``), OpenMP on the host;
  ``cuda``     CUDA kernels compiled into the core (only when built with CUDA);
  ``triton``   Triton kernels from ``pym4.kernels`` (GPU, or the CPU under TRITON_INTERPRET=1);
  ``chunked``  tiled torch code that never forms a B x B matrix (any device);
  ``torch``    the plain PyTorch reference, always available.

:data:`OPS` lists, per op and device type, the backends the op has, best first. ``backend=``
or the ``PYM4_BACKEND`` environment variable forces one: a forced backend runs exactly that
backend or raises; an automatic choice takes the first one that can run. This module is the
only reader of ``PYM4_BACKEND`` and ``TRITON_INTERPRET``. Nothing here imports torch or
triton, or touches the GPU, at import time.
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import os
from typing import Dict, Optional, Tuple

BACKENDS = ("cpu", "cuda", "triton", "chunked", "torch")

# The contrastive losses: on CPU the tiled torch code is the fast path (Triton there is the
# interpreter, for tests, and runs only when forced); on CUDA the fused kernels, then the
# tiled code for what Triton cannot take (no triton, float64), so no automatic choice ever
# falls back to the B x B reference.
_LOSS = {"cpu": ("chunked", "triton", "torch"), "cuda": ("triton", "chunked", "torch")}
# M4 on the data's device: the core's CPU or CUDA kernels, else the torch implementation.
_M4 = {"cpu": ("cpu", "torch"), "cuda": ("cuda", "torch")}

OPS: Dict[str, Dict[str, Tuple[str, ...]]] = {
    # On CUDA the Triton kernel serves a core built without CUDA; on the CPU it runs only when
    # forced (under TRITON_INTERPRET=1, for tests).
    "sinkhorn": {"cpu": ("cpu", "torch", "triton"), "cuda": ("cuda", "triton", "torch")},
    # sinkhorn(group=...): pass by pass, the prototype sums all-reduced between passes (the
    # CUDA kernel's per-pass entry point; the Triton kernel has no per-pass form).
    "sinkhorn_distributed": {"cpu": ("cpu", "torch"), "cuda": ("cuda", "torch")},
    # sinkhorn(prototypes=...): one matmul into the result buffer, solved there in place.
    "sinkhorn_features": {"cpu": ("cpu", "torch", "triton"), "cuda": ("cuda", "triton", "torch")},
    "sinkhorn_ot": {"cpu": ("cpu", "torch"), "cuda": ("torch",)},
    "clip_loss": _LOSS,
    "siglip_loss": _LOSS,
    # M4's exact dual solve exists only in the core; the streaming solver everywhere.
    "m4_exact": {"cpu": ("cpu",)},
    "m4_counts": {"cpu": ("cpu", "torch")},  # weighted counts of host data (reports, biases)
    "m4_fit": _M4,
    "m4_keep_probability": _M4,
}

_PORTABLE = ("chunked", "torch")
# Backends that take only some input dtypes (names as torch spells them, without "torch.").
_DTYPES = {"triton": ("float32", "float16", "bfloat16")}


@functools.lru_cache(maxsize=None)
def core():
    """The compiled core module, or None when it was not built (pure-Python checkout)."""
    # torch ships its own OpenMP runtime and the core links the system's, so two thread
    # pools share the cores. By default a libgomp worker spins for milliseconds after each
    # parallel region, starving torch ops that run in between (seen: a 16000-element
    # torch.log taking 8 ms); sleeping at once (OMP_WAIT_POLICY=PASSIVE) instead made
    # solvers with many short regions far slower. A short spin (about 0.1 ms) covers
    # back-to-back regions and then yields. libgomp reads this once, when it is first
    # loaded: the core and torch share one libgomp, so this takes effect only when the core
    # loads it before torch does (import torch first, and torch's libgomp, already
    # initialised, keeps its default). A user's own OMP_WAIT_POLICY/GOMP_SPINCOUNT wins, and
    # the environment is restored afterwards.
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


def available(backend: str, device_type: str) -> bool:
    """Whether ``backend`` can run on tensors of ``device_type`` ("cpu" or "cuda") here."""
    if backend in _PORTABLE:
        return True
    if backend == "cpu":
        return device_type == "cpu" and core() is not None
    if backend == "cuda":
        return device_type == "cuda" and core_has_cuda()
    if backend == "triton":
        if not _triton_importable():
            return False
        return device_type == "cuda" or (device_type == "cpu" and triton_interpret())
    raise ValueError(f"backend: unknown backend {backend!r}; expected one of {BACKENDS}")


def choose(op: str, device_type: str, backend: Optional[str] = None, *, dtype: Optional[str] = None) -> str:
    """The backend for one call of ``op`` on tensors of ``device_type``.

    ``backend`` (or PYM4_BACKEND when it is None) forces one: it is returned if it can run,
    else ValueError (unknown, or the op has none of that name on this device), TypeError
    (it does not take ``dtype``, e.g. "float64") or RuntimeError (not available here).
    Otherwise the first backend of ``OPS[op][device_type]`` that can run.
    """
    if op not in OPS:
        raise ValueError(f"op: unknown op {op!r}; expected one of {tuple(OPS)}")
    table = OPS[op]
    # Other device types (mps, xpu, ...) get the op's portable torch backends.
    options = table.get(device_type) or tuple(dict.fromkeys(
        name for names in table.values() for name in names if name in _PORTABLE))
    forced = backend if backend is not None else (os.environ.get("PYM4_BACKEND") or None)
    if forced is not None:
        if forced not in BACKENDS:
            raise ValueError(f"backend: unknown backend {forced!r}; expected one of {BACKENDS}")
        if forced not in options:
            if any(forced in names for names in table.values()):
                raise RuntimeError(f"backend: {forced!r} cannot run {op} on {device_type} tensors "
                                   f"(there it has {options})")
            has = tuple(dict.fromkeys(name for names in table.values() for name in names))
            raise ValueError(f"backend: {op} has no {forced!r} backend; it has {has}")
        if dtype is not None and dtype not in _DTYPES.get(forced, (dtype,)):
            raise TypeError(f"backend: the {forced} backend takes {', '.join(_DTYPES[forced])}, got {dtype}")
        if not available(forced, device_type):
            raise RuntimeError(f"backend: {forced!r} cannot run {op} on {device_type} tensors here "
                               f"({_why_unavailable(forced, device_type)})")
        return forced
    for name in options:
        if (dtype is None or dtype in _DTYPES.get(name, (dtype,))) and available(name, device_type):
            return name
    raise RuntimeError(f"backend: no backend of {op} runs on {device_type} tensors here "
                       f"(it has {options or 'none'} there)")


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
