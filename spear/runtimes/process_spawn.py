"""Starting and stopping native processes: the rlimit wrapper, spawning, group kill, reaping.

Shared by per-call runs (spear.runtimes.process) and worker instances
(spear.runtimes.process_worker). Every process starts in a new session and process group
(`start_new_session`), so one `killpg` stops it and whatever it forked.

Why rlimits are set by `/bin/sh -c 'ulimit ...; exec "$0" "$@"'`: any `preexec_fn` makes
CPython leave its vfork fast path (measured: /bin/true 5.0 ms instead of 1.25 ms), and
`prlimit` on the pid after spawn races with the child's first allocations. The shell's
builtins cost one extra exec (1.7 ms in all) and take the arguments as "$@", never parsed.
Limits are only ever lowered (raising a hard limit fails without CAP_SYS_RESOURCE): each
value is clamped to the node's own hard limit.
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


def limits_script(config: ProcessConfig, *, memory_limit_bytes: int, cpu_s: int | None) -> str:
    """The `sh -c` script that lowers the rlimits, then execs "$0" "$@".

    Args:
        config: the `[runtimes.process]` section (open files, processes).
        memory_limit_bytes: RLIMIT_AS.
        cpu_s: RLIMIT_CPU soft limit (hard = soft + 1, so SIGXCPU comes first); None leaves
            CPU time unlimited (a worker's CPU time adds up over all its requests).
    """
    steps = [
        ("-v", clamp(resource.RLIMIT_AS, memory_limit_bytes) // 1024),
        ("-n", clamp(resource.RLIMIT_NOFILE, config.rlimit_nofile)),
        ("-c", 0),
    ]
    if cpu_s is not None:
        steps.append(("-t", clamp(resource.RLIMIT_CPU, cpu_s + 1)))
        steps.append(("-S -t", clamp(resource.RLIMIT_CPU, cpu_s)))
    if config.rlimit_nproc:
        steps.append(("-p", clamp(resource.RLIMIT_NPROC, config.rlimit_nproc)))
    limits = " && ".join(f"ulimit {flag} {value}" for flag, value in steps)
    # unset PWD: the shell exports it, the function's environment must not show it
    return f'{limits} && unset PWD && exec "$0" "$@"'


async def spawn(
    argv: list[str],
    *,
    env: dict[str, str],
    cwd: Path,
    stdin: int = subprocess.PIPE,
    stdout: int = subprocess.PIPE,
    stderr: int = subprocess.PIPE,
) -> trio.Process:
    """Start `argv` in a new session with a clean `env` (pipes by default, or given fds).

    Raises:
        OSError: the executable cannot be started.
        ValueError: an argument or environment value holds a NUL byte.
    """
    for attempt in range(3):
        try:
            return await trio.lowlevel.open_process(
                argv,
                stdin=stdin,
                stdout=stdout,
                stderr=stderr,
                env=env,
                cwd=cwd,
                start_new_session=True,
                close_fds=True,
            )
        except OSError as exc:
            # A freshly staged artifact can still be open for writing in a child that another
            # thread forked meanwhile (until that child execs): "text file busy", retry.
            if exc.errno != errno.ETXTBSY or attempt == 2:
                raise
            await trio.sleep(0.01)
    raise AssertionError("unreachable")


async def wait_exited(proc: trio.Process) -> None:
    """Wait until the main process has exited, without reaping it (so its pgid stays ours)."""
    try:
        pidfd = os.pidfd_open(proc.pid)
    except OSError:  # pragma: no cover - kernels before 5.3: reap, then kill the group
        await proc.wait()
        return
    try:
        await trio.lowlevel.wait_readable(pidfd)
    finally:
        os.close(pidfd)


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
