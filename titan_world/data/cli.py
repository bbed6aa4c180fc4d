"""`titan-world data` (placeholder until issue #6 lands)."""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (parser.description or "") + " [not implemented yet: tracked in issue #6]"


def run(args: argparse.Namespace) -> int:
    print("titan-world data: not implemented yet (issue #6)", file=sys.stderr)
    return 2
