"""``pym4 balance`` on a dataset (a directory of Parquet shards, a glob, or OUT a folder):
every argument checked before any data is read, then :func:`pym4.m4.balance_dataset`.
Errors come back as the CLI's ``pym4: error: ...`` (exit 2) before any output exists."""
from __future__ import annotations

import json
import os
import sys

# The extra that installs a module a run may find missing (its ImportError's top-level name).
_EXTRA_OF_MODULE = {"ray": "ray", "pyspark": "spark", "pyarrow": "data", "polars": "data", "matplotlib": "plot"}


def _cols(text: str):
    return [c.strip() for c in text.split(",") if c.strip()]


def run_balance_dataset(args) -> int:
    from . import _io
    from .cli import CLIError, _column_spec, _DEFAULT_BATCH_ROWS, _flag_names, _is_uri, _parse_target
    from .m4 import _feasibility
    from .m4._columns import DataError
    from .m4._dataset import balance_dataset, out_inside_source

    out = os.path.abspath(args.out)
    if args.out.lower().endswith((".parquet", ".pq", ".csv")):
        what = "a URI INPUT is read as a dataset" if _is_uri(args.input) else "for a dataset INPUT"
        raise CLIError(f"--out: {args.out!r} names a file; {what}, OUTPUT is a folder")
    if os.path.lexists(out):
        raise CLIError(f"--out: {args.out!r} already exists (OUTPUT must be a new folder)")
    if not os.path.isdir(os.path.dirname(out)):
        raise CLIError(f"--out: folder {os.path.dirname(out)!r} does not exist")
    if out_inside_source(args.input, out):
        raise CLIError("--out: must not lie inside INPUT (the input is never modified)")
    if args.input.lower().endswith(".csv"):
        raise CLIError(f"INPUT: {args.input!r}: a dataset is read as Parquet; a CSV file takes a .parquet/.csv --out")
    if args.method != "exact":
        raise CLIError("--method stream: a dataset is balanced by the exact solver's passes (use --method exact)")
    if args.batch_rows is not None and args.engine == "spark":
        raise CLIError("--batch-rows: not for --engine spark (Spark sizes its Arrow batches itself: "
                       "spark.sql.execution.arrow.maxRecordsPerBatch)")
    kw = dict(sensitive=_cols(args.sensitive), labels=_cols(args.labels), sensitive_from=args.sensitive_from,
              labels_from=args.labels_from, utility=args.utility, id=args.id)
    try:
        _column_spec(kw["sensitive"], kw["labels"], kw["utility"], sensitive_from=kw["sensitive_from"],
                     labels_from=kw["labels_from"], id=kw["id"])
    except (TypeError, ValueError) as e:
        raise CLIError(_flag_names(str(e))) from None
    # The number of groups is known here unless a tag column gives them (found by a pass).
    target = _parse_target(args.target, None if args.sensitive_from else len(kw["sensitive"]))
    folder = os.path.dirname(out)
    _io.clean_stale(folder)  # a crashed run's checkpoint temporaries and unfinished output folder
    try:
        _io.check_writable_folder(folder)
    except OSError as e:
        raise CLIError(f"--out: cannot write in folder {folder!r}: {e.strerror or e}") from None
    options = ({"batch_rows": args.batch_rows or _DEFAULT_BATCH_ROWS} if args.engine in (None, "local", "ray")
               else {})
    try:
        model = balance_dataset(args.input, out, sample=args.sample, seed=args.seed, **kw, target=target,
                                budget=args.budget, eps_rep=args.eps_rep, eps_assoc=args.eps_assoc,
                                engine=args.engine, progress=not args.no_progress, engine_options=options)
    except _feasibility.InfeasibleError as e:
        raise CLIError(str(e)) from None
    except ImportError as e:  # a dependency whose extra is not installed: name the extra that has it
        extra = _EXTRA_OF_MODULE.get((e.name or "").split(".")[0])
        where = f"--engine {args.engine}: " if extra in ("ray", "spark") else ""
        hint = f" (pip install 'pym4[{extra}]')" if extra else ""
        raise CLIError(f"{where}{e}{hint}") from None
    except (DataError, ValueError, TypeError, OSError) as e:
        raise CLIError(_flag_names(str(e))) from None
    with open(os.path.join(out, "_pym4_report.json")) as f:
        summary = json.load(f)
    print(json.dumps({k: summary.get(k) for k in ("status", "kept_fraction", "rb_before", "rb_after", "ab_before",
                                                   "ab_after", "max_violation", "passes", "compressed")}))
    if model.info.get("status") != "optimal":
        print(f"pym4: warning: {model.info.get('message')}", file=sys.stderr)
    return 0
