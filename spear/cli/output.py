"""What client commands print: aligned tables, `key  value` documents, JSON, raw bytes."""

from __future__ import annotations

import json
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


def print_json(doc: Any) -> None:
    print(json.dumps(doc, indent=2), flush=True)


def print_doc(doc: Mapping[str, Any]) -> None:
    """One document as aligned `key  value` lines; `*_at` timestamps as local times."""
    width = max((len(key) for key in doc), default=0)
    for key, value in doc.items():
        text = when(value) if key.endswith("_at") else cell(value)
        print(f"{key:<{width}}  {text}")
    sys.stdout.flush()


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


def write_bytes(data: bytes) -> None:
    """Bytes to stdout exactly as given (a function's output, logs, an artifact)."""
    sys.stdout.buffer.write(data)
    sys.stdout.buffer.flush()
