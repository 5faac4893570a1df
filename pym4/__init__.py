"""pym4: fair, large-scale self-supervised and contrastive pretraining.

Compiled kernels (C++/OpenMP, CUDA, Triton) for the three hot operations of SwAV/SEER
and CLIP/SigLIP training and of M4 data balancing, under a thin Python layer:

- :func:`sinkhorn`, :func:`sinkhorn_ot`: Sinkhorn-Knopp equipartition and entropic OT;
- :func:`clip_loss`, :func:`siglip_loss`, :mod:`pym4.nn`: CLIP/SigLIP losses over giant
  batches (tiled, never B x B), and :func:`similarity_topk` for retrieval;
- :mod:`pym4.m4`: M4 data balancing (``balance``, ``M4Solver``, bias metrics);
- :func:`build_info`: what the compiled core was built with.

``import pym4`` never needs triton, a GPU or a CUDA build, and it does not import torch:
the ops load it on first use (below), so an M4 worker on Ray or Spark that only runs
``pym4.m4``'s data-side code never pays torch's import (about a second per process).
"""
from __future__ import annotations

from importlib import metadata as _metadata

from . import _backend
from . import m4  # M4 data balancing: balance, M4Solver, representation_bias, ... (torch-free until used)

try:
    __version__ = _metadata.version("pym4")
except _metadata.PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0.0.0+unknown"

__all__ = ["build_info", "m4", "sinkhorn", "sinkhorn_ot", "ConvergenceWarning", "__version__",
           "clip_loss", "siglip_loss", "similarity_topk", "nn", "ot"]


def build_info() -> dict:
    """What the compiled core was built with, and what this process can use.

    Keys: ``version``, ``compiler``, ``core`` (whether pym4._core is importable),
    ``openmp``, ``omp_max_threads``, ``simd`` (the ISA clone this CPU runs) and
    ``simd_clones``, ``cuda`` (CUDA kernels compiled in) and ``cuda_archs``, ``triton``
    (installed), ``torch``, ``sanitize`` (the -fsanitize= list of a test build, else empty).
    """
    import importlib.util

    import torch

    core = _backend.core()
    info = dict(core.build_info()) if core is not None else {
        "version": __version__, "compiler": None, "openmp": False, "omp_max_threads": 1,
        "simd": None, "simd_clones": (), "cuda": False, "cuda_archs": "", "sanitize": ""}
    info["core"] = core is not None
    info["triton"] = importlib.util.find_spec("triton") is not None
    info["torch"] = torch.__version__
    return info


# ----- everything that imports torch: loaded on first access --------------------------------
# The ops, by the private module that defines them. The Sinkhorn module is ``_sinkhorn``, not
# ``sinkhorn``: importing a submodule binds its name on the package, so a module named like
# the function would replace ``pym4.sinkhorn`` (the function) as soon as anything imported it.
_LAZY_ATTRIBUTES = {"sinkhorn": "_sinkhorn", "sinkhorn_ot": "_sinkhorn", "ConvergenceWarning": "_sinkhorn",
                    "clip_loss": "contrastive", "siglip_loss": "contrastive", "similarity_topk": "contrastive"}
# Submodules: the losses as modules (nn), training, evaluation, data, demo (pym4.eval and
# pym4.demo pull in scikit-learn/matplotlib when used), and pym4.ot, POT's ``ot.sinkhorn``
# signature over the same core (``from pym4 import ot``).
_LAZY_SUBMODULES = ("nn", "train", "eval", "data", "demo", "ot")


def __getattr__(name: str):
    import importlib

    if name in _LAZY_ATTRIBUTES:
        value = getattr(importlib.import_module(f"{__name__}.{_LAZY_ATTRIBUTES[name]}"), name)
        globals()[name] = value  # later accesses skip this hook
        return value
    if name in _LAZY_SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY_ATTRIBUTES) | set(_LAZY_SUBMODULES))
