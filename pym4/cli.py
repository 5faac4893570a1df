"""The ``pym4`` command line.

Each subcommand is a small function that adds its parser (``_add_<name>``) and a runner;
heavy imports (matplotlib, pyarrow, training code) happen inside the runners only.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from typing import List, Optional


class CLIError(Exception):
    """A user-facing error: printed as ``pym4: error: ...`` with exit code 2."""


def _add_info(sub) -> None:
    p = sub.add_parser("info", help="print what the compiled core was built with (JSON)")
    p.set_defaults(run=_run_info)


def _run_info(args) -> int:
    import pym4

    print(json.dumps(pym4.build_info(), indent=2, default=str))
    return 0


# ----- demo (the main job) ------------------------------------------------------------------

def _unit_interval(name: str, low_open: bool = False):
    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name}: expected a number, got {text!r}") from None
        if not (0.0 < v <= 1.0 if low_open else 0.0 <= v <= 1.0):
            raise argparse.ArgumentTypeError(f"{name}: expected a number in {'(0, 1]' if low_open else '[0, 1]'}, got {text}")
        return v
    return parse


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="the main job: M4-balance a biased image-caption set, train CLIP on both, compare",
                       description="Build a synthetic image-caption set whose captions' concepts correlate with an "
                                   "unmentioned colour group, balance it with M4, train a tiny CLIP/SigLIP on the "
                                   "unbalanced and on the balanced data, and compare bias and quality side by side. "
                                   "With --swav: train SwAV on scikit-learn's digits and compare linear probes.")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (summary.json and PNG plots)")
    p.add_argument("--swav", action="store_true", help="run the SwAV linear-probe demo on the digits instead")
    p.add_argument("--size", choices=("tiny", "small", "default"), default="default",
                   help="problem size: tiny (seconds), small, default (about a minute on 2 CPU cores)")
    p.add_argument("--loss", choices=("clip", "siglip"), default="clip", help="contrastive loss (default: clip)")
    p.add_argument("--association", type=_unit_interval("--association"), default=0.6,
                   help="strength of the group-concept correlation in the training data, 0..1 (default 0.6)")
    p.add_argument("--minority-share", type=_unit_interval("--minority-share"), default=0.3,
                   help="share of the minority colour group in the training data (default 0.3)")
    p.add_argument("--budget", type=_unit_interval("--budget", low_open=True), default=0.3,
                   help="M4 budget: expected fraction of the training data kept (default 0.3)")
    p.add_argument("--seed", type=_int_arg("--seed", 0), default=0, help="random seed, >= 0 (default 0)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(run=_run_demo)


def _run_demo(args) -> int:
    import os

    from .demo import INSTALL_HINT, missing_requirements

    # Before any work: a base install lacks the demo's plotting and digits packages.
    missing = missing_requirements()
    if missing:
        raise CLIError(f"the demo needs {' and '.join(missing)} (not installed): {INSTALL_HINT}")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise CLIError(f"--out: {args.out!r} exists and is not a directory")
    if os.path.isdir(args.out):  # else it is made first thing, which fails at once if it cannot be
        from ._io import check_writable_folder
        try:
            check_writable_folder(args.out)
        except OSError as e:
            raise CLIError(f"--out: cannot write in folder {args.out!r}: {e.strerror or e}") from None
    from .demo.run import run_demo, run_swav_demo

    try:
        if args.swav:
            run_swav_demo(args.out, size=args.size, seed=args.seed, progress=not args.no_progress)
        else:
            run_demo(args.out, size=args.size, loss=args.loss, association=args.association,
                     minority_share=args.minority_share, budget=args.budget, seed=args.seed,
                     progress=not args.no_progress)
    except (ValueError, OSError) as e:
        raise CLIError(str(e)) from e
    return 0


# ----- balance (M4 data balancing) ----------------------------------------------------------

def _add_balance(sub) -> None:
    p = sub.add_parser(
        "balance", help="M4 keep probabilities for a Parquet/CSV file or a sharded Parquet dataset",
        description="Compute per-example keep probabilities q that balance the sensitive groups and remove "
                    "their association with the labels (M4, Alabdulmohsin et al., ICLR 2024). The input is never "
                    "modified. INPUT a .parquet/.csv file and OUTPUT a .parquet/.csv file: the id column and q "
                    "(and keep with --sample) are written to OUTPUT atomically, the report (JSON + PNG) beside it. "
                    "INPUT a directory of Parquet shards (hive partitions included), a glob, or OUTPUT a folder: "
                    "the exact solver runs in passes on --engine (pym4.m4.balance_dataset), OUTPUT is a folder "
                    "with one Parquet part per input shard and _pym4_report.json/.png, the solver state is "
                    "checkpointed beside it after every pass and the same command resumes after an interruption.")
    p.add_argument("input", metavar="INPUT", help="a .parquet or .csv file, a directory of Parquet shards, or a glob")
    p.add_argument("--sensitive", default="", metavar="COLS", help="comma-separated 0/1 group columns")
    p.add_argument("--sensitive-from", default=None, metavar="COL[:V1,...]",
                   help="groups from a list<string>/string column: every value, or the values listed (datasets)")
    p.add_argument("--labels", default="", metavar="COLS", help="comma-separated 0/1 label or proxy columns")
    p.add_argument("--labels-from", default=None, metavar="COL[:V1,...]",
                   help="labels from a list<string>/string column: every value, or the values listed (datasets)")
    p.add_argument("--target", default=None, metavar="PI",
                   help="target proportion(s): one number or one per group, comma-separated "
                        "(default: the mean of the observed group shares)")
    p.add_argument("--budget", type=_budget_arg, default=0.9,
                   help="expected fraction of data kept, in (0, 1], or 'max': the largest feasible budget "
                        "(default 0.9)")
    p.add_argument("--eps-rep", type=_tolerance_arg("--eps-rep"), default=0.01,
                   help="representation tolerance, >= 0 (default 0.01)")
    p.add_argument("--eps-assoc", type=_tolerance_arg("--eps-assoc"), default=0.01,
                   help="association tolerance, >= 0 (default 0.01)")
    p.add_argument("--utility", default=None, metavar="COL", help="numeric column: bonus for keeping an example")
    p.add_argument("--id", default=None, metavar="COL", help="id column copied to the output (default: row number)")
    p.add_argument("--method", choices=("exact", "stream"), default="exact",
                   help="exact: dual solved to convergence (a file: columns held in memory as bytes; a dataset: "
                        "passes); stream (files only): one-pass stochastic dual ascent, then a second pass "
                        "writing q (bounded memory)")
    p.add_argument("--engine", choices=("local", "ray", "spark"), default=None,
                   help="where a dataset's passes run (default local: a thread pool over the files)")
    p.add_argument("--sample", action="store_true", help="also write keep ~ Bernoulli(q)")
    p.add_argument("--seed", type=_int_arg("--seed", 0), default=0,
                   help="seed of --sample and of the stream order, >= 0 (default 0)")
    p.add_argument("--batch-rows", type=_int_arg("--batch-rows", 1, _MAX_BATCH_ROWS), default=None,
                   help="rows per record batch read (default 65536; not for --engine spark, which batches "
                        "by itself)")
    p.add_argument("--out", required=True, metavar="OUTPUT", help="output .parquet or .csv file, or folder")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a read-only OUTPUT file or report (writable ones are replaced anyway)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    p.set_defaults(run=_run_balance)


def _budget_arg(text: str):
    if text == "max":
        return "max"
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--budget: expected a number in (0, 1] or 'max', got {text!r}") from None
    if not 0.0 < v <= 1.0:
        raise argparse.ArgumentTypeError(f"--budget: expected a number in (0, 1] or 'max', got {text}")
    return v


_MAX_BATCH_ROWS = 2**31 - 1  # pyarrow's readers take an int32-sized batch; more is one batch anyway
_DEFAULT_BATCH_ROWS = 65536


def _int_arg(name: str, low: int, high: Optional[int] = None):
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            v = None
        if v is None or v < low or (high is not None and v > high):
            within = f">= {low}" if high is None else f"in [{low}, {high}]"
            raise argparse.ArgumentTypeError(f"{name}: expected an integer {within}, got {text!r}")
        return v
    return parse


def _tolerance_arg(name: str):
    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            v = float("nan")
        if not (0.0 <= v < float("inf")):  # NaN fails too
            raise argparse.ArgumentTypeError(f"{name}: expected a finite number >= 0, got {text!r}")
        return v
    return parse


def _split_cols(text: str) -> List[str]:
    return [c.strip() for c in text.split(",") if c.strip()]


def _parse_target(text: Optional[str], groups: Optional[int] = None):
    """--target: None, one number, or a list of them (one per group; ``groups``, when the
    number of groups is known before reading data), each in (0, 1)."""
    if text is None:
        return None
    try:
        vals = [float(v) for v in _split_cols(text)]
    except ValueError:
        raise CLIError(f"--target: expected numbers, got {text!r}") from None
    if not vals:
        raise CLIError(f"--target: expected one number or one per group, got {text!r}")
    if not all(0.0 < v < 1.0 for v in vals):  # NaN fails too
        raise CLIError(f"--target: proportions must be in (0, 1), got {text!r}")
    if groups is not None and len(vals) not in (1, groups):
        raise CLIError(f"--target: expected one number or {groups} (one per --sensitive column), got {len(vals)}")
    return vals[0] if len(vals) == 1 else vals


def _file_format(path: str, what: str) -> str:
    low = path.lower()
    if low.endswith((".parquet", ".pq")):
        return "parquet"
    if low.endswith(".csv"):
        return "csv"
    raise CLIError(f"{what}: {path!r} must end in .parquet, .pq or .csv")


def _record_batches(path: str, fmt: str, columns: List[str], batch_rows: int):
    """(batches, rows or None, schema): pyarrow RecordBatches of `columns` (``batch_rows``
    rows each, the last one shorter), after checking that each of them exists exactly once."""
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    try:
        if fmt == "parquet":
            pf = pq.ParquetFile(path)
            schema = pf.schema_arrow
            total = pf.metadata.num_rows
        else:
            reader = pacsv.open_csv(path, read_options=pacsv.ReadOptions(block_size=_CSV_BLOCK_BYTES))
            schema = reader.schema
            total = None
        names = schema.names
    except (pa.ArrowInvalid, OSError) as e:
        if "Empty CSV file" in str(e) or (fmt == "csv" and os.path.getsize(path) == 0):
            raise CLIError(f"{path}: the file is empty") from None
        raise CLIError(f"{path}: cannot read it as {fmt}: {e}") from None
    missing = [c for c in columns if c not in names]
    if missing:
        raise CLIError(f"{path}: missing column(s) {', '.join(repr(c) for c in missing)}; "
                       f"the file has {', '.join(names)}")
    # A name given twice is ambiguous: pyarrow's lookups by name answer -1 (or raise) for it,
    # and column(-1) would quietly be the last column.
    twice = [c for c in columns if names.count(c) > 1]
    if twice:
        raise CLIError(f"{path}: column {twice[0]!r} appears {names.count(twice[0])} times; "
                       f"it is ambiguous (rename the columns so that each name is used once)")

    def gen():
        if fmt == "parquet":
            yield from pf.iter_batches(batch_size=batch_rows, columns=columns)
        else:
            # A fresh reader restricted to the needed columns (the probe above read the header only).
            r = pacsv.open_csv(path, read_options=pacsv.ReadOptions(block_size=_CSV_BLOCK_BYTES),
                               convert_options=pacsv.ConvertOptions(include_columns=columns))
            yield from _rebatch(r, batch_rows)
    return gen(), total, schema


# The CSV reader cuts blocks by bytes; _rebatch turns them into batches of --batch-rows rows.
_CSV_BLOCK_BYTES = 1 << 22


def _rebatch(batches, rows: int):
    """The rows of ``batches`` (an iterable of RecordBatches), re-cut into batches of
    ``rows`` rows (the last one shorter)."""
    import pyarrow as pa

    pending, have = [], 0
    for batch in batches:
        while batch.num_rows:
            take = min(rows - have, batch.num_rows)
            pending.append(batch.slice(0, take))
            have += take
            batch = batch.slice(take)
            if have == rows:
                yield pa.Table.from_batches(pending).combine_chunks().to_batches()[0]
                pending, have = [], 0
    if have:
        yield pa.Table.from_batches(pending).combine_chunks().to_batches()[0]


def _column(batch, name: str):
    """Column ``name`` of ``batch``, found by position (its name is unique: checked above)."""
    return batch.column(batch.schema.names.index(name))


def _binary_column(batch, name: str, row0: int):
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    col = _column(batch, name)
    if col.null_count:
        first = int(pc.index(pc.is_null(col), True).as_py())
        raise CLIError(f"column {name!r} has a missing value (row {row0 + first}); M4 needs 0/1 everywhere")
    if pa.types.is_boolean(col.type):
        return col.to_numpy(zero_copy_only=False).astype(np.uint8)
    if not (pa.types.is_integer(col.type) or pa.types.is_floating(col.type)):
        raise CLIError(f"column {name!r} has type {col.type}; expected 0/1 (integer, float or boolean)")
    arr = col.to_numpy(zero_copy_only=False)
    bad = ~((arr == 0) | (arr == 1))
    if bad.any():
        i = int(np.argmax(bad))
        raise CLIError(f"column {name!r} is not binary: row {row0 + i} has value {arr[i]!r} (expected 0 or 1)")
    return arr.astype(np.uint8)


def _numeric_column(batch, name: str, row0: int):
    import numpy as np
    import pyarrow as pa

    col = _column(batch, name)
    if col.null_count or not (pa.types.is_integer(col.type) or pa.types.is_floating(col.type)):
        raise CLIError(f"column {name!r} must be numeric without missing values")
    arr = col.to_numpy(zero_copy_only=False).astype(np.float64)
    if not np.all(np.isfinite(arr)):
        raise CLIError(f"column {name!r} has NaN or Inf (row {row0 + int(np.argmax(~np.isfinite(arr)))})")
    return arr


_FILE_SUFFIXES = (".parquet", ".pq", ".csv")


def _is_uri(path: str) -> bool:
    """``scheme://...`` (s3, gs, hdfs, file): read through a pyarrow filesystem, by the dataset
    route, whose listing takes a folder, a file or a glob alike (os.path knows none of them)."""
    scheme, sep, _ = path.partition("://")
    return bool(sep) and scheme.isidentifier()


def _is_dataset(args) -> bool:
    """A dataset run: INPUT a directory, a glob or a URI, or OUTPUT not a .parquet/.csv file."""
    return (os.path.isdir(args.input) or any(ch in args.input for ch in "*?[") or _is_uri(args.input)
            or not args.out.lower().endswith(_FILE_SUFFIXES))


def _run_balance(args) -> int:
    for flag, value in (("INPUT", args.input), ("--out", args.out)):
        if not value:  # (as a path, '' is the current folder, which "already exists")
            raise CLIError(f"{flag}: is empty; give a file or folder name")
    if _is_dataset(args):
        from ._cli_dataset import run_balance_dataset
        return run_balance_dataset(args)
    import os as _os

    import numpy as np
    import pyarrow as pa
    from tqdm import tqdm

    from . import _io, m4
    from .m4._inputs import default_target_of_shares

    src = _os.path.abspath(args.input)
    dst = _os.path.abspath(args.out)
    if not _os.path.isfile(src):
        raise CLIError(f"INPUT: no such file {args.input!r}")
    for flag, value in (("--sensitive-from", args.sensitive_from), ("--labels-from", args.labels_from),
                        ("--engine", args.engine)):
        if value is not None:
            raise CLIError(f"{flag}: only for a dataset (give --out a folder name, not a .parquet/.csv file)")
    if args.budget == "max" and args.method == "stream":
        raise CLIError("--budget max: needs --method exact (the largest feasible budget is found by exact solves)")
    # Through symlinks too: replacing a link's target would replace the input's data.
    if src == dst or _os.path.realpath(src) == _os.path.realpath(dst):
        raise CLIError("--out: must differ from INPUT (the input is never modified)")
    if not _os.path.isdir(_os.path.dirname(dst)):
        raise CLIError(f"--out: folder {_os.path.dirname(dst)!r} does not exist")
    in_fmt, out_fmt = _file_format(args.input, "INPUT"), _file_format(args.out, "--out")
    groups, labels = _split_cols(args.sensitive), _split_cols(args.labels)
    if not groups:
        raise CLIError("--sensitive: give at least one column")
    try:
        _column_spec(groups, labels, args.utility)
    except ValueError as e:
        raise CLIError(_flag_names(str(e))) from None
    extra = [c for c in (args.utility, args.id) if c]
    columns = list(dict.fromkeys(groups + labels + extra))
    target = _parse_target(args.target, len(groups))
    batch_rows = args.batch_rows or _DEFAULT_BATCH_ROWS
    # OUTPUT, its report, and the folder they go to, all checked before any data is read.
    stem = _os.path.splitext(dst)[0] + ".report"
    outputs = [dst, stem + ".png", stem + ".json"]  # the order of the commit: the JSON last
    folder = _os.path.dirname(dst)
    _io.clean_stale(folder)  # what crashed runs left here: finished (a cut-short commit) or removed
    _check_outputs(outputs, args.overwrite)
    try:
        _io.check_writable_folder(folder)
    except OSError as e:
        raise CLIError(f"--out: cannot write in folder {folder!r}: {e.strerror or e}") from None

    def read_pass(desc):
        batches, total, _ = _record_batches(args.input, in_fmt, columns, batch_rows)
        bar = tqdm(total=total, unit="rows", desc=desc, disable=args.no_progress, file=sys.stderr)
        row0 = 0
        for batch in batches:
            s = np.stack([_binary_column(batch, c, row0) for c in groups], axis=1)
            y = (np.stack([_binary_column(batch, c, row0) for c in labels], axis=1) if labels
                 else np.zeros((batch.num_rows, 0), np.uint8))
            u = _numeric_column(batch, args.utility, row0) if args.utility else None
            ids = (_column(batch, args.id) if args.id
                   else pa.array(np.arange(row0, row0 + batch.num_rows, dtype=np.int64)))
            yield s, y, u, ids
            row0 += batch.num_rows
            bar.update(batch.num_rows)
        bar.close()

    _, _, schema = _record_batches(args.input, in_fmt, columns, batch_rows)  # the header: checks only
    if args.id and out_fmt == "csv":
        id_type = schema.field(schema.names.index(args.id)).type
        if pa.types.is_nested(id_type):
            raise CLIError(f"--id: column {args.id!r} has type {id_type}, which a CSV OUTPUT cannot hold; "
                           f"write a .parquet OUTPUT")
    id_name = args.id or "row"
    kept = {"q": [], "ids": []}
    try:
        if args.method == "exact":
            parts = list(read_pass("reading"))
            if not parts or sum(len(p[0]) for p in parts) == 0:
                raise CLIError(f"{args.input}: the file has no rows")
            s = np.concatenate([p[0] for p in parts])
            y = np.concatenate([p[1] for p in parts])
            u = np.concatenate([p[2] for p in parts]) if args.utility else None
            ids = pa.chunked_array([p[3] for p in parts])
            if target is None:  # (refused here in the CLI's words: m4.balance would name s= and target=)
                default_target_of_shares(s.mean(axis=0, dtype=np.float64), f"--sensitive {args.sensitive}",
                                         "--target")
            with warnings.catch_warnings():  # a non-optimal status is reported below, once
                warnings.filterwarnings("ignore", message="pym4.m4.balance: ", category=RuntimeWarning)
                res = m4.balance(s, y, target=target, budget=args.budget, eps_rep=args.eps_rep,
                                 eps_assoc=args.eps_assoc, utility=u, group_names=groups, label_names=labels)
            kept["q"], kept["ids"] = [res.q], [ids]
            summary, report = res.summary(), res.report
        else:
            summary, report = _stream_balance(args, read_pass, target, kept, groups, labels)
    except ValueError as e:  # argument errors of m4.balance (target, budget, ...)
        raise CLIError(str(e)) from None

    summary.update({"input": src, "output": dst, "sensitive": groups, "labels": labels,
                    "budget": args.budget, "eps_rep": args.eps_rep, "eps_assoc": args.eps_assoc})
    infeasible = summary["status"] == "infeasible"
    table = None
    if not infeasible:
        q = np.concatenate([np.asarray(x, dtype=np.float64) for x in kept["q"]])
        ids = pa.chunked_array([c for part in kept["ids"]
                                for c in (part.chunks if hasattr(part, "chunks") else [part])])
        cols = {id_name: ids, "q": pa.array(q)}
        if args.sample:
            cols["keep"] = pa.array(m4.sample(q, seed=args.seed))
        table = pa.table(cols)
    _commit_outputs(outputs, table, out_fmt, summary, report)
    if infeasible:
        raise CLIError(f"{summary['message']} (report: {stem}.json)")
    print(json.dumps({k: summary[k] for k in ("status", "kept_fraction", "rb_before", "rb_after", "ab_before",
                                               "ab_after", "max_violation")}, default=float))
    if summary["status"] != "optimal":
        print(f"pym4: warning: {summary['message']}", file=sys.stderr)
    return 0


def _stream_balance(args, read_pass, target, kept, groups: List[str], labels: List[str]):
    """Pass 1: stream the batches into M4Solver; pass 2: keep probabilities per batch; the
    report from the two passes' weighted counts."""
    import numpy as np

    from . import m4

    def total(acc, counts):
        return counts if acc is None else acc + counts

    from .m4._balance import center_utility
    from .m4._inputs import default_target_of_shares

    pi = target
    centered, shift = None, 0.0
    if pi is None or args.utility:
        # The default target needs the group shares, and the utility is centred as balance()
        # centres it (a constant part only moves mu; u = 1e16 would swamp the budget): one
        # extra pass. The centred utility is held, 8 bytes a row, as the q and ids are.
        shares, us = None, []
        for s, _, u, _ in read_pass("counting groups" if args.utility is None else "reading the utility"):
            shares = total(shares, m4.weighted_counts(s))
            if u is not None:
                us.append(u)
        if shares is None or shares[0] == 0:
            raise CLIError(f"{args.input}: the file has no rows")
        if pi is None:
            pi = default_target_of_shares(m4.group_shares(shares, len(groups)), f"--sensitive {args.sensitive}",
                                          "--target")
        if args.utility:
            centered, shift, _ = center_utility(np.concatenate(us), args.budget)

    def utility_of(row0, n):
        return None if centered is None else centered[row0:row0 + n]

    solver = m4.M4Solver(pi, budget=args.budget, eps_rep=args.eps_rep, eps_assoc=args.eps_assoc)
    before, rows = None, 0
    for s, y, _, _ in read_pass("fitting"):
        u = utility_of(rows, len(s))
        order = np.random.default_rng(args.seed + rows).permutation(len(s))
        solver.partial_fit(s[order], y[order], None if u is None else u[order])
        before = total(before, m4.weighted_counts(s, y))
        rows += len(s)
    if rows == 0:
        raise CLIError(f"{args.input}: the file has no rows")
    after, row0 = None, 0
    for s, y, _, ids in read_pass("writing"):
        q = solver.keep_probability(s, y, utility_of(row0, len(s)))
        row0 += len(s)
        after = total(after, m4.weighted_counts(s, y, q))
        kept["q"].append(q)
        kept["ids"].append(ids)
    report = m4.report(before, after, target=solver.pi, budget=args.budget, eps_rep=args.eps_rep,
                       eps_assoc=args.eps_assoc, method="stream", iterations=solver.steps,
                       group_names=groups, label_names=labels)
    return {**report.summary(), "mu": solver.mu + shift}, report  # mu for the utility as given


