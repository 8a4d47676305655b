"""Where durable records are kept as files: a folder (the data dir, or a volume mounted in a Modal
container) or a Modal volume reached through its client API (the bot of a Modal deployment).

Paths are relative and use `/`. A write replaces the whole file atomically, so a reader (or a
process killed mid-write) sees either the old record or the new one, never part of one:

1. the bytes go to a temporary file in the same folder, which is flushed and fsynced;
2. `os.replace` renames it over the record (atomic on one file system);
3. the folder is fsynced, so that the rename itself survives a power cut;
4. `commit` runs (Modal: `volume.commit()`, which makes the write visible to other containers).

A temporary file left by a killed writer is named `.<record>.<random>.tmp`; listings skip it and
`remove_leftovers` deletes those older than a minute.

Every path goes through `checked_path` first, so a name that came from a person can never reach
outside the tree, hide itself among the temporary files or be too long for its temporary file.
"""

from __future__ import annotations

import asyncio
import io
import os
import tempfile
import time
from abc import ABC, abstractmethod
from pathlib import Path, PurePosixPath
from typing import Callable

TEMP_SUFFIX = ".tmp"
# A temporary file younger than this may belong to a write in progress.
LEFTOVER_AGE = 60.0
# The longest name a record may have, in bytes: its temporary file adds 14 (`.`, `.`, 8 random
# characters, `.tmp`) and a file system allows 255.
MAX_NAME_BYTES = 240


def checked_path(path: str) -> PurePosixPath:
    """`path` if it is relative and made of plain names: ValueError otherwise.

    A plain name is not empty, `.` or `..`, does not start with `.` (hidden: the temporary files),
    has no slash or backslash, no control character (NUL, newline...), and fits `MAX_NAME_BYTES`.
    """
    if not isinstance(path, str) or not path or not all(is_plain_name(part) for part in path.split("/")):
        raise ValueError(f"not a record path (relative, plain names only): {path!r}")
    return PurePosixPath(path)


def is_plain_name(name: str) -> bool:
    """One part of a record path: see `checked_path`."""
    if name in ("", ".", "..") or name.startswith(".") or "/" in name or "\\" in name:
        return False
    if any(ord(character) < 32 or ord(character) == 127 for character in name):
        return False
    try:
        return len(name.encode("utf-8")) <= MAX_NAME_BYTES
    except UnicodeEncodeError:  # a lone surrogate: no UTF-8 name (nor a volume path) can hold it
        return False


class RecordFiles(ABC):
    """One tree of record files: read, write (atomically), remove, list a folder."""

    @abstractmethod
    async def read(self, path: str) -> bytes | None:
        """The file's bytes, or None when there is none."""

    @abstractmethod
    async def write(self, path: str, data: bytes) -> None: ...

    @abstractmethod
    async def remove(self, path: str) -> None:
        """Remove the file; no error when it is already gone."""

    @abstractmethod
    async def names(self, folder: str) -> list[str]:
        """The names of the files directly in `folder` (none when it does not exist)."""


