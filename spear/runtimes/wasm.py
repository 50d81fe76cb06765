"""The WASM runtime: WASI command modules run per call in wasmtime (the only wasmtime importer).

A run is a fresh Store, a fresh WasiConfig and the module's `_start` (DESIGN.md section 5):
input on stdin (a temp file, unlinked at once: WASI stdin is file-only), output and logs
through byte-counting callbacks, argv `[task name, *command]`, the task's env and nothing
else (no preopened directory, nothing inherited).

Limits and how they hold:
- time: the engine has epoch interruption; one ticker thread bumps the epoch every
  `epoch_tick_ms` while any guest runs. Every store's deadline is one tick ahead and its
  deadline callback decides at each tick whether the run goes on (deadline not reached, not
  cancelled, output within its limit) or traps. So a timeout, a cancel or an output overflow
  stops the guest within a tick, and its worker thread really ends.
- sleeping guests: `poll_oneoff` is spear's own (see wasi_poll.py).
- memory: `Store.set_limits(memory_size=...)`; `memory.grow` past it returns -1.
- fuel: when `runtimes.wasm.fuel > 0` every run gets that much fuel.

Compiled modules are cached on disk (`<cache_dir>/<key>.cwasm`, key = sha256 of the wasmtime
version, the engine settings and the module's sha256, so another version or setting never
reads a stale file) and in memory (an LRU of InstancePre per module sha256). The cache
directory must be trusted: deserializing a file runs the native code compiled into it.

The epoch-deadline callback is registered through `wasmtime._ffi` (wasmtime-py 50 has no
public binding for `wasmtime_store_epoch_deadline_callback`); pyproject pins wasmtime <51.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import itertools
import json
import logging
import os
import platform
import shutil
import tempfile
import threading
import time
from functools import partial
from importlib.metadata import version as package_version
from pathlib import Path
from typing import Any, Final, cast

import trio
import wasmtime
from wasmtime import _ffi as ffi  # the epoch-deadline callback has no public binding yet

from spear.config import WasmConfig
from spear.errors import ArtifactError, RuntimeFailure, ValidationError
from spear.model import ErrorCode, FunctionSpec, RunOutcome
from spear.runtimes import wasi_poll
from spear.runtimes.base import PER_CALL, check_mode, effective_timeout_s
from spear.runtimes.compile_cache import CompileCache, Compiler
from spear.runtimes.guest import GuestRun
from spear.runtimes.outcomes import SUCCEEDED, Verdict, early_outcome, failed, timed_out
from spear.runtimes.threads import EpochTicker, run_stoppable

log = logging.getLogger(__name__)

WASM_MAGIC: Final = b"\0asm\x01\x00\x00\x00"
COMPONENT_MAGIC: Final = b"\0asm\x0d\x00\x01\x00"
WASM_PAGE_BYTES: Final = 65536
WASI: Final = "wasi_snapshot_preview1"
#: bump when the cache file layout or the engine settings that matter change
CACHE_FORMAT: Final = 1
#: how long a cancelled run waits for its guest thread to notice (it needs one epoch tick)
STOP_GRACE_S: Final = 2.0
#: a module that outruns the inline budget this often in a row runs in worker threads from then on
INLINE_STRIKES: Final = 3


class WasmRuntime:
    """Runs WASI command modules per call (see the module docstring for the limits)."""

    name = "wasm"

    def __init__(
        self, config: WasmConfig, *, cache_dir: Path, memory_cache_entries: int = 128
    ) -> None:
        """Build the engine and start the (idle) epoch ticker; blocking (directories).

        Args:
            config: the `[runtimes.wasm]` section.
            cache_dir: where compiled modules are cached (absolute; created if missing).
            memory_cache_entries: how many compiled modules to keep in memory.
        """
        self._config = config
        engine_config = wasmtime.Config()
        engine_config.epoch_interruption = True
        engine_config.consume_fuel = config.fuel > 0
        engine_config.max_wasm_stack = config.max_wasm_stack_bytes
        self._engine = wasmtime.Engine(engine_config)
        self.version = package_version("wasmtime")
        settings = {
            "format": CACHE_FORMAT,
            "wasmtime": self.version,
            "machine": platform.machine(),
            "epoch_interruption": True,
            "consume_fuel": config.fuel > 0,
            "max_wasm_stack": config.max_wasm_stack_bytes,
        }
        self._modules = CompileCache(
            _compiler(self._engine, _wasi_linker(self._engine)),
            cache_dir=cache_dir,
            settings_key=json.dumps(settings, sort_keys=True),
            capacity=memory_cache_entries,
            suffix=".cwasm",
        )
        self._limiter = trio.CapacityLimiter(config.max_threads or 4 * (os.cpu_count() or 1))
        self._ticker = EpochTicker(self._engine.increment_epoch, config.epoch_tick_ms / 1000)
        shm = Path("/dev/shm")
        stdin_base = shm if shm.is_dir() and os.access(shm, os.W_OK) else None
        self._stdin_dir = Path(tempfile.mkdtemp(prefix="spear-wasm-stdin-", dir=stdin_base))
        self._run_ids = itertools.count(1)
        self._closed = False
        self._inline_budget_s = config.inline_budget_ms / 1000
        #: how often in a row each module outran the inline budget
        self._strikes: dict[str | None, int] = {}
        self._inline_runs = 0
        self._inline_fallbacks = 0

    # --- the Runtime protocol -----------------------------------------------------------

    def describe(self) -> dict[str, Any]:
        return {
            "available": True,
            "version": f"wasmtime {self.version}",
            "modes": [PER_CALL],
            "fuel": self._config.fuel,
            "epoch_tick_ms": self._config.epoch_tick_ms,
            "max_threads": self._limiter.total_tokens,
        }

    def validate_task(self, spec: FunctionSpec) -> None:
        check_mode(self.name, spec)
        if spec.artifact_sha256 is None or spec.artifact_path is None:
            raise ValidationError(
                "runtime 'wasm' needs an artifact (the file_id of a WASM module)",
                field="artifact",
            )
        if spec.memory_limit_bytes < WASM_PAGE_BYTES:
            raise ValidationError(
                f"memory_limit_bytes must be at least one WASM page ({WASM_PAGE_BYTES}),"
                f" got {spec.memory_limit_bytes}",
                field="memory_limit_bytes",
            )

    def validate_artifact(self, data: bytes) -> None:
        """Check that `data` is a WASI command module; it is compiled and cached on the way."""
        self._modules.load(hashlib.sha256(data).hexdigest(), data=data)

    async def prepare(self, spec: FunctionSpec) -> None:
        self.validate_task(spec)
        assert spec.artifact_sha256 is not None
        if self._modules.peek(spec.artifact_sha256) is None:
            await trio.to_thread.run_sync(self._load, spec)

    async def run(self, spec: FunctionSpec, data: bytes, *, deadline: float) -> RunOutcome:
        started = time.perf_counter()
        timeout_s = effective_timeout_s(spec, deadline)
        if timeout_s <= 0:
            return early_outcome(timed_out(max(timeout_s, 0.0)))
        sha = spec.artifact_sha256
        if self._inline_budget_s > 0 and self._strikes.get(sha, 0) < INLINE_STRIKES:
            outcome = self._run_inline(spec, data, timeout_s, started)
            if outcome is not None:
                self._strikes.pop(sha, None)
                self._inline_runs += 1
                return outcome
            self._strikes[sha] = self._strikes.get(sha, 0) + 1
            spent_s = time.perf_counter() - started
            timeout_s = min(effective_timeout_s(spec, deadline), timeout_s - spent_s)
        run = GuestRun(spec, next(self._run_ids), timeout_s, started)
        try:
            return await run_stoppable(
                partial(self._execute, run, data),
                limiter=self._limiter,
                acquire_timeout_s=timeout_s,
                stop=partial(run.stop, ErrorCode.CANCELLED),
                grace_s=STOP_GRACE_S,
                name=spec.name,
            )
        except trio.TooSlowError:
            why = "no guest thread was free before the deadline (runtimes.wasm.max_threads)"
            return early_outcome(timed_out(timeout_s), why)

    def _run_inline(
        self, spec: FunctionSpec, data: bytes, timeout_s: float, started: float
    ) -> RunOutcome | None:
        """Run on the event loop's thread within `runtimes.wasm.inline_budget_ms`.

        A short guest costs less than handing it to a worker thread and back (measured: the
        hand-off doubles a 0.5 ms run). A guest still running at the budget is stopped at its
        next epoch tick and None is returned: the caller runs it again in a worker thread.
        Running it twice is safe because a per-call WASI command has no effects outside its
        run: no preopened directories, no sockets, and its stdout and stderr are captured per
        run. After INLINE_STRIKES such fallbacks in a row the module always runs in worker
        threads.
        """
        with contextlib.suppress(ArtifactError, RuntimeFailure):  # _execute reports it
            self._load(spec)  # the budget is for running, not for loading the module
        budget = min(timeout_s, self._inline_budget_s)
        run = GuestRun(spec, next(self._run_ids), budget, started)
        outcome = self._execute(run, data)
        if run.stop_reason is ErrorCode.TIMEOUT and budget < timeout_s:
            self._inline_fallbacks += 1
            return None
        return outcome

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(self._ticker.close)
            await trio.to_thread.run_sync(
                partial(shutil.rmtree, self._stdin_dir, ignore_errors=True)
            )

    def statistics(self) -> dict[str, Any]:
        """Compile-cache counters (`compiles`, `disk_hits`, `memory_hits`, `disk_errors`,
        `memory_entries`) and guest threads (`running`, `waiting`, `max_threads`)."""
        limiter = self._limiter.statistics()
        return {
            **self._modules.statistics(),
            "running": limiter.borrowed_tokens,
            "waiting": limiter.tasks_waiting,
            "max_threads": limiter.total_tokens,
            "epoch_ticks": self._ticker.ticks,
            "inline_runs": self._inline_runs,
            "inline_fallbacks": self._inline_fallbacks,
        }

    # --- worker-thread side -------------------------------------------------------------

    def _load(self, spec: FunctionSpec) -> wasmtime.InstancePre:
        assert spec.artifact_sha256 is not None
        return self._modules.load(spec.artifact_sha256, path=spec.artifact_path)

    def _execute(self, run: GuestRun, data: bytes) -> RunOutcome:
        """One guest run, start to finish, in a worker thread."""
        try:
            pre = self._load(run.spec)
        except (ArtifactError, RuntimeFailure) as exc:
            return early_outcome(failed(ErrorCode.START_FAILED, str(exc)))
        if run.should_stop():
            return run.outcome(run.stop_verdict() or SUCCEEDED)
        try:
            wasi = self._wasi(run, data)
        except OSError as exc:  # e.g. /dev/shm full
            message = f"cannot hand the input to the guest: {exc}"
            return early_outcome(failed(ErrorCode.START_FAILED, message))
        store = wasmtime.Store(self._engine)
        try:
            store.set_limits(memory_size=run.spec.memory_limit_bytes)
            if self._config.fuel:
                store.set_fuel(self._config.fuel)
            _watch_epoch(store, run)
            store.set_wasi(wasi)
            self._ticker.enter()
            _CURRENT.run = run
            try:
                return run.outcome(self._start(run, store, pre))
            finally:
                _CURRENT.run = None
                self._ticker.exit()
        finally:
            _RUNS.pop(run.run_id, None)
            store.close()  # here and now: a store with Python callbacks must not linger

    def _wasi(self, run: GuestRun, data: bytes) -> wasmtime.WasiConfig:
        wasi = wasmtime.WasiConfig()
        wasi.argv = [run.spec.name, *run.spec.command]
        if run.spec.env:
            wasi.env = list(run.spec.env.items())
        if data:
            path = self._stdin_dir / str(run.run_id)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                try:
                    view = memoryview(data)
                    while view:
                        view = view[os.write(fd, view) :]
                finally:
                    os.close(fd)
                wasi.stdin_file = path  # wasmtime opens it here, so it can go at once
            finally:
                os.unlink(path)
        else:
            wasi.stdin_file = os.devnull
        wasi.stdout_custom = run.on_stdout
        wasi.stderr_custom = run.logs.write
        return wasi

    def _start(self, run: GuestRun, store: wasmtime.Store, pre: wasmtime.InstancePre) -> Verdict:
        try:
            instance = pre.instantiate(store)
        except (wasmtime.Trap, wasmtime.WasmtimeError) as exc:
            run.ready = time.perf_counter()
            return run.stop_verdict() or _instantiation_failed(run, _split_trap(exc)[0])
        start = instance.exports(store)["_start"]
        assert isinstance(start, wasmtime.Func)
        run.ready = time.perf_counter()
        error: wasmtime.Trap | wasmtime.WasmtimeError | None = None
        try:
            start(store)
            exit_code = 0
        except wasmtime.ExitTrap as exc:
            exit_code = exc.code
        except (wasmtime.Trap, wasmtime.WasmtimeError) as exc:
            error, exit_code = exc, 0
        stopped = run.stop_verdict()
        if stopped is not None:
            return stopped
        if error is None and exit_code == 0:
            return SUCCEEDED
        return self._failure(run, _memory_size(store, instance), error, exit_code)

    def _failure(
        self,
        run: GuestRun,
        memory_bytes: int | None,
        error: wasmtime.Trap | wasmtime.WasmtimeError | None,
        exit_code: int,
    ) -> Verdict:
        if error is None:
            what = f"exited with code {exit_code}"
        else:
            cause, backtrace = _split_trap(error)
            if backtrace:
                run.logs.note(f"wasm {backtrace}")
            if (
                isinstance(error, wasmtime.Trap)
                and error.trap_code == wasmtime.TrapCode.OUT_OF_FUEL
            ):
                message = (
                    f"the function used all its fuel (runtimes.wasm.fuel = {self._config.fuel})"
                )
                return failed(ErrorCode.FUEL_EXHAUSTED, message)
            what = f"trapped: {cause}"
        limit = run.spec.memory_limit_bytes
        code = exit_code or None
        if memory_bytes is not None and _near_limit(memory_bytes, limit):
            message = (
                f"the function {what}, with its memory at {memory_bytes} bytes of its"
                f" memory_limit_bytes ({limit}): most likely an allocation failed"
            )
            return failed(ErrorCode.MEMORY_LIMIT, message, code)
        if error is None:
            return failed(ErrorCode.EXIT_NONZERO, f"the function {what}", code)
        return failed(ErrorCode.TRAP, f"the function {what}")


def _instantiation_failed(run: GuestRun, cause: str) -> Verdict:
    if "exceeds memory limits" in cause:
        message = (
            f"the module needs more memory than its memory_limit_bytes"
            f" ({run.spec.memory_limit_bytes}) to start: {cause}"
        )
        return failed(ErrorCode.MEMORY_LIMIT, message)
    return failed(ErrorCode.START_FAILED, f"the module could not be instantiated: {cause}")


def _memory_size(store: wasmtime.Store, instance: wasmtime.Instance) -> int | None:
    memory = instance.exports(store).get("memory")
    return memory.data_len(store) if isinstance(memory, wasmtime.Memory) else None


def _near_limit(memory_bytes: int, limit: int) -> bool:
    """Whether a failing guest's memory says that a `memory.grow` was refused.

    wasmtime does not report refused grows, so this is a heuristic: within one eighth of the
    limit (at least a page, at most 8 MiB) counts. wasi-libc's malloc grows in steps of
    about a megabyte or more, and a C program that fails malloc at a 64 MiB limit was seen
    stopping 2 MiB short of it. A single huge request far below the limit is not recognised
    and reports as a trap or an exit code.
    """
    slack = max(WASM_PAGE_BYTES, min(limit // 8, 8 << 20))
    return memory_bytes + slack > limit


def _split_trap(error: wasmtime.Trap | wasmtime.WasmtimeError) -> tuple[str, str]:
    """("wasm trap: ...", "backtrace: ...") from wasmtime's multi-line error text."""
    text = error.message if isinstance(error, wasmtime.Trap) else str(error)
    head, sep, cause = text.partition("Caused by:")
    if not sep:
        return " ".join(text.split()), ""
    frames = [line.strip() for line in head.splitlines()[1:11] if line.strip()]
    backtrace = "backtrace: " + "; ".join(frames) if frames else ""
    return " ".join(cause.split()), backtrace


