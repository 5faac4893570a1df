"""The streaming M4 solver (one-pass stochastic projected dual ascent, bounded memory) and
the Newton refinement of given duals that ``balance(method="stream")`` runs after its pass
(:func:`newton_model`, :func:`newton_step`, :func:`keep_probability_at_budget`)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional

import numpy as np
import torch

from .. import _backend
from .._arrays import to_tensor
from . import _device, _inputs
from ._problem import Problem

_ARRAYS = ("v_plus", "v_minus", "avg_w", "curv")
_SCALARS = ("mu", "mu_avg", "n_seen", "steps")  # the core's `scalars` layout, in this order
# 2: tensors and python scalars (torch.load(weights_only=True) reads them); 1: numpy arrays.
STATE_VERSION = 2


_INF = float("inf")


def _config(**values) -> Dict[str, Any]:
    """The solver's checked configuration: the one set of checks of the constructor and of
    :meth:`M4Solver.load_state_dict`; each error names its argument."""
    out = {}
    for key, v in values.items():
        if key == "batch_size":
            out[key] = _inputs.positive_int(v, key)
        elif key == "budget":
            out[key] = _inputs.scalar(v, key, 0.0, 1.0, lo_open=True)
        else:  # eps_rep, eps_assoc, gamma >= 0 and lr > 0: finite numbers
            out[key] = _inputs.scalar(v, key, 0.0, _INF, lo_open=key == "lr", hi_open=True)
    return out


@dataclass
class StreamState:
    """The dual state of :class:`M4Solver` (p = m (c + 1) constraints, float64).

    v_plus, v_minus : (p,) current iterates of the duals of the upper/lower constraints.
    avg_w : (p,) polynomial-decay average of v_plus - v_minus (what q is computed from).
    curv : (p,) running sum of a_ij^2 over the examples seen (the preconditioner).
    mu, mu_avg : the budget's dual and its average; n_seen, steps : examples and steps so far.
    Fields are numpy arrays and floats, or (inside the torch path) tensors on one device.
    """
    v_plus: Any
    v_minus: Any
    avg_w: Any
    curv: Any
    mu: Any = 0.0
    mu_avg: Any = 0.0
    n_seen: Any = 0.0
    steps: Any = 0.0

    @classmethod
    def zeros(cls, p: int) -> "StreamState":
        return cls(*(np.zeros(p) for _ in _ARRAYS))

    def scalars(self) -> np.ndarray:
        """(4,) [mu, mu_avg, n_seen, steps]: the core's in/out argument."""
        return np.array([float(getattr(self, k)) for k in _SCALARS])

    def set_scalars(self, values) -> None:
        for k, v in zip(_SCALARS, np.asarray(values, dtype=np.float64).reshape(-1)):
            setattr(self, k, float(v))

    def to_torch(self, device: torch.device) -> "StreamState":
        return StreamState(*(torch.from_numpy(getattr(self, k)).to(device) for k in _ARRAYS),
                           *(torch.tensor(float(getattr(self, k)), dtype=torch.float64, device=device)
                             for k in _SCALARS))

    def to_numpy(self) -> "StreamState":
        return StreamState(*(getattr(self, k).cpu().numpy().copy() for k in _ARRAYS),
                           *(float(getattr(self, k)) for k in _SCALARS))

    def copy(self) -> "StreamState":
        return dataclasses.replace(self, **{k: getattr(self, k).copy() for k in _ARRAYS})


