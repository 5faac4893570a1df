"""M4 over datasets (DESIGN.md §3b): :func:`fit_dataset` (the exact solver as passes on an
engine) and :func:`balance_dataset` (fit, then one Parquet part of q per input shard).

Passes over the data, in order::

    schema checks on every shard          (no data read; bad input stops here)
    vocabulary of "COL" tag columns       (only with labels_from/sensitive_from="COL")
    counts + pattern table                (one pass: the counts give the default target)
    the exact solve                       on the pattern table (no utility, few patterns: no
                                          pass), else one engine pass per driver step,
                                          checkpointed after each
    counts weighted by q                  (the report; from the table when compressed)
    [balance_dataset] q per row           (one part per input file)

Nothing here imports torch.
"""
from __future__ import annotations

import base64
import contextlib
import json
import os
import secrets
import shutil
import sys
import threading
import time
import warnings
from typing import Any, Dict, Optional

import numpy as np

from .. import _backend
from .._io import atomic_output, clean_stale, temp_prefix
from . import _feasibility, _inputs, _passes, _problem
from ._columns import ColumnSpec, DataError
from ._stages import CountsStage, PartialStage, PatternStage, resolve_columns, utility_shift, write_keep_probability
from .model import M4Model

__all__ = ["fit_dataset", "balance_dataset", "CHECKPOINT_SUFFIX"]

CHECKPOINT_SUFFIX = ".pym4-checkpoint.json"
_CHECKPOINT_KIND = "pym4.checkpoint/"  # every version's format starts so (an older one is ours to replace)
_CHECKPOINT_HEAD = '{"format": "' + _CHECKPOINT_KIND
_CHECKPOINT_FORMAT = _CHECKPOINT_KIND + "3"  # /3: the counting pass's utility stats saved too
# Test hook: seconds to sleep after each checkpoint saved (so a test can kill -9 a run mid-solve).
_SLEEP_ENV = "PYM4_TEST_SLEEP_AFTER_PASS"
# Rows of the exact solver's warm-start sample (the core samples only when the data has 4x
# as many rows); a module constant so that a test can make a small dataset take the sample.
_SAMPLE_ROWS = 1 << 17


def _check_args(budget, eps_rep, eps_assoc, tol, max_passes, max_patterns):
    if isinstance(budget, str):
        if budget != "max":
            raise ValueError(f"budget: expected a number in (0, 1] or 'max', got {budget!r}")
        eta = "max"
    else:
        eta = _inputs.scalar(budget, "budget", 0.0, 1.0, lo_open=True)
    er = _inputs.scalar(eps_rep, "eps_rep", 0.0, float("inf"))
    ea = _inputs.scalar(eps_assoc, "eps_assoc", 0.0, float("inf"))
    if isinstance(tol, bool) or not 0 < _inputs.positive_number(tol, "tol") < 1:
        raise ValueError(f"tol: must be a number in (0, 1), got {tol!r}")
    return eta, er, ea, float(tol), _inputs.positive_int(max_passes, "max_passes"), \
        _inputs.positive_int(max_patterns, "max_patterns")


class _Passes:
    """Runs engine passes, counts and times them (``seconds``), each with a tqdm bar (rows/s)
    that the engine advances as its batches or tasks finish."""

    def __init__(self, engine, progress: bool):
        self.engine, self.progress, self.count, self.rows, self.seconds = engine, progress, 0, None, []

    def reduce(self, stage, desc: str):
        t0 = time.perf_counter()
        with progress_bar(self.progress, self.rows, desc) as advance:
            out = self.engine.reduce(stage, advance)
        self.seconds.append(time.perf_counter() - t0)
        self.count += 1
        return out


@contextlib.contextmanager
def progress_bar(show: bool, rows: Optional[int], desc: str):
    """A tqdm bar of ``rows`` rows (rows/s) on stderr, yielding ``advance(rows)`` (safe to call
    from the local engine's worker threads), or None when not ``show``."""
    if not show:
        yield None
        return
    from tqdm import tqdm
    lock = threading.Lock()
    with tqdm(total=rows, unit="rows", unit_scale=True, desc=desc, file=sys.stderr, leave=False) as bar:
        def advance(n: int) -> None:
            with lock:
                bar.update(n)
        yield advance


