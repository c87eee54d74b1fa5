"""`download_data`: not implemented yet (its issue lands it)."""

import sys


def main() -> None:
    print("download_data: not implemented yet", file=sys.stderr)
    sys.exit(1)
