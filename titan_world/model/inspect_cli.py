"""`titan-world inspect` (placeholder until issue #4 lands)."""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (parser.description or "") + " [not implemented yet: tracked in issue #4]"


def run(args: argparse.Namespace) -> int:
    print("titan-world inspect: not implemented yet (issue #4)", file=sys.stderr)
    return 2
