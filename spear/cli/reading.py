"""Local input of client commands: --data, files, stdin, JSON task definitions, KEY=VALUE."""

from __future__ import annotations

import io
import json
import sys
from collections.abc import Sequence
from typing import IO, Any

from spear.errors import SpearError


class UsageError(SpearError):
    """The command line or its local input (a file, a flag's syntax) is not usable (exit 2)."""

    code = "usage"


def open_input(path: str) -> IO[bytes]:
    """A binary file to read, or stdin for "-"; the caller closes it."""
    if path == "-":
        # Read to the end first: a pipe has no length to send as Content-Length.
        return io.BytesIO(sys.stdin.buffer.read())
    try:
        return open(path, "rb")
    except OSError as exc:
        raise UsageError(f"cannot read {path!r}: {(exc.strerror or str(exc)).lower()}") from exc


def read_data(data: str | None) -> bytes:
    """--data: TEXT as UTF-8, @FILE's bytes, or stdin for - and @-; None is empty input."""
    if data is None:
        return b""
    if data in ("-", "@-"):
        return sys.stdin.buffer.read()
    if data.startswith("@"):
        with open_input(data[1:]) as fh:
            return fh.read()
    return data.encode()


def read_json_object(path: str) -> dict[str, Any]:
    """A JSON object from a file or stdin ("-"), e.g. a task definition."""
    with open_input(path) as fh:
        raw = fh.read()
    try:
        doc = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"{path!r} is not valid JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise UsageError(f"{path!r} must hold a JSON object (a task definition)")
    return doc


def parse_env(pairs: Sequence[str]) -> dict[str, str]:
    """--env KEY=VALUE pairs as a dict (a later KEY wins)."""
    env: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UsageError(f"--env must be KEY=VALUE, got {pair!r}")
        env[key] = value
    return env
