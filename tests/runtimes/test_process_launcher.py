"""spear's launcher (spear.runtimes.process): its machine code against its assembly source,
its failures, and the limits through the `/bin/sh` wrapper where the launcher is not used."""

from __future__ import annotations

import math
import os
import platform
import resource
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from spear.config import ProcessConfig
from spear.model import ErrorCode, ExecStatus
from spear.runtimes import ProcessRuntime
from spear.runtimes.process import LAUNCHER_X86_64, launcher_elf, rlimits
from tests.conftest import require_real_part
from tests.runtimes.conftest import MiB, function_spec, wait_gone
from tests.wasm_programs import BUILD_TIMEOUT_S, ZIG_CACHE_DIR, compiler_available

FOREVER = math.inf
X86_64 = platform.machine() == "x86_64" and sys.platform == "linux"
needs_x86_64 = pytest.mark.skipif(not X86_64, reason="the launcher is x86-64 Linux code")

#: the launcher's source (GNU as / LLVM syntax); the comments beside LAUNCHER_X86_64 explain it
LAUNCHER_SOURCE = """\
    .intel_syntax noprefix
    .globl _start
    .text
_start:
    mov rbx, rsp
    lea r14, [rbx + 16]
    sub rsp, 16
limit:
    mov rdi, [r14]
    cmp word ptr [rdi], 0x2d
    je join_next
    call number
    mov r12, rax
    mov rdi, [r14 + 8]
    call number
    mov [rsp], rax
    mov rdi, [r14 + 16]
    call number
    mov [rsp + 8], rax
    mov eax, 302
    xor edi, edi
    mov rsi, r12
    mov rdx, rsp
    xor r10d, r10d
    syscall
    test rax, rax
    jnz fail_limit
    add r14, 24
    jmp limit
join_next:
    add r14, 8
    mov rdi, [r14]
    cmp word ptr [rdi], 0x2d
    je exec
    mov eax, 2
    mov esi, 0x80001
    xor edx, edx
    syscall
    test rax, rax
    js fail_join
    mov r15, rax
    mov eax, 1
    mov rdi, r15
    lea rsi, [rip + zero]
    mov edx, 1
    syscall
    cmp rax, 1
    jne fail_join
    mov eax, 3
    mov rdi, r15
    syscall
    jmp join_next
exec:
    add r14, 8
    mov eax, 59
    mov rdi, [r14]
    mov rsi, r14
    mov rcx, [rbx]
    lea rdx, [rbx + rcx*8 + 16]
    syscall
    mov r12d, 127
    cmp rax, -2
    je 1f
    mov r12d, 126
1:  lea rsi, [rip + msg_exec]
    mov edx, 35
    jmp die
fail_limit:
    mov r12d, 125
    lea rsi, [rip + msg_limit]
    mov edx, 35
    jmp die
fail_join:
    mov r12d, 125
    lea rsi, [rip + msg_join]
    mov edx, 30
die:
    mov eax, 1
    mov edi, 2
    syscall
    mov eax, 231
    mov edi, r12d
    syscall
number:
    xor eax, eax
    movzx ecx, byte ptr [rdi]
    test ecx, ecx
    jz fail_limit
2:  movzx ecx, byte ptr [rdi]
    test ecx, ecx
    jz 3f
    sub ecx, 0x30
    cmp ecx, 9
    ja fail_limit
    imul rax, rax, 10
    add rax, rcx
    inc rdi
    jmp 2b
3:  ret
zero:
    .ascii "0"
msg_exec:
    .ascii "spear: cannot execute the function\n"
msg_limit:
    .ascii "spear: cannot set a resource limit\n"
msg_join:
    .ascii "spear: cannot join the cgroup\n"
msg_end:
"""


@pytest.mark.compiler
def test_machine_code_is_its_assembly_source(tmp_path: Path) -> None:
    ok, reason = compiler_available()
    require_real_part("the zig C compiler", ok, reason)
    source = tmp_path / "launcher.s"
    source.write_text(LAUNCHER_SOURCE)
    env = {
        **os.environ,
        "ZIG_GLOBAL_CACHE_DIR": str(ZIG_CACHE_DIR),
        "ZIG_LOCAL_CACHE_DIR": str(ZIG_CACHE_DIR),
    }
    argv = [sys.executable, "-m", "ziglang", "cc", "-c", "-target", "x86_64-linux-musl"]
    subprocess.run(
        [*argv, str(source), "-o", str(tmp_path / "launcher.o")],
        env=env,
        check=True,
        capture_output=True,
        timeout=BUILD_TIMEOUT_S,
    )
    text = text_section((tmp_path / "launcher.o").read_bytes())
    assert text[: len(LAUNCHER_X86_64)].hex() == LAUNCHER_X86_64.hex()
    assert launcher_elf().endswith(text)  # the code, then its strings


