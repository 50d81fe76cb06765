"""Starting and stopping native processes: the rlimit wrapper, spawning, group kill, reaping.

Shared by per-call runs (spear.runtimes.process) and worker instances
(spear.runtimes.process_worker). Every process starts in a new session and process group
(`start_new_session`), so one `killpg` stops it and whatever it forked.

Why rlimits (and the join of an instance's cgroup) are set by `/bin/sh -c 'echo $$ >
.../cgroup.procs && ulimit ...; exec "$0" "$@"'`: any `preexec_fn` makes CPython leave its
vfork fast path (measured: /bin/true 5.0 ms instead of 1.25 ms), and `prlimit` or a cgroup
write on the pid after the spawn races with the child's first allocations and forks. The
shell's builtins cost one extra exec (0.4-0.6 ms, most of what a per-call run costs over a
bare spawn; a static busybox shell saves only 0.1 ms of it) and take the arguments as "$@",
never parsed. Limits are only ever lowered (raising a hard limit fails without
CAP_SYS_RESOURCE): each value is clamped to the node's own hard limit.
"""

from __future__ import annotations

import errno
import logging
import os
import resource
import signal
import subprocess
from pathlib import Path
from typing import Final

import trio

from spear.config import ProcessConfig

log = logging.getLogger(__name__)

SHELL: Final = "/bin/sh"
#: stderr fragments that say an allocation failed (Python, C, glibc, C++, Rust, Go)
MEMORY_MARKERS: Final = (
    b"MemoryError",
    b"Cannot allocate memory",
    b"out of memory",
    b"std::bad_alloc",
    b"memory allocation of",
)


