"""`titan-world serve` (placeholder until issue #9 lands)."""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (parser.description or "") + " [not implemented yet: tracked in issue #9]"


def run(args: argparse.Namespace) -> int:
    print("titan-world serve: not implemented yet (issue #9)", file=sys.stderr)
    return 2
