"""`export_model`: not implemented yet (its issue lands it)."""

import sys


def main() -> None:
    print("export_model: not implemented yet", file=sys.stderr)
    sys.exit(1)
