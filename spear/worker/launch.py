"""`python -m spear.worker MODULE:FUNCTION [--concurrency N]`: load a handler and serve it.

Exit status: 0 once the host closed the pipe, 2 for a bad command line or a handler that
cannot be loaded (one line on stderr says why), 3 if the host broke the protocol.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

from spear.errors import WireError
from spear.worker.channel import Channel
from spear.worker.serve import Handler, serve

USAGE = "usage: python -m spear.worker MODULE:FUNCTION [--concurrency N]"


class LaunchError(Exception):
    """The command line or the handler it names is unusable; the message says why."""


def parse_args(argv: Sequence[str]) -> tuple[str, int | None]:
    """`(target, concurrency)` from the arguments after `-m spear.worker`.

    Raises:
        LaunchError: the arguments do not follow the usage line.
    """
    args = list(argv)
    concurrency: int | None = None
    if len(args) == 3 and args[1] == "--concurrency":
        value = args.pop()
        args.pop()
        if not value.isdigit() or int(value) < 1:
            raise LaunchError(f"--concurrency must be an integer >= 1, got {value!r}")
        concurrency = int(value)
    if len(args) != 1 or args[0].startswith("-"):
        raise LaunchError(USAGE)
    return args[0], concurrency


def load_handler(target: str) -> Handler:
    """Import `MODULE:FUNCTION` (FUNCTION may be dotted, e.g. `app:Service.handle`).

    Raises:
        LaunchError: one sentence naming the part that is wrong.
    """
    module_name, sep, attr_path = target.partition(":")
    if not sep or not module_name or not attr_path:
        raise LaunchError(f"expected MODULE:FUNCTION (e.g. mypkg.handlers:handle), got {target!r}")
    try:
        obj: object = importlib.import_module(module_name)
    except ImportError as exc:
        raise LaunchError(f"cannot import module {module_name!r}: {exc}") from exc
    except Exception as exc:
        raise LaunchError(
            f"importing module {module_name!r} failed: {type(exc).__name__}: {exc}"
        ) from exc
    for part in attr_path.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError as exc:
            raise LaunchError(f"{module_name!r} has no attribute {attr_path!r}") from exc
    if not callable(obj):
        kind = type(obj).__name__
        raise LaunchError(f"{target!r} is a {kind}, not a function: def handle(data, ctx)")
    return obj


def main(argv: Sequence[str] | None = None) -> int:
    """Run the worker; return its exit status (see the module docstring)."""
    try:
        target, concurrency = parse_args(sys.argv[1:] if argv is None else argv)
        handler = load_handler(target)
    except LaunchError as exc:
        print(f"spear.worker: {exc}", file=sys.stderr)
        return 2
    try:
        serve(handler, Channel.open(), concurrency=concurrency)
    except WireError as exc:
        print(f"spear.worker: the host broke the worker protocol: {exc}", file=sys.stderr)
        return 3
    except BrokenPipeError:
        return 0  # the host went away while we answered: nothing left to serve
    except KeyboardInterrupt:
        return 130
    return 0
