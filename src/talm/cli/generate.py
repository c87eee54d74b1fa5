"""`generate`: not implemented yet (its issue lands it)."""

import sys


def main() -> None:
    print("generate: not implemented yet", file=sys.stderr)
    sys.exit(1)
