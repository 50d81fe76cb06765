"""Per-instance cgroups for the process runtime: memory and CPU limits that hold for every
process of an instance, and a kill that reaches all of them (cgroup v2 or v1).

A node that runs as root with a writable cgroup hierarchy gives each process-runtime instance
(a per-call run or a worker) a cgroup of its own, `spear-<node pid>-<token>-<n>`, made under the
node's own cgroup. The instance's launcher (or shell wrapper) joins it before it execs the
function (it writes itself into `cgroup.procs`: no `preexec_fn`, so the spawn keeps
CPython's fast path), so its first allocation is already counted and everything it forks is
a member, also what leaves the process group with setsid(). At the end every member is
killed and the cgroup removed, or, when empty, kept for the next instance with the same
memory limit (`MAX_SPARE`; the runtime's `aclose` removes them). Cgroups of nodes that are
gone (a SIGKILL) are emptied and removed when the next `Cgroups` starts.

- cgroup v2 (one `cgroup2` mount): `memory.max` (and `memory.swap.max` = 0 where swap is
  accounted), `cpu.max`, `pids.max`; the kill is `cgroup.kill` (Linux 5.14+; before it, each
  member is killed in turn). The parent's `cgroup.subtree_control` must enable the
  controllers: spear enables them, which the kernel refuses while processes live in the
  parent itself (the "no internal processes" rule); the runtime then falls back to rlimits.
- cgroup v1 (one mount per controller, e.g. hybrid systems): `memory.limit_in_bytes` and
  `memory.memsw.limit_in_bytes`, `cpu.cfs_period_us` / `cpu.cfs_quota_us`, `pids.max`, a
  directory per controller; membership is read from the memory controller's `cgroup.procs`.

Memory verdicts are exact here: the kernel's OOM killer counts its kills in the cgroup
(`memory.events` / `memory.oom_control`, field `oom_kill`).

The parsing and the limit files (`locate`, `limit_files`) are pure; `Cgroup` and
`Hierarchy.probe` do the file system work (a few small syscalls, fast enough for the event
loop's thread); `Cgroup.remove` is async only to wait out members that are still dying.
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import secrets
import shlex
import signal
from collections.abc import Iterable, Mapping
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, Literal

import trio

log = logging.getLogger(__name__)

Version = Literal[1, 2]
MEMORY: Final = "memory"
CPU: Final = "cpu"
PIDS: Final = "pids"
#: the period of a CPU quota (the kernel's default)
CPU_PERIOD_US: Final = 100_000
#: rounds of "kill every member" before giving up on a cgroup that keeps forking
KILL_ROUNDS: Final = 20
#: how long removing a cgroup may wait for its killed members to finish dying
REMOVE_WITHIN_S: Final = 2.0
#: empty cgroups kept for the next instances (removing and making one cost 0.3-0.5 ms, and
#: a v1 memory cgroup's rmdir now and then waits 10-15 ms for the kernel)
MAX_SPARE: Final = 16


class CgroupError(OSError):
    """A cgroup could not be made, limited or removed (the message says which file)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class CgroupSettings:
    """How the process runtime uses cgroups (`[runtimes.process]`)."""

    #: "auto": use them when the node can, else rlimits; "off": rlimits only
    mode: Literal["auto", "off"] = "auto"
    #: CPU quota of each instance, in CPUs (0.5 = half of one); 0 = no quota
    cpus: float = 0.0
    #: processes and threads per instance; 0 = no limit
    pids_limit: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class Limits:
    """The limits of one cgroup; a zero quota or pids count means none."""

    memory_bytes: int
    cpu_quota_us: int = 0
    pids_max: int = 0

    @property
    def controllers(self) -> tuple[str, ...]:
        """The controllers these limits need (memory always: it also tracks membership)."""
        return (
            MEMORY,
            *((CPU,) if self.cpu_quota_us else ()),
            *((PIDS,) if self.pids_max else ()),
        )


def cpu_quota_us(cpus: float) -> int:
    """The quota per `CPU_PERIOD_US` for `cpus` CPUs (at least the kernel's 1 ms minimum)."""
    return max(1000, round(cpus * CPU_PERIOD_US)) if cpus > 0 else 0


