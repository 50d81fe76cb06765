"""Warm WASM worker instances: one reactor module kept instantiated, called through memory.

The reactor ABI (mode `worker` on runtime `wasm`; docs/runtimes.md has the guide):

- exports `memory`, `spear_alloc(len: i32) -> i32` and `spear_handle(ptr: i32, len: i32) ->
  i64`, optionally `_initialize` (called once, when the instance starts);
- per invocation spear calls `spear_alloc(len)` for the input (skipped for empty input, then
  `ptr = len = 0`), copies the input there, and calls `spear_handle(ptr, len)`; the input
  buffer belongs to the guest from then on;
- `spear_handle` returns `(out_len << 32) | out_ptr` on success; spear copies the output out
  before any other call into the instance, so the guest may reuse that buffer next time. A
  negative result is a failure the guest reports itself (`exit_nonzero`, exit code
  `-result`); the instance stays healthy;
- WASI works as in per-call mode, but stdin is empty and both stdout and stderr go to the
  invocation's logs.

One Store and Instance are kept warm; a wasm instance is single-threaded, so an instance
serves one call at a time (`pool.max_concurrency` must be 1). Limits per invocation: the
epoch deadline (the call's timeout; cancel), fuel (refilled to `runtimes.wasm.fuel` per
call), the output limit (checked on the returned length). The memory limit is the store's
and holds across calls. A guest stopped mid-call (trap, timeout, cancel, fuel, an invalid
pointer) leaves its memory in an unknown state: the instance turns unhealthy and the pool
replaces it.

Short calls (and starts) run on the event loop's thread within the inline budget
(wasm_inline.py); a call past it is stopped, the instance instantiated afresh (its state is
lost, as if the pool had replaced it) and the call run again from the start in a worker
thread. That is safe for the same reason as in per-call mode: a guest has no effect outside
its own memory. An open instance keeps the epoch ticker running (see `_started_or_closed`).
"""

from __future__ import annotations

import ctypes
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from functools import partial
from typing import Final

import trio
import wasmtime

from spear.errors import ArtifactError, RuntimeFailure
from spear.model import ErrorCode, FunctionSpec, RunOutcome
from spear.runtimes.base import effective_timeout_s
from spear.runtimes.guest import GuestRun
from spear.runtimes.outcomes import (
    CANCELLED,
    SUCCEEDED,
    Verdict,
    early_outcome,
    failed,
    timed_out,
)
from spear.runtimes.threads import EpochTicker, run_stoppable
from spear.runtimes.wasm_engine import (
    ALLOC_EXPORT,
    CURRENT,
    HANDLE_EXPORT,
    LoadedModule,
    ModuleKind,
    RawFunc,
    arm,
    classify_failure,
    forget,
    instantiation_failed,
    near_limit,
    split_trap,
    watch_epoch,
)
from spear.runtimes.wasm_inline import InlinePolicy, InlineRun

#: how long a cancelled call waits for its guest thread to notice (it needs one epoch tick)
STOP_GRACE_S: Final = 2.0
_Error = wasmtime.Trap | wasmtime.WasmtimeError
_ERRORS: Final = (wasmtime.Trap, wasmtime.WasmtimeError)


@dataclass(frozen=True, slots=True, kw_only=True)
class ReactorHost:
    """What the WasmRuntime shares with its reactor instances."""

    engine: wasmtime.Engine
    fuel: int
    ticker: EpochTicker
    limiter: trio.CapacityLimiter
    inline: InlinePolicy
    run_ids: Iterator[int]


async def open_reactor(host: ReactorHost, spec: FunctionSpec, loaded: LoadedModule) -> Reactor:
    """Instantiate `loaded` (a reactor) and run its `_initialize`, within the task's timeout.

    Raises:
        ArtifactError: the module is not a reactor.
        RuntimeFailure: instantiation or `_initialize` failed (a trap, the memory limit,
            the timeout).
    """
    if loaded.kind is not ModuleKind.REACTOR:
        raise ArtifactError("a worker instance on runtime 'wasm' needs a reactor module")
    reactor = Reactor(host, spec, loaded)
    started = time.perf_counter()
    # like a call: inline within the budget first (instantiating takes ~0.1 ms); a slow
    # start has strikes of its own, so that it does not send short calls to threads
    boot_key = f"{spec.artifact_sha256}:start"
    budget_s = host.inline.budget_s(boot_key, spec.timeout_s)
    if budget_s > 0:
        inline = InlineRun(spec, next(host.run_ids), budget_s, spec.timeout_s, started)
        with reactor._mutex:
            verdict = reactor._boot(inline)
        host.inline.record(boot_key, overran=inline.overran)
        if not inline.overran:
            return await _started_or_closed(reactor, verdict)
    timeout_s = spec.timeout_s - (time.perf_counter() - started)
    run = GuestRun(spec, next(host.run_ids), timeout_s, started)
    try:
        verdict = await reactor._in_thread(run, partial(reactor._boot, run))
    except trio.TooSlowError:
        verdict = timed_out(spec.timeout_s)
    except BaseException:
        with trio.CancelScope(shield=True):
            await reactor.aclose()
        raise
    return await _started_or_closed(reactor, verdict)