def _write_report(stem: str, summary: dict, report) -> None:
    from .m4._files import write_report
    write_report(stem, summary, report)


def _column_spec(groups, labels, utility, **tags):
    """The columns' roles checked as the dataset path checks them (a column named twice, or
    in two roles, is refused); ValueError/TypeError with the argument's name."""
    from .m4._columns import ColumnSpec
    return ColumnSpec.make(sensitive=groups, labels=labels, utility=utility, **tags)


_FLAGS = {"sensitive_from": "--sensitive-from", "labels_from": "--labels-from", "sensitive": "--sensitive",
          "labels": "--labels", "utility": "--utility"}


def _flag_names(text: str) -> str:
    """A message of the Python API, with its argument names as the CLI's flags."""
    import re
    text = re.sub(r"^(sensitive_from|labels_from|sensitive|labels|utility)\b", lambda m: _FLAGS[m.group(1)], text)
    text = re.sub(r"(?<!['\w-])(sensitive_from|labels_from)=", lambda m: _FLAGS[m.group(1)] + " ", text)
    text = re.sub(r"\bpass target=", "pass --target", text)
    return re.sub(r"(already used as )(sensitive_from|labels_from|sensitive|labels|utility)\b",
                  lambda m: m.group(1) + _FLAGS[m.group(2)], text)


