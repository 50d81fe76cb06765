"""SMS commands as replicated-log payloads: exact round trips, and garbage is a WireError."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from spear import wire
from spear.errors import ConflictError, WireError
from spear.model import (
    ExecStatus,
    ExecutionRecord,
    FileId,
    NodeId,
    TaskRecord,
    TaskSpec,
    new_execution_id,
    new_task_id,
)
from spear.roles.state import (
    AddFile,
    Command,
    DeleteTask,
    DrainNode,
    PutExecution,
    RegisterTask,
    SmsState,
    decode_command,
    encode_command,
)
from spear.store import open_store

TASK = TaskRecord(
    task_id=new_task_id(),
    spec=TaskSpec.model_validate(
        {"name": "upper", "runtime": "wasm", "artifact": "a" * 64, "env": {"K": "v"}}
    ),
    created_at=1700000000.5,
)
EXECUTION = ExecutionRecord(
    execution_id=new_execution_id(1700000001.0),
    task_id=TASK.task_id,
    task_name="upper",
    mode="async",
    status=ExecStatus.SUCCEEDED,
    node_id=NodeId("nd-1"),
    attempts=2,
    error=None,
    created_at=1700000001.0,
    finished_at=1700000002.0,
    timings_ms={"run": 1.5},
    cold=True,
    exit_code=0,
    output_bytes=3,
    idempotency_key="key-1",
)

COMMANDS: list[Command] = [
    RegisterTask(record=TASK),
    DeleteTask(task_id=TASK.task_id),
    AddFile(file_id=FileId("b" * 64), size=10, name="m.wasm", created_at=1.25),
    PutExecution(record=EXECUTION, input=b"in", output=b"OUT", logs=b""),
    PutExecution(record=EXECUTION),
]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: type(c).__name__)
def test_every_command_round_trips_exactly(command: Command) -> None:
    assert decode_command(encode_command(command)) == command


@pytest.mark.parametrize(
    "doc",
    [
        {"c": "task.unknown"},
        {"c": "task.delete"},
        {"c": "file.add", "file_id": "x", "size": "big", "name": "n", "created_at": 1.0},
        {"c": "exec.put", "record": EXECUTION.to_doc(), "input": "not bytes"},
        {"c": "task.register", "record": {"task_id": "tk-1", "created_at": 0.0}},
        {"no-tag": 1},
    ],
)
def test_malformed_commands_are_wire_errors(doc: dict[str, object]) -> None:
    with pytest.raises(WireError):
        decode_command(wire.dumps(doc))


@given(st.binary(max_size=200))
def test_random_bytes_never_raise_anything_but_wire_error(data: bytes) -> None:
    with contextlib.suppress(WireError):
        decode_command(data)


# --- applying at a log index, snapshots ------------------------------------------------------


@pytest.fixture
def state(tmp_path: Path) -> Iterator[SmsState]:
    store = open_store("sqlite", tmp_path / "a.sqlite")
    yield SmsState(store)
    store.close()


@pytest.fixture
def other(tmp_path: Path) -> Iterator[SmsState]:
    store = open_store("sqlite", tmp_path / "b.sqlite")
    yield SmsState(store)
    store.close()


def test_applied_index_advances_also_when_a_command_is_refused(state: SmsState) -> None:
    assert state.applied_index() == 0
    state.apply(RegisterTask(record=TASK), index=3)
    assert state.applied_index() == 3
    with pytest.raises(ConflictError):
        state.apply(RegisterTask(record=TASK), index=4)
    assert state.applied_index() == 4
    assert [t.task_id for t in state.tasks()] == [TASK.task_id]


def test_a_snapshot_replaces_the_state_of_another_node_and_keeps_its_identity(
    state: SmsState, other: SmsState
) -> None:
    for index, command in enumerate(COMMANDS[2:], start=1):
        state.apply(command, index=index)
    state.apply(RegisterTask(record=TASK), index=10)
    other.node_id("nd-other")
    stale = TaskRecord(task_id=new_task_id(), spec=TASK.spec.model_copy(), created_at=1.0)
    other.apply(RegisterTask(record=stale), index=1)

    other.restore(state.snapshot(), index=10)

    assert other.applied_index() == 10
    assert other.tasks() == [TASK]
    assert other.files() == state.files()
    assert other.execution(EXECUTION.execution_id) == EXECUTION
    assert other.execution_blob("execout", EXECUTION.execution_id) == b"OUT"
    assert other.idempotent_execution(TASK.task_id, "key-1") == EXECUTION.execution_id
    assert other.node_id("nd-new") == "nd-other"


@pytest.mark.parametrize(
    "snapshot",
    [b"\xff", wire.dumps({"a": 1}), wire.dumps([[b"meta/node_id", b"x"]]), wire.dumps([[1, 2]])],
)
def test_a_malformed_snapshot_changes_nothing(state: SmsState, snapshot: bytes) -> None:
    state.apply(RegisterTask(record=TASK), index=1)
    with pytest.raises(WireError):
        state.restore(snapshot, index=5)
    assert state.applied_index() == 1
    assert state.tasks() == [TASK]


# --- DrainNode ----------------------------------------------------------------------------------


@pytest.mark.parametrize("draining", [True, False])
def test_drain_node_round_trips(draining: bool) -> None:
    command = DrainNode(node_id="nd-1", draining=draining)
    assert decode_command(encode_command(command)) == command


@pytest.mark.parametrize(
    "doc",
    [
        {"c": "node.drain", "node_id": "nd-1"},
        {"c": "node.drain", "node_id": "nd-1", "draining": 1},
        {"c": "node.drain", "node_id": "", "draining": True},
        {"c": "node.drain", "node_id": 7, "draining": True},
    ],
)
def test_malformed_drain_commands_are_wire_errors(doc: dict[str, object]) -> None:
    with pytest.raises(WireError):
        decode_command(wire.dumps(doc))


def test_drained_nodes_survive_a_restart_and_travel_in_snapshots(
    tmp_path: Path, other: SmsState
) -> None:
    store = open_store("sqlite", tmp_path / "drain.sqlite")
    state = SmsState(store)
    state.apply(DrainNode(node_id="nd-1", draining=True), index=1)
    state.apply(DrainNode(node_id="nd-2", draining=True), index=2)
    state.apply(DrainNode(node_id="nd-2", draining=False), index=3)
    state.apply(DrainNode(node_id="nd-3", draining=False), index=4)  # never drained: a no-op
    assert state.drained() == {"nd-1"}
    other.apply(DrainNode(node_id="nd-9", draining=True), index=1)
    other.restore(state.snapshot(), index=4)
    assert other.drained() == {"nd-1"}
    store.close()

    reopened = open_store("sqlite", tmp_path / "drain.sqlite")
    again = SmsState(reopened)
    again.load()
    assert again.drained() == {"nd-1"}
    reopened.close()
