"""Floor servers for the gateway benchmark: what spear is measured against in the same run.

    python bench/floors.py echo PORT         hypercorn-trio endpoint that upper-cases its body
    python bench/floors.py wasm PORT FILE    the same endpoint running a bare wasmtime
                                             instantiate + WASI _start of FILE per request

Both print "ready" on stdout once they listen.
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any

import trio
import wasmtime
from hypercorn.config import Config
from hypercorn.trio import serve

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


class BareWasm:
    """A bare wasmtime per-call run: new Store + WasiConfig + instantiate + _start."""

    def __init__(self, module_bytes: bytes) -> None:
        self.engine = wasmtime.Engine()
        module = wasmtime.Module(self.engine, module_bytes)
        linker = wasmtime.Linker(self.engine)
        linker.define_wasi()
        self.pre = linker.instantiate_pre(module)
        self.stdin_dir = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None

    def run(self, data: bytes) -> bytes:
        out: list[bytes] = []
        fd, path = tempfile.mkstemp(dir=self.stdin_dir)
        try:
            os.write(fd, data)
            os.close(fd)
            wasi = wasmtime.WasiConfig()
            wasi.stdin_file = path
            wasi.stdout_custom = out.append
        finally:
            os.unlink(path)
        store = wasmtime.Store(self.engine)
        store.set_wasi(wasi)
        instance = self.pre.instantiate(store)
        start = instance.exports(store)["_start"]
        assert isinstance(start, wasmtime.Func)
        start(store)
        return b"".join(out)


def make_app(
    handler: Callable[[bytes], bytes],
) -> Callable[[Scope, Receive, Send], Awaitable[None]]:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                kind = message["type"].rsplit(".", 1)[-1]  # startup | shutdown
                await send({"type": f"lifespan.{kind}.complete"})
                if kind == "shutdown":
                    return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        out = handler(body)
        headers = [
            (b"content-type", b"application/octet-stream"),
            (b"content-length", str(len(out)).encode()),
        ]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": out})

    return app


def make_handler(kind: str, module_path: str | None) -> Callable[[bytes], bytes]:
    if kind == "echo":
        return bytes.upper
    assert module_path is not None
    return BareWasm(Path(module_path).read_bytes()).run


async def main(handler: Callable[[bytes], bytes], port: int) -> None:
    config = Config()
    config.bind = [f"127.0.0.1:{port}"]
    config.accesslog = None
    config.keep_alive_max_requests = 1_000_000
    async with trio.open_nursery() as nursery:
        await nursery.start(partial(serve, make_app(handler), config))  # type: ignore[arg-type]
        print("ready", flush=True)


if __name__ == "__main__":
    kind, port = sys.argv[1], int(sys.argv[2])
    trio.run(main, make_handler(kind, sys.argv[3] if len(sys.argv) > 3 else None), port)
