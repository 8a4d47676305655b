"""CivitAI: what people paste, and the REST API.

- `parse_reference` turns every form a model gets pasted in (page URLs with or
  without slug and `?modelVersionId=`, download links, AIR URNs, bare ids,
  `v:<id>`, the civitai.green / civitai.red mirrors) into ids;
  `parse_image_reference` does the same for an image (`/images/<id>`, or its id).
- `CivitaiClient` is a small blocking client over the egress policy
  (`egress.open_url`) for the v1 API and the download redirect. The token goes
  in `Authorization: Bearer`, never in a URL, and only to the configured API
  origin; 429/5xx are retried with backoff honouring `Retry-After`.

What may be imported is decided in `civitai_plans`.

Runs in worker threads and in the bot (via `asyncio.to_thread`): no torch here.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, field
from typing import Any, Callable
from urllib.parse import parse_qs, urljoin, urlsplit, urlunsplit

import urllib3

from modal_services.net.egress import REDIRECT_STATUSES, Credentials, Origin, Purpose, Response, open_url
from modal_services import remedies
from modal_services.errors import ErrorCode, ToolboxError
from modal_services.net.transfer.responses import retry_after_seconds
from modal_services.net.transfer.retrying import backoff_delay

log = logging.getLogger(__name__)

CIVITAI_HOSTS = ("civitai.com", "civitai.green", "civitai.red")
CONNECT_TIMEOUT = 10.0
READ_TIMEOUT = 30.0
# An API answer is small: one that is larger, or takes longer in all, is refused.
MAX_JSON_BYTES = 8 << 20
JSON_TIMEOUT = 60.0
# A pause longer than this is not worth holding a command for.
MAX_RETRY_AFTER = 120.0


@dataclass(frozen=True)
class CivitaiRef:
    model_id: int | None = None
    version_id: int | None = None

    def describe(self) -> str:
        if self.version_id is not None:
            return f"model version {self.version_id}"
        return f"model {self.model_id}"


_AIR = re.compile(
    r"(?:urn:)?air:(?P<ecosystem>[\w.-]+):(?P<type>[\w.-]+):civitai:(?P<model>\d+)(?:@(?P<version>\d+))?(?:\.\w+)?",
    re.IGNORECASE,
)


def parse_reference(text: str) -> CivitaiRef:
    """Ids from anything a person might paste; INVALID_INPUT (quoting their text) otherwise."""
    raw = (text or "").strip()
    # Discord users wrap links in <> to suppress embeds; some paste with quotes.
    cleaned = raw.strip("<>\"'` \t\r\n")
    if not cleaned:
        raise ToolboxError(ErrorCode.INVALID_INPUT, "Paste a CivitAI link, a model id, `v:<version id>` or an AIR URN.")
    if cleaned.isdigit():
        return CivitaiRef(model_id=_positive(cleaned, raw))
    version = re.fullmatch(r"v(?:ersion)?\s*[:#]\s*(\d+)", cleaned, re.IGNORECASE)
    if version:
        return CivitaiRef(version_id=_positive(version.group(1), raw))
    air = _AIR.fullmatch(cleaned)
    if air:
        version_id = air.group("version")
        return CivitaiRef(
            model_id=_positive(air.group("model"), raw),
            version_id=_positive(version_id, raw) if version_id else None,
        )
    return _parse_url(cleaned, raw)


def _parse_url(cleaned: str, raw: str) -> CivitaiRef:
    url = cleaned if re.match(r"^[a-z][a-z0-9+.-]*://", cleaned, re.IGNORECASE) else "https://" + cleaned
    parts = urlsplit(url)
    host = (parts.hostname or "").lower()
    if host.startswith("www."):
        host = host[4:]
    if host not in CIVITAI_HOSTS:
        raise ToolboxError(
            ErrorCode.INVALID_INPUT,
            f"`{_quote(raw)}` is not a CivitAI link. Paste a civitai.com model page or download link, "
            "a model id, `v:<version id>` or an AIR URN.",
        )
    query = parse_qs(parts.query)
    path = [segment for segment in parts.path.split("/") if segment]
    version_param = (query.get("modelVersionId") or [None])[0]
    # /models/<id>[/<slug>][?modelVersionId=<vid>]
    if len(path) >= 2 and path[0] == "models" and path[1].isdigit():
        return CivitaiRef(
            model_id=_positive(path[1], raw),
            version_id=_positive(version_param, raw) if version_param else None,
        )
    # /api/download/models/<vid> and /api/v1/model-versions/<vid>
    if len(path) == 4 and path[:3] == ["api", "download", "models"] and path[3].isdigit():
        return CivitaiRef(version_id=_positive(path[3], raw))
    if len(path) == 4 and path[:3] == ["api", "v1", "model-versions"] and path[3].isdigit():
        return CivitaiRef(version_id=_positive(path[3], raw))
    if len(path) == 4 and path[:3] == ["api", "v1", "models"] and path[3].isdigit():
        return CivitaiRef(model_id=_positive(path[3], raw))
    raise ToolboxError(
        ErrorCode.INVALID_INPUT,
        f"`{_quote(raw)}` is a CivitAI link but not to a model. Open the model's page and copy its address.",
    )


def parse_image_reference(text: str) -> int:
    """The id of the CivitAI image a person pasted (`https://civitai.com/images/<id>`, on any CivitAI host,
    with or without a query, or the bare id); INVALID_INPUT (quoting their text) otherwise."""
    raw = (text or "").strip()
    cleaned = raw.strip("<>\"'` \t\r\n")
    if cleaned.isdigit():
        return _positive(cleaned, raw)
    url = cleaned if re.match(r"^[a-z][a-z0-9+.-]*://", cleaned, re.IGNORECASE) else "https://" + cleaned
    try:
        parts = urlsplit(url)
    except ValueError:
        parts = None
    host = ((parts.hostname if parts else None) or "").lower().removeprefix("www.")
    path = [segment for segment in parts.path.split("/") if segment] if parts else []
    if host in CIVITAI_HOSTS and len(path) == 2 and path[0] == "images" and path[1].isdigit():
        return _positive(path[1], raw)
    raise ToolboxError(ErrorCode.INVALID_INPUT, f"`{_quote(raw)}` is not a CivitAI image. Paste an image's link "
                       "(https://civitai.com/images/<id>) or its id.")


def _positive(digits: str, raw: str) -> int:
    value = int(digits) if digits and digits.isdigit() else 0
    if value <= 0 or value >= 2**53:
        raise ToolboxError(ErrorCode.INVALID_INPUT, f"`{_quote(raw)}` does not hold a valid CivitAI id.")
    return value


def _quote(text: str, limit: int = 120) -> str:
    text = "".join(ch for ch in text if ch.isprintable()).replace("`", "'")
    return text if len(text) <= limit else text[: limit - 1] + "…"


# ---------------------------------------------------------------- the client


@dataclass(frozen=True)
class ResolvedDownload:
    """Where the file bytes really are, and the credentials (for that origin only) to fetch them with."""

    url: str
    credentials: Credentials | None = field(default=None, repr=False)


class CivitaiClient:
    def __init__(
        self,
        api_base: str = "https://civitai.com",
        token: str | None = None,
        *,
        retries: int = 4,
        sleep: Callable[[float], None] = time.sleep,
    ):
        self.api_base = api_base.rstrip("/")
        self._token = token or None
        self.retries = retries
        self._sleep = sleep
        # The token belongs to the configured API origin, matched on parsed URLs at every hop.
        self.credentials = (Credentials.for_base(self.api_base, {"Authorization": f"Bearer {self._token}"})
                            if self._token else None)

    def __repr__(self) -> str:  # the token stays out of logs
        return f"CivitaiClient({self.api_base!r}, token={'set' if self._token else 'none'})"

    def close(self) -> None:
        """Connections are per request: nothing is kept open between calls."""

    # -- the API

    def model(self, model_id: int) -> dict[str, Any]:
        return self._get_json(f"/api/v1/models/{model_id}", f"model {model_id}")

    def version(self, version_id: int) -> dict[str, Any]:
        return self._get_json(f"/api/v1/model-versions/{version_id}", f"model version {version_id}")

    def version_by_hash(self, sha256: str) -> dict[str, Any] | None:
        """The version a file belongs to, or None when CivitAI does not know the hash."""
        if not re.fullmatch(r"[0-9a-fA-F]{64}", sha256 or ""):
            raise ToolboxError(ErrorCode.INVALID_INPUT, "A sha256 is 64 hexadecimal digits.")
        try:
            return self._get_json(f"/api/v1/model-versions/by-hash/{sha256.upper()}", "that file hash")
        except ToolboxError as error:
            if error.code is ErrorCode.CIVITAI_NOT_FOUND:
                return None
            raise

    def image(self, image_id: int) -> dict[str, Any]:
        """One image as the images endpoint lists it, with its published generation data (`meta`);
        CIVITAI_NOT_FOUND when CivitAI lists no such image (removed, or hidden from this account)."""
        what = f"image {image_id}"
        body = self._get_json(f"/api/v1/images?imageId={image_id}&withMeta=true", what)
        items = body.get("items")
        # Only the image asked for: an answer listing others (a filter CivitAI ignored) does not stand in for it.
        found = [item for item in items if isinstance(item, dict) and item.get("id") == image_id] \
            if isinstance(items, list) else None
        if found is None:
            raise ToolboxError(ErrorCode.CIVITAI_UNAVAILABLE, f"CivitAI's answer for {what} lists no images.")
        if not found:
            raise ToolboxError(ErrorCode.CIVITAI_NOT_FOUND, f"CivitAI shows no {what}: it may have been removed, or "
                               "be visible only to accounts allowed to see it (its owner's, or one with mature "
                               f"content on). For this bot's account, {remedies.set_token('civitai')}.")
        return found[0]

    def resolve_download(self, download_url: str, what: str) -> ResolvedDownload:
        """Follow CivitAI's download link to the storage URL it redirects to.

        The token goes only to CivitAI: the presigned storage URL carries its
        own authorisation (and S3 refuses a request that has both).
        """
        url = self.rebase(download_url)
        with self._request(url, what, follow_redirects=False) as response:
            if response.status in REDIRECT_STATUSES:
                location = response.headers.get("Location")
                if not location:
                    raise ToolboxError(ErrorCode.CIVITAI_UNAVAILABLE, f"CivitAI answered the download of {what} with a bad redirect.")
                return ResolvedDownload(urljoin(url, location))
            if _is_html(response):
                # CivitAI shows a login page instead of a 401 for some gated files.
                raise self._auth_error(what)
            # Served directly (no redirect): fetch it from here, with the token if here is CivitAI.
            own = self.credentials is not None and self.credentials.origin == Origin.of(url)
            return ResolvedDownload(url, self.credentials if own else None)

    # -- plumbing

    def rebase(self, url: str) -> str:
        """CivitAI's own links, pointed at the configured base (a mirror, or a test server).

        Built from parsed parts, never by gluing strings: whatever the API
        sends, a CivitAI link stays on the configured origin, and a link to
        any other host stays on that host (and gets no token).
        """
        parts = urlsplit(url)
        host = (parts.hostname or "").lower().removeprefix("www.")
        if parts.netloc and host not in CIVITAI_HOSTS:
            return url
        base = urlsplit(self.api_base)
        path = "/" + parts.path.lstrip("/")
        return urlunsplit((base.scheme, base.netloc, path, parts.query, ""))

    def _get_json(self, path: str, what: str) -> dict[str, Any]:
        deadline_at = time.monotonic() + JSON_TIMEOUT
        with self._request(self.api_base + path, what, headers={"Accept": "application/json"}) as response:
            try:
                body = response.json(MAX_JSON_BYTES, deadline_at)
            except ToolboxError:
                raise ToolboxError(ErrorCode.CIVITAI_UNAVAILABLE,
                                   f"CivitAI's answer for {what} was too large or too slow; try again later.") from None
            except (ValueError, OSError, urllib3.exceptions.HTTPError):
                body = None
            if not isinstance(body, dict):
                if _is_html(response):
                    raise self._auth_error(what)
                raise ToolboxError(ErrorCode.CIVITAI_UNAVAILABLE, f"CivitAI sent something that is not JSON for {what}.")
        return body

    def _request(self, url: str, what: str, headers: dict[str, str] | None = None, follow_redirects: bool = True) -> Response:
        failures = 0
        while True:
            delay = None
            try:
                response = open_url(url, Purpose.CIVITAI, headers=headers, credentials=self.credentials,
                                    trusted=(self.api_base,), timeout=(CONNECT_TIMEOUT, READ_TIMEOUT),
                                    follow_redirects=follow_redirects)
            except (OSError, urllib3.exceptions.HTTPError) as exc:
                reason = type(exc).__name__
            else:
                status = response.status
                if status in (401, 403):
                    response.close()
                    raise self._auth_error(what)
                if status in (404, 410):
                    response.close()
                    raise ToolboxError(
                        ErrorCode.CIVITAI_NOT_FOUND,
                        f"CivitAI has no {what} (it may have been removed, or the id is wrong).",
                    )
                if status == 429 or status >= 500 or status == 408:
                    delay = retry_after_seconds(response.headers.get("Retry-After"))
                    response.close()
                    if delay is not None and delay > MAX_RETRY_AFTER:
                        raise ToolboxError(
                            ErrorCode.CIVITAI_UNAVAILABLE,
                            f"CivitAI is rate-limiting us and asked to wait {delay:.0f} s. Try again later.",
                        )
                    reason = f"HTTP {status}"
                elif status >= 400:
                    response.close()
                    raise ToolboxError(ErrorCode.CIVITAI_UNAVAILABLE, f"CivitAI refused the request for {what} (HTTP {status}).")
                else:
                    return response
            failures += 1
            if failures > self.retries:
                raise ToolboxError(
                    ErrorCode.CIVITAI_UNAVAILABLE,
                    f"CivitAI is not answering ({reason}, {failures} attempts) for {what}. Try again in a few minutes.",
                )
            wait = delay if delay is not None else backoff_delay(failures)
            log.info("CivitAI %s: %s; retrying in %.1f s", what, reason, wait)
            self._sleep(wait)

    def _auth_error(self, what: str) -> ToolboxError:
        if self._token:
            return ToolboxError(
                ErrorCode.CIVITAI_AUTH_REQUIRED,
                f"CivitAI refused the token for {what}: it may be revoked, or the model needs access the account "
                f"does not have (early access, age verification). For a new token, {remedies.set_token('civitai')}.",
            )
        return ToolboxError(
            ErrorCode.CIVITAI_AUTH_REQUIRED,
            f"CivitAI requires a logged-in account for {what}: {remedies.set_token('civitai')}.",
        )


def _is_html(response) -> bool:
    return "text/html" in (response.headers.get("Content-Type") or "").lower()