def _fingerprint(engine, spec: ColumnSpec, request) -> Optional[Dict[str, Any]]:
    """What a checkpoint belongs to: the files (path, size, mtime), or for a dataset handed
    in (a Ray Dataset, a Spark DataFrame) what the engine says identifies it
    (:meth:`Engine.identity`); the columns and the problem as requested (the target and
    budget derived from the data are saved with it). None when nothing identifies the data:
    such a checkpoint is written but never resumed, as resuming another dataset's state
    would give a wrong answer with no error."""
    files, data = [], None
    shards = getattr(engine, "shards", None)
    if shards is not None:
        # The engine's own identity of its files (os.stat locally, the filesystem's file info on
        # an object store), as lists: the fingerprint is compared with its JSON round trip.
        files = [list(f) for f in shards.identity]
        if any(f[2] is None for f in files):
            return None  # a store that keeps no mtime: a same-size rewrite would go unseen
    else:
        data = engine.identity()
        if data is None:
            return None
    return {"source": engine.source, "files": files, "data": data, "columns": spec.to_json(), "problem": request}


def _as_json_target(target):
    if target is None:
        return None
    try:
        return np.asarray(target, dtype=np.float64).tolist()
    except (TypeError, ValueError):
        return repr(target)  # refused later by the target check, with its own message


def _encode(a: Optional[np.ndarray]):
    if a is None:
        return None
    a = np.ascontiguousarray(a)
    return {"dtype": a.dtype.str, "shape": list(a.shape), "data": base64.b64encode(a.tobytes()).decode("ascii")}


def _decode(d) -> Optional[np.ndarray]:
    if d is None:
        return None
    return np.frombuffer(base64.b64decode(d["data"]), dtype=np.dtype(d["dtype"])).reshape(d["shape"]).copy()


def _encode_table(table):
    """A pattern table ``(data, counts)`` as JSON (arrays as base64 bytes: exact, and
    smaller than lists of numbers); None stays None (the table passed its bound)."""
    if table is None:
        return None
    data, counts = table
    return {"s": _encode(data[0]), "y": _encode(data[1]), "y_indptr": _encode(data[2]), "y_indices": _encode(data[3]),
            "c": int(data[4]), "counts": _encode(counts)}


def _decode_table(d):
    if d is None:
        return None
    return ((_decode(d["s"]), _decode(d["y"]), _decode(d["y_indptr"]), _decode(d["y_indices"]), int(d["c"]), None),
            _decode(d["counts"]))


class _Checkpoint:
    """The run's progress in one JSON file, rewritten atomically after every pass: the tag
    vocabulary, the counts and pattern table (or that it passed its bound), the budget
    found for ``budget="max"``, and the solver state after each solver pass (a pass over
    the data, or the solve on the table). A run that finds it (same files, columns and
    request) skips every saved pass. Fields: ``passes`` (solver passes done), ``done``."""

    def __init__(self, path: str, fingerprint):
        self.path, self.fingerprint, self.fields = path, fingerprint, {"passes": 0, "done": False}
        # Test hook: sleep after each save, so that a test can kill -9 the run between passes.
        self.sleep = float(os.environ.get(_SLEEP_ENV, "0") or 0)

    def load(self) -> dict:
        """The saved fields ({} when there is no checkpoint of this run), before any pass.
        Raises ValueError when the path cannot be a checkpoint (a folder, or in a folder that
        does not exist) or holds a file that is not one: the run would overwrite, then
        remove it, and a user's file is never touched."""
        if os.path.isdir(self.path):
            raise ValueError(f"checkpoint: {self.path} is a folder; give the path of a file")
        folder = os.path.dirname(os.path.abspath(self.path))
        if not os.path.isdir(folder):
            raise ValueError(f"checkpoint: the folder {folder} does not exist")
        if not os.path.exists(self.path):
            return {}
        # save() writes the format first: the head tells a checkpoint from a user's file
        # without reading a large file whole.
        head = _CHECKPOINT_HEAD.encode()
        try:
            with open(self.path, "rb") as f:
                ck = json.load(f) if f.read(len(head)) == head and f.seek(0) == 0 else None
        except (OSError, ValueError):
            ck = None
        if not (isinstance(ck, dict) and str(ck.get("format", "")).startswith(_CHECKPOINT_KIND)):
            raise ValueError(f"checkpoint: {self.path} exists and is not a pym4 checkpoint (left as it is); "
                             f"give another path, or remove the file")
        if self.fingerprint is None:
            print(f"pym4: {self.path} is not resumed: nothing identifies this dataset (no files, or a "
                  f"transform after its read), so the saved state may be another's; starting afresh",
                  file=sys.stderr)
            return {}
        if ck.get("format") != _CHECKPOINT_FORMAT or ck.get("fingerprint") != self.fingerprint:
            print(f"pym4: {self.path} belongs to another run (other data, columns or parameters); starting afresh",
                  file=sys.stderr)
            return {}
        self.fields = {k: v for k, v in ck.items() if k not in ("format", "fingerprint")}
        return dict(self.fields)

    def save(self, **fields) -> None:
        self.fields.update(fields)
        with atomic_output(self.path) as tmp, open(tmp, "w") as f:
            # repr floats: the resumed state is the saved one bit for bit, so it takes the same steps.
            json.dump({"format": _CHECKPOINT_FORMAT, "fingerprint": self.fingerprint, **self.fields}, f)
        if self.sleep:
            time.sleep(self.sleep)


