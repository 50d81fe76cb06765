"""wasmtime plumbing shared by per-call runs and warm reactors (wasm.py, wasm_reactor.py).

- the epoch-deadline callback: each store's deadline is one tick ahead and, at every tick,
  asks the GuestRun armed for the store (`arm`) whether it may go on;
- the WASI linker, with spear's interruptible `poll_oneoff` (wasi_poll.py) and stdio served
  from host memory (`fd_read` of fd 0, `fd_write` of fds 1 and 2: see `_stdio`);
- compiling: header and entry-point checks; a module is a WASI *command* (`_start`) or a
  spear *reactor* (`spear_alloc` + `spear_handle` + `memory`, see wasm_reactor.py);
- calls into exports of a known signature (`RawFunc`);
- how a trap or a non-zero exit becomes a Verdict.

The epoch-deadline callback is registered through `wasmtime._ffi` (wasmtime-py 50 has no
public binding for `wasmtime_store_epoch_deadline_callback`); pyproject pins wasmtime <51.
"""

from __future__ import annotations

import ctypes
import enum
import logging
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, cast

import wasmtime
from wasmtime import _ffi as ffi  # the epoch-deadline callback has no public binding yet

from spear.errors import ArtifactError
from spear.model import ErrorCode
from spear.runtimes import wasi_poll
from spear.runtimes.compile_cache import Compiler
from spear.runtimes.guest import GuestRun
from spear.runtimes.outcomes import Verdict, failed

log = logging.getLogger(__name__)

WASM_MAGIC: Final = b"\0asm\x01\x00\x00\x00"
COMPONENT_MAGIC: Final = b"\0asm\x0d\x00\x01\x00"
WASM_PAGE_BYTES: Final = 65536
WASI: Final = "wasi_snapshot_preview1"
#: the reactor ABI's exports (wasm_reactor.py)
ALLOC_EXPORT: Final = "spear_alloc"
HANDLE_EXPORT: Final = "spear_handle"


class ModuleKind(enum.Enum):
    """What a module's exports make it: which instance mode can run it."""

    COMMAND = "command"  # `_start`: mode per-call
    REACTOR = "reactor"  # `spear_alloc` + `spear_handle` + `memory`: mode worker


@dataclass(frozen=True, slots=True)
class LoadedModule:
    """A compiled module linked against spear's WASI, ready to instantiate."""

    pre: wasmtime.InstancePre
    kind: ModuleKind


# --- the epoch deadline callback ----------------------------------------------------------

#: the run each watched store is serving, by the key given to wasmtime as the callback's env
_RUNS: dict[int, GuestRun] = {}
#: the run on this thread (for poll_oneoff and reactor output: store-independent callbacks)
CURRENT = threading.local()
_UPDATE_DEADLINE_CONTINUE: Final = 0


def _epoch_deadline(context: Any, env: int | None, delta: Any, kind: Any) -> int:
    """Called by wasmtime at each tick of a running store: one more tick, or trap."""
    run = _RUNS.get(env or 0)
    if run is None or run.should_stop():
        error = ffi.wasmtime_error_new(b"spear stopped the guest")
        return cast(int, ctypes.cast(error, ctypes.c_void_p).value)
    delta[0] = 1
    kind[0] = _UPDATE_DEADLINE_CONTINUE
    return 0


def _store_dropped(env: int | None) -> None:
    _RUNS.pop(env or 0, None)


_on_epoch_deadline = ctypes.CFUNCTYPE(
    ctypes.c_size_t,
    ctypes.POINTER(ffi.wasmtime_context_t),
    ctypes.c_void_p,
    ctypes.POINTER(ctypes.c_uint64),
    ctypes.POINTER(ffi.wasmtime_update_deadline_kind_t),
)(_epoch_deadline)
_on_store_dropped = ctypes.CFUNCTYPE(None, ctypes.c_void_p)(_store_dropped)


def watch_epoch(store: wasmtime.Store, key: int, run: GuestRun) -> None:
    """Register the deadline callback of `store` under `key` (unique in this process) and
    arm it for `run`; the entry goes when the store is dropped."""
    _RUNS[key] = run
    ffi.wasmtime_store_epoch_deadline_callback(
        store.ptr(), _on_epoch_deadline, key, _on_store_dropped
    )
    store.set_epoch_deadline(1)


