"""The WASM runtime: WASI command modules run per call in wasmtime (the only wasmtime importer).

A run is a fresh Store, a fresh WasiConfig and the module's `_start` (DESIGN.md section 5):
input on stdin (a temp file: WASI stdin is file-only), output and logs through byte-counting
callbacks, argv `[task name, *command]`, the task's env and nothing else (no preopened
directory, nothing inherited).

Limits and how they hold:
- time: the engine has epoch interruption; one ticker thread bumps the epoch every
  `epoch_tick_ms` while any guest runs. Every store's deadline is one tick ahead and its
  deadline callback decides at each tick whether the run goes on (deadline not reached, not
  cancelled, output within its limit) or traps. So a timeout, a cancel or an output overflow
  stops the guest within a tick, and the worker thread really ends.
- sleeping guests: `poll_oneoff` is spear's own (the stock one blocks the thread in the host
  where no epoch reaches it); it sleeps in an interruptible wait on the run's stop event.
- memory: `Store.set_limits(memory_size=...)`; `memory.grow` past it returns -1.
- fuel: when `runtimes.wasm.fuel > 0` every run gets that much fuel.

Compiled modules are cached on disk (`<cache_dir>/<key>.cwasm`, key = sha256 of the wasmtime
version, the engine settings and the module's sha256: another version or setting never reads
a stale artifact) and in memory (an LRU of InstancePre per module sha256). The cache
directory must be trusted: deserializing a file runs native code compiled into it.

Why a ticker thread and not a trio task: the epoch must advance in real time whatever the
event loop is doing (a busy gateway, a test's MockClock), and it is idle (blocked on a
condition) while no guest runs.
"""

from __future__ import annotations

import ctypes
import hashlib
import itertools
import json
import logging
import os
import platform
import shutil
import struct
import tempfile
import threading
import time
from collections import OrderedDict
from importlib.metadata import version as package_version
from pathlib import Path
from typing import Any, Final, cast

import trio
import wasmtime
from wasmtime import _ffi as ffi  # the epoch-deadline callback has no public binding

from spear.config import WasmConfig
from spear.errors import ArtifactError, RuntimeFailure, ValidationError
from spear.model import ErrorCode, ExecStatus, FunctionSpec, RunOutcome
from spear.runtimes.base import (
    PER_CALL,
    check_mode,
    effective_timeout_s,
    failed_outcome,
    timeout_outcome,
)
from spear.runtimes.capture import LogCapture, OutputCapture

log = logging.getLogger(__name__)

WASM_MAGIC: Final = b"\0asm\x01\x00\x00\x00"
COMPONENT_MAGIC: Final = b"\0asm\x0d\x00\x01\x00"
WASM_PAGE_BYTES: Final = 65536
#: bump when the cache file layout or the engine settings that matter change
CACHE_FORMAT: Final = 1
#: how long a cancelled run waits for its guest thread to notice (it needs one epoch tick)
STOP_GRACE_S: Final = 2.0
WASI: Final = "wasi_snapshot_preview1"


