"""The process runtime: a native executable per call (the CGI/watchdog contract).

The executable is `command[0]` (looked up on the clean PATH), or the uploaded artifact staged
as `<work_dir>/artifacts/<sha256>` (mode 0755) followed by `command` as its arguments. Input
goes to stdin, output is read from stdout, logs from stderr, exit code 0 means success. The
working directory is `<work_dir>/scratch`, shared by all calls and never cleaned by spear (a
fresh directory per call cost 0.6 ms of mkdir/rmdir on overlay filesystems).

Limits and how they hold:
- time: a trio deadline; at it the whole process group gets SIGKILL and is reaped. RLIMIT_CPU
  (soft = the timeout rounded up or `cpu_time_limit_s`, hard = soft + 1) is a backstop.
- processes: each call is a new session and process group (`start_new_session`); when the
  main process exits, times out, overflows or is cancelled, the group is killed, and with
  cgroups every member of the call's cgroup too (also what left the group with setsid()).
- memory: with cgroups (spear.runtimes.cgroups: root and a writable hierarchy), the call's
  cgroup limit = memory_limit_bytes, for all its processes together, and the kernel's OOM
  kill is reported exactly; else RLIMIT_AS = memory_limit_bytes (address space, so runtimes
  that reserve large virtual ranges, e.g. the JVM or Go, need a generous limit).
- CPU share: with cgroups, a quota of `CgroupSettings.cpus` CPUs per call or worker.
- files: RLIMIT_NOFILE; RLIMIT_NPROC when `rlimit_nproc > 0` (not enforced for root); with
  cgroups, `pids.max` = `CgroupSettings.pids_limit` when > 0 (enforced for root too).
- output: stdout is read incrementally; past `max_output_bytes` the group is killed at once.
- environment: only `pass_env` names copied from the node's environment, plus the task's env.
- network: with `isolate_network`, the call runs under `unshare -n` (an empty network
  namespace; needs root, checked at start).

Rlimits are set, and the cgroup joined, in the child before it execs the function, never in
a `preexec_fn` (CPython then forks instead of its vfork fast path; process_spawn says why).
On x86-64 Linux this is spear's launcher (`launcher_elf`: 317 bytes of machine code, no
libc, written to `<work_dir>/launcher` and checked at start), which costs an exec of about
0.03 ms; elsewhere, or if it does not run, a `/bin/sh -c 'echo $$ > .../cgroup.procs &&
ulimit ...; exec "$0" "$@"'` wrapper, whose exec costs 0.4-0.6 ms (a dynamically linked
executable's loader and libc start-up: a static glibc helper still cost 0.35 ms).
`describe()` says which limits apply (`limits`: the cgroup hierarchy, or "rlimits" and why)
and which of the two sets them (`launcher`). Mode `worker` starts the same
command line, under the same limits except RLIMIT_CPU (only `cpu_time_limit_s`, as a
worker's CPU time adds up), in a cgroup of its own, as a warm instance speaking
spear.worker_protocol (see spear.runtimes.process_worker).
"""

from __future__ import annotations

import logging
import math
import os
import platform
import resource
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path
from typing import Any, Final

import trio

from spear.config import ProcessConfig
from spear.errors import ArtifactError, ConfigError, RuntimeFailure, ValidationError
from spear.model import ErrorCode, ExecStatus, FunctionSpec, RunOutcome
from spear.runtimes.base import PER_CALL, WORKER, Instance, check_mode, effective_timeout_s
from spear.runtimes.cgroups import Cgroup, CgroupError, Cgroups, CgroupSettings
from spear.runtimes.outcomes import (
    SUCCEEDED,
    LogCapture,
    OutputCapture,
    Verdict,
    early_outcome,
    failed,
    output_overflowed,
    timed_out,
)
from spear.runtimes.process_spawn import (
    MEMORY_MARKERS,
    SHELL,
    Child,
    clamp,
    kill_group,
    limits_script,
    signal_name,
    spawn,
)
from spear.runtimes.process_worker import ProcessInstance, WorkerSettings

log = logging.getLogger(__name__)

READ_CHUNK_BYTES: Final = 65536
#: input up to this size is written at once, atomically (POSIX PIPE_BUF on Linux)
PIPE_BUF_BYTES: Final = 4096
#: after the main process exits and its group is killed, how long the pipes may take to close
DRAIN_S: Final = 1.0