def arm(store: wasmtime.Store, key: int, run: GuestRun) -> None:
    """Point a watched store's callback at its next run, one tick ahead of now."""
    _RUNS[key] = run
    store.set_epoch_deadline(1)


def forget(key: int) -> None:
    """Drop a store's entry now (a closed store may call its finalizer late)."""
    _RUNS.pop(key, None)


# --- WASI with an interruptible poll_oneoff -------------------------------------------------


def wasi_linker(engine: wasmtime.Engine) -> wasmtime.Linker:
    linker = wasmtime.Linker(engine)
    linker.define_wasi()
    linker.allow_shadowing = True
    i32 = wasmtime.ValType.i32()
    poll_type = wasmtime.FuncType([i32] * 4, [i32])
    linker.define_func(WASI, "poll_oneoff", poll_type, _poll_oneoff, access_caller=True)
    _define_stdio(linker, poll_type)
    return linker


def _poll_oneoff(caller: wasmtime.Caller, subs: int, events: int, count: int, out: int) -> int:
    """The host side of wasi_poll.answer_poll: guest memory in and out.

    A host function must never raise (wasmtime-py keeps the exception in a global shared by
    all threads), hence the catch-all.
    """
    try:
        run: GuestRun | None = getattr(CURRENT, "run", None)
        memory = caller.get("memory")
        if run is None or not isinstance(memory, wasmtime.Memory):
            return wasi_poll.ERRNO_NOTSUP
        subs, events, count, out = (value & 0xFFFFFFFF for value in (subs, events, count, out))
        size = memory.data_len(caller)
        end = subs + wasi_poll.SUBSCRIPTION.size * count
        if end > size or events + wasi_poll.EVENT.size * count > size or out + 4 > size:
            return wasi_poll.ERRNO_FAULT
        errno, answer, ready = wasi_poll.answer_poll(memory.read(caller, subs, end), run.sleep)
        if errno == wasi_poll.ERRNO_SUCCESS:
            memory.write(caller, answer, events)
            memory.write(caller, ready.to_bytes(4, "little"), out)
        return errno
    except Exception:  # pragma: no cover - a bug here, reported to the guest as EINVAL
        log.exception("poll_oneoff failed")
        return wasi_poll.ERRNO_INVAL


# --- stdio from host memory ------------------------------------------------------------------
#
# A guest's stdin is the invocation's input and its stdout and stderr are captured, so
# fd_read and fd_write serve them from and to the GuestRun directly. wasmtime's own WASI
# streams (a `stdin_file`, `stdout_custom`) go through its I/O threads: each read and write
# is a thread hand-off, which cost a per-call run of a small filter about 0.15 ms whenever
# those threads had gone to sleep between calls (the usual case under steady load), besides a
# temp file per input. No other descriptor exists in spear's sandbox (no preopened
# directories, no sockets), and the other WASI calls on fds 0-2 behave as for pipes. With no
# run on the thread (a reactor's `_initialize` before its first call) reads see an empty
# stdin and writes are dropped, as /dev/null would.
#
# Both are defined through wasmtime's *unchecked* host-function interface: raw i32 values in
# and out, and guest memory read and written in place through its base address (bounds
# checked here). wasmtime-py's `define_func` converts every argument and result through
# `Val` objects and hands out `Memory` wrappers: 20 us a call against 6 us this way.

_IOVEC = struct.Struct("<II")
_U32 = 0xFFFFFFFF
ERRNO_BADF: Final = 8
_MEMORY = b"memory"


def _guest_memory(caller: Any) -> tuple[int, int] | None:
    """The base address and size in bytes of the calling instance's `memory` export."""
    extern = ffi.wasmtime_extern_t()
    if not ffi.wasmtime_caller_export_get(caller, _MEMORY, len(_MEMORY), ctypes.byref(extern)):
        return None
    try:
        if int(extern.kind) != ffi.WASMTIME_EXTERN_MEMORY.value:
            return None
        context = ffi.wasmtime_caller_context(caller)
        memory = ctypes.byref(extern.of.memory)
        base = ctypes.cast(ffi.wasmtime_memory_data(context, memory), ctypes.c_void_p).value
        return base or 0, ffi.wasmtime_memory_data_size(context, memory)
    finally:
        ffi.wasmtime_extern_delete(ctypes.byref(extern))