def text_section(elf: bytes) -> bytes:
    """The `.text` section of a 64-bit little-endian ELF object file."""
    (shoff,) = struct.unpack_from("<Q", elf, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", elf, 0x3A)
    sections = [struct.unpack_from("<IIQQQQ", elf, shoff + i * shentsize) for i in range(shnum)]
    names_offset = sections[shstrndx][4]
    for name, _type, _flags, _addr, offset, size in sections:
        end = elf.index(b"\0", names_offset + name)
        if elf[names_offset + name : end] == b".text":
            return elf[offset : offset + size]
    raise AssertionError("no .text section")


@needs_x86_64
async def test_the_launcher_sets_the_limits(tmp_path: Path) -> None:
    runtime = ProcessRuntime(ProcessConfig(), work_dir=tmp_path)
    assert runtime.describe()["launcher"].startswith("spear launcher")
    script = "ulimit -v; ulimit -H -v; ulimit -n; ulimit -c; ulimit -S -t; ulimit -H -t"
    spec = function_spec(runtime="process", command=("/bin/sh", "-c", script))
    outcome = await runtime.run(spec, b"", deadline=FOREVER)
    assert outcome.output.split() == [b"65536", b"65536", b"256", b"0", b"10", b"11"]


@needs_x86_64
@pytest.mark.parametrize(
    ("arguments", "code", "message"),
    [
        (["7", "x", "1", "-", "-", "/bin/true"], 125, b"cannot set a resource limit"),
        (["7", "", "1", "-", "-", "/bin/true"], 125, b"cannot set a resource limit"),
        (
            ["7", "2", "1", "-", "-", "/bin/true"],
            125,
            b"cannot set a resource limit",
        ),  # soft > hard
        (["-", "/no/such/cgroup.procs", "-", "/bin/true"], 125, b"cannot join the cgroup"),
        (["-", "-", "/no/such/program"], 127, b"cannot execute the function"),
        (["-", "-", "/dev/null"], 126, b"cannot execute the function"),
    ],
)
async def test_launcher_failures(
    tmp_path: Path, arguments: list[str], code: int, message: bytes
) -> None:
    ProcessRuntime(ProcessConfig(), work_dir=tmp_path)
    done = await trio.run_process(
        [str(tmp_path / "launcher"), *arguments], capture_stderr=True, check=False
    )
    assert done.returncode == code
    assert done.stderr == b"spear: " + message + b"\n"


@needs_x86_64
async def test_a_function_removed_after_validation_exits_127(tmp_path: Path) -> None:
    program = tmp_path / "gone.sh"
    program.write_text("#!/bin/sh\necho here\n")
    program.chmod(0o755)
    runtime = ProcessRuntime(ProcessConfig(), work_dir=tmp_path / "work")
    spec = function_spec(runtime="process", command=(str(program),))
    runtime.validate_task(spec)
    assert (await runtime.run(spec, b"", deadline=FOREVER)).output == b"here\n"
    program.unlink()
    outcome = await runtime.run(spec, b"", deadline=FOREVER)
    assert outcome.error_code is ErrorCode.EXIT_NONZERO
    assert outcome.exit_code == 127
    assert outcome.logs == b"spear: cannot execute the function\n"


async def test_the_shell_wrapper_sets_the_same_limits(tmp_path: Path) -> None:
    runtime = ProcessRuntime(ProcessConfig(), work_dir=tmp_path, launcher=False)
    assert runtime.describe()["launcher"] == "/bin/sh wrapper (launcher=False)"
    script = "ulimit -v; ulimit -H -v; ulimit -n; ulimit -c; ulimit -S -t; ulimit -H -t"
    spec = function_spec(runtime="process", command=("/bin/sh", "-c", script))
    outcome = await runtime.run(spec, b"", deadline=FOREVER)
    assert outcome.output.split() == [b"65536", b"65536", b"256", b"0", b"10", b"11"]


async def test_the_shell_wrapper_kills_the_group_at_the_timeout(tmp_path: Path) -> None:
    runtime = ProcessRuntime(ProcessConfig(), work_dir=tmp_path, launcher=False)
    spec = function_spec(
        runtime="process", command=("/bin/sh", "-c", "sleep 60 & echo $!; wait"), timeout_s=0.5
    )
    outcome = await runtime.run(spec, b"", deadline=FOREVER)
    assert outcome.status is ExecStatus.TIMEOUT
    assert await wait_gone(int(outcome.output))


async def test_the_shell_wrapper_limits_memory(tmp_path: Path) -> None:
    runtime = ProcessRuntime(ProcessConfig(), work_dir=tmp_path, launcher=False)
    command = (sys.executable, "-c", "b = bytearray(1 << 30)")
    spec = function_spec(runtime="process", command=command, memory_limit_bytes=64 * MiB)
    outcome = await runtime.run(spec, b"", deadline=FOREVER)
    assert outcome.error_code is ErrorCode.MEMORY_LIMIT


def test_limits_never_exceed_the_nodes_hard_limits() -> None:
    config = ProcessConfig(rlimit_nofile=1 << 40, rlimit_nproc=1 << 40)
    for which, soft, hard in rlimits(config, memory_limit_bytes=1 << 60, cpu_s=1 << 40):
        node_hard = resource.getrlimit(which)[1]
        assert soft <= hard
        assert node_hard == resource.RLIM_INFINITY or hard <= node_hard