async def _started_or_closed(reactor: Reactor, verdict: Verdict) -> Reactor:
    if verdict is not SUCCEEDED:
        await reactor.aclose()
        name = reactor._spec.name
        raise RuntimeFailure(f"the reactor of task {name!r} did not start: {verdict.message}")
    # A warm instance keeps the epoch ticking: otherwise each call that comes more than a
    # tick after the last wakes the idle ticker thread, and that wake-up and its GIL
    # hand-off cost more than the call (measured at the gateway under load: 0.7-2.8 ms a
    # call, against 0.3-0.4 ms with the ticker running). A tick costs microseconds.
    reactor._host.ticker.enter()
    reactor._holds_ticker = True
    return reactor


class Reactor:
    """One warm reactor instance (the `Instance` protocol of spear.runtimes.base)."""

    def __init__(self, host: ReactorHost, spec: FunctionSpec, loaded: LoadedModule) -> None:
        self._host = host
        self._spec = spec
        self._loaded = loaded
        #: the key of this instance's stores in the epoch callback's table
        self._key = next(host.run_ids)
        self._store: wasmtime.Store | None = None
        self._memory: wasmtime.Memory | None = None
        self._alloc: RawFunc | None = None
        self._handle: RawFunc | None = None
        #: held by whichever thread is inside the store (a Store is not thread-safe)
        self._mutex = threading.Lock()
        #: the run of the worker-thread job under way, if any (aclose stops it)
        self._thread_run: GuestRun | None = None
        self._busy = False
        self._healthy = False
        self._closed = False
        self._holds_ticker = False
        self.calls = 0

    @property
    def healthy(self) -> bool:
        return self._healthy and not self._closed

    async def invoke(self, data: bytes, *, deadline: float, execution_id: str) -> RunOutcome:
        """Serve one call; see the module docstring for what each failure does.

        Raises:
            trio.BusyResourceError: a call is already in progress (max_concurrency is 1).
        """
        started = time.perf_counter()
        if self._busy:
            raise trio.BusyResourceError("a wasm worker instance serves one call at a time")
        timeout_s = effective_timeout_s(self._spec, deadline)
        if not self.healthy:
            message = "the worker instance is closed or unhealthy and cannot serve"
            return replace(early_outcome(failed(ErrorCode.START_FAILED, message)), cold=False)
        if timeout_s <= 0:
            return replace(early_outcome(timed_out(max(timeout_s, 0.0))), cold=False)
        self._busy = True
        try:
            return await self._serve(data, deadline, timeout_s, started)
        finally:
            self._busy = False

    async def _serve(
        self, data: bytes, deadline: float, timeout_s: float, started: float
    ) -> RunOutcome:
        self.calls += 1
        sha = self._spec.artifact_sha256
        budget_s = self._host.inline.budget_s(sha, timeout_s)
        fresh = False
        if budget_s > 0:
            inline = InlineRun(self._spec, next(self._host.run_ids), budget_s, timeout_s, started)
            with self._mutex:
                verdict = self._call(inline, data)
            self._host.inline.record(sha, overran=inline.overran)
            if not inline.overran:
                return _warm_outcome(inline, verdict)
            fresh = True  # the stopped guest's memory is in an unknown state
            spent_s = time.perf_counter() - started
            timeout_s = min(effective_timeout_s(self._spec, deadline), timeout_s - spent_s)
        run = GuestRun(self._spec, next(self._host.run_ids), timeout_s, started)
        try:
            verdict = await self._in_thread(run, partial(self._call_again, run, data, fresh))
        except trio.TooSlowError:
            why = "no guest thread was free before the deadline (runtimes.wasm.max_threads)"
            return replace(early_outcome(timed_out(timeout_s), why), cold=False)
        return _warm_outcome(run, verdict)

    async def aclose(self) -> None:
        """Drop the Store (after a running guest stopped, at most STOP_GRACE_S later)."""
        if self._closed:
            return
        self._closed = True
        if self._holds_ticker:
            self._holds_ticker = False
            self._host.ticker.exit()
        if self._mutex.acquire(blocking=False):
            try:
                self._drop_store()
            finally:
                self._mutex.release()
            return
        if self._thread_run is not None:
            self._thread_run.stop(ErrorCode.CANCELLED)
        with trio.move_on_after(STOP_GRACE_S) as scope:
            scope.shield = True
            # abandoned on timeout: the thread still drops the store once the guest stops
            await trio.to_thread.run_sync(self._drop_when_free, abandon_on_cancel=True)

    # --- the guest's side (the loop's thread inline, else a worker thread) ----------------

    async def _in_thread(self, run: GuestRun, fn: Callable[[], Verdict]) -> Verdict:
        def locked() -> Verdict:
            # set before taking the mutex: whoever finds the mutex taken can stop this run
            self._thread_run = run
            try:
                with self._mutex:
                    if self._closed or run.should_stop():  # closed or cancelled meanwhile
                        return run.stop_verdict() or CANCELLED
                    try:
                        return fn()
                    finally:
                        self._drop_if_closed()  # aclose found the store in use
            finally:
                self._thread_run = None

        return await run_stoppable(
            locked,
            limiter=self._host.limiter,
            acquire_timeout_s=run.timeout_s,
            stop=partial(run.stop, ErrorCode.CANCELLED),
            grace_s=STOP_GRACE_S,
            name=self._spec.name,
        )

    def _call_again(self, run: GuestRun, data: bytes, fresh: bool) -> Verdict:
        if fresh:
            verdict = self._boot(run)
            if verdict is not SUCCEEDED:
                return verdict
        return self._call(run, data)

    def _boot(self, run: GuestRun) -> Verdict:
        """A new Store and Instance, `_initialize` run; healthy once it succeeds."""
        self._drop_store()
        self._healthy = False
        store = self._store = wasmtime.Store(self._host.engine)
        store.set_limits(memory_size=self._spec.memory_limit_bytes)
        store.set_wasi(self._wasi())
        if self._host.fuel:
            store.set_fuel(self._host.fuel)
        watch_epoch(store, self._key, run)
        with self._guest(run):
            try:
                instance = self._loaded.pre.instantiate(store)
            except _ERRORS as exc:
                return run.stop_verdict() or instantiation_failed(run, split_trap(exc)[0])
            exports = instance.exports(store)
            init = exports.get("_initialize")
            error = _call_quietly(store, init) if isinstance(init, wasmtime.Func) else None
        memory, alloc, handle = (exports[name] for name in ("memory", ALLOC_EXPORT, HANDLE_EXPORT))
        assert isinstance(memory, wasmtime.Memory)
        assert isinstance(alloc, wasmtime.Func) and isinstance(handle, wasmtime.Func)
        self._memory = memory
        self._alloc = RawFunc(store, alloc)
        self._handle = RawFunc(store, handle)
        if error is not None or run.should_stop():
            return self._stopped(run, error)
        self._healthy = True
        return SUCCEEDED

    def _call(self, run: GuestRun, data: bytes) -> Verdict:
        """One call into the warm instance: input in, handler, output out."""
        store, memory = self._store, self._memory
        assert store is not None and memory is not None
        assert self._alloc is not None and self._handle is not None
        if self._host.fuel:
            store.set_fuel(self._host.fuel)
        arm(store, self._key, run)
        with self._guest(run):
            try:
                ptr = self._alloc.i32(len(data)) & 0xFFFFFFFF if data else 0
                if data:
                    if ptr == 0 or ptr + len(data) > memory.data_len(store):
                        return self._no_room(run, len(data), ptr)
                    ctypes.memmove(_address(store, memory) + ptr, data, len(data))
                packed = self._handle.i64(ptr, len(data))
            except _ERRORS as exc:
                return self._stopped(run, exc)
        stopped = run.stop_verdict()  # cancelled meanwhile, or past a limit the guest survived
        if stopped is not None:
            return stopped
        return self._take_output(run, packed)

    def _take_output(self, run: GuestRun, packed: int) -> Verdict:
        if packed < 0:
            message = f"the function's {HANDLE_EXPORT} reported failure {-packed}"
            return failed(ErrorCode.EXIT_NONZERO, message, -packed)
        store, memory = self._store, self._memory
        assert store is not None and memory is not None
        out_ptr, out_len = packed & 0xFFFFFFFF, packed >> 32
        if out_ptr + out_len > memory.data_len(store):
            self._healthy = False
            message = (
                f"the function's {HANDLE_EXPORT} returned output at {out_ptr} of {out_len}"
                f" bytes, past the end of its memory ({memory.data_len(store)} bytes)"
            )
            return failed(ErrorCode.TRAP, message)
        limit = run.output.limit
        run.output.write(
            ctypes.string_at(_address(store, memory) + out_ptr, min(out_len, limit + 1))
        )
        if run.output.overflowed:
            message = (
                f"the function returned {out_len} bytes, more than runtimes.max_output_bytes"
                f" ({limit})"
            )
            return failed(ErrorCode.OUTPUT_LIMIT, message)
        return SUCCEEDED

    def _stopped(self, run: GuestRun, error: _Error | None) -> Verdict:
        """A guest that trapped (or was stopped by spear): the instance is done for."""
        self._healthy = False
        stopped = run.stop_verdict()
        if stopped is not None:
            return stopped
        if isinstance(error, wasmtime.ExitTrap):
            message = f"the reactor called proc_exit({error.code})"
            return failed(ErrorCode.EXIT_NONZERO, message, error.code)
        assert self._store is not None and self._memory is not None
        size = self._memory.data_len(self._store)
        return classify_failure(run, size, error, 0, self._host.fuel)

    def _no_room(self, run: GuestRun, size: int, ptr: int) -> Verdict:
        self._healthy = False
        assert self._store is not None and self._memory is not None
        memory_bytes = self._memory.data_len(self._store)
        message = f"{ALLOC_EXPORT}({size}) returned {ptr}, not room for the input"
        if near_limit(memory_bytes, self._spec.memory_limit_bytes):
            limit = self._spec.memory_limit_bytes
            return failed(
                ErrorCode.MEMORY_LIMIT, f"{message}: memory at {memory_bytes} of {limit} bytes"
            )
        return failed(ErrorCode.TRAP, message)

    def _guest(self, run: GuestRun) -> _GuestScope:
        return _GuestScope(self, run)

    def _wasi(self) -> wasmtime.WasiConfig:
        wasi = wasmtime.WasiConfig()
        wasi.argv = [self._spec.name, *self._spec.command]
        if self._spec.env:
            wasi.env = list(self._spec.env.items())
        return wasi  # stdio: wasm_engine's fd_read and fd_write, through the run

    def _drop_store(self) -> None:
        if self._store is not None:
            forget(self._key)
            self._store.close()  # now: a store with Python callbacks must not linger
            self._store = None
            self._memory = None
            self._alloc = self._handle = None

    def _drop_if_closed(self) -> None:
        if self._closed:
            self._drop_store()

    def _drop_when_free(self) -> None:
        with self._mutex:
            self._drop_store()


