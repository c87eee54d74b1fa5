"""`plot_metrics`: draw the training curves of one or several runs on one chart.

Each RUN is a model directory (models/NAME) or a metrics.jsonl. Left: train and val loss; right: val bits per
byte, which compares runs even when their tokenizers differ. One run is drawn to RUN/loss.png (the picture
training keeps up to date), several to compare.png, unless -o says otherwise.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from talm.cli.common import ArgumentParser, HelpFormatter, run_main
from talm.train.metrics import FILE


def build_parser() -> argparse.ArgumentParser:
    from talm.train.plots import X_AXES

    parser = ArgumentParser(
        prog="plot_metrics",
        description=__doc__,
        formatter_class=HelpFormatter,
        epilog="Example: plot_metrics models/small models/wide -o compare.png",
    )
    parser.add_argument(
        "runs", nargs="+", metavar="RUN", help="model directories (models/NAME) or metrics.jsonl"
    )
    parser.add_argument("-o", "--output", metavar="FILE.png", help="the picture to write")
    parser.add_argument(
        "--x", default="tokens", choices=list(X_AXES), help="the horizontal axis (default: tokens)"
    )
    parser.add_argument("--title", help="the chart's title (default: the runs' names)")
    return parser


def labels_for(runs: list[Path]) -> list[str]:
    """Each run's name (its directory's), or its full path where two names would be the same."""
    names = [(p.parent if p.name == FILE else p).name or str(p) for p in runs]
    return [str(p) if names.count(n) > 1 else n for p, n in zip(runs, names, strict=True)]


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    run_main(lambda: run(args))


def run(args: argparse.Namespace) -> None:
    from talm.train.plots import metrics_path, plot_model, plot_runs

    runs = [Path(r) for r in args.runs]
    if len(runs) == 1 and runs[0].is_dir() and args.title is None:
        out = plot_model(runs[0], args.output, x=args.x)
    else:
        default = metrics_path(runs[0]).parent / "loss.png" if len(runs) == 1 else Path("compare.png")
        out = plot_runs(
            list(zip(labels_for(runs), runs, strict=True)), args.output or default, x=args.x, title=args.title
        )
    print(f"wrote {out}", file=sys.stderr)
