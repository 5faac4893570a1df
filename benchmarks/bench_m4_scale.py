"""M4 over sharded Parquet (DESIGN.md §3b): each engine to the exact answer, from the files.

Writes a synthetic sharded Parquet dataset once into a cache folder (reused when present):

- ``dense``: N rows, m = 2 boolean group columns (g0, g1) and c = 32 boolean label columns
  (l00 ... l31), the random instances of bench_m4.py (groups tied to a latent factor, labels
  associated with the groups); ``dense-c8`` reads the same files with only l00 ... l07 as
  labels (at most 2^10 distinct patterns: the pattern table's case);
- ``sparse``: the same groups and a list<string> column ``tags`` of about 5 values per row
  from a vocabulary of 1000 (a fifth of group-0 rows' tags drawn from the first 50 values:
  an association), balanced with ``labels_from="tags"`` (c = 1000).

Then it times ``pym4.m4.fit_dataset`` on each engine (local, ray, spark), once with the
pattern table allowed (``compressed``: used when the distinct (s, y) rows fit the table's
bound, else the solve falls back to passes and the row says so) and once by passes over the
rows (``max_patterns=1``): passes over the data, rows/s of each data pass (median over the
passes, from ``model.info["pass_seconds"]``), total time, and peak memory (RSS of this
process: its own peak exactly, plus its descendants, Ray's and Spark's workers, sampled every 0.5 s;
and the tree's PSS plus the shared shard cache's files, sampled: shared pages counted once);
against the in-memory exact solver (``balance(method="exact")`` on the arrays read from
the files, when they fit: N <= --in-memory-max) and cvxpy/CLARABEL (N <= --cvxpy-max,
dense only). Every engine's duals are compared with local's and with the in-memory solve's.
Writes m4_scale.csv and m4_scale.png (benchmarks/_harness.py, plot.py); prints the load
average with the figures (the machine may be shared).

    python benchmarks/bench_m4_scale.py [--quick | --full] [--n N] [--engines local,ray,spark]
                                        [--instances dense,dense-c8,sparse] [--modes compressed,passes]
                                        [--cache DIR] [--out DIR] [--simulate SHARDS] [--profile]
                                        [--profile-spark]

``--simulate 2000`` adds a run by passes over 2000 shards of 500 rows, for what a
cluster-sized run costs (README): bytes read per pass (measured with /proc/self/io and
from the Parquet metadata), the stats each task sends the driver, the driver state and
the checkpoint's size, and the time per shard-task.

``--profile`` instead times one solver pass over the dense instance stage by stage: the
Parquet read and decode, the boolean-to-rows conversion, ``m4_partial`` at each state of a
real solve and the merge, each on one thread (CPU ns per row), then the local engine's
whole pass from Parquet and from its cache (rows/s): m4_scale_profile.csv. ``--profile-spark``
times the Spark engine's pass piece by piece (per-file pyarrow passes with and without the
workers' caches, Spark's own Parquet read, packing and Arrow transfer, a DataFrame's passes
raw and packed): m4_scale_profile_spark.csv.

N = 1e7 by default, 1e8 with --full, 2e4 with --quick (a smoke run of a few seconds per
engine). Targets (2-core CPU): local exact at N = 1e8 (m = 2, c = 32) in <= 3 minutes
including reading Parquet, peak memory <= 2 GB whatever N, each pass >= 20 M rows/s from
Parquet; Ray and Spark within 3x of local.
"""
from __future__ import annotations

import argparse
import functools
import os
import shutil
import statistics
import sys
import threading
import time
import warnings

import numpy as np

# _harness.py and bench_m4.py lie beside this file; the repository root is not added (the
# installed pym4 must not be shadowed by the source tree).
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _harness import write_results  # noqa: E402
from bench_m4 import EPS_ASSOC, EPS_REP, ETA, cvxpy_solve, make_dense  # noqa: E402

import pym4.m4 as m4  # noqa: E402
from pym4 import _backend  # noqa: E402

TOL = 1e-9
M, C = 2, 32
VOCAB = 1000
TAGS_PER_ROW = 5
INSTANCES = ("dense", "dense-c8", "sparse")


# ----- the dataset --------------------------------------------------------------------------------

