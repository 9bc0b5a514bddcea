"""Writes that survive a kill -9 or a power cut, and the checksums that show a file was damaged afterwards.

A kill -9 loses nothing a process already handed to the kernel; a power cut also loses what the kernel had not
written to disk yet. So every file whose loss would lose a completed step is fsynced, and so is its folder after a
rename (a rename is only durable once the folder's entry is). `replace_text` writes beside the target and renames
over it, so a reader sees the old file or the new one, never half of one.

`file_digest` hashes a file in independent 16 MiB blocks on a few threads (hashlib releases the GIL), then hashes the
block digests: one streaming pass at several GB/s, so verifying a checkpoint of tens of GB takes seconds, not
minutes. Torch-free.
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

DIGEST_NAME = "sha256-of-16MiB-blocks"
BLOCK_BYTES = 16 * 2**20


def fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def fsync_dir(path: Path) -> None:
    """Make the entries of folder `path` (created, renamed or removed names) durable."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def replace_text(path: Path, text: str) -> None:
    """Atomically replace (or create) `path` with `text`, durably."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    replace_bytes(path, text.encode("utf-8"), tmp)


def replace_bytes(path: Path, data: bytes, tmp: Path | None = None) -> None:
    path = Path(path)
    tmp = tmp or path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def append_text(path: Path, text: str) -> None:
    """Append and fsync (a kill mid-append leaves at most a torn last line, which readers of our logs drop)."""
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


def file_digest(path: Path, *, threads: int = 8) -> str:
    """The hex digest (DIGEST_NAME) of one file."""
    size = os.path.getsize(path)
    descriptor = os.open(path, os.O_RDONLY)
    try:
        def block(offset: int) -> bytes:
            return hashlib.sha256(os.pread(descriptor, BLOCK_BYTES, offset)).digest()

        offsets = range(0, size, BLOCK_BYTES)
        if len(offsets) <= 1:
            digests = [block(offset) for offset in offsets]
        else:
            with ThreadPoolExecutor(max_workers=min(threads, len(offsets), os.cpu_count() or 1)) as pool:
                digests = list(pool.map(block, offsets))
    finally:
        os.close(descriptor)
    return hashlib.sha256(b"".join(digests)).hexdigest()
