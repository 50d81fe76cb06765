"""SIGKILL a process that is writing to a store: nothing acknowledged may be lost or torn.

A child (tests/store/crash_writer.py) writes single puts and multi-key batches, printing a
line as each one begins and another once it is acknowledged. The parent reads a number of
acknowledgements from the pipe, then SIGKILLs the child as soon as it reads that the next
write of the round's kind (a batch, then a single put) has begun, so the kill lands inside a
store call. It reads whatever else the child had acknowledged and reopens the store:

* every acknowledged put and batch is there with its value;
* every batch is complete or absent, never torn;
* the only unacknowledged write that may be there is the one in flight at the kill.

Two rounds per backend, so the second round also writes to a store recovered from a crash.
SIGKILL tests process crashes (the page cache survives), not power loss.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from spear.store import Store, open_store
from tests.store.backends import PERSISTENT, backend_params
from tests.store.crash_writer import (
    BATCH_PARTS,
    LATEST_BATCH,
    batch_key,
    put_key,
    value_for,
)

REPO = Path(__file__).resolve().parents[2]
#: each round: acknowledgements to read, then the kind of write to kill inside
ROUNDS = ((150, "batch"), (333, "put"))
#: each round's ids start at round * ROUND_IDS, so rounds never reuse an id
ROUND_IDS = 1_000_000
#: a bound on a child that hangs without writing (a failure, never a wait)
WATCHDOG_S = 60.0


@dataclass
class Acked:
    """What the children acknowledged, and the ids that were in flight when each was killed."""

    puts: set[int] = field(default_factory=set)
    batches: set[int] = field(default_factory=set)
    in_flight: set[int] = field(default_factory=set)

    def record(self, kind: str, op_id: int) -> None:
        (self.batches if kind == "batch" else self.puts).add(op_id)


def parse(line: bytes) -> tuple[str, str, int]:
    """("begin" | "ack", "batch" | "put", id) from one line of the writer."""
    event, kind, op_id = line.decode().split()
    return event, kind, int(op_id)


def write_until_killed(
    backend: str, path: Path, first_id: int, kill: tuple[int, str], acked: Acked, log: Path
) -> None:
    """Run the writer, SIGKILL it inside a write, and record every ack it printed."""
    kill_after, kill_kind = kill
    command = [sys.executable, "-m", "tests.store.crash_writer", backend, str(path), str(first_id)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with log.open("wb") as stderr:
        child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=stderr, cwd=REPO, env=env)
    watchdog = threading.Timer(WATCHDOG_S, child.kill)
    watchdog.start()
    assert child.stdout is not None
    acks, last = 0, first_id - 1
    try:
        while True:
            line = child.stdout.readline()
            if not line.endswith(b"\n"):
                pytest.fail(f"the writer stopped after {acks} acks:\n{log.read_text()}")
            event, kind, op_id = parse(line)
            if event == "ack":
                acked.record(kind, op_id)
                acks, last = acks + 1, op_id
            elif acks >= kill_after and kind == kill_kind:
                break
        child.kill()
        child.wait()
        # acks printed between our last read and the kill count too; a cut line does not
        for line in child.stdout.read().splitlines(keepends=True):
            if not line.endswith(b"\n"):
                break
            event, kind, op_id = parse(line)
            if event == "ack":
                acked.record(kind, op_id)
                last = op_id
    finally:
        watchdog.cancel()
        child.kill()
        child.wait()
        child.stdout.close()
    assert child.returncode == -9, f"the writer was not killed by SIGKILL:\n{log.read_text()}"
    acked.in_flight.add(last + 1)


def ids_under(store: Store, prefix: bytes) -> dict[int, dict[bytes, bytes]]:
    """The rows under `prefix` grouped by the operation id in their key."""
    groups: dict[int, dict[bytes, bytes]] = {}
    for key, value in store.scan(prefix):
        groups.setdefault(int(key.split(b"/")[1]), {})[key] = value
    return groups


def check_recovered(store: Store, acked: Acked) -> None:
    puts = ids_under(store, b"put/")
    for op_id in acked.puts:
        assert puts.get(op_id) == {put_key(op_id): value_for(op_id, 0)}, f"put {op_id} lost"
    assert puts.keys() - acked.puts <= acked.in_flight, "a write that was never made is there"

    batches = ids_under(store, b"batch/")
    for op_id, rows in batches.items():
        whole = {batch_key(op_id, part): value_for(op_id, part) for part in range(BATCH_PARTS)}
        assert rows == whole, f"batch {op_id} is torn: {sorted(rows)}"
    assert acked.batches <= batches.keys(), f"batches lost: {acked.batches - batches.keys()}"
    assert batches.keys() - acked.batches <= acked.in_flight

    latest = store.get(LATEST_BATCH)
    assert latest is not None and int(latest) in batches
    assert int(latest) >= max(acked.batches)


@pytest.mark.parametrize("backend", backend_params(PERSISTENT))
def test_sigkill_loses_no_acknowledged_write(backend: str, tmp_path: Path) -> None:
    path = tmp_path / f"store.{backend}"
    acked = Acked()
    for round_number, kill in enumerate(ROUNDS, start=1):
        log = tmp_path / f"writer-{round_number}.log"
        write_until_killed(backend, path, round_number * ROUND_IDS, kill, acked, log)
        assert len(acked.puts) + len(acked.batches) >= sum(n for n, _ in ROUNDS[:round_number])
        with open_store(backend, path) as store:
            check_recovered(store, acked)
