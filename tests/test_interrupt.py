"""Ctrl-C reaches the core's long loops (issue 11, item 9; csrc/include/pym4/interrupt.h).

A child Python runs each scenario's call over and over (most calls never end: n_iters=10**12);
the test sends it SIGINT about a second after it starts, and the child reports where the
KeyboardInterrupt came from. It must come from the core entry point named by the scenario
(the innermost traceback line is the call of that binding), not from Python code between two
calls, which is where it surfaces when the core ignores signals (or the call never returns
and the test times out). A signal that lands between two calls is re-sent (a call ends after
its last check, so that can happen once in a while to a call that does end). Scenarios that
own caller state then check that it is unchanged. No timing is asserted beyond generous
timeouts.
"""
import os
import select
import signal
import subprocess
import sys
import tempfile
import textwrap
import time

import pytest

from pym4 import _backend

pytestmark = [
    pytest.mark.skipif(_backend.core() is None, reason="needs the compiled core"),
    pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals"),
]

STARTUP_S = 180  # imports and data set-up of the child, on a loaded machine
DELAY_S = 1.0    # from "ready" to SIGINT: the call is well inside its loop by then
EXIT_S = 60      # SIGINT to the child's answer: generous (a check comes every ~10 ms of work)
RESENDS = 5      # signals that landed between two calls, tolerated per scenario

CHILD = """\
import sys
import traceback
import numpy as np
import pym4
{setup}
def call():
{call}
def after():
{after}
where = {where!r}
print("ready", flush=True)
while True:
    try:
        while True:
            call()
    except KeyboardInterrupt as e:
        line = traceback.extract_tb(e.__traceback__)[-1].line or ""
        if where is not None and where + "(" not in line:
            print("outside:", line, flush=True)
            continue
        after()
        print("interrupted", flush=True)
        break
"""


class Lines:
    """Lines of a child's stdout, read with a timeout (select on the raw pipe, no buffering)."""

    def __init__(self, proc):
        self.fd, self.buf = proc.stdout.fileno(), b""

    def next(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.fd], [], [], left)[0]:
                return "<timeout>"
            chunk = os.read(self.fd, 4096)
            if not chunk:
                return "<exit>"
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return line.decode()


def run_interrupted(setup: str, call: str, where, after: str = "pass") -> None:
    """Runs `call` in a loop in a child and interrupts it; `where`: the binding the
    KeyboardInterrupt must come from (None: anywhere, for loops that live in Python)."""
    code = CHILD.format(setup=textwrap.dedent(setup), call=textwrap.indent(textwrap.dedent(call), "    "),
                        after=textwrap.indent(textwrap.dedent(after), "    "), where=where)
    # A file, not -c: the traceback needs the child's source lines.
    with tempfile.TemporaryFile("w+") as err, tempfile.NamedTemporaryFile("w", suffix=".py") as script:
        script.write(code)
        script.flush()
        proc = subprocess.Popen([sys.executable, script.name], stdout=subprocess.PIPE, stderr=err, bufsize=0,
                                env=dict(os.environ, OMP_NUM_THREADS="2"))
        seen = []
        try:
            lines = Lines(proc)
            seen.append(lines.next(STARTUP_S))
            if seen[-1] == "ready":
                for _ in range(1 + RESENDS):
                    time.sleep(DELAY_S)
                    proc.send_signal(signal.SIGINT)
                    seen.append(lines.next(EXIT_S))
                    if not seen[-1].startswith("outside:"):
                        break
                proc.wait(EXIT_S)
        except subprocess.TimeoutExpired:
            pass
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            proc.stdout.close()
            err.seek(0)
            stderr = err.read()
    assert seen[-1] == "interrupted" and proc.returncode == 0, (
        f"expected a KeyboardInterrupt from {where or 'the call'}; child said {seen}, exit code "
        f"{proc.returncode}\n{stderr}")


SCORES = "x = np.random.default_rng(0).uniform(-1, 1, size=(64, 16)).astype(np.{})\n"


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("epsilon", [0.05, 0.002])  # the kernel form; a spread only the log domain takes
def test_sinkhorn_scores(dtype, epsilon):
    run_interrupted(SCORES.format(dtype), f"pym4.sinkhorn(x, {epsilon}, n_iters=10**12)", "sinkhorn_solve")


def test_sinkhorn_out_buffer():
    # out= is the caller's buffer: after Ctrl-C it holds unspecified values (the solve's
    # scratch) and is not returned; the scores are untouched.
    run_interrupted(SCORES.format("float32") + "x0 = x.copy()\nout = np.empty_like(x)",
                    "pym4.sinkhorn(x, 0.05, n_iters=10**12, out=out)", "sinkhorn_solve",
                    "assert np.array_equal(x, x0), 'scores changed'")


