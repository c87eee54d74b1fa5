"""`train_model`: not implemented yet (its issue lands it)."""

import sys


def main() -> None:
    print("train_model: not implemented yet", file=sys.stderr)
    sys.exit(1)
