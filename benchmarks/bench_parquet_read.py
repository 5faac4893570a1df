"""How fast pyarrow reads the M4 benchmark's boolean columns under different Parquet layouts
(not a test: a measurement for the README's advice on which layout to write).

Writes N rows (default 4e6) of the dense instance of bench_m4_scale.py (m = 2 group and c = 32
label columns, boolean) in two files per layout, then reads the 34 columns back as a pass of
the local engine does (each file streamed in record batches, one file per thread), on one
thread and on every core, and prints rows/s per layout and reader option. Layouts: the
benchmark's own writer settings (pyarrow's defaults: nullable fields, snappy, dictionary on,
data page v1, row groups of 2^20 rows) and one change at a time from them (non-nullable
fields, no compression, zstd, dictionary off, data page v2, RLE boolean encoding, row
groups of 2^16 rows and of the whole file), and int8 instead of boolean columns. Reader
options: batch size, pre_buffer, use_threads, ``pq.read_table`` of the whole file; and the
engines' own read (column "pym4": polars for these columns when it is installed).

    python benchmarks/bench_parquet_read.py [--n 4e6] [--dir DIR] [--repeat 3]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_m4 import make_dense  # noqa: E402

M, C = 2, 32
NAMES = [f"g{k}" for k in range(M)] + [f"l{r:02d}" for r in range(C)]


def table(n, seed, int8=False, nullable=True):
    import pyarrow as pa
    s, y = make_dense(n, c=C, seed=seed)
    x = np.concatenate([s, y], axis=1)
    t = pa.Table.from_arrays([pa.array(x[:, j].astype(np.int8) if int8 else x[:, j].view(np.bool_))
                              for j in range(M + C)], names=NAMES)
    if not nullable:
        t = t.cast(pa.schema([pa.field(f.name, f.type, nullable=False) for f in t.schema]))
    return t


LAYOUTS = {
    "benchmark's (defaults: snappy, dictionary, v1, 2^20-row groups)": {},
    "non-nullable fields": {"nullable": False},
    "no compression": {"compression": "none"},
    "zstd": {"compression": "zstd"},
    "dictionary off": {"use_dictionary": False},
    "data page v2": {"data_page_version": "2.0"},
    "RLE booleans, no dictionary": {"use_dictionary": False, "column_encoding": "RLE"},
    "RLE booleans, no dictionary, no compression, non-nullable":
        {"use_dictionary": False, "column_encoding": "RLE", "compression": "none", "nullable": False},
    "no dictionary, no compression, non-nullable": {"use_dictionary": False, "compression": "none", "nullable": False},
    "row groups of 2^16 rows": {"row_group_size": 1 << 16},
    "one row group per file": {"row_group_size": 1 << 30},
    "int8 columns (not boolean)": {"int8": True},
}


def write(folder, n, opts):
    import pyarrow.parquet as pq
    os.makedirs(folder, exist_ok=True)
    paths = []
    opts = dict(opts)
    int8, nullable = opts.pop("int8", False), opts.pop("nullable", True)
    if opts.get("column_encoding") == "RLE":
        opts["column_encoding"] = {c: "RLE" for c in NAMES}
    opts.setdefault("row_group_size", 1 << 20)
    for i in range(2):
        path = os.path.join(folder, f"part-{i}.parquet")
        if not os.path.exists(path):
            pq.write_table(table(n // 2, 1000 + i, int8, nullable), path + ".tmp", **opts)
            os.rename(path + ".tmp", path)
        paths.append(path)
    return paths


def read_fragments(paths, threads, batch_rows=1 << 16, **scan):
    """The local engine's read: each file's fragment streamed in batches, a file per thread."""
    import pyarrow.dataset as pads

    def one(p):
        frag = next(iter(pads.dataset(p, format="parquet").get_fragments()))
        return sum(b.num_rows for b in frag.to_batches(columns=NAMES, batch_size=batch_rows, batch_readahead=1,
                                                       fragment_readahead=1, use_threads=False, **scan))
    with ThreadPoolExecutor(threads) as pool:
        return sum(pool.map(one, paths))


def read_iter_batches(paths, threads, batch_rows=1 << 16, pre_buffer=False):
    import pyarrow.parquet as pq

    def one(p):
        f = pq.ParquetFile(p, pre_buffer=pre_buffer)
        return sum(b.num_rows for b in f.iter_batches(batch_size=batch_rows, columns=NAMES, use_threads=False))
    with ThreadPoolExecutor(threads) as pool:
        return sum(pool.map(one, paths))


def read_table(paths, threads, pre_buffer=True):
    """pq.read_table of each file, its own threads (use_threads) doing the column chunks."""
    import pyarrow.parquet as pq
    return sum(pq.read_table(p, columns=NAMES, use_threads=threads > 1, pre_buffer=pre_buffer).num_rows
               for p in paths)


def read_pym4(paths, threads, batch_rows=1 << 16):
    """What the engines read with (pym4.engines._parquet): polars for boolean and integer
    columns when it is installed, a file per thread as the local engine runs them."""
    import pyarrow.dataset as pads

    from pym4.engines._parquet import fragment_batches

    def one(p):
        ds = pads.dataset(p, format="parquet")
        frag = next(iter(ds.get_fragments()))
        return sum(b.num_rows for b in fragment_batches(frag, ds.schema, NAMES, batch_rows))
    with ThreadPoolExecutor(threads) as pool:
        return sum(pool.map(one, paths))


READERS = {
    "1 thread": lambda paths, cores: read_fragments(paths, 1),
    f"{os.cpu_count() or 1} thr": lambda paths, cores: read_fragments(paths, cores),
    "iter_b.": lambda paths, cores: read_iter_batches(paths, cores),
    "pre_buf": lambda paths, cores: read_iter_batches(paths, cores, pre_buffer=True),
    "b=2^20": lambda paths, cores: read_fragments(paths, cores, batch_rows=1 << 20),
    "table": lambda paths, cores: read_table(paths, cores),
    "pym4": lambda paths, cores: read_pym4(paths, cores),
}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=float, default=4e6)
    ap.add_argument("--dir", default="bench_out/parquet_layouts")
    ap.add_argument("--repeat", type=int, default=3, help="rounds over every layout and reader (best kept)")
    ap.add_argument("--layouts", default=None, help="comma-separated numbers of the layouts to run (default: all)")
    args = ap.parse_args(argv)
    n, cores = int(args.n), os.cpu_count() or 1
    names = list(LAYOUTS)
    chosen = range(len(names)) if not args.layouts else [int(i) for i in args.layouts.split(",")]
    files = {k: write(os.path.join(args.dir, f"layout-{k:02d}"), n, LAYOUTS[names[k]]) for k in chosen}
    print(f"N={n:,d} rows, {M + C} boolean columns, 2 files; {cores} CPUs, load {os.getloadavg()[0]:.1f}; "
          f"M rows/s, best of {args.repeat} rounds (each round: every layout and reader in turn, so that "
          f"a change of the machine's load falls on all of them)", flush=True)
    best = {}
    for _ in range(args.repeat):
        for k, paths in files.items():
            for r, fn in READERS.items():
                t0 = time.perf_counter()
                rows = fn(paths, cores)
                best[k, r] = max(best.get((k, r), 0.0), rows / (time.perf_counter() - t0))
    print(f"{'layout':62s} {'MB':>6s}" + "".join(f" {r:>8s}" for r in READERS))
    for k, paths in files.items():
        mb = sum(os.path.getsize(p) for p in paths) / 2**20
        print(f"{k:2d} {names[k]:59s} {mb:6.1f}" + "".join(f" {best[k, r] / 1e6:8.1f}" for r in READERS))
    print(f"load {os.getloadavg()[0]:.1f} at the end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