class ProcessRuntime:
    """Runs native executables per call (see the module docstring for the limits)."""

    name = "process"

    def __init__(
        self,
        config: ProcessConfig,
        *,
        work_dir: Path,
        worker_settings: WorkerSettings | None = None,
        cgroups: CgroupSettings | None = None,
        launcher: bool = True,
    ) -> None:
        """Check the config and create the work directories.

        Args:
            config: the `[runtimes.process]` section.
            work_dir: absolute directory for staged artifacts (`artifacts/`) and the calls'
                working directory (`scratch/`).
            worker_settings: start and cancel bounds of worker instances (mode `worker`);
                None for the defaults.
            cgroups: whether instances get cgroups (used when the node can; `describe()`
                says which limits apply); None: rlimits only.
            launcher: set the limits with spear's launcher where this machine runs it (x86-64
                Linux), else with the `/bin/sh` wrapper; False: always the wrapper.

        Raises:
            ConfigError: `isolate_network` is set but this node cannot use `unshare -n`.
        """
        self._config = config
        self._prefix: tuple[str, ...] = ()
        if config.isolate_network:
            unshare = shutil.which("unshare")
            if os.geteuid() != 0 or unshare is None:
                raise ConfigError(
                    "runtimes.process.isolate_network needs root and the unshare command"
                    " (util-linux); run the node as root or set it to false"
                )
            self._prefix = (unshare, "--net", "--")
        self._artifacts = work_dir / "artifacts"
        self._scratch = work_dir / "scratch"
        self._artifacts.mkdir(parents=True, exist_ok=True)
        self._scratch.mkdir(parents=True, exist_ok=True)
        self._base_env = {k: os.environ[k] for k in config.pass_env if k in os.environ}
        self._staged: set[str] = set()
        self._resolved: dict[tuple[str, str], str | None] = {}
        self._running = 0
        self._instances: set[ProcessInstance] = set()
        self._worker_settings = worker_settings or WorkerSettings()
        self._cgroups = Cgroups(cgroups or CgroupSettings(mode="off"))
        installed = install_launcher(work_dir) if launcher else "launcher=False"
        self._launcher = str(installed) if isinstance(installed, Path) else None
        self._launcher_note = f"spear launcher ({installed})"
        if self._launcher is None:
            self._launcher_note = f"{SHELL} wrapper ({installed})"
            log.info("process runtime: limits set by %s", self._launcher_note)

    # --- the Runtime protocol -----------------------------------------------------------

    def describe(self) -> dict[str, Any]:
        return {
            "available": True,
            "version": f"{os.uname().sysname} {os.uname().release}",
            "modes": [PER_CALL, WORKER],
            "isolate_network": self._config.isolate_network,
            "cgroup_version": self._cgroups.hierarchy and self._cgroups.hierarchy.version,
            "limits": self._cgroups.describe(),
            "launcher": self._launcher_note,
        }

    def validate_task(self, spec: FunctionSpec) -> None:
        check_mode(self.name, spec, (PER_CALL, WORKER))
        if spec.artifact_sha256 is None and not spec.command:
            raise ValidationError(
                "runtime 'process' needs a command or an artifact", field="command"
            )
        if spec.artifact_sha256 is None and self._resolve(spec.command[0], spec) is None:
            raise ValidationError(
                f"command {spec.command[0]!r} is not an executable on this node's PATH"
                " (runtimes.process.pass_env decides the PATH)",
                field="command",
            )

    def validate_artifact(self, data: bytes) -> None:
        if not data:
            raise ArtifactError("the artifact is empty; upload an executable file")
        if not data.startswith((b"\x7fELF", b"#!")):
            raise ArtifactError(
                "the artifact is not an executable: it is neither an ELF binary nor a script"
                " starting with #!"
            )

    async def prepare(self, spec: FunctionSpec) -> None:
        self.validate_task(spec)
        if spec.artifact_sha256 is not None:
            await trio.to_thread.run_sync(self._stage, spec)

    async def run(
        self, spec: FunctionSpec, data: bytes, *, deadline: float, execution_id: str = ""
    ) -> RunOutcome:
        started = time.perf_counter()
        timeout_s = effective_timeout_s(spec, deadline)
        if timeout_s <= 0:
            return early_outcome(timed_out(max(timeout_s, 0.0)))
        try:
            target = await self._target(spec)
            cgroup = self._new_cgroup(spec)
        except (ArtifactError, RuntimeFailure) as exc:
            return early_outcome(failed(ErrorCode.START_FAILED, str(exc)))
        self._running += 1
        call = _Call(spec, timeout_s, started, cgroup)
        try:
            return await self._run(call, self._argv(spec, timeout_s, target, cgroup), data)
        finally:
            self._running -= 1
            if cgroup is not None:
                with trio.CancelScope(shield=True):
                    await self._cgroups.release(cgroup)

    async def start_instance(self, spec: FunctionSpec) -> Instance:
        """Start a worker process of `spec` and wait for its hello.

        The hello may take `worker_settings.start_timeout_s` or the task's timeout, the
        longer. The command line, limits and environment are those of a per-call run, except
        that RLIMIT_CPU is only set from `cpu_time_limit_s` (a worker's CPU time adds up).

        Raises:
            RuntimeFailure: the executable cannot be staged or started, or the worker exited,
                broke the protocol or sent no hello in time (the message says which).
        """
        target = await self._target(spec)
        cgroup = self._new_cgroup(spec)
        env = {**self._base_env, **spec.env}
        instance = await ProcessInstance.start(
            spec,
            self._argv(spec, None, target, cgroup),
            env=env,
            cwd=self._scratch,
            on_close=self._instances.discard,
            settings=self._worker_settings,
            cgroup=cgroup,
        )
        self._instances.add(instance)
        return instance

    async def aclose(self) -> None:
        """Close the worker instances still open (per-call runs reap their own processes)
        and remove the spare cgroups."""
        for instance in list(self._instances):
            await instance.aclose()
        with trio.CancelScope(shield=True):
            await self._cgroups.aclose()

    def statistics(self) -> dict[str, Any]:
        return {
            "running": self._running,
            "staged_artifacts": len(self._staged),
            "worker_instances": len(self._instances),
            "cgroups": self._cgroups.active,
            "spare_cgroups": self._cgroups.spare,
        }

    # --- one call -----------------------------------------------------------------------

    async def _run(self, call: _Call, argv: list[str], data: bytes) -> RunOutcome:
        try:
            proc = await spawn(argv, env={**self._base_env, **call.spec.env}, cwd=self._scratch)
        except (OSError, ValueError) as exc:  # ValueError: e.g. a NUL byte in argv or env
            message = f"cannot start the function: {exc}"
            return early_outcome(failed(ErrorCode.START_FAILED, message))
        call.spawned = time.perf_counter()
        try:
            with trio.move_on_after(call.timeout_s) as guard:
                await self._supervise(call, proc, data)
            if guard.cancelled_caught:
                call.stop(ErrorCode.TIMEOUT)
        finally:
            with trio.CancelScope(shield=True):
                call.kill_all(proc.pid)
                await proc.wait()
        return call.outcome(proc.returncode)

    async def _supervise(self, call: _Call, proc: Child, data: bytes) -> None:
        """Feed stdin and read stdout/stderr until the main process exits and pipes close."""
        assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None

        def on_stdout(chunk: bytes) -> None:
            if not call.output.write(chunk):
                call.stop(ErrorCode.OUTPUT_LIMIT)
                call.kill_all(proc.pid)

        async with trio.open_nursery() as nursery:
            if not _feed_now(proc.stdin, data):  # most inputs fit the pipe: no task needed
                nursery.start_soon(_feed, proc.stdin, data)
            pumps = _Pumps(2)
            nursery.start_soon(_pump, proc.stdout, on_stdout, pumps)
            nursery.start_soon(_pump, proc.stderr, call.logs.write, pumps)
            await proc.wait_exited()
            call.kill_all(proc.pid)  # stragglers (the leader is a zombie: its pgid is not reused)
            if not pumps.done.is_set():
                with trio.move_on_after(DRAIN_S):
                    await pumps.done.wait()
            nursery.cancel_scope.cancel()

    # --- the command line ---------------------------------------------------------------

    async def _target(self, spec: FunctionSpec) -> list[str]:
        """The function's own command line: the staged artifact or the resolved command."""
        if spec.artifact_sha256 is not None:
            if spec.artifact_sha256 not in self._staged:
                await trio.to_thread.run_sync(self._stage, spec)
            return [str(self._artifacts / spec.artifact_sha256), *spec.command]
        exe = self._resolve(spec.command[0], spec)
        if exe is None:
            raise RuntimeFailure(
                f"command {spec.command[0]!r} is not an executable on this node's PATH"
            )
        return [exe, *spec.command[1:]]

    def _new_cgroup(self, spec: FunctionSpec) -> Cgroup | None:
        """The instance's cgroup, or None under rlimits.

        Raises:
            RuntimeFailure: the cgroup could not be made.
        """
        if not self._cgroups.active:
            return None
        try:
            return self._cgroups.new(spec.memory_limit_bytes)
        except CgroupError as exc:
            raise RuntimeFailure(str(exc)) from exc

    def _argv(
        self, spec: FunctionSpec, timeout_s: float | None, target: list[str], cgroup: Cgroup | None
    ) -> list[str]:
        """The wrapper's command line; `timeout_s` None (a worker) sets RLIMIT_CPU only if
        configured; with a cgroup, the wrapper joins it and memory is not an rlimit."""
        if self._config.cpu_time_limit_s:
            cpu_s: int | None = self._config.cpu_time_limit_s
        else:
            cpu_s = None if timeout_s is None else max(1, math.ceil(timeout_s))
        memory_limit_bytes = spec.memory_limit_bytes if cgroup is None else None
        if self._launcher is None:
            script = limits_script(
                self._config,
                memory_limit_bytes=memory_limit_bytes,
                cpu_s=cpu_s,
                join="" if cgroup is None else cgroup.join_script(),
            )
            return [*self._prefix, SHELL, "-c", script, *target]
        argv = [*self._prefix, self._launcher]
        for limit in rlimits(self._config, memory_limit_bytes=memory_limit_bytes, cpu_s=cpu_s):
            argv.extend(map(str, limit))
        argv.append("-")
        if cgroup is not None:
            argv.extend(map(str, cgroup.procs_files()))
        argv.append("-")
        return [*argv, *target]

    def _resolve(self, command: str, spec: FunctionSpec) -> str | None:
        """The executable `command` names on the call's PATH (cached: a lookup costs
        about 0.25 ms; an executable removed later fails at exec with exit code 127)."""
        path = spec.env.get("PATH", self._base_env.get("PATH", os.defpath))
        key = (command, path)
        if key not in self._resolved:
            self._resolved[key] = shutil.which(command, path=path)
        return self._resolved[key]

    def _stage(self, spec: FunctionSpec) -> None:
        """Copy the artifact to `<work_dir>/artifacts/<sha256>` with mode 0755 (blocking)."""
        assert spec.artifact_sha256 is not None
        target = self._artifacts / spec.artifact_sha256
        if not target.exists():
            if spec.artifact_path is None:
                raise RuntimeFailure(f"artifact {spec.artifact_sha256} has no file on this node")
            fd, partial = tempfile.mkstemp(dir=self._artifacts, suffix=".tmp")
            try:
                os.close(fd)
                shutil.copyfile(spec.artifact_path, partial)
                os.chmod(partial, 0o755)
                os.replace(partial, target)  # atomic: a concurrent stager's copy is the same
            except OSError as exc:
                with suppress(OSError):
                    os.unlink(partial)
                raise RuntimeFailure(
                    f"cannot stage artifact {spec.artifact_sha256}: {exc.strerror}"
                ) from exc
        self._staged.add(spec.artifact_sha256)