def _read_only(path: str) -> bool:
    # No write bit at all is the owner's "do not replace" (root may write anyway), and
    # os.access covers files this user may not write.
    try:
        st = os.stat(path)
    except FileNotFoundError:  # a dangling link: replacing it loses nothing
        return False
    return not (st.st_mode & 0o222) or not os.access(path, os.W_OK)


def _check_outputs(paths: List[str], overwrite: bool) -> None:
    """OUTPUT and its report files: none is a directory, none read-only (unless --overwrite)."""
    for i, path in enumerate(paths):
        what = "--out" if i == 0 else "--out: the report file"
        if not os.path.lexists(path):
            continue
        if os.path.isdir(path):
            raise CLIError(f"{what} {path!r} is a directory (a .parquet/.csv OUTPUT names a file; "
                           f"for a dataset OUTPUT folder, leave out the suffix)")
        if not overwrite and _read_only(path):
            raise CLIError(f"{what} {path!r} exists and is read-only; pass --overwrite to replace it")


def _file_sha256(path: str) -> str:
    import hashlib
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _commit_outputs(outputs: List[str], table, fmt: str, summary: dict, report) -> None:
    """Write the table (None: an infeasible run, which has none) and the report into a
    staging folder beside OUTPUT, then replace OUTPUT and the report together
    (pym4._io.Staging): the report's JSON, placed last, names the table's size and sha256,
    so whenever it exists it describes the table beside it. An infeasible run removes the
    old table with the old report. A failure changes nothing."""
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    from . import _io

    names = [os.path.basename(p) for p in outputs]
    stem = os.path.splitext(names[2])[0]
    try:
        with _io.Staging(os.path.dirname(outputs[0])) as stage:
            if table is None:
                summary.update({"output": None, "output_rows": 0, "output_bytes": 0, "output_sha256": None})
            else:
                tmp = stage.path(names[0])
                if fmt == "parquet":
                    pq.write_table(table, tmp)
                else:
                    pacsv.write_csv(table, tmp)
                summary.update({"output_rows": table.num_rows, "output_bytes": os.path.getsize(tmp),
                                "output_sha256": _file_sha256(tmp)})
            _write_report(stage.path(stem), summary, report)
            if table is None:
                stage.commit(names[1:], remove=names[:1])
            else:
                stage.commit(names)
    except OSError as e:
        raise CLIError(f"--out: cannot write {outputs[0]!r}: {e.strerror or e}") from None


# Subcommands in the order `pym4 --help` lists them.
_SUBCOMMANDS = [_add_info, _add_demo, _add_balance]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pym4", description="pym4: fair, large-scale SSL and contrastive pretraining")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for add in _SUBCOMMANDS:
        add(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        rc = int(args.run(args) or 0)
        sys.stdout.flush()  # a reader that has gone (`pym4 info | head`) shows here, not at exit
        return rc
    except CLIError as e:
        print(f"pym4: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # Python's recipe: point stdout at devnull, so the interpreter's last flush does not
        # fail again, and exit as a tool killed by SIGPIPE does (128 + 13).
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except (OSError, ValueError):  # stdout is not a file (captured): nothing to redirect
            pass
        return 141


if __name__ == "__main__":
    # `python -m pym4.cli` runs this file as __main__; the modules it imports (the dataset
    # runner) raise pym4.cli.CLIError, so run pym4.cli's main, whose except names that class.
    from pym4.cli import main as _main
    sys.exit(_main())
