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
import signal
import sys
import traceback
# Python leaves SIGINT ignored when it starts with it ignored (a background job of a
# non-interactive shell, as CI scripts may run): the scenarios need Python's own handler.
signal.signal(signal.SIGINT, signal.default_int_handler)
import numpy as np
import pym4
# `import pym4` loads the ops (and torch) on first use: load them before "ready", so that the
# SIGINT lands inside a call, never inside torch's import (which cannot be re-run after it).
pym4.sinkhorn, pym4.sinkhorn_ot, pym4.clip_loss
{setup}
def interrupt(name, call, after, where):
    # Runs call() until a KeyboardInterrupt comes from the binding `where` (None: anywhere).
    print("ready", name, flush=True)
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
            print("interrupted", name, flush=True)
            return
{scenarios}
print("done", flush=True)
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


def scenario(name: str, call: str, where, after: str = "pass") -> str:
    """Child code that runs `call` in a loop until it is interrupted; `where`: the binding the
    KeyboardInterrupt must come from (None: anywhere, for loops that live in Python)."""
    body = lambda fn, code: f"def {fn}():\n" + textwrap.indent(textwrap.dedent(code), "    ")
    return "\n".join([body(f"call_{name}", call), body(f"after_{name}", after),
                      f"interrupt({name!r}, call_{name}, after_{name}, {where!r})", ""])


def run_interrupted(setup: str, scenarios) -> None:
    """Runs the scenarios one after the other in one child (its start-up is most of the time)
    and interrupts each once it reports ready."""
    code = CHILD.format(setup=textwrap.dedent(setup), scenarios="".join(scenarios))
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
            while seen[-1].startswith("ready"):
                for _ in range(1 + RESENDS):
                    time.sleep(DELAY_S)
                    proc.send_signal(signal.SIGINT)
                    seen.append(lines.next(EXIT_S))
                    if not seen[-1].startswith("outside:"):
                        break
                if seen[-1].startswith("interrupted"):
                    seen.append(lines.next(EXIT_S))
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
    assert seen[-1] == "done" and proc.returncode == 0, (
        f"child said {seen} (the last scenario named did not end in a KeyboardInterrupt from its binding), "
        f"exit code {proc.returncode}\n{stderr}")


SINKHORN_SETUP = """\
rng = np.random.default_rng(0)
x32 = rng.uniform(-1, 1, size=(64, 16)).astype(np.float32)
x64 = x32.astype(np.float64)
x0 = x32.copy()
out = np.empty_like(x32)
z = rng.normal(size=(64, 8)).astype(np.float32)
z /= np.linalg.norm(z, axis=1, keepdims=True)
c = rng.normal(size=(16, 8)).astype(np.float32)
c /= np.linalg.norm(c, axis=1, keepdims=True)
cost = rng.random((40, 30))
"""


def test_sinkhorn_variants():
    # Solves that never end (n_iters=10**12), each interrupted in its core loop: the kernel
    # form (epsilon 0.05) and the log domain (0.002, a spread the kernel form declines) in
    # float32 and float64; into a caller's out= buffer, which then holds unspecified values
    # (the solve's scratch) and is not returned, the scores untouched; the features form
    # solved in place in the result buffer; general OT.
    run_interrupted(SINKHORN_SETUP, [
        *(scenario(f"scores_{e.replace('.', '_')}_{d}", f"pym4.sinkhorn(x{d}, {e}, n_iters=10**12)", "sinkhorn_swav")
          for e in ("0.05", "0.002") for d in ("32", "64")),
        scenario("out_buffer", "pym4.sinkhorn(x32, 0.05, n_iters=10**12, out=out)", "sinkhorn_swav",
                 "assert np.array_equal(x32, x0), 'scores changed'"),
        scenario("features_in_place", "pym4.sinkhorn(z, 0.05, n_iters=10**12, prototypes=c)", "sinkhorn_swav"),
        # A spread that needs the log domain: Python drives block passes of the core (each a
        # short call), so the interrupt surfaces between two of them.
        scenario("features_passes", "pym4.sinkhorn(z, 0.002, n_iters=10**12, prototypes=c)", None),
        scenario("ot", "pym4.sinkhorn_ot(None, None, cost, 1e-3, n_iters=10**12, tol=0.0)", "sinkhorn_solve"),
    ])


