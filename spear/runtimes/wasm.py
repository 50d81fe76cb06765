"""The WASM runtime: WASI commands per call, reactors as warm workers (wasmtime).

Mode per-call runs a WASI command module; mode worker keeps a reactor module warm (see
wasm_reactor.py for its ABI). wasm.py, wasm_engine.py and wasm_reactor.py are the only
modules that import wasmtime.

A per-call run is a fresh Store, a fresh WasiConfig and the module's `_start` (DESIGN.md
section 5): the input on stdin and the output and logs on stdout and stderr, all three served
from host memory by spear's own `fd_read` and `fd_write` (wasm_engine.py: wasmtime's file and
stream stdio hands every read and write to its I/O threads), argv `[task name, *command]`,
the task's env and nothing else (no preopened directory, nothing inherited).

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
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import logging
import os
import platform
import time
import weakref
from functools import partial
from importlib.metadata import version as package_version
from pathlib import Path
from typing import Any, Final

import trio
import wasmtime

from spear.config import WasmConfig
from spear.errors import ArtifactError, RuntimeFailure, ValidationError
from spear.model import ErrorCode, FunctionSpec, RunOutcome
from spear.runtimes.base import PER_CALL, WORKER, Instance, check_mode, effective_timeout_s
from spear.runtimes.compile_cache import CompileCache
from spear.runtimes.guest import GuestRun
from spear.runtimes.outcomes import SUCCEEDED, Verdict, early_outcome, failed, timed_out
from spear.runtimes.threads import EpochTicker, run_stoppable
from spear.runtimes.wasm_engine import (
    CURRENT,
    WASM_PAGE_BYTES,
    LoadedModule,
    ModuleKind,
    classify_failure,
    compiler,
    forget,
    instantiation_failed,
    memory_size,
    split_trap,
    wasi_linker,
    wat_to_wasm,
    watch_epoch,
)
from spear.runtimes.wasm_inline import INLINE_STRIKES, InlinePolicy, InlineRun
from spear.runtimes.wasm_reactor import STOP_GRACE_S, Reactor, ReactorHost, open_reactor

__all__ = ["INLINE_STRIKES", "STOP_GRACE_S", "WasmRuntime", "wat_to_wasm"]

log = logging.getLogger(__name__)

#: bump when the cache file layout or the engine settings that matter change
CACHE_FORMAT: Final = 1
#: calls one worker instance serves at once: a wasm instance is single-threaded
WORKER_MAX_CONCURRENCY: Final = 1
#: what each instance mode needs a module to be
_KIND_OF_MODE: Final = {PER_CALL: ModuleKind.COMMAND, WORKER: ModuleKind.REACTOR}


class WasmRuntime:
    """Runs WASI commands per call and reactors as warm instances (see the module docstring)."""

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
            compiler(self._engine, wasi_linker(self._engine)),
            cache_dir=cache_dir,
            settings_key=json.dumps(settings, sort_keys=True),
            capacity=memory_cache_entries,
            suffix=".cwasm",
        )
        self._limiter = trio.CapacityLimiter(config.max_threads or 4 * (os.cpu_count() or 1))
        self._ticker = EpochTicker(self._engine.increment_epoch, config.epoch_tick_ms / 1000)
        self._run_ids = itertools.count(1)
        self._closed = False
        self._inline = InlinePolicy(config.inline_budget_ms / 1000)
        #: worker instances not closed yet (the pool closes them; aclose catches stragglers)
        self._reactors: weakref.WeakSet[Reactor] = weakref.WeakSet()
        self._reactor_host = ReactorHost(
            engine=self._engine,
            fuel=config.fuel,
            ticker=self._ticker,
            limiter=self._limiter,
            inline=self._inline,
            run_ids=self._run_ids,
        )

    # --- the Runtime protocol -----------------------------------------------------------

    def describe(self) -> dict[str, Any]:
        return {
            "available": True,
            "version": f"wasmtime {self.version}",
            "modes": [PER_CALL, WORKER],
            "worker_max_concurrency": WORKER_MAX_CONCURRENCY,
            "fuel": self._config.fuel,
            "epoch_tick_ms": self._config.epoch_tick_ms,
            "max_threads": self._limiter.total_tokens,
        }

    def validate_task(self, spec: FunctionSpec) -> None:
        check_mode(self.name, spec, _KIND_OF_MODE)
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

    def validate_concurrency(self, max_concurrency: int) -> None:
        """Check a worker task's resolved `pool.max_concurrency` (a wasm instance runs one
        call at a time).

        Raises:
            ValidationError: (field "pool.max_concurrency") it is not 1.
        """
        if max_concurrency != WORKER_MAX_CONCURRENCY:
            raise ValidationError(
                f"pool.max_concurrency must be {WORKER_MAX_CONCURRENCY} for runtime 'wasm' in"
                f" mode 'worker' (a wasm instance runs one call at a time), got"
                f" {max_concurrency}; raise pool.max_instances instead",
                field="pool.max_concurrency",
            )

    def validate_artifact(self, data: bytes) -> None:
        """Check that `data` is a WASI command or a reactor; it is compiled and cached."""
        self._modules.load(hashlib.sha256(data).hexdigest(), data=data)

    async def prepare(self, spec: FunctionSpec) -> None:
        self.validate_task(spec)
        assert spec.artifact_sha256 is not None
        loaded = self._modules.peek(spec.artifact_sha256)
        if loaded is None:
            loaded = await trio.to_thread.run_sync(self._load, spec)
        _check_kind(spec.mode, loaded)

    async def start_instance(self, spec: FunctionSpec) -> Instance:
        """Instantiate the task's reactor (and run its `_initialize`), ready to serve.

        Raises:
            ValidationError: the task is not a wasm task in mode worker.
            ArtifactError: the module is not a reactor.
            RuntimeFailure: it could not be loaded, instantiated or initialised.
        """
        self.validate_task(spec)
        if spec.mode != WORKER:
            raise ValidationError(
                f"start_instance needs mode {WORKER!r}, got {spec.mode!r}", field="mode"
            )
        assert spec.artifact_sha256 is not None
        loaded = self._modules.peek(spec.artifact_sha256)
        if loaded is None:
            loaded = await trio.to_thread.run_sync(self._load, spec)
        _check_kind(spec.mode, loaded)
        if self._closed:
            raise RuntimeFailure("the wasm runtime is closed (the node is stopping)")
        reactor = await open_reactor(self._reactor_host, spec, loaded)
        self._reactors.add(reactor)
        return reactor

    async def run(
        self, spec: FunctionSpec, data: bytes, *, deadline: float, execution_id: str = ""
    ) -> RunOutcome:
        started = time.perf_counter()
        timeout_s = effective_timeout_s(spec, deadline)
        if timeout_s <= 0:
            return early_outcome(timed_out(max(timeout_s, 0.0)))
        sha = spec.artifact_sha256
        budget_s = self._inline.budget_s(sha, timeout_s)
        if budget_s > 0:
            outcome = self._run_inline(spec, data, budget_s, timeout_s, started)
            self._inline.record(sha, overran=outcome is None)
            if outcome is not None:
                return outcome
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
        self, spec: FunctionSpec, data: bytes, budget_s: float, timeout_s: float, started: float
    ) -> RunOutcome | None:
        """Run on the event loop's thread within `budget_s` of CPU (see InlinePolicy).

        A guest past the budget is stopped at its next epoch tick and None is
        returned: the caller runs it again in a worker thread. Running it twice is safe
        because a per-call WASI command has no effects outside its run: no preopened
        directories, no sockets, and its stdout and stderr are captured per run.
        """
        with contextlib.suppress(ArtifactError, RuntimeFailure):  # _execute reports it
            self._load(spec)  # the budget is for running, not for loading the module
        run = InlineRun(spec, next(self._run_ids), budget_s, timeout_s, started)
        outcome = self._execute(run, data)
        return None if run.overran else outcome

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        with trio.CancelScope(shield=True):
            # before the ticker stops: a guest still running needs its ticks to be stopped
            for reactor in list(self._reactors):
                await reactor.aclose()
            await trio.to_thread.run_sync(self._ticker.close)

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
            "inline_runs": self._inline.runs,
            "inline_fallbacks": self._inline.fallbacks,
        }

    # --- worker-thread side -------------------------------------------------------------

    def _load(self, spec: FunctionSpec) -> LoadedModule:
        assert spec.artifact_sha256 is not None
        return self._modules.load(spec.artifact_sha256, path=spec.artifact_path)

    def _execute(self, run: GuestRun, data: bytes) -> RunOutcome:
        """One guest run, start to finish, in a worker thread."""
        try:
            loaded = self._load(run.spec)
            _check_kind(PER_CALL, loaded)  # run() is per call, whatever the task says
        except (ArtifactError, RuntimeFailure) as exc:
            return early_outcome(failed(ErrorCode.START_FAILED, str(exc)))
        if run.should_stop():
            return run.outcome(run.stop_verdict() or SUCCEEDED)
        wasi = self._wasi(run, data)
        store = wasmtime.Store(self._engine)
        try:
            store.set_limits(memory_size=run.spec.memory_limit_bytes)
            if self._config.fuel:
                store.set_fuel(self._config.fuel)
            watch_epoch(store, run.run_id, run)
            store.set_wasi(wasi)
            self._ticker.enter()
            CURRENT.run = run
            try:
                return run.outcome(self._start(run, store, loaded.pre))
            finally:
                CURRENT.run = None
                self._ticker.exit()
        finally:
            forget(run.run_id)
            store.close()  # here and now: a store with Python callbacks must not linger

    def _wasi(self, run: GuestRun, data: bytes) -> wasmtime.WasiConfig:
        """The run's WASI: argv and env; stdio is served from the run (wasm_engine's
        fd_read and fd_write), so nothing else is configured."""
        wasi = wasmtime.WasiConfig()
        wasi.argv = [run.spec.name, *run.spec.command]
        if run.spec.env:
            wasi.env = list(run.spec.env.items())
        run.stdin = data
        return wasi

    def _start(self, run: GuestRun, store: wasmtime.Store, pre: wasmtime.InstancePre) -> Verdict:
        try:
            instance = pre.instantiate(store)
        except (wasmtime.Trap, wasmtime.WasmtimeError) as exc:
            run.ready = time.perf_counter()
            return run.stop_verdict() or instantiation_failed(run, split_trap(exc)[0])
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
        return classify_failure(
            run, memory_size(store, instance), error, exit_code, self._config.fuel
        )


def _check_kind(mode: str, loaded: LoadedModule) -> None:
    """Refuse a module that is not what `mode` runs.

    Raises:
        ArtifactError: a reactor in mode per-call, or a command in mode worker.
    """
    if loaded.kind is _KIND_OF_MODE.get(mode, loaded.kind):
        return
    if loaded.kind is ModuleKind.REACTOR:
        raise ArtifactError(
            "the module is a reactor (it exports spear_handle and no `_start`): register it"
            f" with mode {WORKER!r}, or build a WASI command for mode {PER_CALL!r}"
        )
    raise ArtifactError(
        f"mode {WORKER!r} on runtime 'wasm' needs a reactor module exporting spear_alloc and"
        f" spear_handle (see docs/runtimes.md); this module is a WASI command: use mode"
        f" {PER_CALL!r}"
    )