def rlimits(
    config: ProcessConfig, *, memory_limit_bytes: int | None, cpu_s: int | None
) -> list[tuple[int, int, int]]:
    """The launcher's `(resource, soft, hard)` limits, those of `limits_script` (see its
    arguments): only ever lowered, each clamped to the node's own hard limit."""
    limits: list[tuple[int, int, int]] = []
    if memory_limit_bytes is not None:
        memory = clamp(resource.RLIMIT_AS, memory_limit_bytes)
        limits.append((resource.RLIMIT_AS, memory, memory))
    nofile = clamp(resource.RLIMIT_NOFILE, config.rlimit_nofile)
    limits.extend([(resource.RLIMIT_NOFILE, nofile, nofile), (resource.RLIMIT_CORE, 0, 0)])
    if cpu_s is not None:
        cpu = (clamp(resource.RLIMIT_CPU, cpu_s), clamp(resource.RLIMIT_CPU, cpu_s + 1))
        limits.append((resource.RLIMIT_CPU, *cpu))
    if config.rlimit_nproc:
        nproc = clamp(resource.RLIMIT_NPROC, config.rlimit_nproc)
        limits.append((resource.RLIMIT_NPROC, nproc, nproc))
    return limits


class _Call:
    """One call's captures, stop reason and timings."""

    __slots__ = (
        "cgroup",
        "logs",
        "oom_kills",
        "output",
        "spawned",
        "spec",
        "started",
        "stop_reason",
        "timeout_s",
    )

    def __init__(
        self, spec: FunctionSpec, timeout_s: float, started: float, cgroup: Cgroup | None
    ) -> None:
        self.spec = spec
        self.cgroup = cgroup
        self.oom_kills = 0
        self.timeout_s = timeout_s
        self.started = started
        self.spawned = started
        self.output = OutputCapture(spec.max_output_bytes)
        self.logs = LogCapture(spec.max_log_bytes)
        self.stop_reason: ErrorCode | None = None

    def stop(self, reason: ErrorCode) -> None:
        if self.stop_reason is None:
            self.stop_reason = reason

    def kill_all(self, pgid: int) -> None:
        """Kill the call's process group and, with a cgroup, every member of it."""
        kill_group(pgid)
        if self.cgroup is not None:
            self.cgroup.kill()

    def outcome(self, returncode: int | None) -> RunOutcome:
        if self.cgroup is not None:
            self.oom_kills = self.cgroup.oom_kills()
        done = time.perf_counter()
        return self._verdict(returncode).outcome(
            self.output,
            self.logs,
            acquire_s=self.spawned - self.started,
            run_s=done - self.spawned,
        )

    def _verdict(self, returncode: int | None) -> Verdict:
        if self.stop_reason is ErrorCode.TIMEOUT:
            return timed_out(self.timeout_s)
        if self.stop_reason is ErrorCode.OUTPUT_LIMIT:
            return output_overflowed(self.output.limit)
        code = -1 if returncode is None else returncode
        if code == 0:
            return SUCCEEDED
        if code == -signal.SIGXCPU:
            message = "the function used up its CPU time limit (RLIMIT_CPU) and was killed"
            return Verdict(ExecStatus.TIMEOUT, ErrorCode.TIMEOUT, message, code)
        how = f"was killed by {signal_name(-code)}" if code < 0 else f"exited with code {code}"
        if self.oom_kills:
            message = (
                f"the function {how}: its cgroup passed memory_limit_bytes"
                f" ({self.spec.memory_limit_bytes}) and the kernel's OOM killer stopped it"
            )
            return failed(ErrorCode.MEMORY_LIMIT, message, code)
        if self.cgroup is None and self.logs.contains(MEMORY_MARKERS):
            message = (
                f"the function {how} after an allocation failed under its memory_limit_bytes"
                f" ({self.spec.memory_limit_bytes}, enforced as RLIMIT_AS)"
            )
            return failed(ErrorCode.MEMORY_LIMIT, message, code)
        return failed(ErrorCode.EXIT_NONZERO, f"the function {how}", code)


