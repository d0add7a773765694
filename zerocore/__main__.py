"""Command line: `python -m zerocore report` (environment and op table), `python -m zerocore build [OP ...]`
(compile op libraries into the cache now)."""
from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m zerocore")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("report", help="versions, compilers, SIMD level, I/O backend and every op's status")
    build = commands.add_parser("build", help="compile op libraries into the cache now")
    build.add_argument("ops", nargs="*", help="op names (default: every op compatible with this machine)")
    build.add_argument("--verbose", action="store_true", help="show the compiler's output")
    args = parser.parse_args(argv)

    if args.command == "report":
        from .report import main as report_main
        return report_main()

    from . import ops
    names = args.ops or [n for n in ops.available() if ops.compatibility(n)[0]]
    failed = 0
    for name in names:
        try:
            print(f"{name}: built in {ops.build(name, verbose=args.verbose)}", flush=True)
        except ops.OpBuildError as e:
            print(f"{name}: FAILED: {e}", file=sys.stderr, flush=True)
            failed += 1
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