def limit_files(version: Version, limits: Limits) -> list[tuple[str, str, str]]:
    """(controller, file, value) to write, in order, to put `limits` on a new cgroup.

    Files that only some kernels have (swap accounting) come last and may be missing.
    """
    memory = str(limits.memory_bytes)
    writes: list[tuple[str, str, str]] = []
    if version == 2:
        writes.append((MEMORY, "memory.max", memory))
        if limits.cpu_quota_us:
            writes.append((CPU, "cpu.max", f"{limits.cpu_quota_us} {CPU_PERIOD_US}"))
        if limits.pids_max:
            writes.append((PIDS, "pids.max", str(limits.pids_max)))
        writes.append((MEMORY, "memory.swap.max", "0"))
        return writes
    writes.append((MEMORY, "memory.limit_in_bytes", memory))
    if limits.cpu_quota_us:
        writes.append((CPU, "cpu.cfs_period_us", str(CPU_PERIOD_US)))
        writes.append((CPU, "cpu.cfs_quota_us", str(limits.cpu_quota_us)))
    if limits.pids_max:
        writes.append((PIDS, "pids.max", str(limits.pids_max)))
    # memsw must stay >= the memory limit, so it comes after it
    writes.append((MEMORY, "memory.memsw.limit_in_bytes", memory))
    return writes


#: limit files a kernel may lack (no swap accounting)
OPTIONAL_FILES: Final = frozenset({"memory.swap.max", "memory.memsw.limit_in_bytes"})


# --- where cgroups go (pure) ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Hierarchy:
    """Where this node's instance cgroups go: the parent directory of each controller."""

    version: Version
    parents: Mapping[str, Path] = field(default_factory=dict)

    def describe(self) -> str:
        dirs = sorted({str(p) for p in self.parents.values()})
        return f"cgroup v{self.version} under {', '.join(dirs)}"


def locate(proc_cgroup: str, mountinfo: str, *, need: Iterable[str]) -> Hierarchy | str:
    """Find where the node's instance cgroups go, from `/proc/self/cgroup` and
    `/proc/self/mountinfo`; a sentence saying why not if no hierarchy has the controllers in
    `need` (v1 is chosen when the memory controller is mounted there: a controller lives in
    one hierarchy only).
    """
    own = _own_paths(proc_cgroup)
    v1: dict[str, Path] = {}
    v2: Path | None = None
    for root, mount_point, fstype, options in _cgroup_mounts(mountinfo):
        if fstype == "cgroup2":
            if "" in own and v2 is None:
                v2 = _join(mount_point, root, own[""])
            continue
        for controller in options & set(own):
            v1[controller] = _join(mount_point, root, own[controller])
    need = tuple(need)
    if MEMORY in v1:
        missing = [c for c in need if c not in v1]
        if missing:
            return f"cgroup v1 has no {' or '.join(missing)} controller mounted"
        return Hierarchy(1, {c: v1[c] for c in need})
    if v2 is not None:
        return Hierarchy(2, dict.fromkeys(need, v2))
    return "no cgroup hierarchy is mounted (neither a cgroup2 mount nor a v1 memory controller)"


def _own_paths(proc_cgroup: str) -> dict[str, str]:
    """controller -> this process's cgroup path ("" is the v2 hierarchy)."""
    own: dict[str, str] = {}
    for line in proc_cgroup.splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3:
            for controller in parts[1].split(",") if parts[1] else [""]:
                own[controller] = parts[2]
    return own


def _cgroup_mounts(mountinfo: str) -> Iterable[tuple[str, str, str, set[str]]]:
    """(root, mount point, fstype, super options) of each cgroup mount."""
    for line in mountinfo.splitlines():
        left, sep, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if not sep or len(fields) < 5 or len(tail) < 3:
            continue
        if tail[0] in ("cgroup", "cgroup2"):
            yield _unescape(fields[3]), _unescape(fields[4]), tail[0], set(tail[2].split(","))