# --- the pipes of one call ----------------------------------------------------------------


def _feed_now(stream: trio.lowlevel.FdStream, data: bytes) -> bool:
    """Write `data` and close `stream` if the pipe takes it all at once; False (nothing or
    part written, `data` not consumed) if a task must feed it."""
    if len(data) > PIPE_BUF_BYTES:
        return False
    try:
        if data:
            os.write(stream.fileno(), data)  # atomic up to PIPE_BUF: all or nothing
    except BlockingIOError:
        return False
    except BrokenPipeError:
        pass  # the function exited without reading its input
    stream.close()
    return True


async def _feed(stream: trio.abc.SendStream, data: bytes) -> None:
    with suppress(trio.BrokenResourceError, trio.ClosedResourceError):
        async with stream:
            if data:
                await stream.send_all(data)


class _Pumps:
    """Counts the output pipes still open; `done` is set once all reached end of file."""

    __slots__ = ("done", "open")

    def __init__(self, count: int) -> None:
        self.open = count
        self.done = trio.Event()

    def closed(self) -> None:
        self.open -= 1
        if not self.open:
            self.done.set()


async def _pump(
    stream: trio.abc.ReceiveStream, sink: Callable[[bytes], None], pumps: _Pumps
) -> None:
    try:
        with suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            async with stream:
                while chunk := await stream.receive_some(READ_CHUNK_BYTES):
                    sink(bytes(chunk))
    finally:
        pumps.closed()


