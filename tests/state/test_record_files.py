"""Record files: an atomic write survives a kill at every step, hostile paths never reach the disk,
private homes stay private, and `VolumeFiles` speaks the Modal volume client API."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from modal_services.state.record_files import MAX_NAME_BYTES, FolderFiles, VolumeFiles, checked_path
from tests.fakes.modal_fakes import FakeModalVolume

REPO_ROOT = Path(__file__).resolve().parents[2]
RECORD = "settings/1.json"
OLD = b'{"old": true}'
NEW_SIZE = 256 * 1024

# A writer that replaces RECORD with NEW_SIZE bytes and SIGKILLs itself at one step of the write.
# Each step is reached through the call the write makes there (the temp file's creation, its
# write, the first fsync (the file), os.replace, the second fsync (the folder), the commit hook).
KILLED_WRITER = r"""
import asyncio, os, signal, sys, tempfile
from modal_services.state.record_files import FolderFiles

root, step, record, size = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])

def die():
    os.kill(os.getpid(), signal.SIGKILL)

def kill_after(function, nth_call=1):
    calls = []
    def wrapped(*args, **kwargs):
        result = function(*args, **kwargs)
        calls.append(1)
        if len(calls) == nth_call:
            die()
        return result
    return wrapped

class HalfWriter:
    # The temp file's writer: writes (and syncs) half the bytes, then dies.
    def __init__(self, handle):
        self.handle = handle
    def __enter__(self):
        return self
    def __exit__(self, *exc):
        self.handle.close()
    def write(self, data):
        self.handle.write(data[: len(data) // 2])
        self.handle.flush()
        os.fsync(self.handle.fileno())
        die()

commit = None
if step == "temp-created":
    tempfile.mkstemp = kill_after(tempfile.mkstemp)
elif step == "partial-write":
    real_fdopen = os.fdopen
    os.fdopen = lambda descriptor, mode: HalfWriter(real_fdopen(descriptor, mode))
elif step == "file-fsynced":
    os.fsync = kill_after(os.fsync, 1)
elif step == "replaced":
    os.replace = kill_after(os.replace)
elif step == "folder-fsynced":
    os.fsync = kill_after(os.fsync, 2)
elif step == "committing":
    commit = die
asyncio.run(FolderFiles(root, commit=commit).write(record, bytes(range(256)) * (size // 256)))
"""

# step -> (what the record reads as after the kill, size of the temp file left behind or None)
KILL_STEPS = {
    "temp-created": ("old", 0),
    "partial-write": ("old", NEW_SIZE // 2),
    "file-fsynced": ("old", NEW_SIZE),
    "replaced": ("new", None),
    "folder-fsynced": ("new", None),
    "committing": ("new", None),
}


def _hidden(folder: Path) -> list[Path]:
    return sorted(path for path in folder.iterdir() if path.name.startswith("."))


@pytest.mark.parametrize("step", list(KILL_STEPS))
async def test_a_writer_killed_at_any_step_leaves_the_old_record_or_the_new_one(tmp_path, step):
    root = tmp_path / "records"
    files = FolderFiles(root)
    await files.write(RECORD, OLD)
    new = bytes(range(256)) * (NEW_SIZE // 256)

    writer = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(root), step, RECORD, str(NEW_SIZE)],
                            env={**os.environ, "PYTHONPATH": str(REPO_ROOT)}, capture_output=True, timeout=60)
    assert writer.returncode == -signal.SIGKILL, writer.stderr.decode()

    expected, leftover_size = KILL_STEPS[step]
    assert await files.read(RECORD) == (OLD if expected == "old" else new)
    assert await files.names("settings") == ["1.json"]
    leftovers = _hidden(root / "settings")
    if leftover_size is None:
        assert leftovers == []
    else:
        assert [path.stat().st_size for path in leftovers] == [leftover_size]  # killed where meant
        assert files.remove_leftovers("settings") == []  # too young: could be a write in progress
        assert files.remove_leftovers("settings", older_than=0) == [leftovers[0].name]
        assert _hidden(root / "settings") == []
    assert await files.read(RECORD) == (OLD if expected == "old" else new)


async def test_a_failed_write_removes_its_temp_file_and_keeps_the_old_record(tmp_path, monkeypatch):
    files = FolderFiles(tmp_path)
    await files.write(RECORD, OLD)

    def disk_full(*_):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", disk_full)
    with pytest.raises(OSError, match="No space"):
        await files.write(RECORD, b"new")
    assert await files.read(RECORD) == OLD
    assert _hidden(tmp_path / "settings") == []


HOSTILE_PATHS = ["../x", "/abs", "a/../../b", ".x", "a/.x", "x\0y", "a\\b", "", ".", "a//b", "a/",
                 "a/./b", "line\nbreak", "bell\x07", "\udc80", "n" * (MAX_NAME_BYTES + 1)]


@pytest.mark.parametrize("path", HOSTILE_PATHS)
async def test_hostile_paths_are_refused_and_touch_nothing(tmp_path, path):
    root = tmp_path / "home"
    files = FolderFiles(root)
    with pytest.raises(ValueError, match="not a record path"):
        checked_path(path)
    for call in (files.read(path), files.write(path, b"x"), files.remove(path)):
        with pytest.raises(ValueError):
            await call
    volume = FakeModalVolume()
    with pytest.raises(ValueError):
        await VolumeFiles(volume).write(path, b"x")
    assert not root.exists() and not (tmp_path / "x").exists() and not Path("/abs").exists()
    assert volume.files == {}


def test_plain_paths_pass_as_they_are():
    for path in ("settings/1.json", "loras/my lora (v2) é.json", "n" * MAX_NAME_BYTES, "a/b/c.json"):
        assert str(checked_path(path)) == path


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


async def test_a_private_home_keeps_every_folder_0700_and_every_file_0600(tmp_path):
    root = tmp_path / "data" / "tokens"
    files = FolderFiles(root, private=True)
    await files.write("deep/er/civitai.json", b"{}")
    await files.write("hf.json", b"{}")
    assert {_mode(folder) for folder in (root, root / "deep", root / "deep" / "er")} == {0o700}
    assert {_mode(file) for file in (root / "deep" / "er" / "civitai.json", root / "hf.json")} == {0o600}

    # An earlier install's looser modes are tightened by the next write, and an overwrite stays private.
    os.chmod(root, 0o755)
    os.chmod(root / "deep", 0o755)
    os.chmod(root / "hf.json", 0o644)
    await files.write("deep/er/civitai.json", b'{"token": "new"}')
    await files.write("hf.json", b'{"token": "new"}')
    assert {_mode(folder) for folder in (root, root / "deep", root / "deep" / "er")} == {0o700}
    assert {_mode(file) for file in (root / "deep" / "er" / "civitai.json", root / "hf.json")} == {0o600}


async def test_a_shared_home_gives_readable_files(tmp_path):
    files = FolderFiles(tmp_path / "loras")
    await files.write("loras/a.json", b"{}")
    assert _mode(tmp_path / "loras" / "loras" / "a.json") == 0o644


async def test_every_change_is_committed_and_a_missing_file_is_no_error(tmp_path):
    commits = []
    files = FolderFiles(tmp_path, commit=lambda: commits.append(1))
    await files.write("a.json", b"1")
    await files.remove("a.json")
    assert len(commits) == 2
    await files.remove("a.json")
    await files.remove("never/there.json")
    assert len(commits) == 2  # nothing changed, nothing to commit
    assert await files.read("a.json") is None
    await files.write("b.json", b"1")
    assert await files.read("b.json/inside") is None  # a path through a file is no file either


async def test_names_lists_plain_files_only(tmp_path):
    files = FolderFiles(tmp_path)
    await files.write("folder/b.json", b"1")
    await files.write("folder/a.json", b"1")
    await files.write("folder/sub/c.json", b"1")
    (tmp_path / "folder" / ".a.json.x1y2z3.tmp").write_bytes(b"")
    (tmp_path / "folder" / ".hidden").write_bytes(b"")
    assert await files.names("folder") == ["a.json", "b.json"]
    assert await files.names("missing") == []
    assert await files.names("") == []
    assert files.remove_leftovers("folder", older_than=0) == [".a.json.x1y2z3.tmp"]
    assert (tmp_path / "folder" / ".hidden").exists()  # not a temp file: left alone
    assert files.remove_leftovers("missing", older_than=0) == []


# ---------------------------------------------------------------- VolumeFiles on the fake volume


async def test_volume_files_read_write_overwrite_and_remove():
    volume = FakeModalVolume()
    files = VolumeFiles(volume)
    assert await files.read("settings/1.json") is None
    await files.write("settings/1.json", b"first")
    await files.write("settings/1.json", b"second" * 1000)  # overwrite; read back in several chunks
    assert await files.read("settings/1.json") == b"second" * 1000
    assert volume.files == {"settings/1.json": b"second" * 1000}
    await files.remove("settings/1.json")
    await files.remove("settings/1.json")  # already gone: fine
    assert await files.read("settings/1.json") is None


async def test_volume_files_names():
    volume = FakeModalVolume()
    files = VolumeFiles(volume)
    assert await files.names("") == []
    assert await files.names("settings") == []  # the volume raises NotFoundError for a missing folder
    for path in ("settings/2.json", "settings/1.json", "settings/sub/3.json", "top.json"):
        await files.write(path, b"{}")
    volume.files["settings/.1.json.abc.tmp"] = b""  # hidden: written by something else
    assert await files.names("settings") == ["1.json", "2.json"]
    assert await files.names("") == ["top.json"]
