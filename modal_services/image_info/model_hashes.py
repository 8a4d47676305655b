"""The sha256 of a model file, as the toolbox already recorded it: never computed for an image.

A checkpoint is about 7 GB; hashing it for every image (or every job) would
cost more than the image. Every file the toolbox takes in has its sha256
recorded once: a library entry keeps it in the sidecar beside its file
(`<name>.json`, the `toolbox` entry's `sha256`: the file as downloaded, the
hash CivitAI knows), a base model's manifest keeps each verified file's, and a
request's own LoRA is kept under its sha256 as its file name
(`modal_services.engines.sdxl.request_loras`). A file none of them describes
has no known hash, and results name no hash for it. Lookups are remembered per
file (path, size and modification time), so each is read once per worker.
"""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path

from modal_services.base_models.registry import BASE_MODELS
from modal_services.state.durable import record_kind
from modal_services.state.keys import entry_key, manifest_key

SHA256_HEX = re.compile(r"[0-9a-f]{64}")
# CivitAI's AutoV2 hash: the first ten hex digits of the file's sha256 (A1111's "Model hash").
AUTOV2_DIGITS = 10


def autov2(sha256: str | None) -> str | None:
    return sha256[:AUTOV2_DIGITS] if sha256 else None


def recorded_sha256(path: Path, models_dir: Path | None = None) -> str | None:
    """The sha256 recorded for the model file at `path` (a base model's under `models_dir`), or None."""
    try:
        stat = path.stat()
    except OSError:
        return None
    return _recorded(str(path), stat.st_size, stat.st_mtime_ns, str(models_dir) if models_dir else None)


@functools.lru_cache(maxsize=256)
def _recorded(path: str, size: int, modified: int, models_dir: str | None) -> str | None:
    file = Path(path)
    if SHA256_HEX.fullmatch(file.stem):
        return file.stem
    return _library_sha256(file) or (_manifest_sha256(file, Path(models_dir)) if models_dir else None)


def _library_sha256(file: Path) -> str | None:
    """The sha256 in the library sidecar beside `file`, if the toolbox took it in."""
    key = entry_key(file.name)
    data = _read(file.with_suffix(".json"))
    try:
        entry = record_kind(key).decode(key, data) if data else None
    except ValueError:  # not JSON: an unreadable sidecar records nothing
        entry = None
    sha256 = str((entry or {}).get("sha256") or "").lower()
    return sha256 if SHA256_HEX.fullmatch(sha256) else None


def _manifest_sha256(file: Path, models_dir: Path) -> str | None:
    """The sha256 a base model's manifest records for `file`, when it lies in that model's folder."""
    for key, model in BASE_MODELS.items():
        folder = models_dir / model.folder
        if folder not in file.parents:
            continue
        manifest_file = models_dir / record_kind(manifest_key(key)).paths(manifest_key(key))[0]
        try:
            manifest = json.loads(_read(manifest_file) or b"{}")
        except ValueError:  # not JSON: an unreadable manifest records nothing
            manifest = {}
        recorded = _field(_field(_field(manifest, "files"), file.relative_to(folder).as_posix()), "sha256")
        sha256 = str(recorded or "").lower()
        if SHA256_HEX.fullmatch(sha256):
            return sha256
    return None


def _field(value, name: str):
    return value.get(name) if isinstance(value, dict) else None


def _read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:
        return None