# --- the launcher: lowers the rlimits and joins the cgroup, then execs the function -------

#: x86-64 Linux machine code of the launcher (no libc; everything through raw syscalls).
#: argv: `launcher [RESOURCE SOFT HARD]... - [CGROUP_PROCS_FILE]... - EXECUTABLE ARG...`,
#: numbers in decimal. It calls prlimit64(0, RESOURCE, {SOFT, HARD}) for each triple, writes
#: "0" (the writer itself) to each cgroup.procs file, and execve()s EXECUTABLE with its
#: arguments and the environment it was given. On failure it writes one line to stderr and
#: exits: 125 (a limit or the cgroup), 127 (no such executable) or 126 (cannot execute).
#: The source is the assembly in the comments (GNU as, .intel_syntax noprefix); the tests
#: assemble it again when `as` is there and compare.
LAUNCHER_X86_64: Final = bytes.fromhex(
    # _start: rbx = the initial stack (argc, argv..., NULL, envp...), r14 = &argv[1],
    # 16 bytes of stack for a struct rlimit
    "4889e3"  # mov rbx, rsp
    "4c8d7310"  # lea r14, [rbx + 16]
    "4883ec10"  # sub rsp, 16
    # limit: until "-", prlimit64(0, number(r14[0]), {number(r14[1]), number(r14[2])}, 0)
    "498b3e"  # mov rdi, [r14]
    "66833f2d"  # cmp word ptr [rdi], 0x2d        ("-" and its NUL)
    "7444"  # je join_next
    "e8ff000000"  # call number
    "4989c4"  # mov r12, rax
    "498b7e08"  # mov rdi, [r14 + 8]
    "e8f3000000"  # call number
    "48890424"  # mov [rsp], rax
    "498b7e10"  # mov rdi, [r14 + 16]
    "e8e6000000"  # call number
    "4889442408"  # mov [rsp + 8], rax
    "b82e010000"  # mov eax, 302                  (prlimit64)
    "31ff"  # xor edi, edi
    "4c89e6"  # mov rsi, r12
    "4889e2"  # mov rdx, rsp
    "4531d2"  # xor r10d, r10d
    "0f05"  # syscall
    "4885c0"  # test rax, rax
    "0f858a000000"  # jnz fail_limit
    "4983c618"  # add r14, 24
    "ebb3"  # jmp limit
    # join_next: until "-", fd = open(path, O_WRONLY | O_CLOEXEC); write(fd, "0", 1); close
    "4983c608"  # add r14, 8
    "498b3e"  # mov rdi, [r14]
    "66833f2d"  # cmp word ptr [rdi], 0x2d
    "743e"  # je exec
    "b802000000"  # mov eax, 2                    (open)
    "be01000800"  # mov esi, 0x80001
    "31d2"  # xor edx, edx
    "0f05"  # syscall
    "4885c0"  # test rax, rax
    "7878"  # js fail_join
    "4989c7"  # mov r15, rax
    "b801000000"  # mov eax, 1                    (write)
    "4c89ff"  # mov rdi, r15
    "488d35b3000000"  # lea rsi, [rip + zero]
    "ba01000000"  # mov edx, 1
    "0f05"  # syscall
    "4883f801"  # cmp rax, 1
    "7559"  # jne fail_join
    "b803000000"  # mov eax, 3                    (close)
    "4c89ff"  # mov rdi, r15
    "0f05"  # syscall
    "ebb5"  # jmp join_next
    # exec: execve(r14[1], &r14[1], envp = &argv[argc + 1])
    "4983c608"  # add r14, 8
    "b83b000000"  # mov eax, 59                   (execve)
    "498b3e"  # mov rdi, [r14]
    "4c89f6"  # mov rsi, r14
    "488b0b"  # mov rcx, [rbx]
    "488d54cb10"  # lea rdx, [rbx + rcx*8 + 16]
    "0f05"  # syscall
    "41bc7f000000"  # mov r12d, 127
    "4883f8fe"  # cmp rax, -2                     (ENOENT)
    "7406"  # je 1f
    "41bc7e000000"  # mov r12d, 126
    "488d3569000000"  # 1: lea rsi, [rip + msg_exec]
    "ba23000000"  # mov edx, msg_limit - msg_exec
    "eb26"  # jmp die
    # fail_limit, fail_join: the exit code in r12d, the message in rsi, rdx
    "41bc7d000000"  # fail_limit: mov r12d, 125
    "488d3578000000"  # lea rsi, [rip + msg_limit]
    "ba23000000"  # mov edx, msg_join - msg_limit
    "eb12"  # jmp die
    "41bc7d000000"  # fail_join: mov r12d, 125
    "488d3587000000"  # lea rsi, [rip + msg_join]
    "ba1e000000"  # mov edx, msg_end - msg_join
    # die: write(2, rsi, rdx); exit_group(r12d)
    "b801000000"  # mov eax, 1
    "bf02000000"  # mov edi, 2
    "0f05"  # syscall
    "b8e7000000"  # mov eax, 231                  (exit_group)
    "4489e7"  # mov edi, r12d
    "0f05"  # syscall
    # number: rax = the decimal digits at rdi (none or another character: fail_limit)
    "31c0"  # xor eax, eax
    "0fb60f"  # movzx ecx, byte ptr [rdi]
    "85c9"  # test ecx, ecx
    "74bb"  # jz fail_limit
    "0fb60f"  # 2: movzx ecx, byte ptr [rdi]
    "85c9"  # test ecx, ecx
    "7414"  # jz 3f
    "83e930"  # sub ecx, 0x30
    "83f909"  # cmp ecx, 9
    "77ac"  # ja fail_limit
    "486bc00a"  # imul rax, rax, 10
    "4801c8"  # add rax, rcx
    "48ffc7"  # inc rdi
    "ebe5"  # jmp 2b
    "c3"  # 3: ret
)
_LAUNCHER_DATA: Final = (
    b"0"  # zero
    b"spear: cannot execute the function\n"  # msg_exec
    b"spear: cannot set a resource limit\n"  # msg_limit
    b"spear: cannot join the cgroup\n"  # msg_join
)
#: where the launcher is loaded (a static executable: one read-and-execute segment)
_LAUNCHER_BASE: Final = 0x400000


