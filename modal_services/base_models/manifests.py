"""Base-model manifests: what a model's files on disk must be, checked against the manifest or the source.

A manifest (`manifest:<key>`) lists every file of a verified model with its
size and sha256 (or the Hub's git blob id for small files). It is made from a
download's plan once the files match what the source published, and checked
again by `present` (sizes, published hashes) and the "verify" job (every hash).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Mapping

from modal_services.errors import ErrorCode, ToolboxError
from modal_services.net.fetchers import Plan, git_blob_sha1
from modal_services.net.transfer.files import CHUNK_SIZE, sha256_file


def check_files(folder: Path, manifest: dict, deep: bool = False, on_bytes: Callable[[int], None] | None = None,
                published: Mapping | None = None) -> list[str]:
    """What is wrong with a model's files on disk against its manifest (empty: all good)."""
    return [f"{name} {problem}" for name, problem in file_problems(folder, manifest, deep, on_bytes, published).items()]


def file_problems(folder: Path, manifest: dict, deep: bool = False, on_bytes: Callable[[int], None] | None = None,
                  published: Mapping | None = None) -> dict[str, str]:
    """File name → what is wrong with it ("is missing", wrong size or hash), in name order.

    Shallow: every file exists with its size, and files whose sha256 the
    registry publishes (`published`: dest → PublishedFile) match it. Deep: every
    hash (sha256, or the git blob id for small files), which reads every byte.
    """
    problems: dict[str, str] = {}
    hashed = 0
    for name, expected in sorted(manifest.get("files", {}).items()):
        path = folder / name
        if not path.is_file():
            problems[name] = "is missing"
            continue
        size = path.stat().st_size
        if size != expected.get("size"):
            problems[name] = f"has {size} bytes, {expected.get('size')} expected"
            continue
        known = (published or {}).get(name)
        if not deep and known is not None and known.sha256 and sha256_file(path) != known.sha256.lower():
            problems[name] = "does not match its published sha256"
            continue
        if deep:
            base = hashed
            report = (lambda n: on_bytes(base + n)) if on_bytes else None
            if expected.get("sha256") and sha256_file(path, report) != expected["sha256"]:
                problems[name] = "does not match its sha256"
            elif not expected.get("sha256") and expected.get("git_sha1") and git_blob_sha1(path) != expected["git_sha1"]:
                problems[name] = "does not match its git blob id"
            hashed += size
    return problems


def planned_manifest(entry, plan: Plan, folder: Path) -> tuple[dict, list[str]]:
    """The manifest the planned files on disk make, and the files that are missing or do not match
    what the source published (size, sha256 or git blob id). Reads the files; changes nothing."""
    files, wrong = {}, []
    for file in plan.files:
        path = folder / file.dest
        if not path.is_file():
            wrong.append(file.dest)
            continue
        size = path.stat().st_size
        sha256 = sha256_file(path) if file.sha256 or size > CHUNK_SIZE else None
        if (
            (file.size is not None and size != file.size)
            or (file.sha256 is not None and sha256 != file.sha256)
            or (file.sha256 is None and file.git_sha1 is not None and git_blob_sha1(path) != file.git_sha1)
        ):
            wrong.append(file.dest)
            continue
        files[file.dest] = {"size": size, "sha256": sha256 or file.sha256, "git_sha1": file.git_sha1}
    manifest = {
        "key": entry.key,
        "complete": True,
        "files": files,
        "size_bytes": sum(f["size"] for f in files.values()),
        "source": getattr(entry.source, "repo_id", None) or getattr(entry.source, "url", None),
        "revision": plan.revision,
        "completed_at": time.time(),
    }
    return manifest, wrong


def convert_pickles(entry, folder: Path, manifest: dict) -> dict:
    """The entry's downloaded pickles as safetensors (the pickles removed), and the manifest of what is kept."""
    from modal_services.base_models.pickle_weights import convert_pickle

    files = dict(manifest["files"])
    for pickled, converted in entry.converted.items():
        files.pop(pickled, None)
        target = folder / converted
        convert_pickle(folder / pickled, target)
        files[converted] = {"size": target.stat().st_size, "sha256": sha256_file(target), "git_sha1": None}
    return {**manifest, "files": files, "size_bytes": sum(f["size"] for f in files.values())}


def verified_manifest(entry, plan: Plan, folder: Path) -> dict:
    """The manifest of a finished download; a file that does not match the source is removed."""
    manifest, wrong = planned_manifest(entry, plan, folder)
    if wrong:
        for dest in wrong:
            (folder / dest).unlink(missing_ok=True)
        raise ToolboxError(
            ErrorCode.CHECKSUM_MISMATCH,
            f"{entry.name}: {wrong[0]} did not match what the source published; it was removed. Download again.",
        )
    return manifest