class M4Solver:
    """Streaming M4: one-pass stochastic projected dual ascent with bounded memory.

    Each mini-batch of ``batch_size`` examples gives ``g = mean q_i a_i`` and
    ``g_mu = mean q_i - eta`` at the current duals; then
    ``v+ <- max(0, v+ + lr (g - lambda) / h)``, ``v- <- max(0, v- + lr (-g - lambda) / h)``,
    ``mu <- mu + lr g_mu`` with ``h`` the running mean of ``a_ij^2`` (a diagonal
    preconditioner), and the duals used by :meth:`keep_probability` are the polynomial-decay
    average of the iterates (Shamir & Zhang, 2013). Memory is O(m (c + 1)), whatever N.

    Parameters
    ----------
    target : float or (m,) array in (0, 1)
        Target group proportions (a stream has no data to take a default from).
    budget, eps_rep, eps_assoc : as in :func:`balance`.
    lr, gamma, batch_size : step size, averaging parameter, mini-batch size.
    group : torch.distributed.ProcessGroup, optional
        Every rank calls :meth:`partial_fit` with its own shard; the mini-batch statistics
        are all-reduced, so all ranks hold the same duals: those of one process streaming
        the union of the ranks' i-th mini-batches as its i-th mini-batch.
    backend : {"cpu", "cuda", "torch"}, optional
        Force an implementation (default: ``cpu`` (the core) for host data, ``cuda`` for
        CUDA tensors, ``torch`` where those are not built; see ``pym4._backend``).
    """

    def __init__(self, target, *, budget: float = 0.9, eps_rep: float = 0.01, eps_assoc: float = 0.01,
                 lr: float = 0.1, gamma: float = 3.0, batch_size: int = 256, group=None,
                 backend: Optional[str] = None):
        cfg = _config(budget=budget, eps_rep=eps_rep, eps_assoc=eps_assoc, lr=lr, gamma=gamma,
                      batch_size=batch_size)
        self.budget, self.eps_rep, self.eps_assoc = cfg["budget"], cfg["eps_rep"], cfg["eps_assoc"]
        self.lr, self.gamma, self.batch_size = cfg["lr"], cfg["gamma"], cfg["batch_size"]
        self.group = group
        self.backend = backend
        if target is None:
            raise ValueError("target: required for streaming (a scalar or one proportion per group)")
        # Its values are checked now, its length once the first batch gives the number of
        # groups (a target of 1.5 was accepted here and refused at the first partial_fit).
        if isinstance(target, torch.Tensor):
            given = target.numel()
        elif isinstance(target, (list, tuple, np.ndarray)):
            given = int(np.size(np.asarray(target, dtype=object)))
        else:
            given = 1  # a number (or not one: target() names its type)
        _inputs.target(target, max(given, 1), None)
        self._target_arg = target
        self.problem: Optional[Problem] = None
        self.state: Optional[StreamState] = None
        self.m: Optional[int] = None
        self.c: Optional[int] = None
        # balance() clears it: its utility comes centred where the budget holds, so mu = 0.
        self._start_mu_at_budget = True

    # state ------------------------------------------------------------------------------------
    def _init(self, m: int, c: int) -> None:
        if self.m is None:
            self.problem = Problem(_inputs.target(self._target_arg, m, None), self.budget, self.eps_rep,
                                   self.eps_assoc)
            self.m, self.c = m, c
            self.state = StreamState.zeros(m * (c + 1))
        elif (m, c) != (self.m, self.c):
            raise ValueError(f"s, y: this solver was fitted with m={self.m} groups and c={self.c} labels, "
                             f"got m={m}, c={c}")

    @property
    def pi(self) -> np.ndarray:
        self._check_fitted()
        return self.problem.target

    @property
    def n_seen(self) -> int:
        return 0 if self.m is None else int(self.state.n_seen)

    @property
    def steps(self) -> int:
        return 0 if self.m is None else int(self.state.steps)

    @property
    def v_plus(self) -> np.ndarray:
        """Averaged duals of the upper constraints, (m, c + 1)."""
        self._check_fitted()
        return np.maximum(self.state.avg_w, 0).reshape(self.m, self.c + 1)

    @property
    def v_minus(self) -> np.ndarray:
        self._check_fitted()
        return np.maximum(-self.state.avg_w, 0).reshape(self.m, self.c + 1)

    @property
    def mu(self) -> float:
        self._check_fitted()
        return float(self.state.mu_avg)

    def _check_fitted(self) -> None:
        if self.m is None:
            raise RuntimeError("M4Solver: call partial_fit (or load_state_dict) first")

    def state_dict(self) -> Dict[str, Any]:
        """Everything needed to resume: the configuration (python scalars) and the dual state
        (float64 torch tensors, copies), so ``torch.save`` writes it and ``torch.load`` with
        its default ``weights_only=True`` reads it back. ``version`` is the layout's
        (:data:`STATE_VERSION`); :meth:`load_state_dict` also reads the states of earlier
        versions (numpy arrays, no ``version`` key)."""
        self._check_fitted()
        pr, st = self.problem, self.state
        return {"version": STATE_VERSION, "m": int(self.m), "c": int(self.c),
                "target": torch.tensor(pr.target, dtype=torch.float64), "budget": float(pr.budget),
                "eps_rep": float(pr.eps_rep), "eps_assoc": float(pr.eps_assoc), "lr": float(self.lr),
                "gamma": float(self.gamma), "batch_size": int(self.batch_size),
                **{k: torch.tensor(getattr(st, k), dtype=torch.float64) for k in _ARRAYS},
                "scalars": torch.tensor(st.scalars(), dtype=torch.float64)}

    def load_state_dict(self, state: Dict[str, Any]) -> "M4Solver":
        """Resume from :meth:`state_dict` (of this version or an earlier one). Every entry is
        checked as the constructor checks its arguments, before anything changes: a
        missing, unknown, truncated or out-of-range entry is a ValueError naming its key."""
        if not isinstance(state, Mapping):
            raise ValueError(f"state: expected the dict of M4Solver.state_dict(), got {type(state).__name__}")
        version = state.get("version", 1)
        if isinstance(version, bool) or not isinstance(version, (int, np.integer)) or not 1 <= version <= STATE_VERSION:
            raise ValueError(f"state['version']: expected an integer in [1, {STATE_VERSION}], got {version!r}")
        need = {"m", "c", "target", "budget", "eps_rep", "eps_assoc", "lr", "gamma", "batch_size", *_ARRAYS,
                "scalars"}
        missing, extra = need - set(state), set(state) - need - {"version"}
        if missing:
            raise ValueError(f"state: missing keys {sorted(missing)} (not a state_dict() of M4Solver?)")
        if extra:
            raise ValueError(f"state: unknown keys {sorted(map(str, extra))} (not a state_dict() of M4Solver?)")
        m, c = _state_int(state, "m", 1), _state_int(state, "c", 0)
        try:
            cfg = _config(**{k: state[k] for k in ("budget", "eps_rep", "eps_assoc", "lr", "gamma", "batch_size")})
        except (TypeError, ValueError) as e:
            raise ValueError(f"state[{str(e).split(':', 1)[0]!r}]:{str(e).split(':', 1)[1]}") from None
        try:
            target = _inputs.target(_state_vector(state, "target", m), m, None)
        except (TypeError, ValueError) as e:
            raise ValueError(f"state['target']: {str(e).split(': ', 1)[1]}") from None
        p = m * (c + 1)
        arrays = {k: _state_vector(state, k, p, nonneg=k != "avg_w") for k in _ARRAYS}
        mu, mu_avg, n_seen, steps = _state_vector(state, "scalars", 4)
        if not (n_seen >= 0 and steps >= 0 and n_seen == int(n_seen) and steps == int(steps) and steps <= n_seen):
            raise ValueError(f"state['scalars']: examples seen ({n_seen!r}) and steps ({steps!r}) must be whole "
                             f"numbers with 0 <= steps <= examples seen")
        self.m, self.c = m, c
        self.budget, self.eps_rep, self.eps_assoc = cfg["budget"], cfg["eps_rep"], cfg["eps_assoc"]
        self.problem = Problem(target, self.budget, self.eps_rep, self.eps_assoc)
        self.lr, self.gamma, self.batch_size = cfg["lr"], cfg["gamma"], cfg["batch_size"]
        self.state = StreamState(*(arrays[k] for k in _ARRAYS))
        self.state.set_scalars([mu, mu_avg, n_seen, steps])
        return self

    # fitting ----------------------------------------------------------------------------------
    def _backend_for(self, op: str, s) -> str:
        device = s.device.type if isinstance(s, torch.Tensor) else "cpu"
        return _backend.choose(op, device, self.backend)

    def partial_fit(self, s, y=None, utility=None) -> "M4Solver":
        """One batch of the stream: consecutive mini-batches of ``batch_size`` (the last may
        be shorter), one dual-ascent step each. s (n, m), y (n, c) or CSR, utility (n,).

        Runs where the data are: the core for host data, its CUDA kernel (else torch) on
        the GPU for CUDA tensors; ``backend=`` forces one.
        """
        name = self._backend_for("m4_fit", s)
        if name == "cpu":
            s8 = _inputs.group_matrix(s)
            lab = _inputs.as_labels(y, s8.shape[0])
            u = _inputs.utility(utility, s8.shape[0])
            self._start_mu(s8.shape[1], lab.c, u, None)
            self._fit_core(s8, lab, u)
        else:
            device = s.device if isinstance(s, torch.Tensor) else torch.device("cpu")
            rows = _device.as_rows(s, y, utility, device, for_kernel=name == "cuda")
            self._start_mu(rows[0].shape[1], rows[1].shape[1], rows[2], device)
            self._fit_torch(*rows, use_kernel=name == "cuda")
        return self

    def _start_mu(self, m: int, c: int, u, device) -> None:
        """On the stream's first batch, mu starts where the budget holds on its first
        mini-batch without constraints (:func:`budget_mu`; with a group, on the union of the
        ranks' first mini-batches, as one process streaming it would): a utility offset by
        100 left mu at 0 with every q at 1, and steps of size lr took the whole stream to move
        it. Only mu moves with a constant part of u, so from this start the stream is blind to
        it, as balance()'s centring makes the in-memory solve."""
        fresh = self.m is None or self.state.n_seen == 0
        self._init(m, c)
        if not fresh or not self._start_mu_at_budget or (u is None and self.group is None):
            return
        head = None if u is None else u[:self.batch_size]
        if isinstance(head, torch.Tensor):
            head = head.detach().cpu().numpy()
        if self.group is not None:  # the union of the ranks' first mini-batches; every rank joins
            import torch.distributed as dist
            mine = torch.full((self.batch_size,), float("nan"), dtype=torch.float64, device=device)
            if head is not None:
                mine[:head.shape[0]] = torch.from_numpy(np.ascontiguousarray(head)).to(mine.device)
            every = [torch.empty_like(mine) for _ in range(dist.get_world_size(self.group))]
            dist.all_gather(every, mine, group=self.group)
            union = torch.cat(every).cpu().numpy()
            head = union[~np.isnan(union)]  # (NaN pads a short or absent batch: u is finite)
        k = 0 if head is None else head.shape[0]
        mu = budget_mu(self.problem.budget + head, k * self.problem.budget) if k else 0.0
        self.state.mu = self.state.mu_avg = mu

    def _steps(self, n: int, device=None) -> int:
        """Mini-batches this call runs: the largest count over the ranks, so that every
        rank joins every all-reduce (a rank out of data contributes zeros)."""
        steps = -(-n // self.batch_size)
        if self.group is not None:
            import torch.distributed as dist
            t = torch.tensor([float(steps)], dtype=torch.float64, device=device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
            steps = int(t.item())
        return steps

    def _fit_core(self, s8: np.ndarray, lab: _inputs.Labels, u: Optional[np.ndarray],
                  order: Optional[np.ndarray] = None, counts_data: Optional[np.ndarray] = None,
                  shuffle_seed: Optional[int] = None) -> None:
        """The core's pass; ``order`` (a permutation of the n rows, int64) visits the rows in
        that order without a shuffled copy of the data (one process only); ``shuffle_seed``
        (< 2^64) visits them in the order ``m4_shuffled_order(n, shuffle_seed)`` without
        building it where the rows pack into 8 bytes (include/pym4/m4.h). ``counts_data``
        (float64, :func:`pym4.m4.weighted_counts` layout; one process only): the data's counts
        of these rows are added into it (the pass has them: balance's report needs them)."""
        n, m = s8.shape
        self._init(m, lab.c)
        core, st, pr = _backend.core(), self.state, self.problem.core()
        scalars = st.scalars()
        arrays = (st.v_plus, st.v_minus, st.avg_w, st.curv, scalars)
        if self.group is None:
            if n:
                core.m4_stream_fit(_inputs.data_tuple(s8, lab, u), pr, self.lr, self.gamma, self.batch_size, *arrays,
                                   order=order, counts_data=counts_data, shuffle_seed=shuffle_seed)
            st.set_scalars(scalars)
            return
        if order is not None or counts_data is not None or shuffle_seed is not None:
            raise ValueError("order, counts_data, shuffle_seed: not supported with a process group (one process only)")
        import torch.distributed as dist
        B, p = self.batch_size, m * (lab.c + 1)
        for j in range(self._steps(n)):
            b, e = min(j * B, n), min((j + 1) * B, n)
            if e > b:
                data = _inputs.data_tuple(s8[b:e], lab.slice(b, e), None if u is None else u[b:e])
                stats = core.m4_batch_stats(data, pr, st.v_plus - st.v_minus, float(scalars[0]))
            else:
                stats = np.zeros(2 * p + 2)
            t = torch.from_numpy(stats)
            dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.group)
            core.m4_apply_update(m, lab.c, pr, self.lr, self.gamma, *arrays, t.numpy())
        st.set_scalars(scalars)

    def _fit_torch(self, s, y, u, use_kernel: bool) -> None:
        """Mini-batch statistics on the data's device (the CUDA kernel, or torch), the update in torch."""
        n, m = s.shape
        self._init(m, y.shape[1])
        dev = s.device
        state = self.state.to_torch(dev)
        pi = torch.from_numpy(self.problem.target).to(dev)
        lam = torch.from_numpy(self.problem.tolerances(self.c)).to(dev)
        eta = self.problem.budget
        B = self.batch_size
        for j in range(self._steps(n, dev)):
            b, e = min(j * B, n), min((j + 1) * B, n)
            w = state.v_plus - state.v_minus
            if use_kernel:
                stats = torch.zeros(2 * lam.shape[0] + 2, dtype=torch.float64, device=dev)
                # (the rows came in the kernel's layout: as_rows(for_kernel=True))
                _device.cuda_batch(s, y, u, b, e - b, pi, eta, w, state.mu, stats=stats)
            else:
                stats = _device.batch_stats(s[b:e], y[b:e], None if u is None else u[b:e], pi, eta, w, state.mu)
            if self.group is not None:
                import torch.distributed as dist
                dist.all_reduce(stats, op=dist.ReduceOp.SUM, group=self.group)
            _device.apply_update(state, stats, lam, eta, self.lr, self.gamma)
        self.state = state.to_numpy()

    # inference --------------------------------------------------------------------------------
    def keep_probability(self, s, y=None, utility=None):
        """q_i = clip(eta + u_i - a_i^T (v+ - v-) - mu, 0, 1) with the averaged duals: a pure
        function of the state and the example, (n,) float64 in the caller's array type."""
        self._check_fitted()
        name = self._backend_for("m4_keep_probability", s)
        t, origin = to_tensor(_inputs.dense_input(s), "s")
        if name != "cpu":
            st, yt, ut = _device.as_rows(s, y, utility, t.device, for_kernel=name == "cuda")
            self._init(st.shape[1], yt.shape[1])
            w = torch.from_numpy(self.state.avg_w).to(t.device)
            pi = torch.from_numpy(self.problem.target).to(t.device)
            mu = torch.tensor([float(self.state.mu_avg)], dtype=torch.float64, device=t.device)
            if name == "cuda":
                q = torch.empty(st.shape[0], dtype=torch.float64, device=t.device)
                _device.cuda_batch(st, yt, ut, 0, st.shape[0], pi, self.problem.budget, w, mu, q=q)
            else:
                q = _device.keep_probability(st, yt, ut, pi, self.problem.budget, w, mu[0])
            return q.cpu().numpy() if origin.is_numpy else q
        s8 = _inputs.group_matrix(s)
        lab = _inputs.as_labels(y, s8.shape[0])
        u = _inputs.utility(utility, s8.shape[0])
        self._init(s8.shape[1], lab.c)
        q = np.empty(s8.shape[0])
        if s8.shape[0]:
            _backend.core().m4_keep_probability(_inputs.data_tuple(s8, lab, u), self.problem.core(),
                                                self.state.avg_w, float(self.state.mu_avg), q)
        return q if origin.is_numpy else torch.from_numpy(q).to(t.device)


def _state_int(state, key: str, lo: int) -> int:
    v = state[key]
    if isinstance(v, torch.Tensor) and v.numel() == 1 and not v.is_floating_point() and v.dtype != torch.bool:
        v = int(v.item())
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
        raise ValueError(f"state[{key!r}]: expected an integer >= {lo}, got {v!r}")
    return int(v)


def _state_vector(state, key: str, size: int, nonneg: bool = False) -> np.ndarray:
    """(size,) float64 copy of a state entry (tensor, numpy array or list), finite."""
    v = state[key]
    try:
        a = (v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v)).astype(np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"state[{key!r}]: expected {size} numbers, got {type(v).__name__}") from None
    a = np.array(a.reshape(-1))
    if a.shape[0] != size:
        raise ValueError(f"state[{key!r}]: expected {size} values, got {a.shape[0]} (truncated or another problem?)")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"state[{key!r}]: contains NaN or Inf")
    if nonneg and np.any(a < 0):
        raise ValueError(f"state[{key!r}]: must be >= 0 (got {float(a.min())!r})")
    return a


