"""`titan-world post-train` (placeholder until issue #8 lands)."""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (parser.description or "") + " [not implemented yet: tracked in issue #8]"


def run(args: argparse.Namespace) -> int:
    print("titan-world post-train: not implemented yet (issue #8)", file=sys.stderr)
    return 2
