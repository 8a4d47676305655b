"""What a transfer writes: the `.partial` beside the final name, the size caps, and the sha256 of what is on disk."""

from __future__ import annotations

import hashlib
import queue
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

CHUNK_SIZE = 1 << 20  # bounded memory: one chunk in flight, whatever the file size
PARTIAL_SUFFIX = ".partial"
# What a body may bring when the server declares no size, by kind of file.
LORA_MAX_BYTES = 2 << 30
CHECKPOINT_MAX_BYTES = 16 << 30


@dataclass(frozen=True)
class DownloadedFile:
    path: Path
    size: int
    sha256: str
    filename: str | None  # from Content-Disposition, when the server sent one


def partial_path(dest: Path) -> Path:
    return dest.with_name(dest.name + PARTIAL_SUFFIX)


def max_bytes_for(kind: str) -> int:
    """The most a file of this library type may weigh when its server declares no size."""
    return LORA_MAX_BYTES if kind == "lora" else CHECKPOINT_MAX_BYTES


def sha256_prefix(path: Path, progress: Callable[[int], None] | None = None):
    """The sha256 object over the whole file, to go on hashing what is appended to it."""
    digest = hashlib.sha256()
    done = 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_SIZE * 8):
            digest.update(chunk)
            done += len(chunk)
            if progress is not None:
                progress(done)
    return digest


def sha256_file(path: Path, progress: Callable[[int], None] | None = None) -> str:
    """Hex sha256 of a file, read in bounded chunks; `progress(bytes_read)` as it goes."""
    return sha256_prefix(path, progress).hexdigest()


class BackgroundSha256:
    """sha256 computed in a thread beside the transfer.

    hashlib releases the GIL on large buffers, so hashing a chunk overlaps with
    receiving and writing the next one; on a fast link hashing in line would
    halve the throughput. At most a few chunks wait in the queue (bounded memory).
    """

    def __init__(self, digest=None):
        self._digest = digest or hashlib.sha256()
        self._chunks: queue.Queue[bytes | None] = queue.Queue(maxsize=4)
        self._thread = threading.Thread(target=self._hash, name="sha256", daemon=True)
        self._thread.start()

    def _hash(self) -> None:
        while (chunk := self._chunks.get()) is not None:
            self._digest.update(chunk)

    def update(self, chunk: bytes) -> None:
        self._chunks.put(chunk)

    def close(self) -> None:
        if self._thread.is_alive():
            self._chunks.put(None)
            self._thread.join()

    def hexdigest(self) -> str:
        self.close()
        return self._digest.hexdigest()
