"""What every benchmark shares: one timer, one CSV writer, and the tests' references.

The timer runs the implementations being compared in interleaved rounds: each round calls
every implementation once, in an order rotated by one each round, so that the drifts of a
shared machine (other processes, frequency, page-cache and huge-page state) hit every
implementation alike instead of whichever ran last. On the CPU it reports the median and the
quartiles of the rounds' wall times; on a GPU, ``triton.testing.do_bench``'s quantiles (CUDA
events around many launches, the L2 cache flushed between them), or CUDA events around each
call where an implementation needs an untimed set-up before every call.

    from _harness import Case, time_interleaved, write_csv
    times = time_interleaved({"ours": f, "theirs": Case(g, max_rounds=3)}, rounds=11)
    times["ours"].median, times["ours"].q25, times["ours"].q75   # seconds

A benchmark runs as a script from the repository (``python benchmarks/bench_x.py``), so this
file is imported as the top-level module ``_harness``; :func:`references` imports
``tests/references.py``, the plain torch/numpy references the tests check pym4 against.
"""
from __future__ import annotations

import csv
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The timing columns every benchmark's CSV carries (plot.py reads them).
TIMING_FIELDS = ("median_s", "q25_s", "q75_s", "samples")


def references():
    """``tests/references.py``: one set of references for tests and benchmarks alike."""
    tests = os.path.join(REPO, "tests")
    if tests not in sys.path:
        sys.path.insert(0, tests)
    import references as refs

    return refs


@dataclass(frozen=True)
class Case:
    """One implementation to time.

    fn(*setup()) is the timed call. ``setup`` (untimed, before every call) returns fn's
    arguments, e.g. a fresh output buffer or cleared gradients; ``None``: fn takes none.
    ``max_rounds`` caps the samples of a slow implementation; ``max_seconds`` stops adding
    samples once this implementation's timed total exceeds it (one sample at least).
    """

    fn: Callable[..., Any]
    setup: Optional[Callable[[], Tuple[Any, ...]]] = None
    max_rounds: Optional[int] = None
    max_seconds: Optional[float] = None


@dataclass(frozen=True)
class Timing:
    """Seconds per call: median and quartiles over ``samples`` calls (0: do_bench's count).
    ``output`` is what the last call returned (for checks after the timing)."""

    median: float
    q25: float
    q75: float
    samples: int
    output: Any = None

    def row(self) -> Dict[str, float]:
        """The CSV columns of :data:`TIMING_FIELDS`."""
        return {"median_s": self.median, "q25_s": self.q25, "q75_s": self.q75, "samples": self.samples}


def _quartiles(samples: Sequence[float]) -> Tuple[float, float, float]:
    if len(samples) == 1:
        return samples[0], samples[0], samples[0]
    q1, q2, q3 = statistics.quantiles(samples, n=4, method="inclusive")
    return q2, q1, q3


def _as_case(impl: Union[Case, Callable[[], Any]]) -> Case:
    return impl if isinstance(impl, Case) else Case(impl)


def _call(case: Case) -> Any:
    return case.fn(*case.setup()) if case.setup is not None else case.fn()


def time_interleaved(impls: Mapping[str, Union[Case, Callable[[], Any]]], *, rounds: int = 11, warmup: int = 1,
                     device: str = "cpu") -> Dict[str, Timing]:
    """Time every implementation of ``impls`` (name -> :class:`Case` or a function of no
    argument) and return name -> :class:`Timing`, in seconds.

    CPU: ``warmup`` untimed calls each, then ``rounds`` interleaved rounds (order rotated by
    one per round), median and quartiles of the wall times. CUDA: ``warmup`` untimed calls,
    then per implementation ``triton.testing.do_bench`` quantiles (0.5, 0.25, 0.75); a case
    with a ``setup``, or a machine without triton, is timed by CUDA events around each of
    ``rounds`` calls instead.
    """
    if rounds < 1 or warmup < 0:
        raise ValueError(f"rounds: must be >= 1 and warmup >= 0, got rounds={rounds}, warmup={warmup}")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device: expected 'cpu' or 'cuda', got {device!r}")
    cases = {name: _as_case(impl) for name, impl in impls.items()}
    for case in cases.values():
        for _ in range(warmup):
            _call(case)
    if device == "cuda":
        return {name: _time_cuda(case, rounds) for name, case in cases.items()}
    names = list(cases)
    samples: Dict[str, List[float]] = {name: [] for name in names}
    outputs: Dict[str, Any] = {}
    for r in range(rounds):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            case, done = cases[name], samples[name]
            if done and (len(done) >= (case.max_rounds or rounds)
                         or (case.max_seconds is not None and sum(done) > case.max_seconds)):
                continue
            args = case.setup() if case.setup is not None else ()
            t0 = time.perf_counter()
            outputs[name] = case.fn(*args)
            done.append(time.perf_counter() - t0)
    return {name: Timing(*_quartiles(samples[name]), len(samples[name]), outputs.get(name)) for name in names}


