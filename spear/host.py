"""Host resource metrics (the only module that imports psutil)."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import psutil

#: one value of a resource report: counts and bytes are ints, percentages and loads floats
Metric = int | float | str


class HostMetrics:
    """Samples this host's CPU, memory, disk and load for the node's resource report.

    `sample()` is cheap enough to call every second (about 0.1 ms, most of it in psutil's
    memory and CPU readings; the disk reading is one statvfs call).
    """

    def __init__(self, data_dir: Path) -> None:
        self._data_dir = data_dir
        # What does not change while the node runs is read once.
        self._cpu_count = psutil.cpu_count() or 1
        self._platform = platform.platform(terse=True)
        # The first cpu_percent(None) is meaningless: prime it once and discard the value.
        psutil.cpu_percent(None)

    @property
    def cpu_count(self) -> int:
        """Logical CPUs of this host."""
        return self._cpu_count

    def sample(self) -> dict[str, Metric]:
        """Return a resource report (a plain dict, ready for JSON or CBOR).

        CPU percent is the average over all CPUs since the previous call.
        """
        mem = psutil.virtual_memory()
        disk = psutil.disk_usage(str(self._data_dir))
        load1, load5, load15 = os.getloadavg()
        return {
            "cpu_count": self._cpu_count,
            "cpu_percent": float(psutil.cpu_percent(None)),
            "memory_total_bytes": mem.total,
            "memory_available_bytes": mem.available,
            "disk_free_bytes": disk.free,
            "disk_percent": float(disk.percent),
            "load_1m": load1,
            "load_5m": load5,
            "load_15m": load15,
            "platform": self._platform,
        }
