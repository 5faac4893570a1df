"""The ``pym4`` command line.

Each subcommand is a small function that adds its parser (``_add_<name>``) and a runner;
heavy imports (matplotlib, pyarrow, training code) happen inside the runners only.
"""
from __future__ import annotations

import argparse
import json
import sys
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


# Subcommands in the order `pym4 --help` lists them.
_SUBCOMMANDS = [_add_info]


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
        return int(args.run(args) or 0)
    except CLIError as e:
        print(f"pym4: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
