"""In-memory stand-ins for the Modal objects the bot touches, faithful at the seam.

`FakeModalDict` follows `modal.Dict`'s documented behaviour: values are
serialised (a caller never shares an object with the store), `put` with
`skip_if_exists=True` is an atomic create that returns whether it stored,
`pop` without a default raises KeyError, `keys`/`items` are async iterators
through `.aio`, and every method has the blocking form and `.aio`.

`FakeModalVolume` follows the client API of `modal.Volume` (modal 1.6):
`read_file` streams bytes and raises FileNotFoundError for a missing file,
`batch_upload(force=True)` is an async context manager whose `put_file`
uploads are read and land together when it exits without an error (none if
the block raised; FileExistsError over an existing file without `force`),
`remove_file` raises FileNotFoundError for a missing file, `listdir` lists one
folder's `FileEntry`s (paths from the volume's root, without a leading `/`; a
file's own entry for a file's path) and raises NotFoundError for a missing one.
"""

from __future__ import annotations

import asyncio
import contextlib
import pickle
import threading
import uuid
from typing import Any
from unittest.mock import MagicMock

import modal

from modal_services.jobs.records import run_job
from modal_services.state.store import ModalDictStore


class _Method:
    """A blocking callable with an `.aio` twin, like Modal's synchronised methods."""

    def __init__(self, function, aio):
        self._function = function
        self.aio = aio

    def __call__(self, *args, **kwargs):
        return self._function(*args, **kwargs)


_MISSING = object()


class FakeModalDict:
    def __init__(self):
        self._data: dict[Any, bytes] = {}
        self._lock = threading.Lock()
        self.calls: list[str] = []
        for name in ("get", "put", "pop", "contains"):
            blocking = getattr(self, f"_{name}")
            self.__dict__[name] = _Method(blocking, self._aio(name, blocking))
        self.keys = _Method(lambda: list(self._snapshot()), self._aiter(lambda: list(self._snapshot())))
        self.items = _Method(
            lambda: [(k, pickle.loads(v)) for k, v in self._snapshot().items()],
            self._aiter(lambda: [(k, pickle.loads(v)) for k, v in self._snapshot().items()]),
        )

    def _aio(self, name, blocking):
        async def call(*args, **kwargs):
            self.calls.append(name)
            await asyncio.sleep(0)  # a real call always yields to the event loop
            return blocking(*args, **kwargs)

        return call

    def _aiter(self, listing):
        async def iterate():
            await asyncio.sleep(0)
            for item in listing():
                yield item

        return iterate

    def _snapshot(self) -> dict[Any, bytes]:
        with self._lock:
            return dict(self._data)

    @staticmethod
    def _check_key(key) -> None:
        if not isinstance(key, (str, int, float, bytes, bool, tuple)):
            raise TypeError("modal.Dict keys must be primitive values")

    def _get(self, key, default=None):
        self._check_key(key)
        with self._lock:
            raw = self._data.get(key)
        return default if raw is None else pickle.loads(raw)

    def _put(self, key, value, *, skip_if_exists: bool = False) -> bool:
        self._check_key(key)
        raw = pickle.dumps(value)
        with self._lock:
            if skip_if_exists and key in self._data:
                return False
            self._data[key] = raw
            return True

    def _pop(self, key, default=_MISSING):
        self._check_key(key)
        with self._lock:
            raw = self._data.pop(key, None)
        if raw is None:
            if default is _MISSING:
                raise KeyError(key)
            return default
        return pickle.loads(raw)

    def _contains(self, key) -> bool:
        with self._lock:
            return key in self._data