def _dense_table(n, seed):
    import pyarrow as pa
    s, y = make_dense(n, c=C, seed=seed)
    cols = {f"g{k}": pa.array(s[:, k].view(np.bool_)) for k in range(M)}
    cols.update({f"l{r:02d}": pa.array(y[:, r].view(np.bool_)) for r in range(C)})
    return pa.table(cols)


def _sparse_table(n, seed):
    """Groups as in dense; ``tags``: 1 + Poisson(4) values per row from VOCAB names."""
    import pyarrow as pa
    rng = np.random.default_rng(seed)
    s = (rng.random((n, M)) < np.array([0.35, 0.4])).astype(np.bool_)
    k = rng.poisson(TAGS_PER_ROW - 1, size=n) + 1
    rows = np.repeat(np.arange(n), k)
    idx = rng.integers(0, VOCAB, size=rows.size)
    biased = (rng.random(rows.size) < 0.2) & s[rows, 0]
    idx[biased] = rng.integers(0, VOCAB // 20, size=int(biased.sum()))
    offsets = np.zeros(n + 1, np.int32)
    np.cumsum(k, out=offsets[1:])
    names = pa.array([f"tag{j:04d}" for j in range(VOCAB)])
    tags = pa.ListArray.from_arrays(pa.array(offsets), names.take(pa.array(idx)))
    return pa.table({"g0": pa.array(s[:, 0]), "g1": pa.array(s[:, 1]), "tags": tags})


def dataset(cache, kind, n, shard_rows):
    """The folder of ``kind`` ("dense" or "sparse") with n rows in shards of shard_rows,
    written once (under a temporary name, renamed when complete) and reused after."""
    import pyarrow.parquet as pq
    folder = os.path.join(cache, f"{kind}-n{n}-shard{shard_rows}")
    if os.path.isdir(folder):
        return folder
    tmp = folder + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    t0 = time.perf_counter()
    for i, start in enumerate(range(0, n, shard_rows)):
        k = min(shard_rows, n - start)
        table = (_dense_table if kind == "dense" else _sparse_table)(k, seed=1000 + i)
        pq.write_table(table, os.path.join(tmp, f"shard-{i:05d}.parquet"), row_group_size=1 << 20)
    os.rename(tmp, folder)
    print(f"wrote {folder} ({n:,d} rows) in {time.perf_counter() - t0:.1f} s", flush=True)
    return folder


def columns(instance):
    if instance == "sparse":
        return dict(sensitive=["g0", "g1"], labels_from="tags")
    c = 8 if instance == "dense-c8" else C
    return dict(sensitive=["g0", "g1"], labels=[f"l{r:02d}" for r in range(c)])


# ----- peak memory of the process tree --------------------------------------------------------------

def _tree_rss(root, children_only=False):
    """Bytes resident in process ``root`` and all its descendants (from /proc); with
    ``children_only``, in its descendants alone."""
    total, page = 0, os.sysconf("SC_PAGE_SIZE")
    for pid in ([] if children_only else [root]) + _descendants(root):
        try:
            with open(f"/proc/{pid}/statm") as f:
                total += int(f.read().split()[1]) * page
        except (OSError, IndexError, ValueError):
            pass
    return total


def _own_peak(reset=False):
    """This process's peak RSS in bytes (VmHWM), exact; ``reset`` restarts it from the
    current RSS (/proc/self/clear_refs, Linux >= 4.0; where refused, the peak stays the
    lifetime one, an over-estimate)."""
    if reset:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def _tree_pss(root):
    """Proportional set size of process ``root`` and all its descendants (smaps_rollup's
    Pss, Linux >= 4.14): a page shared by k processes counts 1/k in each, so shared
    libraries (libtorch, libarrow, mapped in every Ray/Spark worker) and the pages of the
    shared shard cache that several workers map count once, where a sum of RSS counts them
    in every process. None where smaps_rollup cannot be read."""
    total = 0
    for pid in [root] + _descendants(root):
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                total += next(int(line.split()[1]) * 1024 for line in f if line.startswith("Pss:"))
        except (OSError, StopIteration, ValueError):
            if pid == root:
                return None
    return total


def _descendants(root):
    """The pids of every descendant of process ``root`` (from /proc's parent links)."""
    children = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(name))
    out, todo = [], list(children.get(root, ()))
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, ()))
    return out


def _shard_cache_bytes():
    """Bytes in the engines' shared shard caches on this host (files in memory, /dev/shm:
    no process's RSS holds them unless it maps them)."""
    from pym4.engines.shared_cache import cache_root
    total = 0
    for folder, _, files in os.walk(cache_root()):
        for name in files:
            try:
                total += os.path.getsize(os.path.join(folder, name))
            except OSError:
                pass
    return total


