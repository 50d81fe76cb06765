"""spear as real subprocesses: `spear node` on free loopback ports, and `spear` CLI runs.

The node is an external process, so waiting for it is a bounded readiness probe on /health
(a fixed number of attempts with a short backoff, never a fixed sleep).
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[1]
#: readiness probe: attempts and backoff (0.02 s doubling up to 0.25 s: about 20 s in all)
READY_ATTEMPTS = 90
READY_BACKOFF_S = (0.02, 0.25)
#: how long a node may take to stop after SIGTERM, and a CLI command to finish
STOP_TIMEOUT_S = 30.0
CLI_TIMEOUT_S = 120.0


#: ports handed out below the kernel's ephemeral range (see `free_port`)
_PORTS_BELOW_EPHEMERAL = (20000, 32768)


def free_port() -> int:
    """A loopback TCP port that was free a moment ago, below the ephemeral range.

    A port the kernel picks for `bind(0)` comes from the range it also gives outgoing
    connections, so between the pick and the node's own bind a test's client or a node's mesh
    link could take it ("address already in use", seen once in a long run). Ports below that
    range are never given out that way: one is drawn at random and kept if it binds.
    """
    low, high = _PORTS_BELOW_EPHEMERAL
    with contextlib.suppress(OSError, ValueError):
        first = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0]
        high = min(high, int(first))
    for _ in range(100):
        port = random.randrange(low, high)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as sock:  # the low range is crowded: let the kernel pick
        sock.bind(("127.0.0.1", 0))
        picked: int = sock.getsockname()[1]
        return picked


def spear_env(**extra: str) -> dict[str, str]:
    """The environment for `python -m spear`: this checkout importable, no stray SPEAR_*."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("SPEAR_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.update(extra)
    return env


@dataclass
class NodeProcess:
    """A `spear node` subprocess on free loopback ports with its own data dir."""

    data_dir: Path
    http: str = field(default_factory=lambda: f"127.0.0.1:{free_port()}")
    listen: str = field(default_factory=lambda: f"127.0.0.1:{free_port()}")
    extra_args: Sequence[str] = ()
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0
    #: ready when /health says the node serves the API as leader (a lone node), or only that
    #: it is up (a node of a cluster still forming)
    ready_when_serving: bool = True

    @property
    def url(self) -> str:
        return f"http://{self.http}"

    @property
    def log_path(self) -> Path:
        return self.data_dir.parent / f"{self.data_dir.name}-node-{self.starts}.log"

    @property
    def output(self) -> str:
        """What the node wrote to stdout and stderr since it was last started."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def start(self) -> None:
        self.starts += 1
        args = [
            "node",
            "--data-dir",
            str(self.data_dir),
            "--http",
            self.http,
            "--listen",
            self.listen,
            *self.extra_args,
        ]
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "spear", *args],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=spear_env(),
                cwd=self.data_dir.parent,
            )
        self._wait_ready()

    def _wait_ready(self) -> None:
        assert self.proc is not None
        delay_s, max_delay_s = READY_BACKOFF_S
        for _ in range(READY_ATTEMPTS):
            if self.proc.poll() is not None:
                pytest.fail(f"spear node exited with {self.proc.returncode}:\n{self.output}")
            try:
                health = httpx.get(f"{self.url}/health", timeout=1.0).json()
                if health.get("status") == "ok" and (
                    health.get("serving") or not self.ready_when_serving
                ):
                    return
            except (httpx.TransportError, ValueError):
                pass
            time.sleep(delay_s)
            delay_s = min(delay_s * 2, max_delay_s)
        self.kill()
        pytest.fail(
            f"spear node at {self.url} not ready after {READY_ATTEMPTS} probes:\n{self.output}"
        )

    def stop(self) -> None:
        """SIGTERM; the node must exit 0 without a traceback."""
        assert self.proc is not None, "the node is not running"
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"spear node did not stop within {STOP_TIMEOUT_S} s:\n{self.output}")
        self.proc = None
        assert code == 0, f"spear node exited with {code}:\n{self.output}"
        assert "Traceback" not in self.output, self.output

    def restart(self) -> None:
        """Stop cleanly and start again on the same ports and data dir."""
        self.stop()
        self.start()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
        if self.proc is not None:
            self.proc.wait()
        self.proc = None


SpearCli = Callable[..., "subprocess.CompletedProcess[bytes]"]


def run_spear(
    *args: str, cwd: Path, input: bytes | None = None, **env: str
) -> subprocess.CompletedProcess[bytes]:
    """Run `python -m spear ARGS...` to the end; environment variables from `env`."""
    # No input means an empty stdin, never the terminal's: a command must not hang on it.
    return subprocess.run(
        [sys.executable, "-m", "spear", *args],
        input=b"" if input is None else input,
        capture_output=True,
        env=spear_env(**env),
        cwd=cwd,
        timeout=CLI_TIMEOUT_S,
        check=False,
    )