M4_SETUP = """\
from pym4 import _backend, m4
core = _backend.core()
rng = np.random.default_rng(0)
# The stream: one-row mini-batches over 2M rows, seconds per call.
n = 2_000_000
s, y = np.zeros((n, 2), np.uint8), np.zeros((n, 8), np.uint8)
s[:500, 0] = s[250:750, 1] = y[::3][:300, 2] = 1
solver = m4.M4Solver([0.3, 0.4], budget=0.5, batch_size=1)
solver.partial_fit(s[:1000], y[:1000])
def snapshot():
    return {k: np.array(np.asarray(v), copy=True) for k, v in solver.state_dict().items()}
# The stream in shares (batches of 256 over the same rows: the dense pass's team of two).
sh_data = (s, y, None, None, 8, None)
sh_state = [np.zeros(18) for _ in range(4)] + [np.zeros(4)]
# The exact solve: a utility rules out the pattern table; at budget 1e-6, with the utility
# centred at its midrange (balance's rule before it centred at the budget's mu, which solves
# this in one iteration), the solve takes max_iter iterations (issue 11, item 10), each a
# pass over the rows: hours with 10**9.
from pym4.m4 import _balance
def midrange_centred(u, budget, clamp=None):
    shift = float(u.min()) / 2 + float(u.max()) / 2
    return u - shift, shift, None
ne = 20_000
se = (rng.random((ne, 2)) < [0.3, 0.45]).astype(np.uint8)
ye = (rng.random((ne, 8)) < 0.2 + 0.2 * se[:, :1]).astype(np.uint8)
ue = rng.normal(scale=0.1, size=ne)
# The pattern table: 2^33 rows of one group and no labels, all zero (numpy's zeros are
# untouched pages: no memory), minutes per call.
nt = 1 << 33
table_data = (np.zeros((nt, 1), np.uint8), np.zeros((nt, 0), np.uint8), None, None, 0, None)
"""


def test_m4_loops():
    run_interrupted(M4_SETUP, [
        # Ctrl-C leaves the solver's state as it was before the call (the fit runs on a copy),
        # never half-updated; a core that ignores the signal finishes the call and the state
        # has moved.
        scenario("stream", "global before\nbefore = snapshot()\nsolver.partial_fit(s, y)", "m4_stream_fit",
                 """\
                 now = snapshot()
                 assert now.keys() == before.keys(), "state keys changed"
                 assert all(np.array_equal(now[k], v) for k, v in before.items()), "state changed"
                 """),
        # The helper thread of the shares leaves the region with thread 0, which checks.
        scenario("stream_shares", "core.m4_stream_fit(sh_data, ((0.3, 0.4), 0.5, 0.01, 0.01), 0.1, 3.0, 256, "
                 "*sh_state)", "m4_stream_fit"),
        scenario("exact", "_balance.center_utility = midrange_centred\n"
                 "m4.balance(se, ye, budget=1e-6, target=0.5, utility=ue, method='exact', max_iter=10**9)",
                 "m4_solve_exact"),
        # The check is asked inside the table's parallel region and raised after it.
        scenario("pattern_table", "core.m4_pattern_table(table_data, None, 1 << 40)", "m4_pattern_table"),
    ])


def test_other_thread_is_not_interrupted():
    # Signals reach the main thread only: Sinkhorn solves running on another thread across
    # the SIGINT are neither stopped nor handed the main thread's KeyboardInterrupt, and give
    # the exact result every time.
    setup = textwrap.dedent("""\
        import threading
        import time
        x = np.random.default_rng(0).uniform(-1, 1, size=(64, 16)).astype(np.float32)
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
    run_interrupted(setup, [scenario("main_thread_waits", "time.sleep(0.05)\nassert worker.is_alive(), errors", None,
                                     """\
                                     stop.set()
                                     worker.join()
                                     assert not errors and calls[0] >= 1, (errors, calls)
                                     """)])
