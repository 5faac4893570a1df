"""M4 data balancing: per-example keep probabilities that remove representation and
association biases (Alabdulmohsin, Wang, Steiner, Goyal, D'Amour, Zhai, "CLIP the Bias:
How Useful is Balancing Data in Multimodal Learning?", ICLR 2024).

For N examples with sensitive groups ``s`` (N, m) in {0,1}, labels or proxies ``y`` (N, c)
in {0,1} and utilities ``u`` (N,), the keep probabilities ``q`` solve (DESIGN.md §3)::

    minimise    (1/N) sum_i [ 1/2 (q_i - eta)^2 - u_i q_i ]
    subject to  (1/N) sum_i q_i = eta                                   (budget)
                |(1/N) sum_i q_i (s_ik - pi_k)|         <= eta eps_rep     (representation)
                |(1/N) sum_i q_i (s_ik - pi_k) y_ir|    <= eta eps_assoc   (association)
                0 <= q_i <= 1

and are ``q_i = clip(eta + u_i - a_i^T (v+ - v-) - mu, 0, 1)`` with
``a_i = (s_i - pi) (x) [1; y_i]`` and the duals ``v+, v- >= 0``, ``mu``. ``method="exact"``
solves the dual to convergence (proximal Newton in the C++ core); ``method="stream"`` and
:class:`M4Solver` run the paper's one-pass stochastic dual ascent with bounded memory.
No N x m(c+1) matrix is ever built.

Modules: ``_inputs`` (0/1 matrices, labels, utility, the default target), ``_problem``
(the problem, weighted counts and the :class:`Report` built from them alone: constraint
values, tolerances, biases, the infeasibility certificate, status and message),
``_solver`` (:class:`M4Solver` and its :class:`StreamState`), ``_device`` (the torch path
and the CUDA launcher), ``_balance`` (:func:`balance`, :func:`sample`); over datasets:
``_columns`` (column specs), ``_stages`` (engine stages), ``_passes`` (the exact solver as
passes), ``_dataset`` (:func:`fit_dataset`, :func:`balance_dataset`), ``_feasibility``
(the largest feasible budget), ``model`` (:class:`M4Model`). A caller that
streams data in passes adds :func:`weighted_counts` per batch and calls :func:`report`.
"""
from ._inputs import default_target
from ._problem import (Problem, Report, association_bias, association_gaps, group_shares, report,
                       representation_bias, target_from_counts, weighted_counts)

# The in-memory solvers take torch tensors and import torch; they load on first use, so that
# the data-side modules (model, engines, fit_dataset) run on a worker without torch (§3b).
_LAZY = {"balance": "_balance", "BalanceResult": "_balance", "sample": "_balance",
         "M4Solver": "_solver", "StreamState": "_solver", "M4Model": "model",
         "fit_dataset": "_dataset", "balance_dataset": "_dataset",
         "InfeasibleError": "_feasibility", "largest_feasible_budget": "_feasibility"}


def __getattr__(name):
    if name in _LAZY:
        import importlib
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["balance", "BalanceResult", "M4Solver", "StreamState", "representation_bias", "association_bias",
           "sample", "default_target", "weighted_counts", "report", "Report", "Problem", "group_shares",
           "association_gaps", "target_from_counts", "M4Model", "fit_dataset", "balance_dataset",
           "InfeasibleError", "largest_feasible_budget"]