class FolderFiles(RecordFiles):
    """Record files in a folder on this machine's disk.

    `private` makes folders 0700 and files 0600 (tokens). `commit` runs after every change, in a
    worker thread (Modal: the mounted volume's blocking `commit`).
    """

    def __init__(self, root: Path, private: bool = False, commit: Callable[[], object] | None = None):
        self.root = Path(root)
        self.private = private
        self.commit = commit

    def _path(self, path: str) -> Path:
        return self.root / checked_path(path)

    async def read(self, path: str) -> bytes | None:
        return await asyncio.to_thread(self._read, self._path(path))

    async def write(self, path: str, data: bytes) -> None:
        await asyncio.to_thread(self._write, self._path(path), data)

    async def remove(self, path: str) -> None:
        await asyncio.to_thread(self._remove, self._path(path))

    async def names(self, folder: str) -> list[str]:
        target = self.root / checked_path(folder) if folder else self.root
        return await asyncio.to_thread(_record_names, target)

    def _read(self, path: Path) -> bytes | None:
        try:
            return path.read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            return None

    def _write(self, path: Path, data: bytes) -> None:
        folder = path.parent
        self._make_folders(folder)
        handle, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=folder)
        try:
            with os.fdopen(handle, "wb") as temp:
                temp.write(data)
                temp.flush()
                os.fsync(temp.fileno())
            os.chmod(temp_name, 0o600 if self.private else 0o644)
            os.replace(temp_name, path)
        except BaseException:
            Path(temp_name).unlink(missing_ok=True)
            raise
        _fsync_folder(folder)
        self._commit()

    def _make_folders(self, folder: Path) -> None:
        """`folder` and the folders between it and the root. When private, each of them (the root
        too) is 0700, also one made earlier with a looser mode: `mkdir(parents=True)` alone would
        give every folder but the last the default mode."""
        levels = [self.root]
        for name in folder.relative_to(self.root).parts:
            levels.append(levels[-1] / name)
        self.root.parent.mkdir(parents=True, exist_ok=True)
        for level in levels:
            level.mkdir(exist_ok=True, mode=0o700 if self.private else 0o755)
            if self.private:
                os.chmod(level, 0o700)

    def _remove(self, path: Path) -> None:
        try:
            path.unlink()
        except FileNotFoundError:
            return
        _fsync_folder(path.parent)
        self._commit()

    def _commit(self) -> None:
        if self.commit is not None:
            self.commit()

    def remove_leftovers(self, folder: str = "", older_than: float = LEFTOVER_AGE) -> list[str]:
        """Temporary files of writes that never finished (a killed writer), older than `older_than` s."""
        target = self.root / checked_path(folder) if folder else self.root
        if not target.is_dir():
            return []
        horizon = time.time() - older_than
        removed = []
        for path in target.iterdir():
            if not (path.name.startswith(".") and path.name.endswith(TEMP_SUFFIX)):
                continue
            try:
                if path.stat().st_mtime >= horizon:
                    continue
                path.unlink()
            except FileNotFoundError:  # renamed over its record, or removed by another cleaner
                continue
            removed.append(path.name)
        return sorted(removed)


def _record_names(folder: Path) -> list[str]:
    if not folder.is_dir():
        return []
    return sorted(path.name for path in folder.iterdir() if not path.name.startswith(".") and path.is_file())


def _fsync_folder(folder: Path) -> None:
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


class VolumeFiles(RecordFiles):
    """Record files on a `modal.Volume`, through the client API (every call `.aio`).

    For a process that does not mount the volume: the bot of a Modal deployment. An upload is
    committed by Modal as a whole, so a reader never sees part of one.
    """

    def __init__(self, volume):
        self.volume = volume

    @classmethod
    def from_name(cls, name: str) -> "VolumeFiles":
        import modal

        return cls(modal.Volume.from_name(name, create_if_missing=True))

    async def read(self, path: str) -> bytes | None:
        buffer = bytearray()
        try:
            async for chunk in self.volume.read_file.aio(str(checked_path(path))):
                buffer += chunk
        except FileNotFoundError:
            return None
        return bytes(buffer)

    async def write(self, path: str, data: bytes) -> None:
        async with self.volume.batch_upload.aio(force=True) as batch:
            batch.put_file(io.BytesIO(data), "/" + str(checked_path(path)))

    async def remove(self, path: str) -> None:
        try:
            await self.volume.remove_file.aio(str(checked_path(path)))
        except FileNotFoundError:
            return

    async def names(self, folder: str) -> list[str]:
        import modal.exception
        from modal.volume import FileEntryType

        where = str(checked_path(folder)) if folder else "/"
        try:
            listed = await self.volume.listdir.aio(where)
        except (FileNotFoundError, modal.exception.NotFoundError):
            return []
        found = (PurePosixPath(entry.path).name for entry in listed if entry.type == FileEntryType.FILE)
        return sorted(name for name in found if not name.startswith("."))

