"""Synced single puts and point gets on every store backend, against floors from the same run.

    .venv/bin/python bench/store_bench.py [--puts 300] [--gets 20000] [--dir DIR]

Floors, measured first on the same file system:
  - "fsync": `os.write` of one value + `os.fsync` of the file (the cost of any durable write);
  - "raw": each engine called directly, without spear's layer (sqlite3 autocommit INSERT in
    WAL + synchronous=FULL, rocksdict put with sync=True, an lmdb write txn with sync=True).
Prints p50/p99 of a synced put, the p50 ratio against the fsync floor and against the raw
engine (spear's overhead), and point gets per second. Keys are 14 B, values 100 B.
Numbers from a VM with a host-cached disk flatter fsync; compare ratios, not milliseconds.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import sqlite3
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from spear.store import BACKENDS, Put, open_store

REPO = Path(__file__).resolve().parents[1]
VALUE = random.Random(7).randbytes(100)


def key(i: int) -> bytes:
    return b"fn:%08d:k" % i


def latencies_ms(call: Callable[[int], object], count: int) -> list[float]:
    samples = []
    for i in range(count):
        start = time.perf_counter_ns()
        call(i)
        samples.append((time.perf_counter_ns() - start) / 1e6)
    return samples


def p50_p99(samples: list[float]) -> tuple[float, float]:
    cuts = statistics.quantiles(samples, n=100)
    return statistics.median(samples), cuts[98]


def fsync_floor(directory: Path, count: int) -> list[float]:
    fd = os.open(directory / "floor.bin", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def durable_write(_: int) -> None:
        os.write(fd, VALUE)
        os.fsync(fd)

    try:
        return latencies_ms(durable_write, count)
    finally:
        os.close(fd)


@contextmanager
def raw_engine(backend: str, path: Path) -> Iterator[Callable[[int], object] | None]:
    """A synced put straight into the engine, or None where there is no engine (memory)."""
    if backend == "sqlite":
        conn = sqlite3.connect(path, isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("CREATE TABLE kv (key BLOB PRIMARY KEY, value BLOB NOT NULL) WITHOUT ROWID")
        yield lambda i: conn.execute("INSERT OR REPLACE INTO kv VALUES (?, ?)", (key(i), VALUE))
        conn.close()
    elif backend == "rocksdb":
        import rocksdict

        options = rocksdict.Options(raw_mode=True)
        options.create_if_missing(True)
        db = rocksdict.Rdict(str(path), options)
        synced = rocksdict.WriteOptions()
        synced.sync = True
        yield lambda i: db.put(key(i), VALUE, synced)
        db.close()
    elif backend == "lmdb":
        import lmdb

        env = lmdb.open(str(path), map_size=1 << 30)

        def put(i: int) -> None:
            with env.begin(write=True) as txn:
                txn.put(key(i), VALUE)

        yield put
        env.close()
    else:
        yield None


def bench_backend(backend: str, directory: Path, puts: int, gets: int) -> dict[str, float]:
    figures: dict[str, float] = {}
    with raw_engine(backend, directory / f"raw.{backend}") as raw_put:
        if raw_put is not None:
            figures["raw_p50"], _ = p50_p99(latencies_ms(raw_put, puts))
    path = None if backend == "memory" else directory / f"store.{backend}"
    with open_store(backend, path) as store:
        samples = latencies_ms(lambda i: store.put(key(i), VALUE), puts)
        figures["p50"], figures["p99"] = p50_p99(samples)
        for start in range(puts, gets, 1000):
            store.write_batch([Put(key(i), VALUE) for i in range(start, min(start + 1000, gets))])
        order = random.Random(1).sample(range(gets), gets)
        start_ns = time.perf_counter_ns()
        for i in order:
            store.get(key(i))
        figures["gets_per_s"] = gets / ((time.perf_counter_ns() - start_ns) / 1e9)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--puts", type=int, default=300, help="synced puts timed per backend")
    parser.add_argument("--gets", type=int, default=20_000, help="keys stored, then read")
    parser.add_argument("--dir", type=Path, default=REPO / ".cache", help="where files go")
    args = parser.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    directory = Path(tempfile.mkdtemp(prefix="store-bench-", dir=args.dir))
    try:
        floor_p50, floor_p99 = p50_p99(fsync_floor(directory, args.puts))
        print(f"floor os.write+fsync: p50 {floor_p50:.3f} ms, p99 {floor_p99:.3f} ms")
        header = ("backend", "put p50", "put p99", "x fsync", "x raw", "gets/s")
        print("{:8} {:>9} {:>9} {:>8} {:>6} {:>10}".format(*header))
        for backend in BACKENDS:
            f = bench_backend(backend, directory, args.puts, args.gets)
            raw = f"{f['p50'] / f['raw_p50']:6.2f}" if "raw_p50" in f else f"{'-':>6}"
            print(
                f"{backend:8} {f['p50']:7.3f}ms {f['p99']:7.3f}ms {f['p50'] / floor_p50:8.2f}"
                f" {raw} {f['gets_per_s']:10.0f}"
            )
    finally:
        shutil.rmtree(directory)


if __name__ == "__main__":
    main()