def _unescape(text: str) -> str:
    """mountinfo writes space, tab, newline and backslash as octal escapes."""
    for code in ("\\040", "\\011", "\\012", "\\134"):
        text = text.replace(code, chr(int(code[1:], 8)))
    return text


def _join(mount_point: str, root: str, path: str) -> Path:
    """The directory of cgroup `path` on a mount of the hierarchy's subtree `root`."""
    if root != "/" and (path == root or path.startswith(root + "/")):
        path = path[len(root) :]
    return Path(mount_point) / path.lstrip("/")


# --- one cgroup (file system work) -------------------------------------------------------------


class Cgroup:
    """One instance's cgroup: a directory per controller (v1) or one directory (v2)."""

    def __init__(self, version: Version, dirs: Mapping[str, Path], memory_bytes: int = 0) -> None:
        self.version = version
        self.dirs = dict(dirs)
        self.memory_bytes = memory_bytes
        self._unique = sorted(set(self.dirs.values()))
        self.path = self.dirs[MEMORY]
        self._oom_base = 0  # OOM kills counted before this cgroup's current instance

    @classmethod
    def create(cls, hierarchy: Hierarchy, name: str, limits: Limits) -> Cgroup:
        """Make cgroup `name` in `hierarchy` with `limits`.

        Raises:
            CgroupError: a directory or a limit file could not be written (nothing is left).
        """
        dirs = {c: hierarchy.parents[c] / name for c in limits.controllers}
        cgroup = cls(hierarchy.version, dirs, limits.memory_bytes)
        made: list[Path] = []
        try:
            for path in cgroup._unique:
                os.mkdir(path)
                made.append(path)
            for controller, filename, value in limit_files(hierarchy.version, limits):
                cgroup._write(controller, filename, value)
        except OSError as exc:
            for path in reversed(made):
                _rmdir_quietly(path)
            raise CgroupError(exc.errno, f"cannot set up cgroup {name}: {exc}") from exc
        return cgroup

    def procs_files(self) -> list[Path]:
        """The `cgroup.procs` files a process writes itself into to join this cgroup."""
        return [path / "cgroup.procs" for path in self._unique]

    def join_script(self) -> str:
        """Shell commands that move the shell running them (`$$`) into this cgroup."""
        return " && ".join(
            f"echo $$ > {shlex.quote(str(p / 'cgroup.procs'))}" for p in self._unique
        )

    def members(self) -> list[int]:
        """The pids in the cgroup now (an empty list once it is gone)."""
        try:
            with open(self.path / "cgroup.procs", "rb") as file:
                return [int(pid) for pid in file.read().split()]
        except FileNotFoundError:
            return []

    def kill(self) -> None:
        """SIGKILL every member (also those that left the process group)."""
        if self.version == 2:
            try:
                self._write(MEMORY, "cgroup.kill", "1")
                return
            except FileNotFoundError:  # before Linux 5.14: one by one
                pass
            except OSError as exc:
                log.warning("cannot write cgroup.kill of %s: %s", self.path, exc)
        for _ in range(KILL_ROUNDS):  # a member may fork while we kill
            members = self.members()
            if not members:
                return
            for pid in members:
                with suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)

    def oom_kills(self) -> int:
        """How many processes the kernel's OOM killer killed in this cgroup since it was made
        or last `reuse`d."""
        return self._oom_kills_ever() - self._oom_base

    def reuse(self) -> None:
        """Start counting OOM kills afresh: the cgroup serves another instance."""
        self._oom_base = self._oom_kills_ever()

    def _oom_kills_ever(self) -> int:
        filename = "memory.events" if self.version == 2 else "memory.oom_control"
        try:
            with open(self.path / filename, "rb") as file:
                text = file.read()
        except OSError:
            return 0
        for line in text.splitlines():
            key, _, value = line.partition(b" ")
            if key == b"oom_kill":
                return int(value)
        return 0

    async def remove(self) -> None:
        """Kill every member, then remove the directories (waiting, bounded, for members to
        finish dying: the kernel refuses with EBUSY until they have).

        A cgroup still busy at the bound is logged and left behind.
        """
        self.kill()
        delay_s = 0.0005
        with trio.move_on_after(REMOVE_WITHIN_S):
            while True:
                busy = [p for p in self._unique if not _rmdir_quietly(p)]
                if not busy:
                    return
                self._unique = busy
                await trio.sleep(delay_s)
                delay_s = min(delay_s * 2, 0.05)
                self.kill()
        log.warning(
            "cgroup %s still has members after %.1f s; left behind", self.path, REMOVE_WITHIN_S
        )

    def _write(self, controller: str, filename: str, value: str) -> None:
        try:
            with open(self.dirs[controller] / filename, "w") as file:
                file.write(value)
        except FileNotFoundError:
            if filename not in OPTIONAL_FILES:
                raise


