"""Handlers that `python -m spear.worker worker_handlers:NAME` serves in the worker tests.

The worker process imports this file with tests/runtimes on its PYTHONPATH. Run as a script
(`python worker_handlers.py MODE`) it is a worker that breaks the protocol on purpose.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time

from spear.worker import Context

NOT_CALLABLE = 42


def upper(data: bytes, ctx: Context) -> bytes:
    ctx.logger.info("upper of %d bytes", len(data))
    print("a stray print goes to the logs")
    return data.upper()


def describe(data: bytes, ctx: Context) -> str:
    ctx.response_content_type = "application/json"
    doc = {
        "execution_id": ctx.execution_id,
        "content_type": ctx.content_type,
        "remaining_s": ctx.remaining_s(),
        "env": sorted(os.environ),
    }
    return json.dumps(doc)


def fail(data: bytes, ctx: Context) -> bytes:
    raise ValueError(f"boom: {data.decode()}")


def bad_result(data: bytes, ctx: Context) -> int:
    return 42


def crash(data: bytes, ctx: Context) -> bytes:
    print("about to crash", file=sys.stderr, flush=True)
    os._exit(7)


def sleep(data: bytes, ctx: Context) -> bytes:
    time.sleep(float(data))
    return b"slept"


def big(data: bytes, ctx: Context) -> bytes:
    return b"x" * int(data)


def hog(data: bytes, ctx: Context) -> bytes:
    return bytes(int(data))


def fork_child(data: bytes, ctx: Context) -> bytes:
    child = subprocess.Popen(["sleep", "60"])
    return str(child.pid).encode()


def call_home(data: bytes, ctx: Context) -> bytes:
    """Tell the test (listening on port `data`) it started, then wait for its go-ahead."""
    with socket.create_connection(("127.0.0.1", int(data))) as conn:
        conn.sendall(b"started")
        return b"done " + conn.recv(16)


async def async_call_home(data: bytes, ctx: Context) -> bytes:
    """`call_home` as a coroutine; other input is echoed upper-cased."""
    if not data.isdigit():
        return data.upper()
    reader, writer = await asyncio.open_connection("127.0.0.1", int(data))
    try:
        writer.write(b"started")
        await writer.drain()
        return b"done " + await reader.read(16)
    finally:
        writer.close()


def _frame(doc: dict[str, object]) -> bytes:
    import cbor2

    payload = cbor2.dumps(doc)
    return len(payload).to_bytes(4, "big") + payload


def _misbehave(mode: str) -> None:
    out = sys.stdout.buffer
    out.write(_frame({"type": "hello", "protocol": 1, "max_concurrency": 1}))
    out.flush()
    sys.stdin.buffer.read(4)  # the start of the first request
    if mode == "unknown-id":
        out.write(_frame({"type": "response", "id": 999, "ok": True, "data": b""}))
    elif mode == "garbage":
        out.write(b"\x00\x00\x00\x02\xff\xff")
    out.flush()
    time.sleep(60)


if __name__ == "__main__":
    _misbehave(sys.argv[1])