class PeakMemory:
    """Peak RSS of this process tree while in the ``with`` block: this process's own peak
    exactly (VmHWM), plus its descendants' (Ray's and Spark's workers) sampled every
    ``interval`` s. (Scanning /proc holds the GIL ~10 ms; sampling every 50 ms, as before,
    took a sixth of a core from the run it measured.) Also ``peak_pss``: the largest sampled
    PSS of the whole tree plus the shared shard cache's bytes (the cache's mapped pages are
    then counted twice: an over-estimate by at most the cache's size)."""

    def __init__(self, interval=0.5):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()
        self._children = 0
        self.peak_pss = 0

    def _sample(self):
        self._children = max(self._children, _tree_rss(os.getpid(), children_only=True))
        pss = _tree_pss(os.getpid())
        if pss is not None:
            self.peak_pss = max(self.peak_pss, pss + _shard_cache_bytes())

    def _run(self):
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval)

    def __enter__(self):
        _own_peak(reset=True)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._sample()
        self.peak = _own_peak() + self._children


# ----- engines ----------------------------------------------------------------------------------

def start_engine(name):
    """Start Ray / Spark once (their start-up is reported apart from the runs)."""
    t0 = time.perf_counter()
    if name == "ray":
        import ray
        import ray.data
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
    elif name == "spark":
        from pyspark.sql import SparkSession
        os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
        spark = (SparkSession.builder.master(f"local[{os.cpu_count()}]").appName("bench_m4_scale")
                 .config("spark.ui.enabled", "false").config("spark.ui.showConsoleProgress", "false")
                 .config("spark.driver.memory", "2g").getOrCreate())
        spark.sparkContext.setLogLevel("ERROR")
    return time.perf_counter() - t0


def stop_engine(name):
    if name == "ray":
        import ray
        ray.shutdown()
    elif name == "spark":
        from pyspark.sql import SparkSession
        s = SparkSession.getActiveSession()
        if s is not None:
            s.stop()


def fit(folder, instance, engine, compressed, target):
    kw = dict(columns(instance), target=target, budget=ETA, eps_rep=EPS_REP, eps_assoc=EPS_ASSOC, tol=TOL,
              engine=engine, progress=False)
    if not compressed:
        kw["max_patterns"] = 1
    base_rss = _tree_rss(os.getpid())
    with PeakMemory() as mem, warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        t0 = time.perf_counter()
        model = m4.fit_dataset(folder, **kw)
        seconds = time.perf_counter() - t0
    return model, seconds, mem, base_rss


def data_pass_rates(info):
    """rows/s of each pass over the data (the driver's table solve is no pass over the data)."""
    return [info["rows"] / t for t in info.get("pass_seconds", []) if t > 0]


# ----- in memory --------------------------------------------------------------------------------

def read_arrays(folder, instance):
    """(s, y) uint8 (y dense, or CSR for the sparse instance) read from the files."""
    import pyarrow.dataset as pads
    cols = columns(instance)
    table = pads.dataset(folder, format="parquet").to_table(
        columns=cols["sensitive"] + cols.get("labels", []) + (["tags"] if instance == "sparse" else []))
    s = np.stack([table.column(g).to_numpy(zero_copy_only=False) for g in cols["sensitive"]], 1).astype(np.uint8)
    if instance != "sparse":
        y = np.stack([table.column(l).to_numpy(zero_copy_only=False) for l in cols["labels"]], 1).astype(np.uint8)
        return s, y
    import pyarrow.compute as pc
    import scipy.sparse as sp
    tags = table.column("tags").combine_chunks()
    vocab = sorted(pc.unique(tags.flatten()).to_pylist())
    idx = np.asarray(pc.index_in(tags.flatten(), value_set=pc.cast(vocab, tags.type.value_type)))
    rows = np.asarray(pc.list_parent_indices(tags))
    y = sp.csr_matrix((np.ones(rows.size, np.uint8), (rows, idx)), shape=(len(s), len(vocab)))
    y.sum_duplicates()
    y.data[:] = 1
    return s, y


def w_of(result):
    """(p,) w = v+ - v- in the dataset layout (group k: [rep, assoc 0..c-1])."""
    return (np.asarray(result.v_plus) - np.asarray(result.v_minus)).reshape(-1)