class FakeModalVolume:
    """A volume reached through the client API: files by path, in memory."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.read_file = _Method(None, self._read_file)
        self.batch_upload = _Method(None, self._batch_upload)
        self.remove_file = _Method(None, self._remove_file)
        self.listdir = _Method(None, self._listdir)

    @staticmethod
    def _normal(path: str) -> str:
        return path.strip("/")

    async def _read_file(self, path: str):
        data = self.files.get(self._normal(path))
        if data is None:
            raise FileNotFoundError(f"No such file: {path}")
        await asyncio.sleep(0)
        for start in range(0, len(data) or 1, 1024):
            yield data[start:start + 1024]

    @contextlib.asynccontextmanager
    async def _batch_upload(self, force: bool = False):
        staged: dict[str, object] = {}

        class Batch:
            @staticmethod
            def put_file(source, remote_path: str, mode: int | None = None) -> None:
                if str(remote_path).endswith("/"):
                    raise ValueError(f"remote_path ({remote_path}) must refer to a file - cannot end with /")
                staged[FakeModalVolume._normal(str(remote_path))] = source  # read when the batch ends

        yield Batch()
        clashes = [path for path in staged if path in self.files]
        if clashes and not force:
            raise FileExistsError(f"{clashes[0]} exists")
        uploads = {path: source.read() for path, source in staged.items()}
        await asyncio.sleep(0)
        self.files.update(uploads)

    async def _remove_file(self, path: str, recursive: bool = False) -> None:
        if self.files.pop(self._normal(path), None) is None:
            raise FileNotFoundError(f"No such file: {path}")

    async def _listdir(self, path: str, *, recursive: bool = False):
        from modal.volume import FileEntry, FileEntryType

        folder = self._normal(path)
        if folder in self.files:
            return [FileEntry(folder, FileEntryType.FILE, 0, len(self.files[folder]))]
        prefix = f"{folder}/" if folder else ""
        inside = [name[len(prefix):] for name in self.files if name.startswith(prefix)]
        if folder and not inside:
            raise modal.exception.NotFoundError(f"No such directory: {path}")
        files = {rest for rest in inside if "/" not in rest}
        folders = {rest.split("/", 1)[0] for rest in inside if "/" in rest}
        entries = [FileEntry(prefix + name, FileEntryType.FILE, 0, len(self.files[prefix + name]))
                   for name in sorted(files)]
        return entries + [FileEntry(prefix + name, FileEntryType.DIRECTORY, 0, 0) for name in sorted(folders)]


def fake_volumes(monkeypatch) -> dict[str, FakeModalVolume]:
    """`modal.Volume.from_name` answers with fakes, one per name (created on first lookup)."""
    volumes: dict[str, FakeModalVolume] = {}
    monkeypatch.setattr(modal.Volume, "from_name",
                        lambda name, create_if_missing=False, **_: volumes.setdefault(name, FakeModalVolume()))
    return volumes


class FakeDeployment:
    """A deployed app: spawning a method runs `work` as a container would, against the shared Dict."""

    def __init__(self, state: FakeModalDict, work):
        self.store = ModalDictStore(state)
        self.work = work
        self.calls: dict[str, asyncio.Task] = {}
        self.spawned: list[tuple[str, str, tuple]] = []
        self.missing = False
        self.cancelled: set[str] = set()
        self.install_models()

    def install_models(self, keys=None) -> None:
        """Manifests as /setup leaves them, so the bot believes the models are on the volume."""
        from modal_services.base_models.downloads import manifest_key
        from modal_services.base_models.registry import BASE_MODELS

        for key in BASE_MODELS if keys is None else keys:
            self.store._dict.put(manifest_key(key), {"complete": True})

    def cls_from_name(self, app_name: str, class_name: str):
        if self.missing:
            raise modal.exception.NotFoundError(f"Lookup failed for Cls '{class_name}' from the '{app_name}' app")
        deployment = self

        class Method:
            def __init__(self, name):
                self.spawn = MagicMock()
                self.spawn.aio = self._spawn
                self.name = name

            async def _spawn(self, job_id, payload):
                deployment.spawned.append((app_name, f"{class_name}.{self.name}", (job_id, payload)))
                call_id = "fc-" + uuid.uuid4().hex[:8]
                deployment.calls[call_id] = asyncio.create_task(
                    run_job(deployment.store, job_id, lambda progress: deployment.work(payload, progress))
                )
                return MagicMock(object_id=call_id)

        class Instance:
            def __getattr__(self, name):
                return Method(name)

        return Instance

    def call_from_id(self, call_id: str):
        call = MagicMock()
        task = self.calls[call_id]

        async def get(timeout=None):
            if call_id in self.cancelled:
                raise modal.exception.InputCancellation("Input was cancelled by user")
            return await asyncio.shield(task)

        async def cancel(terminate_containers: bool = False):
            self.cancelled.add(call_id)

        call.get.aio = get
        call.cancel.aio = cancel
        return call
