"""spear's command line: `spear node`, `spear demo` and the HTTP API client commands.

Exit codes: 0 success; 1 a request or the invoked function failed; 2 bad usage, a bad flag or
config value, or unreadable local input; 130 interrupted; 141 stdout closed early (a pipe).
Every error is one line on stderr, `spear: <message>`, never a traceback (`spear --traceback`
shows one for an unexpected error, which is a bug).

This package is the top layer: the only one that imports `spear.node` and `spear.demo`, and
the only place that configures logging.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from collections.abc import Sequence

from spear.cli.output import EXIT_BROKEN_PIPE, EXIT_FAILED, EXIT_INTERRUPTED, EXIT_USAGE, fail
from spear.cli.parser import Handler, build_parser
from spear.cli.reading import UsageError
from spear.errors import ConfigError, SpearError

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Run one spear command; return its exit code."""
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
        if extra:
            parser.error(f"unrecognized arguments: {' '.join(extra)}{_hint(args)}")
        if args.json_first:
            if not hasattr(args, "json"):
                parser.error("--json applies to the client commands only")
            args.json = True
    except SystemExit as exc:  # --help, or a usage error already reported in one line
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    handler: Handler = args.handler
    try:
        return handler(args)
    except (ConfigError, UsageError) as exc:
        return fail(str(exc), EXIT_USAGE)
    except SpearError as exc:
        return fail(str(exc), EXIT_FAILED)
    except BrokenPipeError:
        # The reader went away (`spear tasks list | head -1`): point stdout at /dev/null so
        # the interpreter's final flush does not complain, and exit like SIGPIPE would.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except KeyboardInterrupt:
        return fail("interrupted", EXIT_INTERRUPTED)
    except Exception as exc:
        if args.traceback:
            traceback.print_exc()
        return fail(
            f"unexpected {type(exc).__name__}: {exc} (a bug; `spear --traceback ...` shows where)",
            EXIT_FAILED,
        )


def _hint(args: argparse.Namespace) -> str:
    if getattr(args, "argv", None) is not None:  # tasks register: a dash argument of --command
        return "; arguments of the command that start with - go after `--`"
    return ""
