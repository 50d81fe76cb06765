"""The SMS's durable state machine: tasks, artifact metadata, async executions, idempotency keys.

Every change is a command (a frozen dataclass) applied as one atomic store batch, and a change
is acknowledged to a client only after `apply` returned (the batch is synced). On a single node
`apply` is the commit; in the mesh the same commands become Raft log entries that every voter
applies in order, so `apply` is deterministic: it reads only the command and the state.

Store layout (values are CBOR):
    task/<task_id>                   task document
    taskname/<name>                  task_id
    file/<file_id>                   {"file_id", "size", "name", "created_at"}
    exec/<execution_id>              execution record (async executions only)
    execout/<execution_id>           output bytes
    execin/<execution_id>            input bytes, until the execution ends
    execlog/<execution_id>           log bytes
    deadletter/<execution_id>        empty: the execution is in the dead-letter list
    idem/<task_id>/<sha256(key)>     execution_id
    drain/<node_id>                  b"1" while the node is drained (no new work placed on it)
    meta/node_id                     this node's permanent id
    meta/applied                     the log index of the last command applied
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from spear import wire
from spear.errors import ConflictError, NotFoundError, SpearError, WireError
from spear.model import ExecutionId, ExecutionRecord, FileId, TaskId, TaskRecord
from spear.store import Delete, Put, Store, WriteOp


@dataclass(frozen=True, slots=True, kw_only=True)
class RegisterTask:
    record: TaskRecord


@dataclass(frozen=True, slots=True, kw_only=True)
class DeleteTask:
    task_id: TaskId


@dataclass(frozen=True, slots=True, kw_only=True)
class AddFile:
    file_id: FileId
    size: int
    name: str
    created_at: float


@dataclass(frozen=True, slots=True, kw_only=True)
class PutExecution:
    """Create or update an async execution record (with its output and logs once finished)."""

    record: ExecutionRecord
    input: bytes | None = None
    output: bytes | None = None
    logs: bytes | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class DrainNode:
    """Stop (draining=True) or resume placing new work on a node; its running work goes on."""

    node_id: str
    draining: bool


Command = RegisterTask | DeleteTask | AddFile | PutExecution | DrainNode

#: append-only command tags of the replicated log
_TAGS: dict[type, str] = {
    RegisterTask: "task.register",
    DeleteTask: "task.delete",
    AddFile: "file.add",
    PutExecution: "exec.put",
    DrainNode: "node.drain",
}


def encode_command(command: Command) -> bytes:
    """The command as one CBOR map, the payload of a Raft log entry."""
    match command:
        case RegisterTask(record=record):
            body: dict[str, Any] = {"record": record.to_doc()}
        case DeleteTask(task_id=task_id):
            body = {"task_id": task_id}
        case AddFile():
            body = {
                "file_id": command.file_id,
                "size": command.size,
                "name": command.name,
                "created_at": command.created_at,
            }
        case PutExecution(record=record):
            body = {
                "record": record.to_doc(),
                "input": command.input,
                "output": command.output,
                "logs": command.logs,
            }
        case DrainNode(node_id=node_id, draining=draining):
            body = {"node_id": node_id, "draining": draining}
    return wire.dumps({"c": _TAGS[type(command)], **body})


def decode_command(data: bytes) -> Command:
    """Decode a log entry's payload.

    Raises:
        WireError: the payload is not a command this version knows.
    """
    doc = wire.loads(data)
    try:
        match doc["c"]:
            case "task.register":
                return RegisterTask(record=TaskRecord.from_doc(doc["record"]))
            case "task.delete":
                return DeleteTask(task_id=TaskId(str(doc["task_id"])))
            case "file.add":
                return AddFile(
                    file_id=FileId(str(doc["file_id"])),
                    size=int(doc["size"]),
                    name=str(doc["name"]),
                    created_at=float(doc["created_at"]),
                )
            case "exec.put":
                return PutExecution(
                    record=ExecutionRecord.from_doc(doc["record"]),
                    input=_optional_bytes(doc.get("input")),
                    output=_optional_bytes(doc.get("output")),
                    logs=_optional_bytes(doc.get("logs")),
                )
            case "node.drain":
                return _decode_drain(doc)
            case other:
                raise WireError(f"unknown command {other!r} in a log entry")
    except (KeyError, TypeError, ValueError) as exc:  # pydantic's errors are ValueErrors
        raise WireError(f"malformed command in a log entry: {exc}") from exc


def _optional_bytes(value: object) -> bytes | None:
    if value is None or isinstance(value, bytes):
        return value
    raise WireError(f"expected bytes or null in a log entry, got {type(value).__name__}")


def _decode_drain(doc: dict[str, Any]) -> DrainNode:
    node_id, draining = doc["node_id"], doc["draining"]
    if not (isinstance(node_id, str) and node_id and isinstance(draining, bool)):
        raise WireError("malformed node.drain command: needs a node_id string, a draining bool")
    return DrainNode(node_id=node_id, draining=draining)


_APPLIED = b"meta/applied"
#: the key prefixes of the replicated state (everything but this node's own meta/ keys)
_STATE_PREFIXES = (
    b"task/",
    b"taskname/",
    b"file/",
    b"exec/",
    b"execout/",
    b"execin/",
    b"execlog/",
    b"idem/",
    b"drain/",
    b"deadletter/",
)


def _is_row(row: object) -> bool:
    return (
        isinstance(row, list)
        and len(row) == 2
        and isinstance(row[0], bytes)
        and row[0].startswith(_STATE_PREFIXES)
        and isinstance(row[1], bytes)
    )


def _k(*parts: str) -> bytes:
    return "/".join(parts).encode()


def idempotency_hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class SmsState:
    """The SMS state over a Store, with in-memory indexes of tasks and files.

    Thread-safe: `apply` and the readers take one lock, so callers may run them in worker
    threads (the store's synced writes block).
    """

    def __init__(self, store: Store) -> None:
        self._store = store
        self._lock = threading.Lock()
        self._tasks: dict[TaskId, TaskRecord] = {}
        self._names: dict[str, TaskId] = {}
        self._files: dict[FileId, dict[str, Any]] = {}
        self._drained: frozenset[str] = frozenset()

    def load(self) -> None:
        """Build the in-memory indexes from the store (at start)."""
        with self._lock:
            for _, value in self._store.scan(b"task/"):
                record = TaskRecord.from_doc(wire.loads(value))
                self._tasks[record.task_id] = record
                self._names[record.name] = record.task_id
            for _, value in self._store.scan(b"file/"):
                doc = wire.loads(value)
                self._files[FileId(doc["file_id"])] = doc
            self._drained = frozenset(
                k.decode()[len("drain/") :] for k, _ in self._store.scan(b"drain/")
            )

    # --- commands --------------------------------------------------------------------------

    def apply(self, command: Command, *, index: int | None = None) -> None:
        """Apply one command durably and atomically.

        Args:
            index: the Raft log index of the command; stored with its changes in the same
                batch (also when the command is refused) so a restart replays the log from
                exactly the next entry.

        Raises:
            ConflictError: a task name is taken.
            NotFoundError: the task to delete does not exist.
        """
        with self._lock:
            marker: list[WriteOp] = [] if index is None else [Put(_APPLIED, str(index).encode())]
            try:
                ops = list(self._ops_for(command))
            except SpearError:
                if marker:
                    self._store.write_batch(marker)
                raise
            self._store.write_batch(ops + marker)
            self._index(command)

    def applied_index(self) -> int:
        """The log index of the last command applied (0 before any)."""
        with self._lock:
            raw = self._store.get(_APPLIED)
        return 0 if raw is None else int(raw)

    def snapshot(self) -> bytes:
        """The whole replicated state as one CBOR value (a Raft snapshot's payload)."""
        with self._lock:
            rows = [[k, v] for prefix in _STATE_PREFIXES for k, v in self._store.scan(prefix)]
        return wire.dumps(rows)

    def restore(self, snapshot: bytes, *, index: int, extra: Iterable[WriteOp] = ()) -> None:
        """Replace the replicated state by a snapshot taken at log `index`.

        Args:
            extra: more writes for the same atomic batch (the Raft log's own bookkeeping).

        Raises:
            WireError: the snapshot is malformed (nothing is changed then).
        """
        rows = wire.loads(snapshot, max_bytes=len(snapshot))
        if not isinstance(rows, list) or not all(_is_row(row) for row in rows):
            raise WireError("malformed snapshot: expected a list of [key, value] byte pairs")
        with self._lock:
            ops: list[WriteOp] = [
                Delete(k) for prefix in _STATE_PREFIXES for k, _ in self._store.scan(prefix)
            ]
            ops += [Put(k, v) for k, v in rows]
            self._store.write_batch([*ops, Put(_APPLIED, str(index).encode()), *extra])
            self._tasks.clear()
            self._names.clear()
            self._files.clear()
            self._drained = frozenset()
        self.load()

    def _ops_for(self, command: Command) -> Iterable[WriteOp]:
        match command:
            case RegisterTask(record=record):
                if record.name in self._names:
                    raise ConflictError(f"a task named {record.name!r} already exists")
                yield Put(_k("task", record.task_id), wire.dumps(record.to_doc()))
                yield Put(_k("taskname", record.name), record.task_id.encode())
            case DeleteTask(task_id=task_id):
                existing = self._tasks.get(task_id)
                if existing is None:
                    raise NotFoundError(f"task {task_id!r} does not exist")
                yield Delete(_k("task", task_id))
                yield Delete(_k("taskname", existing.name))
            case AddFile(file_id=file_id):
                doc = {
                    "file_id": file_id,
                    "size": command.size,
                    "name": command.name,
                    "created_at": command.created_at,
                }
                yield Put(_k("file", file_id), wire.dumps(doc))
            case PutExecution(record=record):
                yield Put(_k("exec", record.execution_id), wire.dumps(record.to_doc()))
                if record.idempotency_key is not None:
                    key = _k("idem", record.task_id, idempotency_hash(record.idempotency_key))
                    yield Put(key, record.execution_id.encode())
                if command.input is not None:
                    yield Put(_k("execin", record.execution_id), command.input)
                if record.dead_letter:  # its input stays: a redrive runs it again
                    yield Put(_k("deadletter", record.execution_id), b"")
                else:
                    yield Delete(_k("deadletter", record.execution_id))
                    if record.status.terminal:
                        yield Delete(_k("execin", record.execution_id))
                if command.output is not None:
                    yield Put(_k("execout", record.execution_id), command.output)
                if command.logs is not None:
                    yield Put(_k("execlog", record.execution_id), command.logs)
            case DrainNode(node_id=node_id, draining=draining):
                yield Put(_k("drain", node_id), b"1") if draining else Delete(_k("drain", node_id))

    def _index(self, command: Command) -> None:
        match command:
            case RegisterTask(record=record):
                self._tasks[record.task_id] = record
                self._names[record.name] = record.task_id
            case DeleteTask(task_id=task_id):
                removed = self._tasks.pop(task_id)
                self._names.pop(removed.name, None)
            case AddFile(file_id=file_id):
                self._files[file_id] = {
                    "file_id": file_id,
                    "size": command.size,
                    "name": command.name,
                    "created_at": command.created_at,
                }
            case PutExecution():
                pass
            case DrainNode(node_id=node_id, draining=draining):
                changed = self._drained | {node_id} if draining else self._drained - {node_id}
                self._drained = frozenset(changed)

    # --- queries ---------------------------------------------------------------------------

    def find_task(self, ref: str) -> TaskRecord | None:
        """A task by id or by unique name."""
        record = self._tasks.get(TaskId(ref))
        if record is None and (task_id := self._names.get(ref)) is not None:
            record = self._tasks.get(task_id)
        return record

    def tasks(self) -> list[TaskRecord]:
        return sorted(self._tasks.values(), key=lambda r: (r.created_at, r.task_id))

    def drained(self) -> frozenset[str]:
        """The ids of the nodes that take no new work (DrainNode)."""
        return self._drained

    def file(self, file_id: str) -> dict[str, Any] | None:
        return self._files.get(FileId(file_id))

    def files(self) -> list[dict[str, Any]]:
        return sorted(self._files.values(), key=lambda d: (d["created_at"], d["file_id"]))

    def execution(self, execution_id: str) -> ExecutionRecord | None:
        with self._lock:
            raw = self._store.get(_k("exec", execution_id))
        return None if raw is None else ExecutionRecord.from_doc(wire.loads(raw))

    def executions(self, *, limit: int, before: str | None = None) -> list[ExecutionRecord]:
        """Async execution records, newest first."""
        with self._lock:
            rows = self._store.scan(
                b"exec/",
                start_after=_k("exec", before) if before else None,
                limit=limit,
                reverse=True,
            )
        return [ExecutionRecord.from_doc(wire.loads(v)) for _, v in rows]

    def unfinished_executions(self) -> list[ExecutionRecord]:
        """Async executions that are pending or were running when the node stopped."""
        with self._lock:
            rows = self._store.scan(b"exec/")
        records = (ExecutionRecord.from_doc(wire.loads(v)) for _, v in rows)
        return [r for r in records if not r.status.terminal]

    def dead_letters(self, *, limit: int) -> list[ExecutionRecord]:
        """Dead-lettered async executions, newest first."""
        with self._lock:
            keys = self._store.scan(b"deadletter/", limit=limit, reverse=True)
            raws = [self._store.get(b"exec/" + k.removeprefix(b"deadletter/")) for k, _ in keys]
        return [ExecutionRecord.from_doc(wire.loads(raw)) for raw in raws if raw is not None]

    def execution_blob(self, kind: str, execution_id: str) -> bytes | None:
        """The stored input ("execin"), output ("execout") or logs ("execlog") of an execution."""
        with self._lock:
            return self._store.get(_k(kind, execution_id))

    def idempotent_execution(self, task_id: TaskId, key: str) -> ExecutionId | None:
        with self._lock:
            raw = self._store.get(_k("idem", task_id, idempotency_hash(key)))
        return None if raw is None else ExecutionId(raw.decode())

    def node_id(self, new: str) -> str:
        """This node's permanent id: the stored one, or `new` stored now."""
        with self._lock:
            key = b"meta/node_id"
            self._store.compare_and_set(key, None, new.encode())
            stored = self._store.get(key)
        assert stored is not None
        return stored.decode()
