"""A worker written in C (tests/programs/worker.c), built for this host with zig's C compiler:
the protocol of docs/workers.md works from a language other than Python."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from spear.model import ExecStatus, RunOutcome
from spear.runtimes import ProcessRuntime
from spear.runtimes.base import WORKER
from spear.runtimes.process_verdicts import FUNCTION_ERROR, WORKER_LOST
from spear.runtimes.process_worker import ProcessInstance
from tests.conftest import require_real_part
from tests.runtimes.conftest import function_spec
from tests.wasm_programs import BUILD_TIMEOUT_S, PROGRAMS_DIR, ZIG_CACHE_DIR, compiler_available

pytestmark = pytest.mark.compiler
STEP_S = 20.0


@pytest.fixture(scope="session")
def c_worker(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tests/programs/worker.c compiled for this host."""
    ok, reason = compiler_available()
    require_real_part("the zig C compiler", ok, reason)
    out = tmp_path_factory.mktemp("c-worker") / "worker"
    env = {
        **os.environ,
        "ZIG_GLOBAL_CACHE_DIR": str(ZIG_CACHE_DIR),
        "ZIG_LOCAL_CACHE_DIR": str(ZIG_CACHE_DIR),
    }
    source = PROGRAMS_DIR / "worker.c"
    argv = [sys.executable, "-m", "ziglang", "cc", "-O2", "-Wall", "-Werror", str(source)]
    try:
        subprocess.run(
            [*argv, "-o", str(out)],
            env=env,
            check=True,
            capture_output=True,
            timeout=BUILD_TIMEOUT_S,
        )
    except subprocess.CalledProcessError as exc:
        pytest.fail(f"building tests/programs/worker.c failed:\n{exc.stderr.decode()}")
    return out


@pytest.fixture
async def c_instance(process: ProcessRuntime, c_worker: Path) -> AsyncIterator[ProcessInstance]:
    spec = function_spec(runtime="process", mode=WORKER, command=(str(c_worker),))
    with trio.fail_after(STEP_S):
        instance = await process.start_instance(spec)
    assert isinstance(instance, ProcessInstance)
    try:
        yield instance
    finally:
        await instance.aclose()


async def call(instance: ProcessInstance, data: bytes) -> RunOutcome:
    with trio.fail_after(STEP_S):
        return await instance.invoke(data, deadline=trio.current_time() + 5, execution_id="ex-c")


async def test_the_c_worker_serves_many_requests(c_instance: ProcessInstance) -> None:
    for id_, word in enumerate([b"hello", b"", b"spear \x00 c" * 1000], start=1):
        outcome = await call(c_instance, word)
        assert outcome.status is ExecStatus.SUCCEEDED
        assert outcome.output == word.upper()
        assert outcome.logs == f"worker.c: request {id_} with {len(word)} bytes\n".encode()


async def test_the_c_worker_answers_with_an_error(c_instance: ProcessInstance) -> None:
    outcome = await call(c_instance, b"fail")
    assert outcome.error_code is FUNCTION_ERROR
    assert outcome.error_message == (
        'the function failed (bad_input): this worker refuses the input "fail"'
    )
    assert c_instance.healthy


async def test_the_c_worker_crashing_mid_request(c_instance: ProcessInstance) -> None:
    outcome = await call(c_instance, b"exit")
    assert outcome.status is ExecStatus.FAILED
    assert outcome.error_code is WORKER_LOST
    assert outcome.error_message == "the worker exited with code 9 while serving this request"
    assert outcome.exit_code == 9
    assert not c_instance.healthy
