"""`plot_metrics`: draw the training curves of one or several runs on one chart.

Each RUN is a model directory (models/NAME) or a metrics.jsonl. Left: train and val loss; right: val bits per
byte, which compares runs even when their tokenizers differ (fine-tuning runs on conversation data have none:
their val loss instead). One run is drawn to RUN/loss.png (the picture
training keeps up to date), several to compare.png, unless -o says otherwise.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from talm.cli.common import ArgumentParser, HelpFormatter, run_main


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


def main(argv: Sequence[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    run_main(parser, lambda: run(args))


def run(args: argparse.Namespace) -> None:
    from talm.train.plots import plot_metrics

    out = plot_metrics(args.runs, args.output, x=args.x, title=args.title)
    print(f"wrote {out}", file=sys.stderr)
