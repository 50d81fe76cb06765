"""Per-instance cgroups of the process runtime: the pure parts (locating the hierarchy, the
limit files), then real cgroups on this machine (memory, CPU and pids limits, the kill that
reaches processes outside the group, removal) and the v2 kill on a real cgroup2 mount."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio

from spear.config import ProcessConfig
from spear.model import ErrorCode, ExecStatus, FunctionSpec
from spear.runtimes import ProcessRuntime
from spear.runtimes.base import WORKER
from spear.runtimes.cgroups import (
    Cgroup,
    Cgroups,
    CgroupSettings,
    Hierarchy,
    Limits,
    cpu_quota_us,
    limit_files,
    locate,
)
from spear.runtimes.process_worker import ProcessInstance
from tests.conftest import require_real_part
from tests.runtimes.conftest import MiB, function_spec, wait_gone

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
FOREVER = math.inf
STEP_S = 20.0

# --- pure: where cgroups go, and what is written -------------------------------------------------

HYBRID_CGROUP = """\
9:name=systemd:/
8:pids:/
4:memory:/process_api/abc
2:cpu,cpuacct:/
0::/
"""
HYBRID_MOUNTS = """\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
"""
V2_CGROUP = "0::/system.slice/spear.service\n"
V2_MOUNTS = "30 23 0:27 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n"


def test_locate_prefers_v1_where_the_memory_controller_is() -> None:
    found = locate(HYBRID_CGROUP, HYBRID_MOUNTS, need=("memory", "cpu", "pids"))
    assert found == Hierarchy(
        1,
        {
            "memory": Path("/sys/fs/cgroup/memory/process_api/abc"),
            "cpu": Path("/sys/fs/cgroup/cpu,cpuacct"),
            "pids": Path("/sys/fs/cgroup/pids"),
        },
    )


def test_locate_v2_under_the_own_cgroup() -> None:
    found = locate(V2_CGROUP, V2_MOUNTS, need=("memory", "cpu"))
    parent = Path("/sys/fs/cgroup/system.slice/spear.service")
    assert found == Hierarchy(2, {"memory": parent, "cpu": parent})


def test_locate_a_mount_of_a_subtree() -> None:
    # A container without a cgroup namespace: the mount shows only the container's subtree.
    mounts = "35 31 0:32 /docker/c1 /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n"
    found = locate("4:memory:/docker/c1/inner\n", mounts, need=("memory",))
    assert found == Hierarchy(1, {"memory": Path("/sys/fs/cgroup/memory/inner")})


def test_locate_says_why_not() -> None:
    assert "no cgroup hierarchy" in str(locate("4:memory:/\n", "", need=("memory",)))
    missing = locate(HYBRID_CGROUP, HYBRID_MOUNTS.replace("pids", "x"), need=("memory", "pids"))
    assert missing == "cgroup v1 has no pids controller mounted"


def test_limit_files_v2_and_v1() -> None:
    limits = Limits(memory_bytes=64 * MiB, cpu_quota_us=50_000, pids_max=32)
    assert limit_files(2, limits) == [
        ("memory", "memory.max", str(64 * MiB)),
        ("cpu", "cpu.max", "50000 100000"),
        ("pids", "pids.max", "32"),
        ("memory", "memory.swap.max", "0"),
    ]
    assert limit_files(1, limits) == [
        ("memory", "memory.limit_in_bytes", str(64 * MiB)),
        ("cpu", "cpu.cfs_period_us", "100000"),
        ("cpu", "cpu.cfs_quota_us", "50000"),
        ("pids", "pids.max", "32"),
        ("memory", "memory.memsw.limit_in_bytes", str(64 * MiB)),
    ]
    assert limit_files(2, Limits(memory_bytes=MiB)) == [
        ("memory", "memory.max", str(MiB)),
        ("memory", "memory.swap.max", "0"),
    ]
    assert Limits(memory_bytes=MiB).controllers == ("memory",)
    assert (cpu_quota_us(0), cpu_quota_us(0.5), cpu_quota_us(0.001)) == (0, 50_000, 1000)


async def test_v2_limits_on_a_directory_tree(tmp_path: Path) -> None:
    """The v2 writes land in their files (a plain directory stands in for cgroup2: this
    machine's cgroup2 mount has no memory controller)."""
    hierarchy = Hierarchy(2, {"memory": tmp_path, "cpu": tmp_path})
    cgroup = Cgroup.create(hierarchy, "spear-1-1", Limits(memory_bytes=MiB, cpu_quota_us=20_000))
    files = {p.name: p.read_text() for p in (tmp_path / "spear-1-1").iterdir()}
    assert files == {"memory.max": str(MiB), "cpu.max": "20000 100000", "memory.swap.max": "0"}
    assert "spear-1-1/cgroup.procs" in cgroup.join_script()


def test_off_and_describe() -> None:
    off = Cgroups(CgroupSettings(mode="off"))
    assert not off.active
    assert off.describe() == "rlimits (no cgroups: turned off (runtimes.process.cgroups = off))"
    none = Cgroups(CgroupSettings(), proc_cgroup="4:memory:/\n", mountinfo="\n")
    assert not none.active
    assert "no cgroup hierarchy is mounted" in none.describe()


# --- real cgroups on this machine ----------------------------------------------------------------

SETTINGS = CgroupSettings(cpus=0.5, pids_limit=64)


def require_cgroups() -> Cgroups:
    cgroups = Cgroups(SETTINGS)
    require_real_part("a writable cgroup hierarchy", cgroups.active, cgroups.reason)
    return cgroups


@pytest.fixture
async def runtime(tmp_path: Path) -> AsyncIterator[ProcessRuntime]:
    require_cgroups()
    runtime = ProcessRuntime(ProcessConfig(), work_dir=tmp_path / "work", cgroups=SETTINGS)
    try:
        yield runtime
    finally:
        await runtime.aclose()


def leftovers(runtime: ProcessRuntime) -> list[Path]:
    """This node's cgroups present under every parent directory."""
    hierarchy = runtime._cgroups.hierarchy
    assert hierarchy is not None
    mine = f"spear-{os.getpid()}-"
    return [p for d in hierarchy.parents.values() for p in d.iterdir() if p.name.startswith(mine)]


def nothing_runs(runtime: ProcessRuntime) -> bool:
    """Whether this node's cgroups are all empty (spares kept for the next calls)."""
    return all(not (path / "cgroup.procs").read_text().split() for path in leftovers(runtime))


def sh(script: str, **fields: Any) -> FunctionSpec:
    return function_spec(runtime="process", command=("/bin/sh", "-c", script), **fields)


async def test_describe_says_which_limits_apply(runtime: ProcessRuntime, tmp_path: Path) -> None:
    described = runtime.describe()
    assert described["cgroup_version"] in (1, 2)
    assert described["limits"].startswith("cgroup v")
    assert runtime.statistics()["cgroups"] is True
    plain = ProcessRuntime(ProcessConfig(), work_dir=tmp_path / "plain")
    assert plain.describe()["limits"].startswith("rlimits")


async def test_a_call_runs_in_its_own_cgroup_without_rlimit_as(runtime: ProcessRuntime) -> None:
    outcome = await runtime.run(sh("cat /proc/self/cgroup; ulimit -v"), b"", deadline=FOREVER)
    assert outcome.status is ExecStatus.SUCCEEDED, outcome.logs
    lines = outcome.output.decode().splitlines()
    assert lines[-1] == "unlimited"  # memory is the cgroup's, not an address-space limit
    mine = f"/spear-{os.getpid()}-"
    assert any(mine in line and "memory" in line.split(":")[1] for line in lines[:-1])
    assert nothing_runs(runtime)


async def test_the_shell_wrapper_joins_the_cgroup_too(tmp_path: Path) -> None:
    require_cgroups()
    work = tmp_path / "work"
    runtime = ProcessRuntime(ProcessConfig(), work_dir=work, cgroups=SETTINGS, launcher=False)
    try:
        assert runtime.describe()["launcher"].startswith("/bin/sh")
        outcome = await runtime.run(sh("cat /proc/self/cgroup"), b"", deadline=FOREVER)
        assert f"/spear-{os.getpid()}-" in outcome.output.decode()
    finally:
        await runtime.aclose()


async def test_cgroups_are_reused_and_removed_at_close(tmp_path: Path) -> None:
    require_cgroups()
    runtime = ProcessRuntime(ProcessConfig(), work_dir=tmp_path, cgroups=SETTINGS)
    try:
        cgroups = set()
        for _ in range(3):
            outcome = await runtime.run(sh("cat /proc/self/cgroup"), b"", deadline=FOREVER)
            cgroups.add(outcome.output)
        assert len(cgroups) == 1  # one cgroup, emptied and lent again
        assert runtime.statistics()["spare_cgroups"] == 1
        other = await runtime.run(sh("true", memory_limit_bytes=32 * MiB), b"", deadline=FOREVER)
        assert other.status is ExecStatus.SUCCEEDED
        assert runtime.statistics()["spare_cgroups"] == 2  # one per memory limit
    finally:
        await runtime.aclose()
    assert leftovers(runtime) == []


async def test_an_allocation_past_the_limit_is_a_memory_limit(runtime: ProcessRuntime) -> None:
    touch = "b = b'x' * (256 << 20)"  # written, not just reserved: the pages are charged
    spec = function_spec(
        runtime="process", command=(sys.executable, "-c", touch), memory_limit_bytes=64 * MiB
    )
    outcome = await runtime.run(spec, b"", deadline=FOREVER)
    assert outcome.status is ExecStatus.FAILED
    assert outcome.error_code is ErrorCode.MEMORY_LIMIT
    assert outcome.exit_code == -9
    assert "OOM killer" in (outcome.error_message or "")
    assert nothing_runs(runtime)
    # The cgroup is lent again, and counts OOM kills afresh for its next call.
    again = await runtime.run(sh("exit 3", memory_limit_bytes=64 * MiB), b"", deadline=FOREVER)
    assert again.error_code is ErrorCode.EXIT_NONZERO


async def test_a_process_that_left_the_group_is_killed_at_timeout(
    runtime: ProcessRuntime,
) -> None:
    # setsid(1) in a background job (not a group leader) execs in place: $! is its pid.
    spec = sh("setsid sleep 60 >/dev/null 2>&1 & echo $!; wait", timeout_s=0.5)
    outcome = await runtime.run(spec, b"", deadline=FOREVER)
    assert outcome.status is ExecStatus.TIMEOUT
    assert await wait_gone(int(outcome.output))
    assert nothing_runs(runtime)


async def test_a_process_that_left_the_group_is_killed_after_the_call(
    runtime: ProcessRuntime,
) -> None:
    spec = sh("setsid sleep 60 >/dev/null 2>&1 & echo $!")
    outcome = await runtime.run(spec, b"", deadline=FOREVER)
    assert outcome.status is ExecStatus.SUCCEEDED
    assert await wait_gone(int(outcome.output))
    assert nothing_runs(runtime)


def worker_spec(handler: str, **fields: Any) -> FunctionSpec:
    env = {"PYTHONPATH": os.pathsep.join([str(REPO), str(HERE)])}
    command = (sys.executable, "-m", "spear.worker", f"worker_handlers:{handler}")
    return function_spec(runtime="process", mode=WORKER, command=command, env=env, **fields)


async def start(runtime: ProcessRuntime, spec: FunctionSpec) -> ProcessInstance:
    with trio.fail_after(STEP_S):
        instance = await runtime.start_instance(spec)
    assert isinstance(instance, ProcessInstance)
    return instance


async def test_a_worker_gets_a_cgroup_with_the_limits(runtime: ProcessRuntime) -> None:
    instance = await start(runtime, worker_spec("upper", memory_limit_bytes=96 * MiB))
    try:
        pid = int(str(instance.statistics()["pid"]))
        cgroup = instance._cgroup
        assert cgroup is not None
        assert pid in cgroup.members()
        files = cgroup.dirs
        if cgroup.version == 1:
            assert (files["memory"] / "memory.limit_in_bytes").read_text() == f"{96 * MiB}\n"
            assert (files["cpu"] / "cpu.cfs_quota_us").read_text() == "50000\n"
        else:
            assert (files["memory"] / "memory.max").read_text() == f"{96 * MiB}\n"
            assert (files["cpu"] / "cpu.max").read_text() == "50000 100000\n"
        assert (files["pids"] / "pids.max").read_text() == "64\n"
        with trio.fail_after(STEP_S):
            outcome = await instance.invoke(b"hi", deadline=FOREVER, execution_id="ex-1")
        assert outcome.output == b"HI"
    finally:
        await instance.aclose()
    assert nothing_runs(runtime)


async def test_a_worker_past_its_memory_limit_is_a_memory_limit(runtime: ProcessRuntime) -> None:
    spec = worker_spec("big", memory_limit_bytes=64 * MiB, max_output_bytes=512 * MiB)
    instance = await start(runtime, spec)
    try:
        with trio.fail_after(STEP_S):
            outcome = await instance.invoke(
                str(256 * MiB).encode(), deadline=FOREVER, execution_id="ex-1"
            )
        assert outcome.error_code is ErrorCode.MEMORY_LIMIT
        assert "OOM killer" in (outcome.error_message or "")
        assert not instance.healthy
    finally:
        await instance.aclose()
    assert nothing_runs(runtime)


LEAVER = """
import subprocess

def leave(data, ctx):
    child = subprocess.Popen(["sleep", "60"], start_new_session=True)
    return str(child.pid).encode()
"""


async def test_a_worker_child_that_left_the_group_dies_with_the_worker(
    runtime: ProcessRuntime, tmp_path: Path
) -> None:
    (tmp_path / "leaver.py").write_text(LEAVER)
    env = {"PYTHONPATH": os.pathsep.join([str(REPO), str(tmp_path)])}
    command = (sys.executable, "-m", "spear.worker", "leaver:leave")
    spec = function_spec(runtime="process", mode=WORKER, command=command, env=env)
    instance = await start(runtime, spec)
    with trio.fail_after(STEP_S):
        outcome = await instance.invoke(b"", deadline=FOREVER, execution_id="ex-1")
    child = int(outcome.output)
    assert os.getpgid(child) == child  # out of the worker's group: only the cgroup holds it
    await instance.aclose()
    assert await wait_gone(child)
    assert nothing_runs(runtime)


async def test_cgroups_of_a_node_that_is_gone_are_reaped_at_start() -> None:
    cgroups = require_cgroups()
    assert cgroups.hierarchy is not None
    # No pid is above the kernel's largest pid_max (4194304): this "node" is gone.
    limits = Limits(memory_bytes=64 * MiB, cpu_quota_us=50_000, pids_max=64)
    orphan = Cgroup.create(cgroups.hierarchy, "spear-4194305-1", limits)
    script = f"{orphan.join_script()} && echo joined && exec sleep 60"
    proc = await trio.lowlevel.open_process(
        ["/bin/sh", "-c", script], stdout=subprocess.PIPE, start_new_session=True
    )
    assert proc.stdout is not None
    try:
        with trio.fail_after(STEP_S):
            assert await proc.stdout.receive_some(64) == b"joined\n"
        assert orphan.members() == [proc.pid]
        again = Cgroups(SETTINGS)
        assert again.reaped == 1
        with trio.fail_after(STEP_S):
            assert await proc.wait() == -9
        await again.aclose()
        assert not any(path.exists() for path in orphan.dirs.values())
    finally:
        await orphan.remove()
        with trio.fail_after(STEP_S):
            await proc.wait()
        await proc.stdout.aclose()


# --- the v2 kill on this machine's cgroup2 mount (no controllers needed) ----------------------


def cgroup2_parent() -> Path | None:
    """This process's directory on the cgroup2 mount, if there is one."""
    own = [line[3:] for line in Path("/proc/self/cgroup").read_text().splitlines()]
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        if " - cgroup2 " in line and own:
            return Path(line.split()[4]) / own[-1].lstrip("/")
    return None


async def test_v2_kill_reaches_every_member() -> None:
    parent = cgroup2_parent()
    ok = parent is not None and os.geteuid() == 0
    require_real_part("a cgroup2 mount (as root)", ok, "none is mounted, or not root")
    assert parent is not None
    cgroup = Cgroup(2, {"memory": parent / f"spear-{os.getpid()}-v2test"})
    os.mkdir(cgroup.path)
    try:
        # The shell joins, then forks a child that leaves its session with setsid(1).
        script = f"{cgroup.join_script()}; setsid sleep 60 >/dev/null 2>&1 & echo $!; wait"
        proc = await trio.lowlevel.open_process(
            ["/bin/sh", "-c", script], stdout=subprocess.PIPE, start_new_session=True
        )
        assert proc.stdout is not None
        with trio.fail_after(STEP_S):
            pid = int(await proc.stdout.receive_some(64))
        assert sorted(cgroup.members()) == sorted([proc.pid, pid])
        await cgroup.remove()
        assert await wait_gone(pid)
        with trio.fail_after(STEP_S):
            await proc.wait()
        assert proc.returncode == -9
        assert not cgroup.path.exists()
    finally:
        await cgroup.remove()