def _iovecs(base: int, size: int, iovs: int, count: int) -> list[tuple[int, int]] | None:
    """The (address, length) pairs of an iovec array, or None if any lies outside memory."""
    end = iovs + _IOVEC.size * count
    if end > size:
        return None
    raw = ctypes.string_at(base + iovs, end - iovs)
    vectors = [_IOVEC.unpack_from(raw, i * _IOVEC.size) for i in range(count)]
    if any(address + length > size for address, length in vectors):
        return None
    return vectors


def _stdio(
    name: str, serve: Callable[[int, int, list[tuple[int, int]]], int | None]
) -> Callable[[Any, Any, Any, int], int]:
    """An unchecked host function `name(fd, iovs, count, out) -> errno` of WASI: it finds the
    guest's memory and iovecs, calls `serve(base, fd, iovecs)` for the byte count to store at
    `out` (None: EBADF), and never raises (see `_poll_oneoff`)."""

    def host(env: Any, caller: Any, args: Any, slots: int) -> int:
        try:
            fd, iovs, count, out = (args[i].i32 & _U32 for i in range(4))
            errno = wasi_poll.ERRNO_SUCCESS
            found = _guest_memory(caller)
            if found is None:
                errno = wasi_poll.ERRNO_NOTSUP
            else:
                base, size = found
                vectors = _iovecs(base, size, iovs, count)
                if vectors is None or out + 4 > size:
                    errno = wasi_poll.ERRNO_FAULT
                else:
                    done = serve(base, fd, vectors)
                    if done is None:
                        errno = ERRNO_BADF
                    else:
                        ctypes.memmove(base + out, done.to_bytes(4, "little"), 4)
        except Exception:  # pragma: no cover - a bug here, reported to the guest as EINVAL
            log.exception("%s failed", name)
            errno = wasi_poll.ERRNO_INVAL
        args[0].i32 = errno
        return 0

    return host


def _read_stdin(base: int, fd: int, vectors: list[tuple[int, int]]) -> int | None:
    """fd_read: fd 0 reads the run's input; no other fd can be read."""
    if fd != 0:
        return None
    run: GuestRun | None = getattr(CURRENT, "run", None)
    total = 0
    for address, length in vectors:
        chunk = run.read_stdin(length) if run is not None else b""
        ctypes.memmove(base + address, chunk, len(chunk))
        total += len(chunk)
        if len(chunk) < length:
            break
    return total


def _write_stdio(base: int, fd: int, vectors: list[tuple[int, int]]) -> int | None:
    """fd_write: fd 1 is the run's output (its logs for a reactor), fd 2 its logs; nothing
    else can be written. Past the output limit the run stops at its next epoch check, and the
    write still reports success."""
    if fd not in (1, 2):
        return None
    run: GuestRun | None = getattr(CURRENT, "run", None)
    total = 0
    for address, length in vectors:
        total += length
        if run is None or not length:
            continue
        data = ctypes.string_at(base + address, length)
        if fd == 1 and not run.stdout_to_logs:
            run.on_stdout(data)
        else:
            run.logs.write(data)
    return total


#: the ctypes callbacks must live as long as the linkers that call them: for the process
_STDIO_HOSTS: Final = {
    name: ffi.wasmtime_func_unchecked_callback_t(_stdio(name, serve))
    for name, serve in (("fd_read", _read_stdin), ("fd_write", _write_stdio))
}
_KEEP_ENV = ctypes.CFUNCTYPE(None, ctypes.c_void_p)(lambda env: None)


def _define_stdio(linker: wasmtime.Linker, func_type: wasmtime.FuncType) -> None:
    module = WASI.encode()
    for name, host in _STDIO_HOSTS.items():
        error = ffi.wasmtime_linker_define_func_unchecked(
            linker.ptr(),
            ctypes.create_string_buffer(module),
            len(module),
            ctypes.create_string_buffer(name.encode()),
            len(name),
            func_type.ptr(),
            host,
            None,
            _KEEP_ENV,
        )
        if error:
            raise wasmtime.WasmtimeError._from_ptr(error)


# --- calls of a known signature ---------------------------------------------------------------


