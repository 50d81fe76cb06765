"""The RuntimeManager: the runtimes this host offers, per `[runtimes]`, and their lifetime."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trio

from spear.config import RuntimesConfig
from spear.errors import SpearError, ValidationError
from spear.model import RUNTIMES
from spear.runtimes.base import Runtime
from spear.runtimes.cgroups import CgroupSettings
from spear.runtimes.docker import DockerRuntime
from spear.runtimes.process import ProcessRuntime
from spear.runtimes.process_worker import WorkerSettings
from spear.runtimes.wasm import WasmRuntime

log = logging.getLogger(__name__)


class RuntimeManager:
    """Looks up runtimes by name and describes them (for gossip metadata and /health)."""

    def __init__(self, runtimes: dict[str, Runtime], unavailable: dict[str, str]) -> None:
        """
        Args:
            runtimes: the usable runtimes by name.
            unavailable: the reason each other known runtime cannot be used here.
        """
        # Not copied: open_runtime_manager fills them in after creating the manager, so that
        # a runtime that fails to start still gets the ones before it closed.
        self._runtimes = runtimes
        self._unavailable = unavailable

    @property
    def available(self) -> list[str]:
        """Names of the runtimes this node can run functions in."""
        return list(self._runtimes)

    def get(self, name: str) -> Runtime:
        """The runtime called `name`.

        Raises:
            ValidationError: (field "runtime") the name is unknown or the runtime unavailable.
        """
        runtime = self._runtimes.get(name)
        if runtime is not None:
            return runtime
        offered = ", ".join(self._runtimes) or "none"
        if name in self._unavailable:
            raise ValidationError(
                f"runtime {name!r} is not available on this node: {self._unavailable[name]}"
                f" (available: {offered})",
                field="runtime",
            )
        raise ValidationError(
            f"runtime {name!r} is unknown; use one of {', '.join(RUNTIMES)}", field="runtime"
        )

    def describe(self) -> dict[str, dict[str, Any]]:
        """`{name: {"available": bool, "version", "modes", "reason"?...}}` for every runtime."""
        described: dict[str, dict[str, Any]] = {}
        for name in RUNTIMES:
            runtime = self._runtimes.get(name)
            if runtime is not None:
                described[name] = runtime.describe()
            else:
                reason = self._unavailable.get(name, "not configured on this node")
                described[name] = {"available": False, "reason": reason, "modes": []}
        return described

    def statistics(self) -> dict[str, dict[str, Any]]:
        return {
            name: stats()
            for name, runtime in self._runtimes.items()
            if callable(stats := getattr(runtime, "statistics", None))
        }

    async def aclose(self) -> None:
        """Close every runtime (shielded: it runs during shutdown)."""
        with trio.CancelScope(shield=True):
            for runtime in self._runtimes.values():
                await runtime.aclose()


@asynccontextmanager
async def open_runtime_manager(
    config: RuntimesConfig, *, data_dir: Path, node_id: str = ""
) -> AsyncIterator[RuntimeManager]:
    """Open the runtimes `config` enables; close them on exit.

    Relative `cache_dir`/`work_dir` settings are taken relative to `data_dir`; empty ones
    default to `<data_dir>/wasm-cache` and `<data_dir>/work`. `node_id` labels this node's
    containers (empty: a label derived from `data_dir`, stable across restarts); a Docker
    daemon that does not answer leaves the docker runtime unavailable, with the reason.

    Raises:
        ConfigError: a runtime's settings cannot work on this host (e.g. isolate_network
            without root).
    """
    runtimes: dict[str, Runtime] = {}
    unavailable: dict[str, str] = {}
    manager = RuntimeManager(runtimes, unavailable)
    try:
        # Creating directories, the engine and the daemon connection block: a worker thread.
        await trio.to_thread.run_sync(_start_runtimes, config, data_dir, runtimes, unavailable)
        if config.docker.enabled:
            await trio.to_thread.run_sync(
                _start_docker, config, node_id or _node_label(data_dir), runtimes, unavailable
            )
        else:
            unavailable["docker"] = "disabled (runtimes.docker.enabled = false)"
        yield manager
    finally:
        await manager.aclose()


def _start_runtimes(
    config: RuntimesConfig,
    data_dir: Path,
    runtimes: dict[str, Runtime],
    unavailable: dict[str, str],
) -> None:
    data_dir = data_dir.resolve()
    if config.wasm.enabled:
        cache_dir = data_dir / (config.wasm.cache_dir or "wasm-cache")
        try:
            runtimes["wasm"] = WasmRuntime(config.wasm, cache_dir=cache_dir)
        except (OSError, SpearError) as exc:
            log.warning("the wasm runtime is unavailable: %s", exc)
            unavailable["wasm"] = f"it failed to start: {exc}"
    else:
        unavailable["wasm"] = "disabled (runtimes.wasm.enabled = false)"
    if config.process.enabled:
        work_dir = data_dir / (config.process.work_dir or "work")
        settings = WorkerSettings(
            start_timeout_s=config.process.worker_start_timeout_ms / 1000,
            cancel_grace_s=config.process.worker_cancel_grace_ms / 1000,
        )
        runtimes["process"] = ProcessRuntime(
            config.process,
            work_dir=work_dir,
            worker_settings=settings,
            cgroups=CgroupSettings(
                mode=config.process.cgroups,
                cpus=config.process.cpus,
                pids_limit=config.process.pids_limit,
            ),
        )
    else:
        unavailable["process"] = "disabled (runtimes.process.enabled = false)"


def _start_docker(
    config: RuntimesConfig,
    node_label: str,
    runtimes: dict[str, Runtime],
    unavailable: dict[str, str],
) -> None:
    try:
        runtimes["docker"] = DockerRuntime.connect(config.docker, node_label=node_label)
    except SpearError as exc:
        log.info("the docker runtime is unavailable: %s", exc)
        unavailable["docker"] = str(exc)


def _node_label(data_dir: Path) -> str:
    """A stable container label for a node known only by its data directory."""
    digest = hashlib.sha256(str(data_dir.resolve()).encode()).hexdigest()
    return f"dir-{digest[:16]}"
