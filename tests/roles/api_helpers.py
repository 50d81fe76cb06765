"""Helpers for API tests: WASM test modules and short-hands for upload and register."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import trio
import wasmtime

DEMO_WAT = Path(__file__).resolve().parents[2] / "spear" / "demo" / "upper.wat"

# A WASI command per failure mode the gateway must report (DESIGN.md section 5).
_WASI = """
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "proc_exit" (func $proc_exit (param i32)))
  (memory (export "memory") 1)
"""
WAT = {
    "exit3": f'(module {_WASI} (func (export "_start") (call $proc_exit (i32.const 3))))',
    "trap": f'(module {_WASI} (func (export "_start") unreachable))',
    "spin": f'(module {_WASI} (func (export "_start") (loop $l (br $l))))',
    "grow": f"""(module {_WASI}
      (func (export "_start")
        (loop $l
          (if (i32.eq (memory.grow (i32.const 1)) (i32.const -1)) (then unreachable))
          (br $l))))""",
    # writes 64 KiB of 'x' to stdout forever
    "flood": f"""(module {_WASI}
      (func (export "_start")
        (i32.store (i32.const 0) (i32.const 16))
        (i32.store (i32.const 4) (i32.const 65520))
        (loop $l
          (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))
          (br $l))))""",
    "noentry": '(module (memory (export "memory") 1) (func (export "main")))',
}


def wasm(name: str) -> bytes:
    """A WASM module: the demo upper-caser ("upper") or one of the WAT cases above."""
    source = DEMO_WAT.read_text() if name == "upper" else WAT[name]
    return bytes(wasmtime.wat2wasm(source))


async def upload(api: httpx.AsyncClient, data: bytes) -> str:
    resp = await api.post("/api/v1/files", content=data)
    assert resp.status_code == 201, resp.text
    file_id: str = resp.json()["file_id"]
    return file_id


async def register(api: httpx.AsyncClient, **spec: Any) -> dict[str, Any]:
    resp = await api.post("/api/v1/tasks", json=spec)
    assert resp.status_code == 201, resp.text
    doc: dict[str, Any] = resp.json()
    return doc


async def register_wasm(
    api: httpx.AsyncClient, name: str, module: str, **spec: Any
) -> dict[str, Any]:
    file_id = await upload(api, wasm(module))
    return await register(api, name=name, runtime="wasm", artifact=file_id, **spec)


class RetryUnavailable(httpx.AsyncBaseTransport):
    """Retries a request answered 503 (no leader yet, or a failover under way), as a client
    of a cluster must; the backoff is the client's, not a wait for a test condition."""

    def __init__(self, attempts: int = 40, backoff_s: float = 0.1) -> None:
        self._inner = httpx.AsyncHTTPTransport()
        self._attempts = attempts
        self._backoff_s = backoff_s

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        for _ in range(self._attempts - 1):
            response = await self._inner.handle_async_request(request)
            if response.status_code != 503:
                return response
            await response.aclose()
            await trio.sleep(self._backoff_s)
        return await self._inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self._inner.aclose()


def cluster_client(url: str) -> httpx.AsyncClient:
    """An API client for any node of a cluster, retrying while no leader serves."""
    return httpx.AsyncClient(base_url=url, timeout=30, transport=RetryUnavailable())