def _time_cuda(case: Case, rounds: int) -> Timing:
    import torch

    if case.setup is None and case.max_rounds is None:  # a capped (slow) case: CUDA events, max_rounds calls
        try:
            from triton.testing import do_bench
        except ImportError:
            do_bench = None
        if do_bench is not None:
            # do_bench calls fn as many times as fit in `rep` ms; fn's output is discarded.
            med, q25, q75 = do_bench(case.fn, warmup=25, rep=200, quantiles=[0.5, 0.25, 0.75])
            return Timing(med / 1e3, q25 / 1e3, q75 / 1e3, 0, case.fn())
    times, out = [], None
    for _ in range(case.max_rounds or rounds):
        args = case.setup() if case.setup is not None else ()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        out = case.fn(*args)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return Timing(*_quartiles(times), len(times), out)


def stream_bandwidth(device: str = "cpu", nbytes: int = 1 << 28) -> Tuple[float, float]:
    """(read, write) bytes/s of streaming over a buffer of ``nbytes`` (256 MB: far larger
    than any CPU cache): a sum reads it, a fill writes it (into touched memory, so no page
    faults are counted). The floor of a memory-bound kernel is its bytes over these."""
    import torch

    buf = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    t = time_interleaved({"read": buf.sum, "write": lambda: buf.fill_(1.0)}, rounds=7, device=device)
    return nbytes / t["read"].median, nbytes / t["write"].median


def write_csv(path: str, rows: Iterable[Mapping[str, Any]], fields: Optional[Sequence[str]] = None) -> str:
    """Write ``rows`` (dicts) as CSV at ``path``, atomically; columns ``fields`` (default:
    every key, in first-seen order), a missing value as an empty cell, floats in full
    precision (NaN as ``nan``). Returns ``path``."""
    from pym4._io import atomic_output

    rows = list(rows)
    if fields is None:
        fields = list(dict.fromkeys(k for r in rows for k in r))
    with atomic_output(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(fields), extrasaction="ignore")
        writer.writeheader()
        for r in rows:
            writer.writerow({k: _cell(r.get(k, "")) for k in fields})
    return path


def _cell(v: Any) -> Any:
    if isinstance(v, float) and math.isnan(v):
        return "nan"
    return v


def write_results(out_dir: str, name: str, rows: Sequence[Mapping[str, Any]], fields: Optional[Sequence[str]] = None,
                  title: Optional[str] = None) -> Tuple[str, Optional[str]]:
    """``<out_dir>/<name>.csv`` and the PNG that plot.py draws from it (None without
    matplotlib). ``name`` starts with the benchmark's plot kind (``contrastive``, ``m4``,
    ``sinkhorn``), e.g. ``m4_cpu``. Returns (csv path, png path)."""
    os.makedirs(out_dir, exist_ok=True)
    csv_path = write_csv(os.path.join(out_dir, f"{name}.csv"), rows, fields)
    here = os.path.dirname(os.path.abspath(__file__))
    if here not in sys.path:  # imported from outside benchmarks/ (a script's own folder is on the path)
        sys.path.insert(0, here)
    import plot

    return csv_path, plot.plot_csv(csv_path, title=title)