# ----- a cluster-sized run, simulated with many tiny shards ------------------------------------------

def _rchar():
    """Bytes this process has read through read(2)/pread(2) so far (page cache included)."""
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("rchar:"))


def projected_bytes(folder, cols):
    """Compressed bytes of the column chunks of ``cols`` in every file, and the footers'
    bytes: what a pass that reads only those columns has to fetch."""
    import glob

    import pyarrow.parquet as pq
    chunks = footers = 0
    for path in sorted(glob.glob(os.path.join(folder, "*.parquet"))):
        md = pq.ParquetFile(path).metadata
        footers += md.serialized_size
        names = [md.schema.column(j).path.split(".")[0] for j in range(md.num_columns)]
        for g in range(md.num_row_groups):
            rg = md.row_group(g)
            chunks += sum(rg.column(j).total_compressed_size for j in range(md.num_columns) if names[j] in cols)
    return chunks, footers


def simulate(args, cache):
    """fit_dataset by passes (max_patterns=1: every solver step reads the data) over
    ``--simulate`` tiny shards: bytes read per pass (measured, and from the Parquet
    metadata), the stats each task sends, the driver state and checkpoint, time per pass."""
    import pickle

    from pym4.engines.local import LocalEngine
    from pym4.m4._stages import PartialStage

    shards, per = args.simulate, args.simulate_rows
    n = shards * per
    folder = dataset(cache, "dense", n, per)
    cols = columns("dense")
    chunks, footers = projected_bytes(folder, set(cols["sensitive"] + cols["labels"]))
    ck = os.path.join(args.out, "m4_scale_simulate.checkpoint.json")
    sizes = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        r0, t0 = _rchar(), time.perf_counter()
        # keep the checkpoint (a fit removes it at the end): save its size from the hook
        model = _fit_keeping_checkpoint(folder, cols, ck, sizes)
        seconds, read = time.perf_counter() - t0, _rchar() - r0
    info = model.info
    # One task's stats at a solver state of this problem (what every task of a pass sends).
    problem = (np.asarray(model.target, dtype=np.float64), model.budget, model.eps_rep, model.eps_assoc)
    state = _backend.core().m4_exact_init(problem, M, C, n, 100, TOL, 1e6, None, 1 << 17)
    one = next(iter(LocalEngine(folder).partials(PartialStage(model.columns, problem, state, None))))
    task_bytes = len(pickle.dumps(one))
    load = os.getloadavg()[0]
    print(f"SIMULATE {shards} shards x {per} rows = {n:,d} rows (m=2, c=32), load {load:.1f}: "
          f"{info['passes']} passes ({info['solver_passes']} solver steps) in {seconds:.1f} s "
          f"({seconds / info['passes']:.2f} s/pass, {1e3 * seconds / info['passes'] / shards:.2f} ms per shard-task)")
    print(f"SIMULATE read per pass: {read / info['passes'] / 2**20:.2f} MiB measured (rchar), "
          f"{(chunks + footers) / 2**20:.2f} MiB of projected column chunks + footers "
          f"({(chunks + footers) / n:.2f} B/row); the files: {_folder_bytes(folder) / 2**20:.1f} MiB")
    print(f"SIMULATE stats: {one.size} float64 per task = {task_bytes / 1024:.1f} KiB pickled, "
          f"{shards * task_bytes / 2**20:.1f} MiB to the driver per pass; driver state {state.size} "
          f"float64 = {state.nbytes / 1024:.1f} KiB; checkpoint {max(sizes) / 1024:.1f} KiB of JSON")
    return dict(instance=f"simulate {shards} shards", n=n, method="local passes (simulated cluster)",
                engine="local", mode="passes", time_s=seconds, passes=info["passes"],
                solver_passes=info["solver_passes"], bytes_read_per_pass=read / info["passes"],
                projected_bytes_per_pass=chunks + footers, stats_values_per_task=int(one.size),
                stats_bytes_per_task=task_bytes, state_bytes=int(state.nbytes),
                checkpoint_bytes=max(sizes), shards=shards, status=info["status"])


def _folder_bytes(folder):
    return sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder))


