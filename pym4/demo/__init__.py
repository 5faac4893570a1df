"""``pym4 demo``: does balancing data with M4 make a CLIP model fairer?

A small-scale replay of "CLIP the Bias" (Alabdulmohsin et al., ICLR 2024) on CPU, and a
SwAV linear-probe check on digits. None of this is library code: it is what the demo runs.

- :mod:`pym4.demo.run`: ``run_demo`` and ``run_swav_demo``, the two runs, and the ``PRESETS``
  of ``--size``;
- :mod:`pym4.demo.synthetic`: the synthetic image-caption set with a controllable bias;
- :mod:`pym4.demo.networks`: the small networks (DigitsNet, ImageTower, TextTower);
- :mod:`pym4.demo.digits`: scikit-learn's 8 x 8 digits;
- :mod:`pym4.demo.plots`: the demo's figures.

The demo needs matplotlib and scikit-learn, which the base install does not carry:
``pip install 'pym4[demo]'``. :func:`missing_requirements` names what is absent without
importing it, so ``pym4 demo`` can say so before it starts any work; this module imports
nothing else (not even torch) for that reason.
"""
from __future__ import annotations

import importlib.util
from typing import List

# Import name -> distribution name, for every package the demo needs beyond pym4's own.
REQUIREMENTS = {"matplotlib": "matplotlib", "sklearn": "scikit-learn"}
INSTALL_HINT = "pip install 'pym4[demo]'"

__all__ = ["REQUIREMENTS", "INSTALL_HINT", "missing_requirements"]


def missing_requirements() -> List[str]:
    """Distribution names of the demo's requirements that cannot be imported here (empty when all can)."""
    return [dist for module, dist in REQUIREMENTS.items() if importlib.util.find_spec(module) is None]