class WasmRuntime:
    """Runs WASI command modules per call (see the module docstring for the limits)."""

    name = "wasm"

    def __init__(
        self, config: WasmConfig, *, cache_dir: Path, memory_cache_entries: int = 128
    ) -> None:
        """Build the engine and start the (idle) epoch ticker.

        Args:
            config: the `[runtimes.wasm]` section.
            cache_dir: where compiled modules are cached (absolute; created if missing).
            memory_cache_entries: how many InstancePre to keep in memory.
        """
        self._config = config
        self._fuel = config.fuel
        engine_config = wasmtime.Config()
        engine_config.epoch_interruption = True
        engine_config.consume_fuel = config.fuel > 0
        engine_config.max_wasm_stack = config.max_wasm_stack_bytes
        self._engine = wasmtime.Engine(engine_config)
        self._linker = _wasi_linker(self._engine)
        self.version = package_version("wasmtime")
        settings = {
            "format": CACHE_FORMAT,
            "wasmtime": self.version,
            "machine": platform.machine(),
            "epoch_interruption": True,
            "consume_fuel": config.fuel > 0,
            "max_wasm_stack": config.max_wasm_stack_bytes,
        }
        self._modules = _ModuleCache(
            self._engine,
            self._linker,
            cache_dir=cache_dir,
            settings_key=json.dumps(settings, sort_keys=True),
            capacity=memory_cache_entries,
        )
        threads = config.max_threads or 4 * (os.cpu_count() or 1)
        self._limiter = trio.CapacityLimiter(threads)
        self._ticker = _EpochTicker(self._engine, config.epoch_tick_ms / 1000)
        shm = Path("/dev/shm")
        base = shm if shm.is_dir() and os.access(shm, os.W_OK) else None
        self._stdin_dir = Path(tempfile.mkdtemp(prefix="spear-wasm-stdin-", dir=base))
        self._runs = itertools.count(1)
        self._closed = False

    # --- the Runtime protocol -----------------------------------------------------------

    def describe(self) -> dict[str, Any]:
        return {
            "available": True,
            "version": f"wasmtime {self.version}",
            "modes": [PER_CALL],
            "fuel": self._fuel,
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
            return timeout_outcome(max(timeout_s, 0.0))
        run = _Run(spec, next(self._runs), timeout_s, started)
        slot = _ThreadSlot(self._limiter)
        with trio.move_on_after(timeout_s + STOP_GRACE_S):
            try:
                return await trio.to_thread.run_sync(
                    self._execute,
                    run,
                    data,
                    abandon_on_cancel=True,
                    limiter=cast(trio.CapacityLimiter, slot),
                )
            except trio.Cancelled:
                run.stop(ErrorCode.CANCELLED)
                if slot.acquired:
                    await slot.wait_released(spec.name)
                raise
        # Only reached when no guest thread was free in time (a running guest stops itself
        # at its deadline, well before this guard).
        return timeout_outcome(
            timeout_s,
            logs=b"[spear] no guest thread became free before the deadline"
            b" (runtimes.wasm.max_threads)\n",
        )

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(self._ticker.close)
        shutil.rmtree(self._stdin_dir, ignore_errors=True)

    def statistics(self) -> dict[str, Any]:
        limiter = self._limiter.statistics()
        return {
            **self._modules.statistics(),
            "running": limiter.borrowed_tokens,
            "waiting": limiter.tasks_waiting,
            "max_threads": limiter.total_tokens,
            "epoch_ticks": self._ticker.ticks,
        }

    # --- worker-thread side -------------------------------------------------------------

    def _load(self, spec: FunctionSpec) -> wasmtime.InstancePre:
        assert spec.artifact_sha256 is not None and spec.artifact_path is not None
        return self._modules.load(spec.artifact_sha256, path=spec.artifact_path)

    def _execute(self, run: _Run, data: bytes) -> RunOutcome:
        """One guest run, start to finish, in a worker thread."""
        spec = run.spec
        try:
            pre = self._modules.peek(run.sha256) or self._load(spec)
        except (ArtifactError, RuntimeFailure) as exc:
            return failed_outcome(ErrorCode.START_FAILED, str(exc))
        if run.should_stop():
            return run.stopped_outcome()
        store = wasmtime.Store(self._engine)
        try:
            store.set_limits(memory_size=spec.memory_limit_bytes)
            if self._fuel:
                store.set_fuel(self._fuel)
            _watch_epoch(store, run)
            store.set_wasi(self._wasi(run, data))
            self._ticker.enter()
            _CURRENT.run = run
            try:
                return self._start(run, store, pre)
            finally:
                _CURRENT.run = None
                self._ticker.exit()
        finally:
            _RUNS.pop(run.run_id, None)
            store.close()  # now, in this thread: a live store with callbacks must not linger

    def _wasi(self, run: _Run, data: bytes) -> wasmtime.WasiConfig:
        wasi = wasmtime.WasiConfig()
        wasi.argv = [run.spec.name, *run.spec.command]
        if run.spec.env:
            wasi.env = list(run.spec.env.items())
        if data:
            # wasmtime opens the file when it is set, so it can be unlinked at once.
            path = self._stdin_dir / str(run.run_id)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.close(fd)
                wasi.stdin_file = path
            finally:
                os.unlink(path)
        else:
            wasi.stdin_file = os.devnull
        wasi.stdout_custom = run.on_stdout
        wasi.stderr_custom = run.logs.write
        return wasi

    def _start(
        self, run: _Run, store: wasmtime.Store, pre: wasmtime.InstancePre
    ) -> RunOutcome:
        instance: wasmtime.Instance | None = None
        ready = time.perf_counter()
        try:
            instance = pre.instantiate(store)
            start = instance.exports(store)["_start"]
            assert isinstance(start, wasmtime.Func)
            ready = time.perf_counter()
            start(store)
            exit_code = 0
        except wasmtime.ExitTrap as exc:
            exit_code = exc.code
        except (wasmtime.Trap, wasmtime.WasmtimeError) as exc:
            return self._failure(run, store, instance, exc, ready)
        if run.stop_reason is not None:
            return run.stopped_outcome(ready)
        if exit_code != 0:
            return run.outcome(
                ExecStatus.FAILED,
                ready,
                error_code=ErrorCode.EXIT_NONZERO,
                error_message=f"the function exited with code {exit_code}",
                exit_code=exit_code,
            )
        return run.outcome(ExecStatus.SUCCEEDED, ready, exit_code=0)

    def _failure(
        self,
        run: _Run,
        store: wasmtime.Store,
        instance: wasmtime.Instance | None,
        exc: wasmtime.Trap | wasmtime.WasmtimeError,
        ready: float,
    ) -> RunOutcome:
        if run.stop_reason is not None:
            return run.stopped_outcome(ready)
        text = exc.message if isinstance(exc, wasmtime.Trap) else str(exc)
        cause, backtrace = _split_trap(text)
        limit = run.spec.memory_limit_bytes
        if instance is None:
            code = ErrorCode.MEMORY_LIMIT if "exceeds memory limits" in cause else None
            message = f"the module could not be instantiated: {cause}"
            if code is ErrorCode.MEMORY_LIMIT:
                message += f" (memory_limit_bytes = {limit})"
            return run.outcome(
                ExecStatus.FAILED,
                ready,
                error_code=code or ErrorCode.START_FAILED,
                error_message=message,
            )
        if backtrace:
            run.logs.note(f"wasm {backtrace}")
        trap_code = exc.trap_code if isinstance(exc, wasmtime.Trap) else None
        if trap_code == wasmtime.TrapCode.OUT_OF_FUEL:
            return run.outcome(
                ExecStatus.FAILED,
                ready,
                error_code=ErrorCode.FUEL_EXHAUSTED,
                error_message=f"the function used all its fuel (runtimes.wasm.fuel = {self._fuel})",
            )
        used = _memory_at_limit(store, instance, limit)
        if used is not None:
            return run.outcome(
                ExecStatus.FAILED,
                ready,
                error_code=ErrorCode.MEMORY_LIMIT,
                error_message=f"the function failed with its memory at {used} bytes of its"
                f" memory_limit_bytes ({limit}): {cause}",
            )
        return run.outcome(
            ExecStatus.FAILED, ready, error_code=ErrorCode.TRAP, error_message=cause
        )


# --- one run's state --------------------------------------------------------------------


class _Run:
    """One guest run, shared by its trio task, its worker thread and wasmtime's callbacks."""

    __slots__ = (
        "deadline",
        "logs",
        "output",
        "run_id",
        "sha256",
        "spec",
        "started",
        "stop_event",
        "stop_reason",
        "timeout_s",
    )

    def __init__(self, spec: FunctionSpec, run_id: int, timeout_s: float, started: float):
        assert spec.artifact_sha256 is not None
        self.spec = spec
        self.sha256 = spec.artifact_sha256
        self.run_id = run_id
        self.timeout_s = timeout_s
        self.started = started
        self.deadline = time.monotonic() + timeout_s
        self.output = OutputCapture(spec.max_output_bytes)
        self.logs = LogCapture(spec.max_log_bytes)
        self.stop_reason: ErrorCode | None = None
        self.stop_event: threading.Event | None = None

    def stop(self, reason: ErrorCode) -> None:
        """Ask the guest to stop (any thread); it traps at its next epoch check."""
        if self.stop_reason is None:
            self.stop_reason = reason
        if self.stop_event is not None:
            self.stop_event.set()

    def should_stop(self) -> bool:
        if self.stop_reason is None and time.monotonic() >= self.deadline:
            self.stop_reason = ErrorCode.TIMEOUT
        return self.stop_reason is not None

    def sleep(self, seconds: float) -> bool:
        """Sleep for a guest (poll_oneoff); False if the run was stopped meanwhile."""
        if self.stop_event is None:
            self.stop_event = threading.Event()
        if self.stop_reason is None:
            self.stop_event.wait(max(0.0, min(seconds, self.deadline - time.monotonic())))
        return not self.should_stop()

    def on_stdout(self, data: bytes) -> None:
        # Past the limit the bytes are dropped and the guest is stopped at the next tick.
        if not self.output.write(data) and self.stop_reason is None:
            self.stop_reason = ErrorCode.OUTPUT_LIMIT

    def outcome(self, status: ExecStatus, ready: float, **fields: Any) -> RunOutcome:
        done = time.perf_counter()
        return RunOutcome(
            status=status,
            output=self.output.getvalue(),
            logs=self.logs.getvalue(),
            cold=True,
            timings_ms={
                "acquire": (ready - self.started) * 1000,
                "run": (done - ready) * 1000,
            },
            **fields,
        )

    def stopped_outcome(self, ready: float | None = None) -> RunOutcome:
        ready = time.perf_counter() if ready is None else ready
        reason = self.stop_reason
        if reason is ErrorCode.TIMEOUT:
            base = timeout_outcome(self.timeout_s)
            return self.outcome(
                base.status, ready, error_code=base.error_code, error_message=base.error_message
            )
        if reason is ErrorCode.OUTPUT_LIMIT:
            return self.outcome(
                ExecStatus.FAILED,
                ready,
                error_code=ErrorCode.OUTPUT_LIMIT,
                error_message="the function wrote more than runtimes.max_output_bytes"
                f" ({self.output.limit}) to stdout and was stopped",
            )
        return self.outcome(
            ExecStatus.CANCELLED,
            ready,
            error_code=ErrorCode.CANCELLED,
            error_message="the execution was cancelled",
        )


class _ThreadSlot:
    """The CapacityLimiter-like object trio sees for one run.

    trio calls `acquire_on_behalf_of` right before it starts the thread and
    `release_on_behalf_of` once the thread has finished, even an abandoned one; so `acquired`
    says whether a thread exists, and `wait_released` waits for it to be gone.
    """

    __slots__ = ("_event", "_limiter", "acquired", "released")

    def __init__(self, limiter: trio.CapacityLimiter) -> None:
        self._limiter = limiter
        self._event: trio.Event | None = None
        self.acquired = False
        self.released = False

    async def acquire_on_behalf_of(self, borrower: object) -> None:
        await self._limiter.acquire_on_behalf_of(borrower)
        self.acquired = True

    def release_on_behalf_of(self, borrower: object) -> None:
        self._limiter.release_on_behalf_of(borrower)
        self.released = True
        if self._event is not None:
            self._event.set()

    async def wait_released(self, name: str) -> None:
        """Wait (shielded, bounded) for the thread to finish."""
        if self.released:
            return
        self._event = trio.Event()
        with trio.move_on_after(STOP_GRACE_S) as scope:
            scope.shield = True
            await self._event.wait()
        if scope.cancelled_caught:
            log.warning("a stopped wasm guest of %s is still running after %s s", name, STOP_GRACE_S)


# --- epoch ticker and deadline callback -------------------------------------------------


class _EpochTicker:
    """Advances the engine epoch every tick while at least one guest runs."""

    def __init__(self, engine: wasmtime.Engine, tick_s: float) -> None:
        self._engine = engine
        self._tick_s = tick_s
        self._cond = threading.Condition()
        self._active = 0
        self._idle = False
        self._closed = False
        self.ticks = 0
        self._thread = threading.Thread(target=self._main, name="spear-wasm-epoch", daemon=True)
        self._thread.start()

    def enter(self) -> None:
        with self._cond:
            self._active += 1
            if self._idle:
                self._cond.notify()

    def exit(self) -> None:
        with self._cond:
            self._active -= 1

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join()

    def _main(self) -> None:
        with self._cond:
            while not self._closed:
                if self._active == 0:
                    self._idle = True
                    self._cond.wait()
                    self._idle = False
                    continue
                # Only close() notifies a ticking thread, so every wake-up here is a tick.
                self._cond.wait(self._tick_s)
                self._engine.increment_epoch()
                self.ticks += 1


_DeadlineCallback = ctypes.CFUNCTYPE(
    ctypes.c_size_t,
    ctypes.POINTER(ffi.wasmtime_context_t),
    ctypes.c_void_p,
    ctypes.POINTER(ctypes.c_uint64),
    ctypes.POINTER(ffi.wasmtime_update_deadline_kind_t),
)
_Finalizer = ctypes.CFUNCTYPE(None, ctypes.c_void_p)
#: runs whose stores may call back, by the id handed to wasmtime as the callback's env
_RUNS: dict[int, _Run] = {}
_CURRENT = threading.local()
_UPDATE_DEADLINE_CONTINUE: Final = 0


def _epoch_deadline(
    context: Any, env: int | None, delta: Any, kind: Any
) -> int:  # pragma: no cover - exercised through wasmtime
    """Called by wasmtime at each tick of a running store: go on one more tick, or trap."""
    run = _RUNS.get(env or 0)
    if run is None or run.should_stop():
        error = ffi.wasmtime_error_new(b"spear stopped the guest")
        return cast(int, ctypes.cast(error, ctypes.c_void_p).value)
    delta[0] = 1
    kind[0] = _UPDATE_DEADLINE_CONTINUE
    return 0


def _forget_run(env: int | None) -> None:  # pragma: no cover - exercised through wasmtime
    _RUNS.pop(env or 0, None)


_ON_DEADLINE = _DeadlineCallback(_epoch_deadline)
_ON_FINALIZE = _Finalizer(_forget_run)


def _watch_epoch(store: wasmtime.Store, run: _Run) -> None:
    _RUNS[run.run_id] = run
    ffi.wasmtime_store_epoch_deadline_callback(store.ptr(), _ON_DEADLINE, run.run_id, _ON_FINALIZE)
    store.set_epoch_deadline(1)


# --- WASI linker with an interruptible poll_oneoff --------------------------------------

_SUBSCRIPTION = struct.Struct("<QB7xI4xQQH6x")  # userdata, tag, clock id | fd, timeout, ..
_EVENT = struct.Struct("<QHB5xQH6x")  # userdata, errno, type, nbytes, flags
_EVENT_COUNT = struct.Struct("<I")
_TAG_CLOCK, _TAG_FD_READ, _TAG_FD_WRITE = 0, 1, 2
_CLOCK_REALTIME = 0
_ABSTIME = 1
_ERRNO_FAULT, _ERRNO_INTR, _ERRNO_INVAL, _ERRNO_NOTSUP = 21, 27, 28, 58
_U32 = 0xFFFFFFFF


def _wasi_linker(engine: wasmtime.Engine) -> wasmtime.Linker:
    linker = wasmtime.Linker(engine)
    linker.define_wasi()
    linker.allow_shadowing = True
    i32 = wasmtime.ValType.i32()
    linker.define_func(
        WASI, "poll_oneoff", wasmtime.FuncType([i32] * 4, [i32]), _poll_oneoff, access_caller=True
    )
    return linker


def _poll_oneoff(caller: wasmtime.Caller, subs: int, events: int, count: int, out: int) -> int:
    """WASI poll_oneoff whose clock waits end when the run is stopped.

    stdin is a file and stdout/stderr are spear's callbacks, so fd subscriptions are always
    ready. A host function must never raise (wasmtime-py keeps the exception in a global
    shared by all threads), hence the catch-all.
    """
    try:
        return _poll(caller, subs & _U32, events & _U32, count & _U32, out & _U32)
    except Exception:  # pragma: no cover - a bug in _poll, reported to the guest
        log.exception("poll_oneoff failed")
        return _ERRNO_INVAL


def _poll(caller: wasmtime.Caller, subs: int, events: int, count: int, out: int) -> int:
    run: _Run | None = getattr(_CURRENT, "run", None)
    memory = caller.get("memory")
    if run is None or not isinstance(memory, wasmtime.Memory):
        return _ERRNO_NOTSUP
    if count == 0:
        return _ERRNO_INVAL
    size = memory.data_len(caller)
    end_subs = subs + _SUBSCRIPTION.size * count
    if end_subs > size or events + _EVENT.size * count > size or out + 4 > size:
        return _ERRNO_FAULT
    raw = memory.read(caller, subs, end_subs)
    entries = [_SUBSCRIPTION.unpack_from(raw, i * _SUBSCRIPTION.size) for i in range(count)]
    ready = [(user, tag) for user, tag, *_ in entries if tag in (_TAG_FD_READ, _TAG_FD_WRITE)]
    if not ready:
        waits: list[tuple[int, int]] = []
        for user, tag, clock, timeout, _precision, flags in entries:
            if tag != _TAG_CLOCK:
                return _ERRNO_INVAL
            if flags & _ABSTIME:
                if clock != _CLOCK_REALTIME:
                    return _ERRNO_NOTSUP
                timeout = max(0, timeout - time.time_ns())
            waits.append((timeout, user))
        wait_ns = min(ns for ns, _ in waits)
        if not run.sleep(wait_ns / 1e9):
            return _ERRNO_INTR
        ready = [(user, _TAG_CLOCK) for ns, user in waits if ns <= wait_ns]
    body = b"".join(_EVENT.pack(user, 0, tag, 0, 0) for user, tag in ready)
    memory.write(caller, body, events)
    memory.write(caller, _EVENT_COUNT.pack(len(ready)), out)
    return 0


# --- compiled modules -------------------------------------------------------------------


class _ModuleCache:
    """InstancePre per module sha256: an in-memory LRU over an on-disk cache of compiled code.

    Used from worker threads, hence the lock (held only for dict updates, never while
    compiling: two threads may compile the same module at once; the second result wins).
    """

    def __init__(
        self,
        engine: wasmtime.Engine,
        linker: wasmtime.Linker,
        *,
        cache_dir: Path,
        settings_key: str,
        capacity: int,
    ) -> None:
        self._engine = engine
        self._linker = linker
        self._dir = cache_dir
        self._settings_key = settings_key
        self._capacity = capacity
        self._lru: OrderedDict[str, wasmtime.InstancePre] = OrderedDict()
        self._lock = threading.Lock()
        self._stats = {"memory_hits": 0, "disk_hits": 0, "compiles": 0, "disk_errors": 0}
        try:
            cache_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            log.warning("runtimes.wasm.cache_dir %s is unusable (%s): no disk cache", cache_dir, exc)

    def statistics(self) -> dict[str, int]:
        with self._lock:
            return {**self._stats, "memory_entries": len(self._lru)}

    def peek(self, sha256: str) -> wasmtime.InstancePre | None:
        with self._lock:
            pre = self._lru.get(sha256)
            if pre is not None:
                self._lru.move_to_end(sha256)
                self._stats["memory_hits"] += 1
            return pre

    def load(
        self, sha256: str, *, data: bytes | None = None, path: Path | None = None
    ) -> wasmtime.InstancePre:
        """The module's InstancePre from memory, disk or a fresh compile (blocking).

        Raises:
            ArtifactError: the bytes are not a WASI command module spear can run.
            RuntimeFailure: the artifact file cannot be read.
        """
        pre = self.peek(sha256)
        if pre is not None:
            return pre
        cached = self._dir / f"{hashlib.sha256(f'{self._settings_key}|{sha256}'.encode()).hexdigest()}.cwasm"
        module = self._deserialize(cached)
        if module is None:
            module = self._compile(_read_artifact(path) if data is None else data)
            self._store(cached, module)
        pre = _instance_pre(self._linker, module)
        with self._lock:
            self._lru[sha256] = pre
            while len(self._lru) > self._capacity:
                self._lru.popitem(last=False)
        return pre

    def _deserialize(self, cached: Path) -> wasmtime.Module | None:
        try:
            module = wasmtime.Module.deserialize_file(self._engine, str(cached))
        except FileNotFoundError:
            return None
        except wasmtime.WasmtimeError as exc:
            if not cached.exists():
                return None
            log.warning("discarding unusable compiled module %s: %s", cached, exc)
            self._count("disk_errors")
            return None
        self._count("disk_hits")
        return module

    def _compile(self, data: bytes) -> wasmtime.Module:
        _check_header(data)
        try:
            module = wasmtime.Module(self._engine, data)
        except wasmtime.WasmtimeError as exc:
            raise ArtifactError(
                f"the artifact fails to compile as WASM: {_split_trap(str(exc))[0]}"
            ) from exc
        _check_command(module)
        self._count("compiles")
        return module

    def _store(self, cached: Path, module: wasmtime.Module) -> None:
        try:
            with tempfile.NamedTemporaryFile(dir=self._dir, suffix=".tmp", delete=False) as fh:
                fh.write(module.serialize())
            os.replace(fh.name, cached)
        except OSError as exc:
            log.warning("cannot write compiled module to %s: %s", cached, exc)

    def _count(self, key: str) -> None:
        with self._lock:
            self._stats[key] += 1


def _read_artifact(path: Path | None) -> bytes:
    if path is None:
        raise RuntimeFailure("the wasm task has no artifact path")
    try:
        return path.read_bytes()
    except OSError as exc:
        raise RuntimeFailure(f"cannot read artifact {path}: {exc.strerror}") from exc


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


def _instance_pre(linker: wasmtime.Linker, module: wasmtime.Module) -> wasmtime.InstancePre:
    try:
        return linker.instantiate_pre(module)
    except wasmtime.WasmtimeError as exc:
        raise ArtifactError(
            f"the module needs an import spear does not provide ({exc}); a WASI command may"
            f" import only {WASI} functions"
        ) from exc


# --- classifying failures ---------------------------------------------------------------


def _split_trap(text: str) -> tuple[str, str]:
    """("wasm trap: ...", "backtrace: ...") from wasmtime's multi-line error text."""
    head, sep, cause = text.partition("Caused by:")
    if not sep:
        return " ".join(text.split()), ""
    frames = [line.strip() for line in head.splitlines()[1:11] if line.strip()]
    backtrace = "backtrace: " + "; ".join(frames) if frames else ""
    return " ".join(cause.split()), backtrace


def _memory_at_limit(
    store: wasmtime.Store, instance: wasmtime.Instance, limit: int
) -> int | None:
    """The guest's memory size if it failed with its memory (nearly) at the limit.

    wasmtime does not say that a `memory.grow` was refused, so this is a heuristic: a guest
    that fails while less than one slack (a page, up to 1 MiB or an eighth of the limit)
    below its limit most likely failed to grow. A single huge request far from the limit is
    not recognised and reports as a trap or an exit code.
    """
    memory = instance.exports(store).get("memory")
    if not isinstance(memory, wasmtime.Memory):
        return None
    used = memory.data_len(store)
    slack = max(WASM_PAGE_BYTES, min(1 << 20, limit // 8))
    return used if used + slack > limit else None
