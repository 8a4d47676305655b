"""Fetchers by source kind: what a base model's files are (a plan) and how each is fetched.

Hugging Face repos go through huggingface_hub (its endpoint, tokens, Xet and
in-call resume); plain URLs through `transfer.download.download_file`.
"""

from __future__ import annotations

import hashlib
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Callable
from urllib.parse import urlsplit

from modal_services import remedies
from modal_services.errors import ErrorCode, ToolboxError
from modal_services.net.egress import HostUnreachable
from modal_services.net.transfer.download import download_file
from modal_services.net.transfer.errors import DownloadHTTPError, TransientFailure, is_disk_full, storage_full
from modal_services.net.transfer.files import CHUNK_SIZE
from modal_services.net.transfer.responses import retry_after_seconds
from modal_services.net.transfer.retrying import with_retries

DEFAULT_HF_ENDPOINT = "https://huggingface.co"
# A hub that refuses connections may be restarting: one short retry, not the full budget.
REFUSED_CONNECTION_RETRIES = 1


@dataclass(frozen=True)
class PlannedFile:
    source: str  # the path at the source (repo path, URL file name)
    dest: str  # relative to the model folder
    size: int | None
    sha256: str | None
    git_sha1: str | None = None  # the Hub's blob id for small non-LFS files


@dataclass(frozen=True)
class Plan:
    files: tuple[PlannedFile, ...]
    revision: str | None = None  # the commit the files were listed at

    @property
    def total(self) -> int:
        return sum(f.size or 0 for f in self.files)


@dataclass(frozen=True)
class FetchContext:
    hf_endpoint: str | None
    hf_token: str | None
    civitai_token: str | None = None


def git_blob_sha1(path: Path) -> str:
    digest = hashlib.sha1(b"blob %d\0" % path.stat().st_size)
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_SIZE):
            digest.update(chunk)
    return digest.hexdigest()


def _expected(entry, dest: str, size: int | None, sha256: str | None) -> tuple[int | None, str | None]:
    """A registry-published value wins over what the source reports; a disagreement is caught at verification."""
    published = entry.published.get(dest)
    if published is None:
        return size, sha256
    return (published.size if published.size is not None else size,
            published.sha256.lower() if published.sha256 else sha256)


class _ByteCounter:
    """What huggingface_hub gets as `tqdm_class`: counts a file's bytes into our progress, draws nothing.

    Having `update_transfer` makes the Xet path treat it as one aggregated bar,
    so file bytes (not network bytes) are what we count there too.
    """

    on_bytes: Callable[[int], None]

    def __init__(self, *args, total: int | None = None, initial: int = 0, **kwargs):
        self.total = total
        self.n = initial
        self.on_bytes(self.n)

    def update(self, n: int = 1) -> None:
        self.n += n
        self.on_bytes(self.n)

    def update_transfer(self, n: int = 1) -> None:
        """Network bytes (compressed, deduplicated): not what the progress bar counts."""

    def set_postfix_str(self, *args, **kwargs) -> None:
        """No bar to label."""

    set_transfer_postfix_str = set_postfix_str

    def refresh(self, *args, **kwargs) -> None:
        """No bar to redraw."""

    def close(self) -> None:
        """Nothing to release."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _byte_counter(on_bytes: Callable[[int], None]) -> type:
    return type("ByteCounter", (_ByteCounter,), {"on_bytes": staticmethod(on_bytes)})


def _cause(exc: BaseException | None, kind: type[BaseException]) -> BaseException | None:
    """The first exception of `kind` in `exc`'s chain of causes (huggingface_hub wraps httpx, which wraps the socket's)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, kind):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def _unreachable_hub(exc: BaseException, endpoint: str | None) -> Exception | None:
    """A hub whose name does not resolve (`HostUnreachable`: no retry), or one refusing connections (a
    `TransientFailure` worth one short retry, then unreachable); None for any other failure."""
    host = urlsplit(endpoint or DEFAULT_HF_ENDPOINT).hostname or "the hub"
    if _cause(exc, socket.gaierror) is not None:
        return HostUnreachable(ErrorCode.DOWNLOAD_FAILED, f"`{host}` does not resolve (check the network or HF_ENDPOINT).")
    if _cause(exc, ConnectionRefusedError) is not None:
        refused = TransientFailure("connection refused")
        refused.max_retries = REFUSED_CONNECTION_RETRIES
        refused.give_up = HostUnreachable(
            ErrorCode.DOWNLOAD_FAILED, f"`{host}` refused the connection (check the network or HF_ENDPOINT).")
        return refused
    return None


