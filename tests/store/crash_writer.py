"""The child process of the store crash test: write forever, acknowledging each durable write.

    python -m tests.store.crash_writer BACKEND PATH FIRST_ID

Operation ids count up from FIRST_ID. Every third id is a batch of `BATCH_PARTS` puts plus a
put of `LATEST_BATCH` (all or nothing); the others are single puts. Around each store call it
prints and flushes "begin KIND ID" before and "ack KIND ID" after the call returned, so each
"ack" line is a write the store acknowledged. The parent SIGKILLs this process on a "begin"
line, which lands the kill inside a store call.
"""

from __future__ import annotations

import sys
from pathlib import Path

from spear.store import Put, WriteOp, open_store

BATCH_PARTS = 4
LATEST_BATCH = b"latest-batch"


def is_batch(op_id: int) -> bool:
    return op_id % 3 == 0


def put_key(op_id: int) -> bytes:
    return b"put/%09d" % op_id


def batch_key(op_id: int, part: int) -> bytes:
    return b"batch/%09d/%d" % (op_id, part)


def value_for(op_id: int, part: int) -> bytes:
    """A value of 20 B to about 12 KiB that says which write it belongs to."""
    return (b"%d.%d;" % (op_id, part)) * (1 + (op_id * 7 + part) % 997)


def batch_ops(op_id: int) -> list[WriteOp]:
    ops: list[WriteOp] = [Put(batch_key(op_id, p), value_for(op_id, p)) for p in range(BATCH_PARTS)]
    ops.append(Put(LATEST_BATCH, b"%d" % op_id))
    return ops


def main(backend: str, path: Path, first_id: int) -> None:
    store = open_store(backend, path)
    op_id = first_id
    while True:
        kind = "batch" if is_batch(op_id) else "put"
        print(f"begin {kind} {op_id}", flush=True)
        if kind == "batch":
            store.write_batch(batch_ops(op_id))
        else:
            store.put(put_key(op_id), value_for(op_id, 0))
        print(f"ack {kind} {op_id}", flush=True)
        op_id += 1


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]))