def _names_from_duals(w: np.ndarray, c: int, groups, labels):
    """The conflicting constraints of an infeasible solve: the duals within 1e-3 of the largest."""
    if not np.any(w):
        return []
    big = np.abs(w) >= 1e-3 * np.abs(w).max()
    return [_problem.constraint_name(int(j), c, groups, labels) for j in np.argsort(-np.abs(w)) if big[j]]


def _fit(engine, spec: ColumnSpec, *, target, budget, eps_rep, eps_assoc, tol, max_passes, max_patterns,
         checkpoint, keep_checkpoint: bool, progress: bool):
    """fit_dataset on an engine: (model, report)."""
    t0 = time.perf_counter()
    core = _backend.core()
    if core is None:
        raise RuntimeError("fit_dataset: pym4._core is not built; the exact M4 solver needs the compiled core")
    eta, er, ea, tol, max_passes, max_patterns = _check_args(budget, eps_rep, eps_assoc, tol, max_passes,
                                                             max_patterns)
    runner = _Passes(engine, progress)
    request = {"target": _as_json_target(target), "budget": eta, "eps_rep": er, "eps_assoc": ea, "tol": tol,
               "max_passes": max_passes, "max_patterns": max_patterns}
    ck = None if checkpoint is None else _Checkpoint(checkpoint, _fingerprint(engine, spec, request))
    saved = {} if ck is None else ck.load()
    info: Dict[str, Any] = {"engine": engine.name}
    if saved:
        skipped = [name for key, name in (("tags", "vocabulary"), ("pattern", "counts and pattern table"),
                                          ("budget", "largest budget")) if key in saved]
        print(f"pym4: resuming from {checkpoint}: {saved['passes']} solver passes already done"
              + (f" ({', '.join(skipped)} saved: not read again)" if skipped else ""), file=sys.stderr)
        info["resumed_after_pass"] = int(saved["passes"])
    rs = resolve_columns(engine, spec, saved.get("tags"), reduce=runner.reduce)
    m, c = rs.m, rs.c
    if "pattern" in saved:
        table, before = _decode_table(saved["pattern"]["table"]), np.asarray(saved["pattern"]["counts"], np.float64)
        patterns = saved["pattern"]["patterns"]
        ustats = None if saved["pattern"]["utility"] is None else np.asarray(saved["pattern"]["utility"], np.float64)
        shift = saved["pattern"].get("utility_shift")  # (None in a checkpoint of an earlier version)
    else:
        shards = getattr(engine, "shards", None)
        counting = PatternStage(rs, max_patterns, None if shards is None else sum(shards.rows))
        got = runner.reduce(counting, "counting")
        if got is None or got[1][0] == 0:
            raise DataError(f"{engine.source}: the dataset has no rows")
        table, before, ustats = counting.table(got[0]), got[1], got[2]
        # The shift from the sampled utilities, which are then dropped (not checkpointed).
        shift = None if ustats is None else utility_shift(ustats, int(before[0]), eta)[0]
        ustats = None if ustats is None else ustats[:3]
        patterns = None if table is None else len(table[1])
        if ck is not None:  # first saved here: every value has been read and checked, so bad input leaves none
            ck.save(tags={k: list(v) for k, v in rs.tags.items()},
                    pattern={"counts": before.tolist(), "patterns": patterns, "table": _encode_table(table),
                             "utility": None if ustats is None else ustats.tolist(), "utility_shift": shift})
    rows = int(before[0])
    # The utility centred as balance() centres it (only mu moves; see ResolvedSpec), and a
    # constant one dropped: the problem is then the one without a utility.
    if shift is None:  # (the midrange of [sum, min, max], or 0 without a utility)
        shift = utility_shift(ustats, rows, eta)[0]
    constant_utility = ustats is not None and ustats[1] == ustats[2]
    if spec.utility is not None:
        rs = rs.with_utility_shift(shift)
        info["utility_shift"] = shift
    runner.rows = rows
    if target is None:  # (the message names the columns the groups came from)
        pi = _inputs.default_target_of_shares(_problem.group_shares(before, m, c), "sensitive" if spec.sensitive
                                              else "sensitive_from")
    else:
        pi = _inputs.target(target, m, None)
    info.update({"rows": rows, "patterns": patterns})

    largest = None
    searched = False

    def find_largest():
        nonlocal largest, searched
        if not searched:
            if table is not None:
                feasible = _feasibility.solver_feasible(table[0], table[1], pi, er, ea, m, c, tol=tol)
            else:  # no table: every trial budget is a solve by passes over the data
                def feasible(x):
                    return _solve_passes(x, None, 0)[0].status == "optimal"
            largest, searched = _feasibility.bisect_budget(feasible), True
        return largest

    steps = [0]  # driver steps taken here (each one pass over the data, or over the table)
    offsets = {}
    if getattr(engine, "shards", None) is not None:
        for p, o in zip(engine.shards.paths, engine.shards.offsets):
            offsets[p] = offsets[os.path.abspath(p)] = o

    def _solve_passes(x, state, done_passes, on_pass=None):
        problem = (pi, float(x), er, ea)
        if state is None:
            state = core.m4_exact_init(problem, m, c, rows, max_passes, tol, 1e6, None, _SAMPLE_ROWS)
        def one_pass(st):
            steps[0] += 1
            return runner.reduce(PartialStage(rs, problem, st, offsets), f"pass {runner.count}")
        res = _passes.run(one_pass, problem, m, c, state, passes_done=done_passes, on_pass=on_pass)
        return res, problem

    if eta == "max":
        if "budget" in saved:
            eta = largest = saved["budget"]
            searched = True
        else:
            eta = find_largest()
            steps[0] = 0  # the search's solves are not this fit's
            if eta is None:
                raise _feasibility.InfeasibleError(f"infeasible at every budget: {_feasibility.budget_text(None)}",
                                                   None, None)
            if ck is not None:
                ck.save(budget=eta)
        info["budget_requested"] = "max"

    compressed = table is not None and (spec.utility is None or constant_utility)
    problem = (pi, eta, er, ea)
    state = np.asarray(saved["state"], dtype=np.float64) if "state" in saved else None
    if state is not None and saved["done"]:
        res = _passes.result(m, c, state)
    elif compressed:
        def table_pass():
            steps[0] += 1
            return [table]
        res = _passes.solve(table_pass, problem, m, c, tol=tol, max_iter=max_passes)
        if ck is not None and keep_checkpoint:
            ck.save(passes=res.passes, state=res.state.tolist(), done=True)
    else:
        def on_pass(k, st):
            if ck is not None:
                ck.save(passes=k, state=st.tolist(), done=False)
        res, problem = _solve_passes(eta, state, int(saved.get("passes", 0)), on_pass)
        if ck is not None and keep_checkpoint:
            ck.save(passes=res.passes, state=res.state.tolist(), done=True)
    if compressed:
        qt = np.empty(len(table[1]))
        core.m4_keep_probability(table[0], problem, res.w, res.mu, qt)
        after = np.zeros_like(before)
        core.m4_weighted_counts(table[0], qt * table[1], after)
    model = M4Model(pi, eta, er, ea, res.w, res.mu, rs, {})
    if not compressed:
        after = runner.reduce(CountsStage(rs, model), "report")
    names = _names_from_duals(res.w, c, rs.group_names, rs.label_names) if res.status == "infeasible" else []
    rep = _problem.evaluate(_problem.Problem(pi, eta, er, ea), before, after, c, method="exact",
                            iterations=res.iterations, status=res.status, infeasible=names,
                            group_names=rs.group_names, label_names=rs.label_names)
    if rep.status == "infeasible":
        rep.largest_feasible_budget = find_largest()
        rep.message = f"{rep.message}; {_feasibility.budget_text(rep.largest_feasible_budget)}"
    elif searched:
        rep.largest_feasible_budget = largest
    info.update({"status": rep.status, "message": rep.message, "compressed": compressed,
                 "passes": runner.count, "pass_seconds": runner.seconds, "solver_passes": steps[0],
                 "iterations": res.iterations, "max_violation": rep.max_violation,
                 "largest_feasible_budget": rep.largest_feasible_budget, "time_s": time.perf_counter() - t0})
    model.info = info
    if checkpoint is not None and not keep_checkpoint:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(checkpoint)
    if rep.status == "infeasible":
        if checkpoint is not None:  # the run is over: nothing to resume
            with contextlib.suppress(FileNotFoundError):
                os.unlink(checkpoint)
        raise _feasibility.InfeasibleError(rep.message, rep, rep.largest_feasible_budget)
    if rep.status != "optimal":
        warnings.warn(f"pym4.m4.fit_dataset: {rep.message}", RuntimeWarning, stacklevel=3)
    return model, rep


