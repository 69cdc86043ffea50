"""`python -m ember.serve MODEL [--port 8000 ...]`: the same as `ember serve`."""
from __future__ import annotations

import argparse
import sys

from .cli import add_parser


def run(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ember.serve")
    sub = parser.add_subparsers(dest="command")
    add_parser(sub).prog = "python -m ember.serve"
    args = parser.parse_args(["serve", *(sys.argv[1:] if argv is None else argv)])
    from ..errors import EmberError

    try:
        return args.func(args)
    except EmberError as e:
        print(f"ember serve: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(run())