# --- the epoch deadline callback ----------------------------------------------------------

#: runs whose stores may call back, by the id given to wasmtime as the callback's env
_RUNS: dict[int, GuestRun] = {}
#: the run on this worker thread (for poll_oneoff, a store-independent host function)
_CURRENT = threading.local()
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


def _watch_epoch(store: wasmtime.Store, run: GuestRun) -> None:
    _RUNS[run.run_id] = run
    ffi.wasmtime_store_epoch_deadline_callback(
        store.ptr(), _on_epoch_deadline, run.run_id, _on_store_dropped
    )
    store.set_epoch_deadline(1)


# --- WASI with an interruptible poll_oneoff -------------------------------------------------


def _wasi_linker(engine: wasmtime.Engine) -> wasmtime.Linker:
    linker = wasmtime.Linker(engine)
    linker.define_wasi()
    linker.allow_shadowing = True
    i32 = wasmtime.ValType.i32()
    poll_type = wasmtime.FuncType([i32] * 4, [i32])
    linker.define_func(WASI, "poll_oneoff", poll_type, _poll_oneoff, access_caller=True)
    return linker


def _poll_oneoff(caller: wasmtime.Caller, subs: int, events: int, count: int, out: int) -> int:
    """The host side of wasi_poll.answer_poll: guest memory in and out.

    A host function must never raise (wasmtime-py keeps the exception in a global shared by
    all threads), hence the catch-all.
    """
    try:
        run: GuestRun | None = getattr(_CURRENT, "run", None)
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