def fit_dataset(data, *, sensitive=(), labels=(), sensitive_from=None, labels_from=None, utility=None, id=None,
                target=None, budget=0.9, eps_rep: float = 0.01, eps_assoc: float = 0.01, engine: Optional[str] = None,
                tol: float = 1e-9, max_passes: int = 100, checkpoint: Optional[str] = None, progress: bool = True,
                max_patterns: int = 1 << 20, engine_options: Optional[dict] = None) -> M4Model:
    """Fit M4 on a dataset by exact passes (DESIGN.md §3b); returns the :class:`M4Model`.

    data : a Parquet file, directory (hive partitions included), glob or list of files, a URI
        of a file, directory or glob (``s3://``, ``gs://``, ``file://``: any that
        ``pyarrow.fs.FileSystem.from_uri`` opens), a ``pyarrow.dataset.Dataset`` (on any pyarrow
        filesystem), a Ray ``Dataset`` or a Spark ``DataFrame`` (the engine is inferred;
        ``engine="ray"``/``"spark"`` runs local files on Ray/Spark).
    sensitive, labels : 0/1 columns (bool, integer or float); sensitive_from, labels_from :
        ``"COL"`` (every value of a list<string>/string column) or ``"COL:V1,V2"``.
    utility : numeric column (no pattern table then); id : id column (for the written q).
    target : scalar or (m,) proportions; None: the mean of the observed group shares.
    budget : eta in (0, 1], or "max": the largest feasible budget (to 1e-3).
    tol : on every constraint and the duality gap; max_passes : Newton steps over the full
        data (each is one pass; the warm start and Hessian refreshes add a few).
    checkpoint : path of a JSON file written after every solver pass over the data; a run
        that finds it (same files, columns and parameters) resumes after its last pass.
        Removed at the end. (A solve on the pattern table runs in memory: nothing to save.)
    max_patterns : memory bound of the pattern table; past it, passes over the data.

    ``model.info``: engine, rows, passes (every pass over the data), solver_passes (driver
    steps of this call: over the data, or over the pattern table when ``compressed``),
    iterations (Newton steps), patterns, status, max_violation, largest_feasible_budget
    (when searched), resumed_after_pass (when resumed), time_s.
    Raises :class:`InfeasibleError` (status "infeasible": the constraints named, and the
    largest feasible budget); warns (RuntimeWarning) when the solve stopped at max_passes.
    """
    from ..engines import engine_for
    spec = ColumnSpec.make(sensitive=sensitive, labels=labels, sensitive_from=sensitive_from,
                           labels_from=labels_from, utility=utility, id=id)
    _check_args(budget, eps_rep, eps_assoc, tol, max_passes, max_patterns)
    eng = engine_for(data, engine, **(engine_options or {}))
    try:
        return _fit(eng, spec, target=target, budget=budget, eps_rep=eps_rep, eps_assoc=eps_assoc, tol=tol,
                    max_passes=max_passes, max_patterns=max_patterns, checkpoint=checkpoint, keep_checkpoint=False,
                    progress=progress)[0]
    finally:
        eng.close()  # what the engine kept between passes (Spark: a persisted frame)