def launcher_elf() -> bytes:
    """The launcher as a static ELF executable for x86-64 Linux: a header, a loadable segment
    (the headers, the code and its strings) and a non-executable stack."""
    headers = 64 + 2 * 56
    size = headers + len(LAUNCHER_X86_64) + len(_LAUNCHER_DATA)
    ident = b"\x7fELF" + bytes([2, 1, 1, 0]) + bytes(8)  # 64-bit, little-endian, SysV
    entry = _LAUNCHER_BASE + headers
    header = ident + struct.pack("<HHIQQQIHHHHHH", 2, 0x3E, 1, entry, 64, 0, 0, 64, 56, 2, 64, 0, 0)
    load = struct.pack("<IIQQQQQQ", 1, 5, 0, _LAUNCHER_BASE, _LAUNCHER_BASE, size, size, 0x1000)
    stack = struct.pack("<IIQQQQQQ", 0x6474E551, 6, 0, 0, 0, 0, 0, 16)  # PT_GNU_STACK, RW
    return header + load + stack + LAUNCHER_X86_64 + _LAUNCHER_DATA


def install_launcher(directory: Path) -> Path | str:
    """Write the launcher to `directory/launcher` and check that it runs; its path, or why
    this node uses the `/bin/sh` wrapper instead (not x86-64 Linux, or it did not run, e.g.
    a `noexec` mount)."""
    if platform.machine() not in ("x86_64", "AMD64") or sys.platform != "linux":
        return f"the launcher is x86-64 Linux machine code; this is {platform.machine()}"
    path = directory / "launcher"
    fd, partial = tempfile.mkstemp(dir=directory, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(launcher_elf())
        os.chmod(partial, 0o755)
        os.replace(partial, path)  # atomic: another runtime on this work_dir writes the same
        probe = [str(path), str(resource.RLIMIT_CORE), "0", "0", "-", "-"]
        probe.extend([shutil.which("true") or sys.executable, "-c", ""])
        done = subprocess.run(probe, capture_output=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError) as exc:
        with suppress(OSError):
            os.unlink(partial)
        return f"the launcher could not be installed in {directory}: {exc}"
    if done.returncode != 0:
        return f"the launcher did not run (exit code {done.returncode}: {done.stderr!r})"
    return path
