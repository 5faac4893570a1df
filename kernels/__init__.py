"""GPU device code of pym4, installed as ``pym4.kernels``.

``*.py`` are Triton kernels, imported lazily by the op modules (never at ``import pym4``);
``cuda/*.cu`` are CUDA kernels compiled into ``pym4._core`` when a CUDA compiler is found.
"""
