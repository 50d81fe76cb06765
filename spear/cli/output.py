"""What client commands print: aligned tables, `key  value` documents, JSON, raw bytes."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import sys
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141


def fail(message: str, exit_code: int) -> int:
    """Report an error as one line on stderr; return `exit_code`."""
    print(f"spear: {message}", file=sys.stderr, flush=True)
    return exit_code


def program() -> str:
    """`spear` as the user ran it, for commands printed to copy: `.venv/bin/spear` when run by
    a path that is not the `spear` on PATH, else `spear` (also for `python -m spear`)."""
    argv0 = sys.argv[0]
    if os.path.basename(argv0) != "spear" or os.sep not in argv0:
        return "spear"
    on_path = shutil.which("spear")
    if on_path is not None and os.path.realpath(on_path) == os.path.realpath(argv0):
        return "spear"
    return shlex.quote(argv0)


def print_json(doc: Any) -> None:
    print(json.dumps(doc, indent=2), flush=True)


def print_doc(doc: Mapping[str, Any]) -> None:
    """One document as aligned `key  value` lines; `*_at` timestamps as local times, also
    inside nested values; a list of objects (an execution's history) one object a line."""
    width = max((len(key) for key in doc), default=0)
    for key, value in doc.items():
        value = readable_times(value, key)
        if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            lines = [cell(item) for item in value]
        else:
            lines = [cell(value)]
        print(f"{key:<{width}}  {lines[0]}")
        for line in lines[1:]:
            print(f"{'':<{width}}  {line}")
    sys.stdout.flush()


def readable_times(value: Any, key: str = "") -> Any:
    """`value` with every `*_at` Unix timestamp in it (at any depth) as a local time."""
    if key.endswith("_at") and isinstance(value, int | float) and not isinstance(value, bool):
        return when(value)
    if isinstance(value, dict):
        return {k: readable_times(v, k) for k, v in value.items()}
    if isinstance(value, list):
        return [readable_times(v) for v in value]
    return value


def print_table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    print(table(columns, rows), flush=True)


def table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Columns left-aligned to their widest cell, two spaces apart; empty cells show as '-'."""
    cells = [list(columns), *([cell(value) for value in row] for row in rows)]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    return "\n".join(
        "  ".join(text.ljust(width) for text, width in zip(line, widths, strict=True)).rstrip()
        for line in cells
    )


def cell(value: Any) -> str:
    if value is None or value == "":
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, dict | list):
        return json.dumps(value, separators=(",", ":")) if value else "-"
    return str(value)


def when(timestamp: Any) -> str:
    """A Unix timestamp as local time to the second."""
    if not isinstance(timestamp, int | float) or isinstance(timestamp, bool):
        return cell(timestamp)
    return datetime.fromtimestamp(timestamp).isoformat(sep=" ", timespec="seconds")


def runtime_names(runtimes: Any) -> str:
    """The runtimes a node offers as `wasm,process`: from a list of names, or from a
    description per name (`{"wasm": {"available": true, ...}}`, a lone node's gateway)."""
    if isinstance(runtimes, list):
        return ",".join(str(name) for name in runtimes) or "-"
    if isinstance(runtimes, Mapping):
        names = [
            str(name)
            for name, info in runtimes.items()
            if not isinstance(info, Mapping) or info.get("available", True)
        ]
        return ",".join(names) or "-"
    return cell(runtimes)


def write_bytes(data: bytes) -> None:
    """Bytes to stdout exactly as given (a function's output, logs, an artifact)."""
    sys.stdout.buffer.write(data)
    sys.stdout.buffer.flush()
