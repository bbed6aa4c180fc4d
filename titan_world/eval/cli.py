"""`titan-world eval` (placeholder until issue #11 lands)."""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (parser.description or "") + " [not implemented yet: tracked in issue #11]"


def run(args: argparse.Namespace) -> int:
    print("titan-world eval: not implemented yet (issue #11)", file=sys.stderr)
    return 2
