"""The quick-start of `spear demo`: upload a WASM function, register it, invoke it, show how.

This package is part of the CLI layer: only `spear.cli` imports it. It talks to the node it
demonstrates through the public HTTP API (spear.client), as any user would; the CLI runs it in a
worker thread next to the node's trio loop.
"""

from __future__ import annotations

import shlex
from importlib import resources
from typing import TextIO

from spear.client import Doc, SpearClient
from spear.errors import ConflictError, SpearError
from spear.runtimes import wat_to_wasm

TASK_NAME = "upper"
DEMO_INPUT = b"hello from spear"
DESCRIPTION = "spear demo: upper-cases its input"


class DemoError(SpearError):
    """The demo function did not produce the expected result."""

    code = "demo_failed"


def upper_wasm() -> bytes:
    """The demo function, `upper.wat` compiled to a WASM binary (a WASI command module)."""
    wat = resources.files(__name__).joinpath("upper.wat").read_text(encoding="utf-8")
    return wat_to_wasm(wat)


def run_demo(base_url: str, out: TextIO, *, program: str = "spear") -> None:
    """Upload, register (or reuse) and invoke the demo function on `base_url`, reporting to `out`.

    `program` is how the commands it suggests call spear (`.venv/bin/spear` after the quick
    start, where `spear` is not on PATH).

    Raises:
        SpearError: a request failed, or the function did not succeed (DemoError).
    """
    with SpearClient(base_url) as client:
        file = client.upload_file(upper_wasm(), name="upper.wasm")
        _say(out, "uploaded upper.wasm", f"file {file['file_id']} ({file['size']} bytes)")
        task, how = _ensure_task(client, str(file["file_id"]))
        _say(out, f"{how} task {TASK_NAME}", f"{task['task_id']} (wasm, per-call)")
        result = client.invoke(TASK_NAME, DEMO_INPUT)
    if not result.succeeded:
        error = (result.record or {}).get("error") or {}
        raise DemoError(
            f"the demo function {result.status} ({error.get('code', 'no error code')}: "
            f"{error.get('message', 'no message')}; execution {result.execution_id})"
        )
    cold = "cold start" if result.cold else "warm"
    duration = "-" if result.duration_ms is None else f"{result.duration_ms:.1f} ms"
    _say(out, f"invoked {TASK_NAME}", repr(DEMO_INPUT.decode()))
    _say(out, "  output", repr(result.output.decode(errors="replace")))
    where = f"on {result.node_id or '-'} ({cold}, {duration})"
    _say(out, "  execution", f"{result.execution_id} {result.status} {where}")
    print_next_steps(base_url, out, program=program)


def _say(out: TextIO, label: str, text: str) -> None:
    print(f"{label:<26}{text}", file=out, flush=True)


def print_next_steps(base_url: str, out: TextIO, *, program: str = "spear") -> None:
    """The gateway, the API docs and commands to try against the running demo."""
    data = shlex.quote("hi there")
    print(
        f"""
gateway   {base_url}
API docs  {base_url}/docs

try:
  curl --data {data} {base_url}/api/v1/tasks/{TASK_NAME}/invoke
  {program} invoke {TASK_NAME} --data {data} --server {base_url}
  {program} executions list --server {base_url}

serving until Ctrl-C""",
        file=out,
        flush=True,
    )


def _ensure_task(client: SpearClient, file_id: str) -> tuple[Doc, str]:
    """The demo task, registered now or reused from an earlier run with the same data dir."""
    spec = {
        "name": TASK_NAME,
        "runtime": "wasm",
        "mode": "per-call",
        "artifact": file_id,
        "description": DESCRIPTION,
    }
    try:
        return client.register_task(spec), "registered"
    except ConflictError:
        existing = client.get_task(TASK_NAME)
    if existing.get("artifact") == file_id and existing.get("runtime") == "wasm":
        return existing, "reused"
    if existing.get("description") != DESCRIPTION:
        raise ConflictError(
            f"task {TASK_NAME!r} already exists and is not the demo's; delete it (`spear tasks "
            f"delete {TASK_NAME}`) or give the demo another --data-dir"
        )
    # The demo's own task from an older version of upper.wat: replace it.
    client.delete_task(TASK_NAME)
    return client.register_task(spec), "replaced"