class _GuestScope:
    """While a guest runs on this thread: the epoch ticks, and host callbacks find its run."""

    __slots__ = ("_reactor", "_run")

    def __init__(self, reactor: Reactor, run: GuestRun) -> None:
        self._reactor = reactor
        self._run = run

    def __enter__(self) -> None:
        self._run.ready = time.perf_counter()
        self._run.stdout_to_logs = True
        self._reactor._host.ticker.enter()
        CURRENT.run = self._run

    def __exit__(self, *exc: object) -> None:
        CURRENT.run = None
        self._reactor._host.ticker.exit()


def _call_quietly(store: wasmtime.Store, func: wasmtime.Func) -> _Error | None:
    try:
        func(store)
    except _ERRORS as exc:
        return exc
    return None


def _address(store: wasmtime.Store, memory: wasmtime.Memory) -> int:
    """The host address of the memory's first byte (valid until the memory grows)."""
    return ctypes.addressof(memory.data_ptr(store).contents)


def _warm_outcome(run: GuestRun, verdict: Verdict) -> RunOutcome:
    """GuestRun.outcome, but warm (built once: this is on every invocation's path)."""
    done = time.perf_counter()
    return RunOutcome(
        status=verdict.status,
        output=run.output.getvalue(),
        logs=run.logs.getvalue(),
        error_code=verdict.error_code,
        error_message=verdict.message,
        exit_code=verdict.exit_code,
        cold=False,
        timings_ms={"acquire": (run.ready - run.started) * 1000, "run": (done - run.ready) * 1000},
    )