def _hf_failure(exc: BaseException, repo_id: str, endpoint: str | None) -> Exception:
    """Turn a huggingface_hub error into ours: a refusal, a retryable `TransientFailure`, or a clear failure."""
    import httpx2
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    unreachable = _unreachable_hub(exc, endpoint)
    if unreachable is not None:
        return unreachable
    if isinstance(exc, OfflineModeIsEnabled):
        return ToolboxError(ErrorCode.DOWNLOAD_FAILED, "HF_HUB_OFFLINE is set, so nothing can be downloaded from Hugging Face.")
    if isinstance(exc, GatedRepoError):
        return DownloadHTTPError(
            f"{repo_id} is gated on Hugging Face: accept its terms on the model page with the account whose "
            f"token is set ({remedies.set_token('hf')}).", 403)
    status = exc.response.status_code if isinstance(exc, HfHubHTTPError) and exc.response is not None else None
    if isinstance(exc, RepositoryNotFoundError):
        return DownloadHTTPError(
            f"Hugging Face did not give access to {repo_id} (HTTP {status}): it does not exist or needs a token "
            f"({remedies.set_token('hf')}).", status)
    if isinstance(exc, (RevisionNotFoundError, RemoteEntryNotFoundError)):
        return DownloadHTTPError(f"A file or revision of {repo_id} was not found on Hugging Face (HTTP {status}).", status or 404)
    if isinstance(exc, HfHubHTTPError):
        if status is not None and (status in (408, 429) or status >= 500):
            transient = TransientFailure(f"HTTP {status}")
            transient.status = status
            transient.retry_after = retry_after_seconds(exc.response.headers.get("Retry-After"))
            return transient
        if status in (401, 403):
            return DownloadHTTPError(f"Hugging Face refused access to {repo_id} (HTTP {status}): the token may be "
                                     f"wrong; {remedies.set_token('hf')}.", status)
        return DownloadHTTPError(f"Hugging Face answered HTTP {status} for {repo_id}.", status)
    if isinstance(exc, (LocalEntryNotFoundError, httpx2.TransportError)):
        return TransientFailure(type(exc).__name__)
    if isinstance(exc, OSError) and is_disk_full(exc):
        return storage_full(repo_id)
    if isinstance(exc, OSError) and "Consistency check failed" in str(exc):
        return TransientFailure("short body")  # huggingface_hub's own word for a truncated transfer
    return exc



class HFFetcher:
    """Hugging Face repos through huggingface_hub (HF_ENDPOINT, tokens, Xet, its own in-call resume)."""

    def plan(self, entry, ctx: FetchContext) -> Plan:
        from fnmatch import fnmatchcase

        from huggingface_hub import HfApi

        source = entry.source

        def list_files():
            try:
                api = HfApi(endpoint=ctx.hf_endpoint, token=ctx.hf_token)
                return api.model_info(source.repo_id, revision=source.revision, files_metadata=True)
            except Exception as exc:
                raise _hf_failure(exc, source.repo_id, ctx.hf_endpoint) from None

        info = with_retries(list_files, f"listing {source.repo_id}")
        siblings = info.siblings or []
        chosen = []
        for sibling in siblings:
            name = sibling.rfilename
            if source.include and not any(fnmatchcase(name, pattern) for pattern in source.include):
                continue
            if any(fnmatchcase(name, pattern) for pattern in source.exclude):
                continue
            chosen.append(sibling)
        for pattern in source.include:
            if not any(fnmatchcase(s.rfilename, pattern) for s in chosen):
                raise DownloadHTTPError(f"{source.repo_id} has no file matching {pattern!r}.", 404)
        if not chosen:
            raise DownloadHTTPError(f"{source.repo_id} lists no files to download.", 404)
        files = []
        for sibling in chosen:
            dest = entry.dest_for(sibling.rfilename)
            size, sha256 = _expected(entry, dest, sibling.size, sibling.lfs.sha256 if sibling.lfs else None)
            files.append(PlannedFile(sibling.rfilename, dest, size, sha256,
                                     None if sibling.lfs else sibling.blob_id))
        return Plan(tuple(files), revision=info.sha)

    def fetch(self, entry, plan: Plan, file: PlannedFile, folder: Path, ctx: FetchContext,
              on_bytes: Callable[[int], None]) -> None:
        from huggingface_hub import hf_hub_download

        def one_try() -> str:
            try:
                return hf_hub_download(
                    entry.source.repo_id, file.source, revision=plan.revision, local_dir=folder,
                    endpoint=ctx.hf_endpoint, token=ctx.hf_token, tqdm_class=_byte_counter(on_bytes),
                )
            except Exception as exc:
                raise _hf_failure(exc, entry.source.repo_id, ctx.hf_endpoint) from None

        path = Path(with_retries(one_try, f"{entry.source.repo_id}/{file.source}"))
        target = folder / file.dest
        if path != target:
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(path, target)


class URLFetcher:
    """One file at a plain URL, through `download_file`."""

    def plan(self, entry, ctx: FetchContext) -> Plan:
        size, sha256 = _expected(entry, entry.source.filename, None, None)
        return Plan((PlannedFile(entry.source.url, entry.source.filename, size, sha256),))

    def fetch(self, entry, plan: Plan, file: PlannedFile, folder: Path, ctx: FetchContext,
              on_bytes: Callable[[int], None]) -> None:
        download_file(file.source, folder / file.dest, expected_size=file.size, expected_sha256=file.sha256,
                      size_hint=entry.approx_bytes, progress=lambda done, total: on_bytes(done))


# By source kind (registry.py). The CivitAI importer adds "civitai" here.
FETCHERS: dict[str, object] = {"huggingface": HFFetcher(), "url": URLFetcher()}


def fetcher_for(entry):
    try:
        return FETCHERS[entry.source.kind]
    except KeyError:
        raise ToolboxError(ErrorCode.INVALID_INPUT, f"No downloader for {entry.key}'s source ({entry.source.kind}).") from None

