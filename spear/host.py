"""Host resource metrics (the only module that imports psutil)."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

import psutil


class HostMetrics:
    """Samples this host's CPU, memory, disk and load for the node's resource report."""

    def __init__(self, data_dir: Path) -> None:
        self._data_dir = data_dir
        # The first cpu_percent(None) is meaningless: prime it once and discard the value.
        psutil.cpu_percent(None)

    def sample(self) -> dict[str, Any]:
        """Return a resource report (a plain dict, ready for JSON or CBOR)."""
        mem = psutil.virtual_memory()
        disk = psutil.disk_usage(str(self._data_dir))
        load1, load5, load15 = os.getloadavg()
        return {
            "cpu_count": psutil.cpu_count() or 1,
            "cpu_percent": psutil.cpu_percent(None),
            "memory_total_bytes": mem.total,
            "memory_available_bytes": mem.available,
            "disk_free_bytes": disk.free,
            "disk_percent": disk.percent,
            "load_1m": load1,
            "load_5m": load5,
            "load_15m": load15,
            "platform": platform.platform(terse=True),
        }