class RawFunc:
    """An export of a type checked at load time (module_kind), called the fast way.

    `wasmtime.Func.__call__` looks up and converts the function's type on every call, which
    costs more than the call itself (measured: about 60% of a warm invocation); this calls
    `wasmtime_func_call_unchecked` with a reused argument buffer instead. Not thread-safe:
    the caller serialises calls (a Reactor holds its mutex) around calls.
    """

    __slots__ = ("_args", "_context", "_func")

    def __init__(self, store: wasmtime.Store, func: wasmtime.Func) -> None:
        self._context = store._context()
        self._func = ctypes.byref(func._func)
        self._args = (ffi.wasmtime_val_raw_t * 2)()

    def i32(self, arg: int) -> int:
        """Call a `(i32) -> i32` export."""
        self._args[0].i32 = arg
        self._call(1)
        return int(self._args[0].i32)

    def i64(self, first: int, second: int) -> int:
        """Call a `(i32, i32) -> i64` export."""
        self._args[0].i32 = first
        self._args[1].i32 = second
        self._call(2)
        return int(self._args[0].i64)

    def _call(self, slots: int) -> None:
        trap = ctypes.POINTER(ffi.wasm_trap_t)()
        error = ffi.wasmtime_func_call_unchecked(
            self._context, self._func, self._args, slots, ctypes.byref(trap)
        )
        if error:
            raise wasmtime.WasmtimeError._from_ptr(error)
        if trap:
            raise wasmtime.Trap._from_ptr(trap)


# --- compiling -------------------------------------------------------------------------------


def compiler(
    engine: wasmtime.Engine, linker: wasmtime.Linker
) -> Compiler[wasmtime.Module, LoadedModule]:
    def compile_module(data: bytes) -> wasmtime.Module:
        _check_header(data)
        try:
            module = wasmtime.Module(engine, data)
        except wasmtime.WasmtimeError as exc:
            cause = split_trap(exc)[0]
            raise ArtifactError(f"the artifact fails to compile as WASM: {cause}") from exc
        module_kind(module)
        return module

    def deserialize(path: Path) -> wasmtime.Module | None:
        try:
            return wasmtime.Module.deserialize_file(engine, str(path))
        except wasmtime.WasmtimeError as exc:
            log.warning("recompiling: the cached module %s is unusable: %s", path, exc)
            return None

    def link(module: wasmtime.Module) -> LoadedModule:
        try:
            pre = linker.instantiate_pre(module)
        except wasmtime.WasmtimeError as exc:
            raise ArtifactError(
                f"the module needs an import spear does not provide ({exc}); a WASM module"
                f" may import only {WASI} functions"
            ) from exc
        return LoadedModule(pre, module_kind(module))

    return Compiler(
        compile=compile_module,
        serialize=lambda module: bytes(module.serialize()),
        deserialize=deserialize,
        link=link,
    )


def _check_header(data: bytes) -> None:
    if data[:8] == COMPONENT_MAGIC:
        raise ArtifactError(
            "the artifact is a WebAssembly component; runtime 'wasm' runs WASI preview 1"
            " modules (wasm32-wasi)"
        )
    if data[:8] != WASM_MAGIC:
        raise ArtifactError(
            "the artifact is not a WASM module (it does not start with the \\0asm header);"
            " upload the binary, not WAT text"
        )


_I32 = "i32"
_I64 = "i64"
#: export name -> (params, results) the reactor ABI requires
_REACTOR_EXPORTS: Final = {
    ALLOC_EXPORT: ((_I32,), (_I32,)),
    HANDLE_EXPORT: ((_I32, _I32), (_I64,)),
}


def module_kind(module: wasmtime.Module) -> ModuleKind:
    """COMMAND if the module exports `_start`, else REACTOR if it keeps the reactor ABI.

    Raises:
        ArtifactError: neither, or an entry point of the wrong type.
    """
    funcs = {e.name: e.type for e in module.exports if isinstance(e.type, wasmtime.FuncType)}
    start = funcs.get("_start")
    if start is not None:
        if start.params or start.results:
            raise ArtifactError("the module's `_start` export is not a function of no arguments")
        return ModuleKind.COMMAND
    if HANDLE_EXPORT not in funcs:
        raise ArtifactError(
            "the module is not a WASI command: it has no `_start` export (build it as an"
            " executable for wasm32-wasi), nor a reactor for mode 'worker' (exports"
            f" `{ALLOC_EXPORT}` and `{HANDLE_EXPORT}`)"
        )
    for name, (params, results) in _REACTOR_EXPORTS.items():
        ty = funcs.get(name)
        if ty is None or (_types(ty.params), _types(ty.results)) != (params, results):
            raise ArtifactError(
                f"the reactor's `{name}` export must be a function"
                f" ({', '.join(params)}) -> {', '.join(results)}"
            )
    if not any(
        e.name == "memory" and isinstance(e.type, wasmtime.MemoryType) for e in module.exports
    ):
        raise ArtifactError("the reactor must export its linear memory as `memory`")
    return ModuleKind.REACTOR