# --- compiling -------------------------------------------------------------------------------


def _compiler(
    engine: wasmtime.Engine, linker: wasmtime.Linker
) -> Compiler[wasmtime.Module, wasmtime.InstancePre]:
    def compile_module(data: bytes) -> wasmtime.Module:
        _check_header(data)
        try:
            module = wasmtime.Module(engine, data)
        except wasmtime.WasmtimeError as exc:
            cause = _split_trap(exc)[0]
            raise ArtifactError(f"the artifact fails to compile as WASM: {cause}") from exc
        _check_command(module)
        return module

    def deserialize(path: Path) -> wasmtime.Module | None:
        try:
            return wasmtime.Module.deserialize_file(engine, str(path))
        except wasmtime.WasmtimeError as exc:
            log.warning("recompiling: the cached module %s is unusable: %s", path, exc)
            return None

    def link(module: wasmtime.Module) -> wasmtime.InstancePre:
        try:
            return linker.instantiate_pre(module)
        except wasmtime.WasmtimeError as exc:
            raise ArtifactError(
                f"the module needs an import spear does not provide ({exc}); a WASI command"
                f" may import only {WASI} functions"
            ) from exc

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
            " command modules (wasm32-wasi)"
        )
    if data[:8] != WASM_MAGIC:
        raise ArtifactError(
            "the artifact is not a WASM module (it does not start with the \\0asm header);"
            " upload the binary, not WAT text"
        )


def _check_command(module: wasmtime.Module) -> None:
    for export in module.exports:
        if export.name == "_start":
            ty = export.type
            if isinstance(ty, wasmtime.FuncType) and not ty.params and not ty.results:
                return
            raise ArtifactError("the module's `_start` export is not a function of no arguments")
    raise ArtifactError(
        "the module is not a WASI command: it has no `_start` export"
        " (build it as an executable for wasm32-wasi, not a library or reactor)"
    )


def wat_to_wasm(text: str) -> bytes:
    """Compile WebAssembly text to a binary module.

    Raises:
        ArtifactError: the text is not valid WAT.
    """
    try:
        return bytes(wasmtime.wat2wasm(text))
    except wasmtime.WasmtimeError as exc:
        raise ArtifactError(f"not valid WebAssembly text: {exc}") from exc
