"""Hand-written WASI guests in WAT, one behaviour each, compiled with `wasmtime.wat2wasm`."""

from __future__ import annotations

import functools

import wasmtime

_FD_WRITE = (
    '(import "wasi_snapshot_preview1" "fd_write"'
    " (func $fd_write (param i32 i32 i32 i32) (result i32)))"
)


@functools.cache
def wasm(wat: str) -> bytes:
    return bytes(wasmtime.wat2wasm(wat))


TRAP = '(module (memory (export "memory") 1) (func (export "_start") unreachable))'

LOOP = '(module (memory (export "memory") 1) (func (export "_start") (loop $l (br $l))))'

NO_START = '(module (memory (export "memory") 1) (func (export "run")))'

UNKNOWN_IMPORT = """
(module
  (import "env" "host_log" (func $log (param i32)))
  (memory (export "memory") 1)
  (func (export "_start") (call $log (i32.const 1))))
"""

EXIT_3 = """
(module
  (import "wasi_snapshot_preview1" "proc_exit" (func $proc_exit (param i32)))
  (memory (export "memory") 1)
  (func (export "_start") (call $proc_exit (i32.const 3))))
"""

#: grows memory one page at a time until memory.grow fails, then traps
GROW = """
(module
  (memory (export "memory") 1)
  (func (export "_start")
    (loop $more
      (br_if $more (i32.ne (memory.grow (i32.const 1)) (i32.const -1))))
    unreachable))
"""

#: asks for 16 pages up front
BIG_MEMORY = '(module (memory (export "memory") 16) (func (export "_start")))'


def spew(fd: int) -> str:
    """Writes 32-byte lines to `fd` forever, ignoring errors."""
    return f"""
(module
  {_FD_WRITE}
  (memory (export "memory") 1)
  (data (i32.const 16) "yyyyyyyyyyyyyyyyyyyyyyyyyyyyyyy\\n")
  (func (export "_start")
    (i32.store (i32.const 0) (i32.const 16))
    (i32.store (i32.const 4) (i32.const 32))
    (loop $again
      (drop (call $fd_write (i32.const {fd}) (i32.const 0) (i32.const 1) (i32.const 8)))
      (br $again))))
"""


def log_lines(count: int) -> str:
    """Writes `count` lines "log line 0123456789012345678901\\n" (32 bytes) to stderr, then
    "done" to stdout, and exits 0."""
    return f"""
(module
  {_FD_WRITE}
  (memory (export "memory") 1)
  (data (i32.const 16) "log line 0123456789012345678901\\n")
  (data (i32.const 64) "done")
  (func (export "_start")
    (local $i i32)
    (i32.store (i32.const 0) (i32.const 16))
    (i32.store (i32.const 4) (i32.const 32))
    (loop $again
      (drop (call $fd_write (i32.const 2) (i32.const 0) (i32.const 1) (i32.const 8)))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br_if $again (i32.lt_u (local.get $i) (i32.const {count}))))
    (i32.store (i32.const 0) (i32.const 64))
    (i32.store (i32.const 4) (i32.const 4))
    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))))
"""


def sleep(ns: int) -> str:
    """Sleeps `ns` nanoseconds with poll_oneoff (one relative monotonic clock subscription);
    writes "ok" to stdout if poll_oneoff reported exactly that subscription."""
    return f"""
(module
  (import "wasi_snapshot_preview1" "poll_oneoff"
    (func $poll (param i32 i32 i32 i32) (result i32)))
  {_FD_WRITE}
  (memory (export "memory") 1)
  (data (i32.const 300) "ok")
  (func (export "_start")
    (i64.store (i32.const 0) (i64.const 7))
    (i32.store8 (i32.const 8) (i32.const 0))
    (i32.store (i32.const 16) (i32.const 1))
    (i64.store (i32.const 24) (i64.const {ns}))
    (br_if 0 (call $poll (i32.const 0) (i32.const 64) (i32.const 1) (i32.const 128)))
    (br_if 0 (i32.ne (i32.load (i32.const 128)) (i32.const 1)))
    (br_if 0 (i64.ne (i64.load (i32.const 64)) (i64.const 7)))
    (i32.store (i32.const 200) (i32.const 300))
    (i32.store (i32.const 204) (i32.const 2))
    (drop (call $fd_write (i32.const 1) (i32.const 200) (i32.const 1) (i32.const 208)))))
"""


#: writes the number of environment variables (0-9) as one ASCII digit
ENV_COUNT = f"""
(module
  (import "wasi_snapshot_preview1" "environ_sizes_get"
    (func $sizes (param i32 i32) (result i32)))
  {_FD_WRITE}
  (memory (export "memory") 1)
  (func (export "_start")
    (drop (call $sizes (i32.const 100) (i32.const 104)))
    (i32.store8 (i32.const 300) (i32.add (i32.const 48) (i32.load (i32.const 100))))
    (i32.store (i32.const 200) (i32.const 300))
    (i32.store (i32.const 204) (i32.const 1))
    (drop (call $fd_write (i32.const 1) (i32.const 200) (i32.const 1) (i32.const 208)))))
"""

_FD_READ = (
    '(import "wasi_snapshot_preview1" "fd_read"'
    " (func $fd_read (param i32 i32 i32 i32) (result i32)))"
)

#: stdio's rules: writes the errnos of fd_write(3), fd_read(1) and fd_read(0) into an iovec
#: outside memory as three bytes, then reads stdin with one call into two iovecs (2 and 10
#: bytes) and writes both back with one call
STDIO_RULES = f"""
(module
  {_FD_WRITE}
  {_FD_READ}
  (memory (export "memory") 1)
  (data (i32.const 0) "\\64\\00\\00\\00\\02\\00\\00\\00\\c8\\00\\00\\00\\0a\\00\\00\\00")
  (data (i32.const 40) "\\f0\\ff\\ff\\ff\\10\\00\\00\\00\\90\\01\\00\\00\\03\\00\\00\\00")
  (func (export "_start")
    (i32.store8 (i32.const 400) (call $fd_write (i32.const 3) (i32.const 0) (i32.const 1)
      (i32.const 304)))
    (i32.store8 (i32.const 401) (call $fd_read (i32.const 1) (i32.const 0) (i32.const 1)
      (i32.const 300)))
    (i32.store8 (i32.const 402) (call $fd_read (i32.const 0) (i32.const 40) (i32.const 1)
      (i32.const 300)))
    (drop (call $fd_read (i32.const 0) (i32.const 0) (i32.const 2) (i32.const 300)))
    (drop (call $fd_write (i32.const 1) (i32.const 48) (i32.const 1) (i32.const 304)))
    (i32.store (i32.const 12) (i32.sub (i32.load (i32.const 300)) (i32.const 2)))
    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 2) (i32.const 304)))))
"""