def _types(types: list[wasmtime.ValType]) -> tuple[str, ...]:
    return tuple(str(ty) for ty in types)


def wat_to_wasm(text: str) -> bytes:
    """Compile WebAssembly text to a binary module.

    Raises:
        ArtifactError: the text is not valid WAT.
    """
    try:
        return bytes(wasmtime.wat2wasm(text))
    except wasmtime.WasmtimeError as exc:
        raise ArtifactError(f"not valid WebAssembly text: {exc}") from exc


# --- verdicts ----------------------------------------------------------------------------


def classify_failure(
    run: GuestRun,
    memory_bytes: int | None,
    error: wasmtime.Trap | wasmtime.WasmtimeError | None,
    exit_code: int,
    fuel: int,
) -> Verdict:
    """The verdict of a guest that trapped (`error`) or exited non-zero, not stopped by spear."""
    if error is None:
        what = f"exited with code {exit_code}"
    else:
        cause, backtrace = split_trap(error)
        if backtrace:
            run.logs.note(f"wasm {backtrace}")
        if isinstance(error, wasmtime.Trap) and error.trap_code == wasmtime.TrapCode.OUT_OF_FUEL:
            message = f"the function used all its fuel (runtimes.wasm.fuel = {fuel})"
            return failed(ErrorCode.FUEL_EXHAUSTED, message)
        what = f"trapped: {cause}"
    limit = run.spec.memory_limit_bytes
    code = exit_code or None
    if memory_bytes is not None and near_limit(memory_bytes, limit):
        message = (
            f"the function {what}, with its memory at {memory_bytes} bytes of its"
            f" memory_limit_bytes ({limit}): most likely an allocation failed"
        )
        return failed(ErrorCode.MEMORY_LIMIT, message, code)
    if error is None:
        return failed(ErrorCode.EXIT_NONZERO, f"the function {what}", code)
    return failed(ErrorCode.TRAP, f"the function {what}")


def instantiation_failed(run: GuestRun, cause: str) -> Verdict:
    if "exceeds memory limits" in cause:
        message = (
            f"the module needs more memory than its memory_limit_bytes"
            f" ({run.spec.memory_limit_bytes}) to start: {cause}"
        )
        return failed(ErrorCode.MEMORY_LIMIT, message)
    return failed(ErrorCode.START_FAILED, f"the module could not be instantiated: {cause}")


def memory_size(store: wasmtime.Store, instance: wasmtime.Instance) -> int | None:
    memory = instance.exports(store).get("memory")
    return memory.data_len(store) if isinstance(memory, wasmtime.Memory) else None


def near_limit(memory_bytes: int, limit: int) -> bool:
    """Whether a failing guest's memory says that a `memory.grow` was refused.

    wasmtime does not report refused grows, so this is a heuristic: within one eighth of the
    limit (at least a page, at most 8 MiB) counts. wasi-libc's malloc grows in steps of
    about a megabyte or more, and a C program that fails malloc at a 64 MiB limit was seen
    stopping 2 MiB short of it. A single huge request far below the limit is not recognised
    and reports as a trap or an exit code.
    """
    slack = max(WASM_PAGE_BYTES, min(limit // 8, 8 << 20))
    return memory_bytes + slack > limit


def split_trap(error: wasmtime.Trap | wasmtime.WasmtimeError) -> tuple[str, str]:
    """("wasm trap: ...", "backtrace: ...") from wasmtime's multi-line error text."""
    text = error.message if isinstance(error, wasmtime.Trap) else str(error)
    head, sep, cause = text.partition("Caused by:")
    if not sep:
        return " ".join(text.split()), ""
    frames = [line.strip() for line in head.splitlines()[1:11] if line.strip()]
    backtrace = "backtrace: " + "; ".join(frames) if frames else ""
    return " ".join(cause.split()), backtrace