def _rmdir_quietly(path: Path) -> bool:
    """Remove an empty cgroup directory; False while members keep it busy."""
    try:
        os.rmdir(path)
    except FileNotFoundError:
        return True
    except OSError as exc:
        if exc.errno == errno.EBUSY:
            return False
        raise
    return True


# --- the runtime's view -------------------------------------------------------------------------


class Cgroups:
    """Whether this node gives process-runtime instances cgroups, and makes them.

    Built once at start: finds the hierarchy and probes it by making (and removing) a cgroup
    with the configured limits. `active` is False with a `reason` when the node cannot, or
    `settings.mode` is "off"; the runtime then uses rlimits.
    """

    def __init__(
        self,
        settings: CgroupSettings,
        *,
        proc_cgroup: str | None = None,
        mountinfo: str | None = None,
    ) -> None:
        self.settings = settings
        self.hierarchy: Hierarchy | None = None
        self.reason = ""
        self.reaped = 0
        self._orphans: list[Cgroup] = []
        self._spare: dict[int, list[Cgroup]] = {}  # by memory limit
        # several runtimes may share a process (in-process test clusters): a token apart
        prefix = f"spear-{os.getpid()}-{secrets.token_hex(3)}"
        self._prefix = prefix
        self._names = (f"{prefix}-{n}" for n in itertools.count(1))
        self._template = Limits(
            memory_bytes=1 << 30,
            cpu_quota_us=cpu_quota_us(settings.cpus),
            pids_max=settings.pids_limit,
        )
        if settings.mode == "off":
            self.reason = "turned off (runtimes.process.cgroups = off)"
            return
        if os.geteuid() != 0:
            self.reason = "the node does not run as root"
            return
        try:
            proc_cgroup = proc_cgroup or Path("/proc/self/cgroup").read_text()
            mountinfo = mountinfo or Path("/proc/self/mountinfo").read_text()
        except OSError as exc:
            self.reason = f"cannot read this process's cgroups: {exc}"
            return
        found = locate(proc_cgroup, mountinfo, need=self._template.controllers)
        if isinstance(found, str):
            self.reason = found
            return
        try:
            if found.version == 2:
                _enable_v2(found, self._template.controllers)
            probe = Cgroup.create(found, f"{self._prefix}-probe", self._template)
            if not _rmdir_quietly_all(probe):
                raise CgroupError(errno.EBUSY, f"cannot remove the probe cgroup {probe.path}")
        except OSError as exc:
            self.reason = f"{found.describe()} is not usable: {exc}"
            return
        self.hierarchy = found
        self.reaped = self._reap_orphans()

    def _reap_orphans(self) -> int:
        """Kill the members of the cgroups of nodes that are gone (`spear-<pid>-<n>` whose
        pid is not running: a node killed with SIGKILL leaves them) and remove the cgroups,
        now or (still busy with dying members) on a later `new` or `aclose`; how many."""
        assert self.hierarchy is not None
        names: set[str] = set()
        for parent in set(self.hierarchy.parents.values()):
            names.update(p.name for p in parent.iterdir() if p.name.startswith("spear-"))
        found = 0
        for name in sorted(names):
            pid = name.split("-")[1]
            if not pid.isdigit() or Path(f"/proc/{pid}").exists():
                continue
            dirs = {c: p / name for c, p in self.hierarchy.parents.items() if (p / name).is_dir()}
            if MEMORY not in dirs:
                continue
            orphan = Cgroup(self.hierarchy.version, dirs)
            try:
                orphan.kill()
            except OSError as exc:  # another user's, or a kernel that says no: leave it
                log.warning("cannot empty the cgroup %s: %s", orphan.path, exc)
                continue
            found += 1
            self._orphans.append(orphan)
        self._remove_orphans()
        if found:
            log.info("killed what was left in %d cgroups of nodes that are gone", found)
        return found

    def _remove_orphans(self) -> None:
        """Remove the orphans whose members have finished dying (no waiting)."""
        busy = []
        for orphan in self._orphans:
            try:
                if not _rmdir_quietly_all(orphan):
                    busy.append(orphan)
            except OSError as exc:
                log.warning("cannot remove the cgroup %s: %s", orphan.path, exc)
        self._orphans = busy

    @property
    def spare(self) -> int:
        """Empty cgroups kept for the next instances."""
        return sum(len(spares) for spares in self._spare.values())

    @property
    def active(self) -> bool:
        return self.hierarchy is not None

    def describe(self) -> str:
        """What limits memory and CPU: the cgroup hierarchy, or rlimits and why."""
        if self.hierarchy is None:
            return f"rlimits (no cgroups: {self.reason})"
        return self.hierarchy.describe()

    def new(self, memory_limit_bytes: int) -> Cgroup:
        """A fresh cgroup for one instance with the node's CPU and pids limits.

        Raises:
            CgroupError: it could not be made (the caller reports a start failure).
        """
        assert self.hierarchy is not None, "new() needs an active Cgroups"
        if self._orphans:
            self._remove_orphans()
        spares = self._spare.get(memory_limit_bytes)
        if spares:
            cgroup = spares.pop()
            cgroup.reuse()
            return cgroup
        limits = Limits(
            memory_bytes=memory_limit_bytes,
            cpu_quota_us=self._template.cpu_quota_us,
            pids_max=self._template.pids_max,
        )
        return Cgroup.create(self.hierarchy, next(self._names), limits)

    async def release(self, cgroup: Cgroup) -> None:
        """An instance is done with `cgroup`: kill what is left in it, then keep it for the
        next instance with the same memory limit if it is empty and fewer than `MAX_SPARE`
        are kept; else remove it."""
        cgroup.kill()
        if self.spare < MAX_SPARE and not cgroup.members():
            self._spare.setdefault(cgroup.memory_bytes, []).append(cgroup)
            return
        await cgroup.remove()

    async def aclose(self) -> None:
        """Remove the spare cgroups (and those of gone nodes still waiting for removal)."""
        spares = [cgroup for group in self._spare.values() for cgroup in group]
        spares += self._orphans
        self._spare.clear()
        self._orphans = []
        for cgroup in spares:
            await cgroup.remove()


def _enable_v2(hierarchy: Hierarchy, controllers: tuple[str, ...]) -> None:
    """Enable `controllers` for the children of the v2 parent directory.

    Raises:
        CgroupError: the parent lacks one, or the kernel refuses (processes in the parent).
    """
    parent = hierarchy.parents[MEMORY]
    available = (parent / "cgroup.controllers").read_text().split()
    missing = [c for c in controllers if c not in available]
    if missing:
        raise CgroupError(errno.ENOENT, f"{parent} offers no {' or '.join(missing)} controller")
    enabled = (parent / "cgroup.subtree_control").read_text().split()
    wanted = " ".join(f"+{c}" for c in controllers if c not in enabled)
    if not wanted:
        return
    try:
        (parent / "cgroup.subtree_control").write_text(wanted)
    except OSError as exc:
        raise CgroupError(
            exc.errno,
            f"cannot enable {wanted} in {parent}/cgroup.subtree_control ({exc.strerror}); with"
            " processes in that cgroup the kernel refuses: run the node in a cgroup of its own",
        ) from exc


def _rmdir_quietly_all(cgroup: Cgroup) -> bool:
    return all(_rmdir_quietly(path) for path in cgroup._unique)