def _fit_keeping_checkpoint(folder, cols, ck, sizes):
    """fit_dataset with a checkpoint, recording the checkpoint's size after each save."""
    from pym4.m4 import _dataset

    save = _dataset._Checkpoint.save

    def recording(self, **fields):
        save(self, **fields)
        sizes.append(os.path.getsize(self.path))
    _dataset._Checkpoint.save = recording
    try:
        model = m4.fit_dataset(folder, **cols, budget=ETA, eps_rep=EPS_REP, eps_assoc=EPS_ASSOC, tol=TOL,
                               max_patterns=1, checkpoint=ck, progress=False)
    finally:
        _dataset._Checkpoint.save = save
    return model


# ----- one pass, stage by stage ---------------------------------------------------------------------

def _cpu_timed(fn):
    """(wall s, CPU s of this process) of fn()."""
    c0, t0 = time.process_time(), time.perf_counter()
    fn()
    return time.perf_counter() - t0, time.process_time() - c0


def profile(folder, instance="dense"):
    """One pass of the exact solver by passes over ``folder``, stage by stage: each stage
    on one thread over every file (CPU ns per row: what it costs wherever it runs), then the
    local engine's whole pass from Parquet and from its cache (wall rows/s; CPU over wall is
    the cores it kept busy). The solver states are those of a real solve (the duals after
    each Newton step ask for different stats: the line search's, the Hessian's)."""
    import pyarrow.dataset as pads

    from pym4.engines import _parquet
    from pym4.engines.local import LocalEngine
    from pym4.m4 import _passes
    from pym4.m4._columns import ColumnSpec
    from pym4.m4._stages import PartialStage

    core = _backend.core()
    cols = columns(instance)
    spec = ColumnSpec.make(**cols).resolve()
    names = cols["sensitive"] + cols["labels"]
    ds = pads.dataset(folder, format="parquet")
    frags = sorted(ds.get_fragments(), key=lambda f: f.path)
    n = sum(f.metadata.num_rows for f in frags)
    every = core.build_info()["omp_max_threads"]
    core.set_thread_limit(1)  # every stage on this thread alone
    rows = []

    def stage(name, fn):
        wall, cpu = _cpu_timed(fn)
        rows.append(dict(instance=f"profile {instance} N={n:.0e}", n=n, method=name, engine="local",
                         time_s=wall, cpu_ns_per_row=1e9 * cpu / n, rows_per_s_pass=n / wall))
        print(f"PROFILE {name:44s} {1e9 * cpu / n:7.1f} CPU ns/row  {n / wall / 1e6:7.1f} M rows/s "
              f"({cpu / wall:.2f} cores)", flush=True)

    batches = []
    stage("read+decode Parquet (1 thread)", lambda: batches.extend(
        b for f in frags for b in f.to_batches(columns=names, batch_size=1 << 16, use_threads=False)))
    if _parquet.polars_module() is not None:  # the engines' read: polars for these columns (its own threads)
        stage("read+decode Parquet, engines' reader (polars)", lambda: sum(
            b.num_rows for f in frags for b in _parquet.fragment_batches(f, ds.schema, names, 1 << 16)))
    datas = []
    stage("bool columns -> uint8 rows (core)", lambda: datas.extend(spec.data_tuple(b, "x") for b in batches))
    target = np.asarray(m4.default_target(np.concatenate([d[0] for d in datas])), np.float64)
    problem = (target, ETA, EPS_REP, EPS_ASSOC)
    states = []
    res = _passes.solve(lambda: datas, problem, M, len(cols["labels"]), tol=TOL,
                        on_pass=lambda k, st: states.append(st.copy()))
    init = core.m4_exact_init(problem, M, len(cols["labels"]), n, 100, TOL, 1e6, None, 1 << 17)
    print(f"PROFILE the solve: {len(states)} solver passes, status {res.status}", flush=True)
    for k, st in enumerate([init] + states[:-1]):
        parts = []
        stage(f"m4_partial at solver state {k} (1 thread)",
              lambda st=st: parts.extend(core.m4_partial(d, None, problem, st, 0) for d in datas))
        stage(f"  merge of its {len(parts)} stats", lambda parts=parts: functools.reduce(PartialStage.merge, parts))
    core.set_thread_limit(every)
    del batches, datas
    mid = states[len(states) // 2 - 1] if len(states) > 1 else init
    pstage = PartialStage(spec, problem, mid, None)
    eng = LocalEngine(folder, cache_bytes=0)
    stage(f"local pass from Parquet ({eng.workers} threads)", lambda: eng.reduce(pstage))
    eng = LocalEngine(folder)
    eng.reduce(pstage)
    stage(f"local pass from its cache ({eng.workers} threads)", lambda: eng.reduce(pstage))
    return rows


def profile_spark(folder, instance="dense"):
    """The Spark engine's pass over ``folder``, piece by piece (wall seconds, this machine's
    local[cores] session): the per-file pass (pyarrow in the Python workers) without and with
    the workers' caches, pass after pass; what Spark's own reader would cost instead (the JVM
    Parquet read of the 0/1 columns, their packing into a word, and ``mapInArrow`` over the
    persisted packed frame with a Python side that does nothing: the transfer's floor, at
    Spark's default Arrow batch and at 2^17 rows); and a DataFrame handed in, by its boolean
    columns and packed (the engine's way). Each time is printed with the load average."""
    import pyarrow as pa
    from pyspark import StorageLevel
    from pyspark.sql import SparkSession

    from pym4.engines.local import LocalEngine
    from pym4.engines.spark import SparkEngine, _word
    from pym4.m4._columns import ColumnSpec
    from pym4.m4._stages import CountsStage

    spark = SparkSession.getActiveSession()
    rs = ColumnSpec.make(**columns(instance)).resolve()
    stage, layout = CountsStage(rs), rs.packed_layout()
    n = sum(LocalEngine(folder).shards.rows)
    rows = []

    def timed(name, fn):
        t0 = time.perf_counter()
        fn()
        sec = time.perf_counter() - t0
        rows.append(dict(instance=f"profile spark {instance} N={n:.0e}", n=n, method=name, engine="spark",
                         time_s=sec, rows_per_s_pass=n / sec, load_avg_1m=os.getloadavg()[0]))
        print(f"PROFILE spark {name:52s} {sec:7.2f} s {n / sec / 1e6:6.1f} M rows/s  (load {os.getloadavg()[0]:.1f})",
              flush=True)

    local = LocalEngine(folder)
    timed("local pass from Parquet (for scale)", lambda: local.reduce(stage))
    timed("local pass from its cache", lambda: local.reduce(stage))
    plain, cached = SparkEngine(folder, cache_bytes=0), SparkEngine(folder)
    for k in range(3):
        timed(f"files, pyarrow in the workers, no cache ({k})", lambda: plain.reduce(stage))
    for k in range(4):
        timed(f"files, the workers' caches ({k}: filling)", lambda: cached.reduce(stage))
    raw = spark.read.parquet(*plain.shards.paths)
    types = {c: plain.shards.dataset.schema.field(c).type for c in layout.columns}
    word = _word(layout, 0, types).alias("w")

    def noop(df):
        df.write.format("noop").mode("overwrite").save()
    timed("JVM: read the 0/1 columns (noop write)", lambda: noop(raw.select(*layout.columns)))
    timed("JVM: read + pack into a word (noop write)", lambda: noop(raw.select(word)))
    frame = raw.select(word).persist(StorageLevel.MEMORY_ONLY)
    timed("JVM: read + pack + persist (count)", frame.count)
    timed("JVM: count of the persisted word", frame.count)

    def nothing(batches):
        yield pa.RecordBatch.from_pydict({"n": [sum(b.num_rows for b in batches)]})
    conf = "spark.sql.execution.arrow.maxRecordsPerBatch"
    default = spark.conf.get(conf)
    for batch in (default, str(1 << 17)):
        spark.conf.set(conf, batch)
        timed(f"persisted word to Python, no work (batch {batch})", lambda: frame.mapInArrow(nothing, "n long").collect())
    spark.conf.set(conf, default)
    frame.unpersist()
    given = SparkEngine(raw)
    timed("a DataFrame: its boolean columns to Python", lambda: given._raw_partials(stage))
    for k in range(3):
        timed(f"a DataFrame: packed and persisted ({k})", lambda: given.reduce(stage))
    given.close()
    return rows


# ----- the run ------------------------------------------------------------------------------------

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    size = ap.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="N = 2e4 in shards of 5000: a smoke run")
    size.add_argument("--full", action="store_true", help="N = 1e8")
    ap.add_argument("--n", type=float, default=None, help="rows (default 1e7; with --quick 2e4)")
    ap.add_argument("--shard-rows", type=float, default=None, help="rows per shard (default N / 10, at most 1e6)")
    ap.add_argument("--engines", default="local,ray,spark")
    ap.add_argument("--instances", default=",".join(INSTANCES))
    ap.add_argument("--modes", default="compressed,passes", help="compressed (pattern table allowed), passes")
    ap.add_argument("--cache", default=None, help="dataset folder (default OUT/m4_scale_data)")
    ap.add_argument("--out", default="bench_out")
    ap.add_argument("--in-memory-max", type=float, default=1e7, help="largest N solved in memory too")
    ap.add_argument("--cvxpy-max", type=float, default=1e5, help="largest N given to cvxpy (0: skip)")
    ap.add_argument("--simulate", type=int, default=0, metavar="SHARDS",
                    help="also: a run by passes over SHARDS tiny shards (bytes per pass, stats, state)")
    ap.add_argument("--simulate-rows", type=int, default=500, help="rows per simulated shard")
    ap.add_argument("--no-warmup", action="store_true",
                    help="no untimed fit after an engine starts: the first timed fit pays the workers' imports")
    ap.add_argument("--profile", action="store_true",
                    help="only: one pass over the dense instance, stage by stage (read, convert, partial, merge)")
    ap.add_argument("--profile-spark", action="store_true",
                    help="only: the Spark engine's pass over the dense instance, piece by piece")
    args = ap.parse_args(argv)
    n = int(args.n or (2e4 if args.quick else 1e8 if args.full else 1e7))
    shard_rows = int(args.shard_rows or (min(5000, n) if args.quick else min(1_000_000, max(1, -(-n // 10)))))
    engines = [e for e in args.engines.split(",") if e]
    instances = [i for i in args.instances.split(",") if i]
    modes = [x for x in args.modes.split(",") if x]
    bad = [i for i in instances if i not in INSTANCES] + [e for e in engines if e not in m4_engines()]
    bad += [x for x in modes if x not in ("compressed", "passes")]
    if bad:
        ap.error(f"unknown instance, engine or mode: {', '.join(bad)}")
    os.makedirs(args.out, exist_ok=True)
    cache = args.cache or os.path.join(args.out, "m4_scale_data")
    os.makedirs(cache, exist_ok=True)
    rows = []
    load = os.getloadavg()
    print(f"N={n:,d} in shards of {shard_rows:,d}; {os.cpu_count()} CPUs, load average "
          f"{load[0]:.1f} {load[1]:.1f} {load[2]:.1f}", flush=True)
    if args.profile_spark:
        start_engine("spark")
        try:
            rows = profile_spark(dataset(cache, "dense", n, shard_rows))
        finally:
            stop_engine("spark")
        csv_path, png = write_results(args.out, "m4_scale_profile_spark", rows, title=f"Spark M4 pass, N={n:,d}")
        print(f"wrote {csv_path}")
        return 0
    if args.profile:
        rows = profile(dataset(cache, "dense", n, shard_rows))
        csv_path, png = write_results(args.out, "m4_scale_profile", rows, title=f"one M4 pass, N={n:,d}")
        print(f"wrote {csv_path}")
        return 0
    folders = {k: dataset(cache, k, n, shard_rows) for k in sorted({"sparse" if i == "sparse" else "dense"
                                                                    for i in instances})}
    targets, reference, local_ws = {}, {}, {}
    for instance in instances:
        folder = folders["sparse" if instance == "sparse" else "dense"]
        base = dict(instance=f"{instance} N={n:.0e}", n=n, shards=-(-n // shard_rows))
        if n <= args.in_memory_max:
            t0 = time.perf_counter()
            s, y = read_arrays(folder, instance)
            t_read = time.perf_counter() - t0
            targets[instance] = m4.default_target(s)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                t0 = time.perf_counter()
                res = m4.balance(s, y, target=targets[instance], budget=ETA, eps_rep=EPS_REP, eps_assoc=EPS_ASSOC,
                                 method="exact", tol=TOL)
                t_solve = time.perf_counter() - t0
            reference[instance] = w_of(res)
            rows.append(dict(base, method="in-memory exact", engine="", mode="", time_s=t_solve, read_s=t_read,
                             status=res.status, iterations=res.iterations, objective=res.objective))
            report(rows[-1])
            if instance != "sparse" and n <= args.cvxpy_max:
                secs, status, q = cvxpy_solve(s, y, targets[instance])
                obj = float(np.mean(0.5 * (q - ETA) ** 2)) if q is not None else float("nan")
                rows.append(dict(base, method="cvxpy-clarabel", engine="", mode="", time_s=secs, status=status,
                                 objective=obj, objective_rel_to_exact=(obj - res.objective) / abs(res.objective)))
                report(rows[-1])
            del s, y
        else:
            targets[instance] = None  # the fit's default target (the mean group share), as in memory
    warm = dataset(cache, "dense", 2000, 1000)
    for engine in engines:
        startup = start_engine(engine)
        if engine != "local":
            print(f"{engine}: started in {startup:.1f} s", flush=True)
        try:
            if not args.no_warmup:  # untimed: first calls (imports, workers) out of the figures
                fit(warm, "dense-c8", engine, False, None)
            local_w = {}
            for instance in instances:
                folder = folders["sparse" if instance == "sparse" else "dense"]
                base = dict(instance=f"{instance} N={n:.0e}", n=n, shards=-(-n // shard_rows))
                for mode in modes:
                    model, seconds, mem, base_rss = fit(folder, instance, engine, mode == "compressed",
                                                        targets[instance])
                    info = model.info
                    rates = data_pass_rates(info)
                    row = dict(base, method=f"{engine} {mode}", engine=engine, mode=mode, time_s=seconds,
                               startup_s=startup if engine != "local" else 0.0, status=info["status"],
                               compressed=info["compressed"], patterns=info["patterns"], passes=info["passes"],
                               solver_passes=info["solver_passes"], iterations=info["iterations"],
                               rows_per_s_pass=statistics.median(rates) if rates else float("nan"),
                               min_rows_per_s_pass=min(rates) if rates else float("nan"),
                               pass_s=" ".join(f"{t:.2f}" for t in info.get("pass_seconds", [])),
                               peak_rss_mb=mem.peak / 2**20, peak_pss_mb=mem.peak_pss / 2**20,
                               rss_before_mb=base_rss / 2**20,
                               max_violation=info["max_violation"])
                    w = np.asarray(model.w)
                    if instance in reference:
                        row["max_abs_w_diff_in_memory"] = float(np.abs(w - reference[instance]).max())
                    key = (instance, mode)
                    if engine == "local":
                        local_w[key] = w
                    elif key in local_ws:
                        row["max_abs_w_diff_local"] = float(np.abs(w - local_ws[key]).max())
                    rows.append(row)
                    report(row)
            if engine == "local":
                local_ws = local_w
        finally:
            stop_engine(engine)
    if args.simulate:
        rows.append(simulate(args, cache))
    load = os.getloadavg()
    for r in rows:
        r["load_avg_1m"] = load[0]
    ratios(rows)
    csv_path, png = write_results(args.out, "m4_scale", rows, title=f"M4 exact over sharded Parquet, N={n:,d}")
    print(f"wrote {csv_path}" + (f" and {png}" if png else ""))
    return 0


def m4_engines():
    from pym4.engines import ENGINES
    return ENGINES


def report(r):
    keys = ("passes", "solver_passes", "compressed", "patterns", "rows_per_s_pass", "peak_rss_mb", "peak_pss_mb",
            "status", "pass_s",
            "max_abs_w_diff_local", "max_abs_w_diff_in_memory", "objective_rel_to_exact")

    def fmt(k, v):
        if k == "rows_per_s_pass":
            return f"{v / 1e6:.1f}M rows/s/pass"
        if k == "pass_s":
            return f"pass_s=[{v}]"
        return f"{k}={v:.2e}" if isinstance(v, float) else f"{k}={v}"
    extra = " ".join(fmt(k, r[k]) for k in keys if k in r and r[k] is not None)
    print(f"{r['instance']:18s} {r['method']:22s} {r['time_s']:8.2f} s  {extra}", flush=True)


def ratios(rows):
    """RATIO lines: each engine's time over local's, same instance and mode, same run."""
    by = {(r["instance"], r["engine"], r["mode"]): r for r in rows if r.get("engine")}
    for (inst, eng, mode), r in by.items():
        loc = by.get((inst, "local", mode))
        if eng != "local" and loc is not None:
            print(f"RATIO {eng} / local {inst} {mode}: {r['time_s'] / loc['time_s']:.2f}x "
                  f"(per pass {loc['rows_per_s_pass'] / r['rows_per_s_pass']:.2f}x)")


if __name__ == "__main__":
    sys.exit(main())