def _partial_name(out: str) -> str:
    # A name of pym4._io's temporaries (pid and host in it): the leftover of a run killed
    # while writing is removed by the next clean_stale of the folder, and a run in progress
    # is never disturbed by another.
    return os.path.join(os.path.dirname(out),
                        f"{temp_prefix()}{os.path.basename(out)}-{secrets.token_hex(4)}.tmp")


def out_inside_source(source, out: str) -> bool:
    """Whether folder ``out`` would lie inside ``source``, a local folder of shards (every
    folder below it is read, so the parts written would join the input of the next run)."""
    if not isinstance(source, (str, os.PathLike)) or not os.path.isdir(source):
        return False
    src, out = os.path.realpath(source), os.path.realpath(out)
    return os.path.commonpath([src, out]) == src


def balance_dataset(source, out, *, sample: bool = False, seed: int = 0, sensitive=(), labels=(),
                    sensitive_from=None, labels_from=None, utility=None, id=None, target=None, budget=0.9,
                    eps_rep: float = 0.01, eps_assoc: float = 0.01, engine: Optional[str] = None, tol: float = 1e-9,
                    max_passes: int = 100, progress: bool = True, max_patterns: int = 1 << 20,
                    engine_options: Optional[dict] = None) -> M4Model:
    """:func:`fit_dataset`, then the keep probabilities written to folder ``out``: one
    Parquet part per input file (``part-NNNNN.parquet``: the id column or ``row``, ``q``,
    and ``keep`` ~ Bernoulli(q) with ``sample``, drawn from ``seed`` and the row's number
    or integer id), ``_pym4_report.json``/``.png`` and ``_pym4_model.json``.

    ``out`` must not exist; it is written as a temporary folder beside it (``.pym4-<pid>-
    ...tmp``) and renamed at the end, so it appears complete or not at all; the input is
    never modified. The solver's state is checkpointed to ``OUT.pym4-checkpoint.json``
    after every pass: after an interruption (even kill -9) the same call resumes after the
    last finished pass, and removes what the interrupted run left. Returns the model.
    """
    from ..engines import engine_for
    out = os.path.abspath(os.fspath(out))
    if os.path.exists(out):
        raise FileExistsError(f"out: {out!r} already exists")
    if not os.path.isdir(os.path.dirname(out)):
        raise FileNotFoundError(f"out: folder {os.path.dirname(out)!r} does not exist")
    if out_inside_source(source, out):
        raise ValueError(f"out: {out!r} lies inside the source folder (the input is never modified)")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed: must be an integer >= 0, got {seed!r}")
    spec = ColumnSpec.make(sensitive=sensitive, labels=labels, sensitive_from=sensitive_from,
                           labels_from=labels_from, utility=utility, id=id)
    _check_args(budget, eps_rep, eps_assoc, tol, max_passes, max_patterns)
    eng = engine_for(source, engine, **(engine_options or {}))
    checkpoint = out + CHECKPOINT_SUFFIX
    clean_stale(os.path.dirname(out))  # an interrupted run's output folder and checkpoint temporaries
    try:
        model, rep = _fit(eng, spec, target=target, budget=budget, eps_rep=eps_rep, eps_assoc=eps_assoc, tol=tol,
                          max_passes=max_passes, max_patterns=max_patterns, checkpoint=checkpoint,
                          keep_checkpoint=True, progress=progress)
    finally:
        eng.close()  # the write pass reads other columns: nothing kept is of use to it
    from ._files import write_report
    tmp = _partial_name(out)
    try:
        with progress_bar(progress, model.info.get("rows"), "pym4: writing q") as advance:
            parts = write_keep_probability(eng, model, tmp, int(seed) if sample else None, advance)
        summary = {**rep.summary(), **{k: v for k, v in model.info.items() if k != "message"},
                   "mu": model.mu, "input": str(eng.source), "output": out, "parts": len(parts),
                   "groups": model.group_names, "labels": model.label_names}
        write_report(os.path.join(tmp, "_pym4_report"), summary, rep)
        model.save(os.path.join(tmp, "_pym4_model.json"))
        # The checkpoint goes first: killed between the two steps, the next run finds neither
        # OUT nor a checkpoint and starts afresh; the other way round, it would find OUT
        # complete and refuse to run, and the checkpoint would stay forever.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(checkpoint)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    model.info["output"] = out
    return model

