"""Content-addressed artifact blobs on the node's disk (`<data_dir>/files/ab/abcd...`).

A blob is written to a temporary file, fsynced, then renamed into place, so a reader never sees
a partial artifact and a crash leaves at most a stray temporary file (removed at start).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

from spear.errors import StoreError


class ArtifactStore:
    """Blobs keyed by the sha256 of their bytes."""

    def __init__(self, root: Path) -> None:
        self._root = root
        root.mkdir(parents=True, exist_ok=True)
        for stray in root.glob("*/.tmp-*"):
            stray.unlink(missing_ok=True)

    def path(self, file_id: str) -> Path:
        return self._root / file_id[:2] / file_id

    def has(self, file_id: str) -> bool:
        return self.path(file_id).is_file()

    def put(self, data: bytes) -> str:
        """Store `data` durably; return its sha256 hex (the file id)."""
        file_id = hashlib.sha256(data).hexdigest()
        final = self.path(file_id)
        if final.is_file() and final.stat().st_size == len(data):
            return file_id
        final.parent.mkdir(exist_ok=True)
        try:
            fd, tmp = tempfile.mkstemp(dir=final.parent, prefix=".tmp-")
            try:
                with os.fdopen(fd, "wb") as fh:
                    fh.write(data)
                    fh.flush()
                    os.fsync(fh.fileno())
                os.replace(tmp, final)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
            dir_fd = os.open(final.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError as exc:
            raise StoreError(f"cannot write artifact {file_id} under {self._root}: {exc}") from exc
        return file_id

    def read(self, file_id: str) -> bytes:
        try:
            return self.path(file_id).read_bytes()
        except OSError as exc:
            raise StoreError(f"cannot read artifact {file_id}: {exc.strerror}") from exc
