"""`spear cluster --nodes N` as a user runs it: a real launcher process and its real nodes; a
node killed by pid is reported and the others keep serving until a signal stops them all."""

from __future__ import annotations

import contextlib
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

import httpx
import psutil
import pytest

from tests.subprocesses import READY_ATTEMPTS, READY_BACKOFF_S, STOP_TIMEOUT_S, spear_env

#: starting N node processes takes a few seconds; bounded, generous
START_TIMEOUT_S = 60.0
#: the launcher's stop grace (10 s) plus the time to start and stop N interpreters
LAUNCHER_STOP_TIMEOUT_S = STOP_TIMEOUT_S + 10.0
CLUSTER = (sys.executable, "-m", "spear", "cluster", "--profile", "lan-fast")


class _Lines:
    """The lines of a stream, collected by a reader thread."""

    def __init__(self, stream: IO[bytes]) -> None:
        self._queue: queue.Queue[str | None] = queue.Queue()
        self.seen: list[str] = []
        self._stream = stream
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for raw in self._stream:
            self._queue.put(raw.decode(errors="replace"))
        self._queue.put(None)

    def close(self) -> None:
        """Once the writer has exited: the reader reaches the end, the stream is closed."""
        self._reader.join(timeout=STOP_TIMEOUT_S)
        self._stream.close()

    def wait_for(self, text: str, timeout_s: float) -> str:
        """The first line containing `text` (fails if the stream ends or on timeout)."""
        while True:
            for line in self.seen:
                if text in line:
                    return line
            try:
                got = self._queue.get(timeout=timeout_s)
            except queue.Empty:
                pytest.fail(f"no {text!r} within {timeout_s} s:\n{''.join(self.seen)}")
            if got is None:
                pytest.fail(f"the stream ended before {text!r}:\n{''.join(self.seen)}")
            self.seen.append(got)


class Launcher:
    """A `spear cluster` process; its table gives each node's name, HTTP URL and pid."""

    def __init__(self, tmp_path: Path, nodes: int) -> None:
        self.root = tmp_path / "cluster"
        self.proc = subprocess.Popen(
            [*CLUSTER, "--nodes", str(nodes), "--data-dir", str(self.root)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=spear_env(),
            cwd=tmp_path,
        )
        assert self.proc.stdout is not None and self.proc.stderr is not None
        self.stdout, self.stderr = _Lines(self.proc.stdout), _Lines(self.proc.stderr)
        #: name -> (HTTP URL, pid), from the launcher's table
        self.nodes: dict[str, tuple[str, int]] = {}
        try:
            self.stdout.wait_for("join token:", START_TIMEOUT_S)
        except BaseException:
            self.kill_all()
            raise
        rows = [line.split() for line in self.stdout.seen if re.match(r"n\d+ ", line)]
        self.nodes = {row[0]: (row[1], int(row[3])) for row in rows}
        assert len(self.nodes) == nodes, "".join(self.stdout.seen)

    def kill_all(self) -> None:
        """The cleanup, also after a failed test: no launcher and no node left running."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for _, pid in self.nodes.values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.stdout.close()
        self.stderr.close()


@contextlib.contextmanager
def spear_cluster(tmp_path: Path, nodes: int) -> Iterator[Launcher]:
    launcher = Launcher(tmp_path, nodes)
    try:
        for url, _ in launcher.nodes.values():
            wait_healthy(url)
        yield launcher
    finally:
        launcher.kill_all()


def probe(ready: Callable[[], bool], what: str) -> None:
    """A bounded readiness probe of the real processes, with backoff."""
    delay_s, max_delay_s = READY_BACKOFF_S
    for _ in range(READY_ATTEMPTS):
        with contextlib.suppress(httpx.TransportError, ValueError, KeyError):
            if ready():
                return
        time.sleep(delay_s)
        delay_s = min(delay_s * 2, max_delay_s)
    pytest.fail(what)


def wait_healthy(url: str) -> None:
    """/health answers ok."""

    def ok() -> bool:
        return bool(httpx.get(f"{url}/health", timeout=1.0).json().get("status") == "ok")

    probe(ok, f"no node answers /health at {url}")


def wait_members(url: str, count: int) -> None:
    """The node at `url` sees `count` members alive."""

    def seen() -> bool:
        members = httpx.get(f"{url}/api/v1/cluster", timeout=1.0).json()["members"]
        return bool(sum(m["state"] == "alive" for m in members) == count)

    probe(seen, f"{url} does not see {count} members alive")


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_a_killed_node_is_reported_and_the_others_keep_serving(tmp_path: Path) -> None:
    with spear_cluster(tmp_path, 3) as launcher:
        token = next(line for line in launcher.stdout.seen if line.startswith("join token:"))
        token = token.split(":", 1)[1].strip()
        for _, pid in launcher.nodes.values():  # the token is not on any command line (ps)
            assert token not in " ".join(psutil.Process(pid).cmdline())
        wait_members(launcher.nodes["n3"][0], 3)  # yet they joined each other with it
        os.kill(launcher.nodes["n1"][1], signal.SIGKILL)
        line = launcher.stderr.wait_for("spear: node n1", START_TIMEOUT_S)
        assert line.startswith("spear: node n1") and "SIGKILL" in line, line
        assert str(launcher.root / "n1.log") in line and "2 still running" in line, line

        for name in ("n2", "n3"):
            health = httpx.get(f"{launcher.nodes[name][0]}/health", timeout=5.0).json()
            assert health["status"] == "ok", (name, health)
        assert launcher.proc.poll() is None, "the launcher must keep the others running"

        launcher.proc.send_signal(signal.SIGINT)
        assert launcher.proc.wait(timeout=LAUNCHER_STOP_TIMEOUT_S) == 0
        assert all(gone(pid) for _, pid in launcher.nodes.values())
        assert "Traceback" not in "".join(launcher.stderr.seen)
        assert (launcher.root / "n2.log").read_bytes(), "each node's output goes to its log"


def test_the_launcher_exits_1_when_every_node_is_gone(tmp_path: Path) -> None:
    with spear_cluster(tmp_path, 1) as launcher:
        os.kill(launcher.nodes["n1"][1], signal.SIGKILL)
        assert launcher.proc.wait(timeout=LAUNCHER_STOP_TIMEOUT_S) == 1
        launcher.stderr.wait_for("none left", START_TIMEOUT_S)
        assert "every node has exited" in launcher.stderr.wait_for("spear: every", 1.0)


def test_nodes_stop_when_the_launcher_is_killed_outright(tmp_path: Path) -> None:
    with spear_cluster(tmp_path, 2) as launcher:
        launcher.proc.kill()
        launcher.proc.wait()
        pids = [pid for _, pid in launcher.nodes.values()]
        # the kernel sent each a SIGTERM: a clean stop
        probe(lambda: all(gone(pid) for pid in pids), "a node outlived its launcher")