# ----- Newton refinement of given duals (balance(method="stream") after the stream's pass) -------

# Rows the Newton model's curvature is estimated from (the gradient uses every row).
HESSIAN_ROWS = 1 << 18


def hessian_stride(n: int) -> int:
    """Every how many rows the curvature sums take one: about HESSIAN_ROWS of n rows."""
    return max(1, n // HESSIAN_ROWS)


def refine_duals(s8: np.ndarray, lab: _inputs.Labels, u: Optional[np.ndarray], problem: Problem, w: np.ndarray,
                 mu: float, refine: int, before: Optional[np.ndarray] = None):
    """``refine`` Newton passes from duals (w, mu) (balance(method="stream") after its pass).

    Above 2 SAMPLE_ROWS rows every pass but the last runs on every k-th row (about
    SAMPLE_ROWS of them); the last always on every row. Each pass builds :func:`newton_model` at the current duals, the gradient over every row
    and the curvature over a strided sample of about HESSIAN_ROWS rows (an inexact Newton
    step, which converges as the gradient is exact), and takes :func:`newton_step`.
    ``before``: the data's counts (:func:`pym4.m4.weighted_counts` layout) when the caller has
    them (the stream's pass counts them); else the first pass counts them, as they do not
    depend on the duals. Returns (w, mu, before); before stays None when refine = 0 and none
    was given.
    """
    n = s8.shape[0]
    sample = _sample_rows(s8, lab, u) if refine > 1 else None
    for k in range(refine):
        # Every pass but the last on a spread-out sample (when the data is much larger): the
        # steps from the stream's duals land near the optimum for a tenth of a pass each; the
        # last, on every row, removes the sample's error (as the exact solver's warm start).
        rows = sample if (sample is not None and k < refine - 1) else (s8, lab, u)
        full = rows[0] is s8
        H, n_h, r, _, counted = newton_model(*rows, problem, w, mu, hessian_stride(rows[0].shape[0]),
                                             count_data=before is None and full)
        before = counted if (before is None and full) else before
        w, mu = newton_step(H, n_h, r, rows[0].shape[0], problem, lab.c, w, mu)
    return w, mu, before


# Rows of the sample the first refinement passes run on (every k-th row); data up to twice
# this size is refined on every row.
SAMPLE_ROWS = 1 << 20


def _sample_rows(s8: np.ndarray, lab: _inputs.Labels, u: Optional[np.ndarray]):
    """(s, labels, u) of every k-th row, k = n // SAMPLE_ROWS, or None when n < 2 SAMPLE_ROWS."""
    k = s8.shape[0] // SAMPLE_ROWS
    if k < 2:
        return None
    idx = np.arange(0, s8.shape[0], k)
    lab_k = (_inputs.Labels(lab.c, dense=np.ascontiguousarray(lab.dense[::k])) if lab.dense is not None
             else lab.take(idx))
    return np.ascontiguousarray(s8[::k]), lab_k, None if u is None else np.ascontiguousarray(u[::k])


def newton_model(s8: np.ndarray, lab: _inputs.Labels, u: Optional[np.ndarray], problem: Problem, w: np.ndarray,
                 mu: float, stride: int = 1, count_data: bool = True):
    """The dual's quadratic model at duals (w, mu) from one pass over checked rows.

    Returns ``(H, n_h, r, after, before)``: H ((p+1, p+1), float64) = sum over the rows
    i with i % stride == 0 and 0 < z_i < 1 of [a_i; 1][a_i; 1]^T (z_i = eta + u_i -
    a_i^T w - mu) and n_h the number of rows with i % stride == 0 (so H / n_h estimates the
    mean curvature; an inexact Newton step converges when the gradient is exact), r
    (p+1,) = sum_i q_i [a_i; 1] over every row, and the weighted counts
    (:func:`pym4.m4.weighted_counts` layout) of q_i = clip(z_i, 0, 1) and of the data
    (None with ``count_data=False``: they do not depend on the duals, so a caller that has
    them skips that work). The core builds them from per-group-set Kronecker blocks
    (include/pym4/m4.h); without it, from the dense rows here.
    """
    m, c = s8.shape[1], lab.c
    core = _backend.core()
    if core is not None:
        stats = np.zeros(core.m4_newton_stats_size(m, c))
        core.m4_newton_stats(_inputs.data_tuple(s8, lab, u), problem.core(), w, float(mu), int(stride), stats,
                             count_data=bool(count_data))
        H, r = core.m4_newton_model(m, c, problem.core(), stats)
        L = c + 1
        moments = stats[-2 * (1 + m) * L - 1:-1].reshape(2, 1 + m, L)
        before = _counts_of_moments(moments[1]) if count_data else None
        return H, float(stats[-1]), r, _counts_of_moments(moments[0]), before
    y = lab.to_dense().astype(np.float64)
    d = s8.astype(np.float64) - problem.target
    v = np.concatenate([np.ones((len(s8), 1)), y], axis=1)
    a = np.concatenate([(d[:, k:k + 1] * v) for k in range(m)] + [np.ones((len(s8), 1))], axis=1)
    z = problem.budget + (0.0 if u is None else u) - a[:, :-1] @ w - mu
    q = np.clip(z, 0.0, 1.0)
    sampled = np.arange(len(s8)) % stride == 0
    act = a[(z > 0) & (z < 1) & sampled]
    sf = s8.astype(np.float64)
    moments = [np.concatenate([(wt @ v)[None], (wt[:, None] * sf).T @ v]) for wt in (q, np.ones(len(s8)))]
    return (act.T @ act, float(np.count_nonzero(sampled)), q @ a, _counts_of_moments(moments[0]),
            _counts_of_moments(moments[1]) if count_data else None)


def _counts_of_moments(mv: np.ndarray) -> np.ndarray:
    """Weighted counts from [sum w v ; sum w s_k v (m rows)] with v = [1; y]."""
    return np.concatenate([mv[:1, 0], mv[1:, 0], mv[0, 1:], mv[1:, 1:].reshape(-1)])


def newton_step(H: np.ndarray, n_h: float, r: np.ndarray, n: float, problem: Problem, c: int, w: np.ndarray,
                mu: float, tighten: float = 1e-3, max_sweeps: int = 5000):
    """The maximiser of the dual's quadratic model at (w, mu) (from :func:`newton_model` over
    n rows, the curvature H over n_h of them): a full Newton step, l1 terms kept exact.
    Maximises over x = (w', mu')

        g^T (x - x0) - 1/2 (x - x0)^T (H / n_h) (x - x0) - sum_j lambda_j (1 - tighten) |w'_j|,

    g = r / n - [0; eta], by cyclic coordinate descent (glmnet's active-set sweeps). The
    bounds are tightened by ``tighten`` (relative) so that the second-order error of the
    step (rows that cross a kink of clip) does not carry a constraint past its bound.
    Returns (w', mu').
    """
    p = w.shape[0]
    Hn = np.asarray(H, dtype=np.float64) / n_h
    diag = np.diag(Hn).copy()
    lam = np.r_[problem.tolerances(c) * (1.0 - tighten), 0.0]
    x0 = np.r_[w, mu]
    x = x0.copy()
    grad = np.asarray(r, dtype=np.float64) / n - np.r_[np.zeros(p), problem.budget]  # model gradient at x
    ok = diag > 1e-14 * max(1.0, float(diag.max(initial=0.0)))  # no curvature: the coordinate stays
    box = 1e6

    def sweep(coords) -> float:
        worst = 0.0
        for j in coords:
            t = x[j] + grad[j] / diag[j]
            new = t if lam[j] == 0.0 else np.sign(t) * max(abs(t) - lam[j] / diag[j], 0.0)
            new = min(max(new, -box), box)
            delta = new - x[j]
            if delta != 0.0:
                x[j] = new
                np.subtract(grad, delta * Hn[:, j], out=grad)
                worst = max(worst, abs(delta) * diag[j])
        return worst

    every = np.flatnonzero(ok)
    # max_sweeps bounds all sweeps together (inner and outer): on a nearly singular model
    # (e.g. an empty group) the sweeps creep and nested bounds would multiply. The step is
    # a model maximiser either way; the status comes from the constraints recomputed on q.
    sweeps = 0
    while sweeps < max_sweeps:
        sweeps += 1
        if sweep(every) <= 1e-13:
            break
        active = every[x[every] != 0.0]
        while sweeps < max_sweeps:  # converge on the nonzero duals, then check all again
            sweeps += 1
            if sweep(active) <= 1e-13:
                break
    return x[:p].copy(), float(x[p])


def keep_probability_at_budget(s8: np.ndarray, lab: _inputs.Labels, u: Optional[np.ndarray], problem: Problem,
                               w: np.ndarray, mu0: float, want_before: bool = False):
    """(q, mu, after, before): q_i = clip(eta + u_i - a_i^T w - mu, 0, 1) with mu such that
    mean q = eta exactly (to rounding) on these rows, found from mu0 by safeguarded Newton
    steps on the monotone piecewise-linear mean (the core's; the same steps in numpy without
    it), and the weighted counts of q and (``want_before``, else None) of the data, which
    the pass that writes q counts as it goes."""
    from . import _problem

    n = s8.shape[0]
    q = np.empty(n)
    core = _backend.core()
    if core is not None:
        size = _problem.counts_size(s8.shape[1], lab.c)
        after, before = np.zeros(size), (np.zeros(size) if want_before else None)
        mu = core.m4_keep_probability_at_budget(_inputs.data_tuple(s8, lab, u), problem.core(), w, float(mu0), q,
                                                after, before)
        return q, float(mu), after, before
    y = lab.to_dense().astype(np.float64)
    d = s8.astype(np.float64) - problem.target
    wk = w.reshape(s8.shape[1], lab.c + 1)
    z = problem.budget + (0.0 if u is None else u) - (d * (wk[:, 0] + y @ wk[:, 1:].T)).sum(axis=1)
    mu = budget_mu(z, n * problem.budget, mu0)
    np.clip(z - mu, 0.0, 1.0, out=q)
    return q, float(mu), _problem.counts(s8, lab, q), (_problem.counts(s8, lab, None) if want_before else None)


def budget_mu(z: np.ndarray, target: float, mu0: float = 0.0) -> float:
    """mu with sum clip(z - mu, 0, 1) = ``target`` (0 < target < len(z)), to rounding: the
    sum is monotone and piecewise linear in mu, so safeguarded Newton steps from ``mu0``
    (bisection where a step leaves the bracket) end in a few passes over z. The numpy form
    of the core's ``m4_keep_probability_at_budget`` search, also the start of the utility's
    centring (:func:`pym4.m4._balance.center_utility`) and of a stream's mu."""
    n = z.shape[0]
    lo, hi = float(z.min()) - 1.0, float(z.max())
    mu = min(max(float(mu0), lo), hi)
    for _ in range(200):
        t = z - mu
        f = float(np.clip(t, 0.0, 1.0).sum()) - target
        if abs(f) <= 1e-13 * n:
            break
        if f > 0:
            lo = mu
        else:
            hi = mu
        active = np.count_nonzero((t > 0) & (t < 1))
        nxt = mu + f / active if active else 0.5 * (lo + hi)
        if not lo < nxt < hi:
            nxt = 0.5 * (lo + hi)
        if nxt == mu or hi - lo <= 1e-15 * (1.0 + abs(mu)):
            break
        mu = nxt
    return mu
