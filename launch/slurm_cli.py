"""`titan-world slurm` (placeholder until issue #10 lands)."""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (parser.description or "") + " [not implemented yet: tracked in issue #10]"


def run(args: argparse.Namespace) -> int:
    print("titan-world slurm: not implemented yet (issue #10)", file=sys.stderr)
    return 2