FEATURES = """\
rng = np.random.default_rng(0)
z = rng.normal(size=(64, 8)).astype(np.float32)
z /= np.linalg.norm(z, axis=1, keepdims=True)
c = rng.normal(size=(16, 8)).astype(np.float32)
c /= np.linalg.norm(c, axis=1, keepdims=True)
"""


def test_sinkhorn_features_in_place():
    # The scores formed in the result buffer and solved there in place (the kernel form).
    run_interrupted(FEATURES, "pym4.sinkhorn(z, 0.05, n_iters=10**12, prototypes=c)", "sinkhorn_solve")


def test_sinkhorn_features_passes():
    # A spread that needs the log domain: Python drives block passes of the core (each one a
    # short call), so the interrupt surfaces between two of them.
    run_interrupted(FEATURES, "pym4.sinkhorn(z, 0.002, n_iters=10**12, prototypes=c)", None)


def test_sinkhorn_ot():
    run_interrupted("cost = np.random.default_rng(0).random((40, 30))\n",
                    "pym4.sinkhorn_ot(None, None, cost, 1e-3, n_iters=10**12, tol=0.0)", "sinkhorn_solve")


M4_DATA = """\
from pym4 import m4
rng = np.random.default_rng(0)
n = {n}
s = (rng.random((n, 2)) < [0.3, 0.45]).astype(np.uint8)
y = (rng.random((n, {c})) < 0.2).astype(np.uint8)
"""


def test_m4_stream_fit_leaves_the_state_unchanged():
    # One-row mini-batches over 1M rows (seconds per call). Ctrl-C leaves the solver's state
    # as it was before the call (the fit runs on a copy), never half-updated.
    setup = M4_DATA.format(n=1_000_000, c=8) + textwrap.dedent("""\
        solver = m4.M4Solver([0.3, 0.4], budget=0.5, batch_size=1)
        solver.partial_fit(s[:1000], y[:1000])
        def snapshot():
            return {k: np.array(np.asarray(v), copy=True) for k, v in solver.state_dict().items()}
        """)
    call = """\
    global before
    before = snapshot()
    solver.partial_fit(s, y)
    """
    after = """\
    now = snapshot()
    assert now.keys() == before.keys(), "state keys changed"
    assert all(np.array_equal(now[k], v) for k, v in before.items()), "state changed"
    """
    run_interrupted(setup, call, "m4_stream_fit", after)


def test_m4_exact():
    # A utility rules out the pattern table: passes over 1M rows, a second or more per solve.
    setup = M4_DATA.format(n=1_000_000, c=8) + "u = rng.normal(scale=0.1, size=n)\n"
    run_interrupted(setup, "m4.balance(s, y, budget=0.5, utility=u, method='exact', max_iter=10**9, tol=1e-300)",
                    "m4_solve_exact")


def test_m4_pattern_table():
    # The hash aggregate over 8M rows (a few tenths of a second per call); the check is asked
    # inside its parallel region and raised after it.
    setup = M4_DATA.format(n=8_000_000, c=4) + textwrap.dedent("""\
        from pym4 import _backend
        from pym4.m4 import _inputs
        core = _backend.core()
        data = _inputs.data_tuple(s, _inputs.as_labels(y, n), None)
        """)
    run_interrupted(setup, "core.m4_pattern_table(data, None, 1 << 40)", "m4_pattern_table")


def test_other_thread_is_not_interrupted():
    # Signals reach the main thread only: Sinkhorn solves running on another thread across
    # the SIGINT are neither stopped nor handed the main thread's KeyboardInterrupt, and give
    # the exact result every time.
    setup = SCORES.format("float32") + textwrap.dedent("""\
        import threading
        import time
        ref = pym4.sinkhorn(x, 0.05, n_iters=20000)
        stop, errors, calls = threading.Event(), [], [0]
        def work():
            try:
                while not stop.is_set():
                    assert np.array_equal(pym4.sinkhorn(x, 0.05, n_iters=20000), ref)
                    calls[0] += 1
            except BaseException as e:
                errors.append(repr(e))
        worker = threading.Thread(target=work)
        worker.start()
        """)
    # Not worker.join(timeout): a KeyboardInterrupt inside Thread.join can make the next join
    # return while the thread still runs (a CPython limitation), and the interpreter then exits
    # under a thread that is inside a core call.
    call = "time.sleep(0.05)\nassert worker.is_alive(), errors"
    after = """\
    stop.set()
    worker.join()
    assert not errors and calls[0] >= 1, (errors, calls)
    """
    run_interrupted(setup, call, None, after)
