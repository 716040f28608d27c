"""The command line: `python -m pipelines.run <pipeline> [options]`.

A user's mistake (a bad data file, a typo in a spec or a config value) ends with one line on stderr
and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Sequence

from msa.config import ConfigError
from msa.data import DataError

EXIT_USER_ERROR = 2


class UserError(Exception):
    """Anything a user can fix from the message alone."""


USER_ERRORS = (UserError, DataError, ConfigError)


def _prepare(args: argparse.Namespace) -> int:
    from pipelines.stages.prepare import prepare

    data = prepare(args.data, quick=args.quick)
    print(data.summary())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pipelines.run",
        description="Ablation-tracking pipelines for multimodal sentiment analysis (CMU-MOSI).")
    sub = parser.add_subparsers(dest="pipeline", required=True, metavar="PIPELINE")

    p = sub.add_parser("prepare", help="load, validate and clean a data file and print a summary",
                       description="Load, validate and clean a MOSI pickle (MultiBench mosi_raw.pkl, MulT "
                                   "mosi_data.pkl, MMSA aligned_50.pkl/unaligned_50.pkl) or the synthetic "
                                   "default, and print split sizes, dims, label range and cleaning counts.")
    p.add_argument("--data", default="synthetic", metavar="PATH|synthetic",
                   help="a MOSI pickle, or 'synthetic' for the embedded synthetic MOSI-like data (default)")
    p.add_argument("--quick", action="store_true", help="small synthetic data (real dims) for smoke runs")
    p.set_defaults(func=_prepare)

    for register in _EXTRA_PIPELINES:
        register(sub)
    return parser


# Later pipelines (ablations, compare, tune) register their sub-commands here.
_EXTRA_PIPELINES: list[Callable[[argparse._SubParsersAction], None]] = []


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
