"""`spear demo` as a user runs it: a real process, its walkthrough, then Ctrl-C/SIGTERM."""

from __future__ import annotations

import queue
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from spear.cli.output import program
from tests.subprocesses import REPO, STOP_TIMEOUT_S, SpearCli, free_port, spear_env

#: the demo starts a node, compiles, uploads, registers and invokes: bounded, generous
DEMO_READY_TIMEOUT_S = 60.0


class Demo:
    """A `spear demo` process whose stdout is collected line by line by a reader thread."""

    def __init__(self, data_dir: Path, http: str, *, signum: int) -> None:
        self.url = f"http://{http}"
        self.signum = signum
        self.stderr_path = data_dir.parent / "demo-stderr.log"
        with self.stderr_path.open("wb") as stderr:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "spear",
                    "demo",
                    "--data-dir",
                    str(data_dir),
                    "--http",
                    http,
                    "--listen",
                    f"127.0.0.1:{free_port()}",
                ],
                stdout=subprocess.PIPE,
                stderr=stderr,
                env=spear_env(),
                cwd=data_dir.parent,
            )
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            self.lines.put(raw.decode(errors="replace"))
        self.lines.put(None)

    def wait_for(self, text: str) -> str:
        """Everything printed until a line containing `text` (fails on exit or timeout)."""
        while not any(text in line for line in self.seen):
            try:
                line = self.lines.get(timeout=DEMO_READY_TIMEOUT_S)
            except queue.Empty:
                pytest.fail(f"no {text!r} within {DEMO_READY_TIMEOUT_S} s:\n{self.output}")
            if line is None:
                pytest.fail(f"demo exited with {self.proc.wait()}:\n{self.output}")
            self.seen.append(line)
        return "".join(self.seen)

    @property
    def output(self) -> str:
        return "".join(self.seen) + self.stderr_path.read_text(errors="replace")

    def stop(self) -> int:
        self.proc.send_signal(self.signum)
        code = self.proc.wait(timeout=STOP_TIMEOUT_S)
        assert self.proc.stdout is not None
        self.proc.stdout.close()
        return code


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_demo_invokes_upper_then_serves_until_a_signal(
    tmp_path: Path, spear_cli: SpearCli, signum: int
) -> None:
    http = f"127.0.0.1:{free_port()}"
    demo = Demo(tmp_path / "data", http, signum=signum)
    try:
        out = demo.wait_for("serving until Ctrl-C")
        assert "'HELLO FROM SPEAR'" in out
        assert "registered" in out and "succeeded" in out and "cold start" in out
        assert f"http://{http}/docs" in out
        assert f"spear invoke upper --data 'hi there' --server http://{http}" in out
        assert "curl" in out

        invoked = spear_cli("invoke", "upper", "--data", "hi there", "--server", demo.url)
        assert (invoked.returncode, invoked.stdout) == (0, b"HI THERE"), invoked.stderr
    finally:
        code = demo.stop()
    assert code == 0, demo.output
    assert "Traceback" not in demo.output


def test_demo_reuses_its_task_with_the_same_data_dir(tmp_path: Path) -> None:
    http = f"127.0.0.1:{free_port()}"
    for expected in ("registered", "reused"):
        demo = Demo(tmp_path / "data", http, signum=signal.SIGTERM)
        try:
            out = demo.wait_for("serving until Ctrl-C")
            assert expected in out and "'HELLO FROM SPEAR'" in out
        finally:
            assert demo.stop() == 0, demo.output


@pytest.mark.parametrize(
    ("busy_flag", "key"), [("--http", "gateway.http"), ("--listen", "mesh.listen")]
)
def test_demo_port_in_use_is_one_line_exit_1(
    tmp_path: Path, spear_cli: SpearCli, busy_flag: str, key: str
) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        addresses = {"--http": f"127.0.0.1:{free_port()}", "--listen": f"127.0.0.1:{free_port()}"}
        addresses[busy_flag] = f"127.0.0.1:{port}"
        result = spear_cli(
            "demo",
            "--data-dir",
            str(tmp_path / "data"),
            *(item for pair in addresses.items() for item in pair),
        )
    stderr = result.stderr.decode()
    assert result.returncode == 1, stderr
    assert "Traceback" not in stderr
    assert stderr.startswith("spear: ") and stderr.count("\n") == 1, stderr
    assert key in stderr, stderr


def test_commands_to_try_call_spear_as_it_was_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    venv_spear = tmp_path / "venv" / "bin" / "spear"
    venv_spear.parent.mkdir(parents=True)
    venv_spear.write_text("#!/bin/sh\n")
    venv_spear.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path / "elsewhere"))
    cases = [
        (str(venv_spear), str(venv_spear)),  # `.venv/bin/spear demo`: not on PATH
        ("spear", "spear"),  # found on PATH
        (str(REPO / "spear" / "__main__.py"), "spear"),  # `python -m spear`
    ]
    for argv0, expected in cases:
        monkeypatch.setattr(sys, "argv", [argv0, "demo"])
        assert program() == expected
    monkeypatch.setenv("PATH", str(venv_spear.parent))
    monkeypatch.setattr(sys, "argv", [str(venv_spear), "demo"])
    assert program() == "spear", "the spear on PATH is called by its name"
