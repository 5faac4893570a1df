"""POT-compatible entropic optimal transport: ``from pym4 import ot`` in code written for POT.

``ot.sinkhorn`` has the signature, defaults, return values, log dict and warnings of POT's
``ot.sinkhorn`` (PythonOT/POT, ``ot/bregman/_sinkhorn.py``) for ``method="sinkhorn"`` and
``method="sinkhorn_log"``, and is solved by pym4's core (:func:`pym4.sinkhorn_ot`).
"""
from __future__ import annotations

from .sinkhorn import ConvergenceWarning, _sinkhorn_ot

__all__ = ["sinkhorn", "ConvergenceWarning"]

_METHODS = ("sinkhorn", "sinkhorn_log")


def sinkhorn(a, b, M, reg, method="sinkhorn", numItermax=1000, stopThr=1e-9, verbose=False, log=False, warn=True,
             warmstart=None, **kwargs):
    r"""Entropic regularised optimal transport plan, as POT's ``ot.sinkhorn``.

    .. math::
        \gamma = \arg\min_\gamma \langle \gamma, M \rangle_F + \mathrm{reg} \sum_{ij} \gamma_{ij}
        (\log \gamma_{ij} - 1) \quad \text{s.t.} \quad \gamma 1 = a,\ \gamma^T 1 = b,\ \gamma \ge 0

    (Cuturi, 2013). Both methods run the same log-domain-safe solver, so
    ``method="sinkhorn"`` does not underflow at small ``reg`` as POT's does; they differ
    only in what the log dict holds, as in POT.

    Parameters
    ----------
    a : array (n,)  — source histogram (empty or None: uniform)
    b : array (m,) or (m, h)  — target histogram(s); with h columns the result is the h
        transport costs (POT's "multi b")
    M : array (n, m)  — cost matrix (numpy or torch, float32/float64)
    reg : float  — regularisation, > 0
    method : {"sinkhorn", "sinkhorn_log"}
    numItermax : int, default 1000  — maximum number of iterations
    stopThr : float, default 1e-9  — stop when the l2 error of the column marginals is below
        it, measured every 10 iterations as POT does
    verbose : bool  — print the measured errors
    log : bool  — also return a dict: ``err``, ``niter``, ``u``, ``v`` (and ``log_u``,
        ``log_v`` for ``method="sinkhorn_log"``)
    warn : bool, default True  — warn when ``numItermax`` is reached without convergence
    warmstart : (log_u, log_v), optional  — initial dual potentials

    Returns
    -------
    gamma : array (n, m) of M's type and dtype (for a 2-D b: the costs, (h,)); and the log
    dict when ``log``.
    """
    if kwargs:
        raise TypeError(f"sinkhorn: unexpected keyword argument(s) {sorted(kwargs)} (pym4.ot.sinkhorn supports "
                        f"method='sinkhorn' and 'sinkhorn_log' without extra options)")
    if not isinstance(method, str) or method.lower() not in _METHODS:
        raise ValueError(f"method: pym4.ot.sinkhorn supports {_METHODS}, got {method!r}")
    method = method.lower()
    res, info = _sinkhorn_ot(a, b, M, reg, numItermax, stopThr, warmstart, None, check_every=10,
                             gauge="ones" if method == "sinkhorn" else "zeros", potentials=bool(log))
    if verbose:
        for k, err in enumerate(info["err"] if not info["err"] or not isinstance(info["err"][0], list)
                                else info["err"][0]):
            if k % 20 == 0:
                print("{:5s}|{:12s}".format("It.", "Err") + "\n" + "-" * 19)
            print("{:5d}|{:8e}|".format(10 * k, err))
    if warn and not info["converged"]:
        import warnings

        warnings.warn("Sinkhorn did not converge. You might want to increase the number of iterations `numItermax` "
                      "or the regularization parameter `reg`.", ConvergenceWarning, stacklevel=2)
    if not log:
        return res
    keys = ("err", "niter", "u", "v") if method == "sinkhorn" else ("err", "niter", "log_u", "log_v", "u", "v")
    if method == "sinkhorn_log" and getattr(b, "ndim", 1) == 2:
        keys = keys[2:]  # POT's multi-b sinkhorn_log keeps only the potentials
    return res, {k: info[k] for k in keys}
