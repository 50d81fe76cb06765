"""Function runtimes: WASM (wasmtime), native processes and Docker (DESIGN.md section 5).

Open them with `open_runtime_manager(config.runtimes, data_dir=...)`; look one up with
`manager.get(name)`; every runtime keeps the `Runtime` protocol.
"""

from spear.runtimes.base import PER_CALL, WORKER, Instance, Runtime
from spear.runtimes.docker import DockerRuntime
from spear.runtimes.manager import RuntimeManager, open_runtime_manager
from spear.runtimes.process import ProcessRuntime
from spear.runtimes.wasm import WasmRuntime, wat_to_wasm

__all__ = [
    "PER_CALL",
    "WORKER",
    "DockerRuntime",
    "Instance",
    "ProcessRuntime",
    "Runtime",
    "RuntimeManager",
    "WasmRuntime",
    "open_runtime_manager",
    "wat_to_wasm",
]
