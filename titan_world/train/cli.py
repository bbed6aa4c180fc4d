"""`titan-world train` (placeholder until issue #7 lands)."""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (parser.description or "") + " [not implemented yet: tracked in issue #7]"


def run(args: argparse.Namespace) -> int:
    print("titan-world train: not implemented yet (issue #7)", file=sys.stderr)
    return 2