def limits_script(
    config: ProcessConfig, *, memory_limit_bytes: int | None, cpu_s: int | None, join: str = ""
) -> str:
    """The `sh -c` script that joins a cgroup, lowers the rlimits, then execs "$0" "$@".

    Args:
        config: the `[runtimes.process]` section (open files, processes).
        memory_limit_bytes: RLIMIT_AS; None leaves it (a cgroup limits memory instead).
        cpu_s: RLIMIT_CPU soft limit (hard = soft + 1, so SIGXCPU comes first); None leaves
            CPU time unlimited (a worker's CPU time adds up over all its requests).
        join: shell commands that move the shell into the instance's cgroup (first, so the
            function's first allocation is counted), or "".
    """
    steps: list[tuple[str, int]] = []
    if memory_limit_bytes is not None:
        steps.append(("-v", clamp(resource.RLIMIT_AS, memory_limit_bytes) // 1024))
    steps.append(("-n", clamp(resource.RLIMIT_NOFILE, config.rlimit_nofile)))
    steps.append(("-c", 0))
    if cpu_s is not None:
        steps.append(("-t", clamp(resource.RLIMIT_CPU, cpu_s + 1)))
        steps.append(("-S -t", clamp(resource.RLIMIT_CPU, cpu_s)))
    if config.rlimit_nproc:
        steps.append(("-p", clamp(resource.RLIMIT_NPROC, config.rlimit_nproc)))
    limits = " && ".join([*([join] if join else []), *(f"ulimit {f} {v}" for f, v in steps)])
    # unset PWD: the shell exports it, the function's environment must not show it
    return f'{limits} && unset PWD && exec "$0" "$@"'


class Child:
    """A process started by `spawn`: its pid, its pipes (trio streams where `spawn` made
    them, else None) and a pidfd that tells its exit without reaping it."""

    def __init__(
        self,
        popen: subprocess.Popen[bytes],
        stdin: trio.lowlevel.FdStream | None,
        stdout: trio.lowlevel.FdStream | None,
        stderr: trio.lowlevel.FdStream | None,
    ) -> None:
        self._popen = popen
        self.pid = popen.pid
        self.stdin, self.stdout, self.stderr = stdin, stdout, stderr
        try:
            self._pidfd = os.pidfd_open(popen.pid)
        except OSError:  # pragma: no cover - kernels before 5.3
            self._pidfd = -1

    @property
    def returncode(self) -> int | None:
        """The exit code, or -signal; None until `wait` reaped the process."""
        return self._popen.returncode

    async def wait_exited(self) -> None:
        """Wait until the process has exited, without reaping it (its pgid stays ours)."""
        if self._pidfd < 0:  # pragma: no cover - kernels before 5.3: reap, then kill the group
            await self.wait()
            return
        await trio.lowlevel.wait_readable(self._pidfd)

    async def wait(self) -> int:
        """Wait for the process to exit and reap it; its exit code (or -signal)."""
        if self._popen.poll() is None:  # poll: no loop turn when it has exited already
            if self._pidfd >= 0:
                await trio.lowlevel.wait_readable(self._pidfd)
                self._popen.wait()  # exited already: reaps at once
            else:  # pragma: no cover - kernels before 5.3
                await trio.to_thread.run_sync(self._popen.wait, abandon_on_cancel=True)
        if self._pidfd >= 0:
            os.close(self._pidfd)
            self._pidfd = -1
        return self._popen.wait()


async def spawn(
    argv: list[str],
    *,
    env: dict[str, str],
    cwd: Path,
    stdin: int = subprocess.PIPE,
    stdout: int = subprocess.PIPE,
    stderr: int = subprocess.PIPE,
) -> Child:
    """Start `argv` in a new session with a clean `env` (pipes by default, or given fds).

    `subprocess.Popen` runs on the calling (event loop) thread: with no `preexec_fn`, CPython
    uses vfork and Popen returns once the child has exec'd (0.1-0.3 ms), which is less than
    the hand-off to a worker thread and back that `trio.lowlevel.open_process` makes.

    Raises:
        OSError: the executable cannot be started.
        ValueError: an argument or environment value holds a NUL byte.
    """
    for attempt in range(3):
        try:
            return _spawn(argv, env=env, cwd=cwd, stdin=stdin, stdout=stdout, stderr=stderr)
        except OSError as exc:
            # A freshly staged artifact can still be open for writing in a child that another
            # thread forked meanwhile (until that child execs): "text file busy", retry.
            if exc.errno != errno.ETXTBSY or attempt == 2:
                raise
            await trio.sleep(0.01)
    raise AssertionError("unreachable")


def _spawn(
    argv: list[str], *, env: dict[str, str], cwd: Path, stdin: int, stdout: int, stderr: int
) -> Child:
    fds = [stdin, stdout, stderr]
    ours: list[int | None] = [None, None, None]  # the parent's ends of the pipes made here
    for index, fd in enumerate(fds):
        if fd == subprocess.PIPE:
            read_end, write_end = os.pipe()
            fds[index], ours[index] = (read_end, write_end) if index == 0 else (write_end, read_end)
    try:
        popen = subprocess.Popen(
            argv,
            stdin=fds[0],
            stdout=fds[1],
            stderr=fds[2],
            env=env,
            cwd=cwd,
            start_new_session=True,
            close_fds=True,
        )
    except BaseException:
        for our_end in ours:
            if our_end is not None:
                os.close(our_end)
        raise
    finally:
        for index, our_end in enumerate(ours):
            if our_end is not None:
                os.close(fds[index])  # the child's end: it has its own copy now
    streams = [None if end is None else trio.lowlevel.FdStream(end) for end in ours]
    return Child(popen, *streams)


def exit_status(pid: int) -> int | None:
    """The exit code (or -signal) of child `pid` if it has exited, without reaping it."""
    try:
        info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return None
    if info is None or info.si_pid == 0:
        return None
    if info.si_code == os.CLD_EXITED:
        return info.si_status
    return -info.si_status


def kill_group(pgid: int) -> None:
    """SIGKILL every process of group `pgid` (a no-op once the group is empty)."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    except PermissionError:  # pragma: no cover - a member changed its uid
        log.warning("cannot kill process group %d", pgid)


def clamp(which: int, value: int) -> int:
    """`value`, or the node's own hard limit if that is lower (limits can only go down)."""
    _soft, hard = resource.getrlimit(which)
    return value if hard == resource.RLIM_INFINITY else min(value, hard)


def signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"
