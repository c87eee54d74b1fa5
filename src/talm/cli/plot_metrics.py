"""`plot_metrics`: not implemented yet (its issue lands it)."""

import sys


def main() -> None:
    print("plot_metrics: not implemented yet", file=sys.stderr)
    sys.exit(1)
