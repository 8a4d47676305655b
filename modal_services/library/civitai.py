"""CivitAI: what people paste, the REST API, and the importer's rules.

- `parse_reference` turns every form a model gets pasted in (page URLs with or
  without slug and `?modelVersionId=`, download links, AIR URNs, bare ids,
  `v:<id>`, the civitai.green / civitai.red mirrors) into ids.
- `CivitaiClient` is a small blocking client over the egress policy
  (`egress.open_url`) for the v1 API and the download redirect. The token goes
  in `Authorization: Bearer`, never in a URL, and only to the configured API
  origin; 429/5xx are retried with backoff honouring `Retry-After`.
- `plan_import` fetches a version's metadata and applies the importer's
  rules (SafeTensor only, LoRA-like or checkpoint, SDXL family), giving an
  `ImportPlan`: what a preview shows and what the import engine downloads.

Runs in worker threads and in the bot (via `asyncio.to_thread`): no torch here.
"""

from __future__ import annotations

import html
import logging
import re
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable
from urllib.parse import parse_qs, urljoin, urlsplit, urlunsplit

import urllib3

from modal_services.net.egress import REDIRECT_STATUSES, Credentials, Origin, Purpose, Response, open_url
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

# CivitAI model types we import, and the library type each becomes.
LORA_TYPES = {"lora": "lora", "locon": "lora", "dora": "lora"}
CHECKPOINT_TYPES = {"checkpoint": "checkpoint"}
# SDXL-architecture base models by their CivitAI `baseModel` names. "Pony V7"
# (AuraFlow) and "Illustrious"-named non-SDXL successors are not in the set.
SDXL_BASE_MODELS = {"pony", "illustrious", "noobai"}
# FLUX.1 base models (dev and schnell share the transformer's layout): LoRAs only.
FLUX_BASE_MODELS = {"flux.1 d", "flux.1 s"}
# SDXL checkpoints that are not the plain text-to-image UNet the upscaler loads.
UNSUPPORTED_CHECKPOINT_VARIANTS = {"inpainting", "refiner"}
PICKLE_EXTENSIONS = (".ckpt", ".pt", ".pth", ".bin", ".pkl")


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
                "does not have (early access, age verification). An admin can set a new token with /setup.",
            )
        return ToolboxError(
            ErrorCode.CIVITAI_AUTH_REQUIRED,
            f"CivitAI requires a logged-in account for {what}. An admin can set a CivitAI API token with /setup "
            "(or CIVITAI_TOKEN for the CLI).",
        )


def _is_html(response) -> bool:
    return "text/html" in (response.headers.get("Content-Type") or "").lower()


# ---------------------------------------------------------------- the importer's rules


@dataclass
class ImportPlan:
    """One version's file, checked against the rules: what a preview shows and an import downloads."""

    model_id: int
    version_id: int
    name: str
    version_name: str
    civitai_type: str  # as CivitAI names it: LORA, LoCon, DoRA, Checkpoint
    type: str  # library type: lora | checkpoint
    base_model: str
    trigger_words: list[str]
    file_name: str
    file_id: int | None
    size_bytes: int  # from sizeKB: approximate, for display
    sha256: str | None
    format: str  # SafeTensor
    precision: str | None
    download_url: str
    nsfw: bool
    tags: list[str]
    description: str
    images: list[dict[str, Any]]  # {"url", "nsfw"}, first few
    page_url: str
    family: str = "sdxl"  # sdxl | flux

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ImportPlan":
        return cls(**{name: data[name] for name in cls.__dataclass_fields__ if name in data})

    def thumbnail(self, age_restricted_channel: bool) -> str | None:
        """A preview image URL fit for the channel: nothing NSFW outside age-restricted channels."""
        if self.nsfw and not age_restricted_channel:
            return None
        for image in self.images:
            if age_restricted_channel or not image["nsfw"]:
                return image["url"]
        return None


def is_sdxl_family(base_model: str) -> bool:
    name = (base_model or "").strip().lower()
    return name.startswith("sdxl") or name in SDXL_BASE_MODELS


def model_family(base_model: str) -> str | None:
    """The library family ("sdxl" or "flux") of a CivitAI base model; None when it is neither."""
    if is_sdxl_family(base_model):
        return "sdxl"
    if (base_model or "").strip().lower() in FLUX_BASE_MODELS:
        return "flux"
    return None


def library_type(civitai_type: str) -> str:
    key = (civitai_type or "").strip().lower()
    if key in LORA_TYPES:
        return LORA_TYPES[key]
    if key in CHECKPOINT_TYPES:
        return CHECKPOINT_TYPES[key]
    raise ToolboxError(
        ErrorCode.INCOMPATIBLE_MODEL,
        f"This is a {civitai_type or 'model of unknown type'}; only LoRAs (LORA, LoCon, DoRA) and checkpoints "
        "can be imported for now.",
    )


def plan_import(client: CivitaiClient, ref: CivitaiRef) -> ImportPlan:
    """Fetch the version `ref` names (the newest one for a bare model) and check it; raises with the reason."""
    if ref.version_id is not None:
        version = client.version(ref.version_id)
        model_id = _int(version.get("modelId"))
        if ref.model_id is not None and model_id is not None and model_id != ref.model_id:
            raise ToolboxError(
                ErrorCode.INVALID_INPUT,
                f"Version {ref.version_id} belongs to model {model_id}, not to model {ref.model_id}.",
            )
        model = client.model(model_id or ref.model_id) if (model_id or ref.model_id) else {}
    else:
        model = client.model(ref.model_id)
        versions = [v for v in model.get("modelVersions") or [] if isinstance(v, dict) and _int(v.get("id"))]
        if not versions:
            raise ToolboxError(ErrorCode.CIVITAI_NOT_FOUND, f"CivitAI model {ref.model_id} has no published version.")
        # modelVersions is newest first.
        version = client.version(_int(versions[0]["id"]))
    return plan_from_metadata(version, model)


def plan_from_metadata(version: dict[str, Any], model: dict[str, Any]) -> ImportPlan:
    """The rules, applied to a version JSON (and its model's JSON, for tags and type)."""
    version_id = _int(version.get("id"))
    model_id = _int(version.get("modelId")) or _int(model.get("id"))
    if version_id is None or model_id is None:
        raise ToolboxError(ErrorCode.CIVITAI_UNAVAILABLE, "CivitAI sent a model version without ids.")
    model_part = version.get("model") if isinstance(version.get("model"), dict) else {}
    name = _text(model_part.get("name") or model.get("name")) or f"CivitAI model {model_id}"
    civitai_type = _text(model_part.get("type") or model.get("type"))
    kind = library_type(civitai_type)
    base_model = _text(version.get("baseModel"))
    family = model_family(base_model)
    if family is None:
        raise ToolboxError(
            ErrorCode.INCOMPATIBLE_MODEL,
            f"{name} is made for {base_model or 'an unknown base model'}; only SDXL-family models (SDXL 1.0, Pony, "
            "Illustrious, NoobAI…) and Flux.1 LoRAs (Flux.1 D, Flux.1 S) can be used.",
        )
    if family == "flux" and kind == "checkpoint":
        raise ToolboxError(
            ErrorCode.INCOMPATIBLE_MODEL,
            f"{name} is a Flux checkpoint; only Flux LoRAs can be imported (FLUX.1-dev itself is enabled in /setup).",
        )
    variant = _text(version.get("baseModelType")).lower()
    if kind == "checkpoint" and variant in UNSUPPORTED_CHECKPOINT_VARIANTS:
        raise ToolboxError(
            ErrorCode.INCOMPATIBLE_MODEL,
            f"{name} is an SDXL {variant} checkpoint; the upscaler needs a standard text-to-image checkpoint.",
        )
    file = _pick_file(version, name)
    hashes = file.get("hashes") if isinstance(file.get("hashes"), dict) else {}
    sha256 = _text(hashes.get("SHA256")).lower() or None
    metadata = file.get("metadata") if isinstance(file.get("metadata"), dict) else {}
    size_kb = file.get("sizeKB")
    tags = model.get("tags") or []
    return ImportPlan(
        model_id=model_id,
        version_id=version_id,
        name=name[:100],
        version_name=_text(version.get("name"))[:100],
        civitai_type=civitai_type,
        type=kind,
        base_model=base_model,
        trigger_words=clean_words(version.get("trainedWords") or []),
        file_name=_text(file.get("name")),
        file_id=_int(file.get("id")),
        size_bytes=int(float(size_kb) * 1024) if isinstance(size_kb, (int, float)) else 0,
        sha256=sha256 if sha256 and re.fullmatch(r"[0-9a-f]{64}", sha256) else None,
        format="SafeTensor",
        precision=_text(metadata.get("fp")) or None,
        download_url=_text(file.get("downloadUrl") or version.get("downloadUrl"))
        or f"/api/download/models/{version_id}",
        nsfw=bool(model_part.get("nsfw", model.get("nsfw", False))),
        tags=[_text(tag)[:40] for tag in tags if isinstance(tag, str) and tag.strip()][:20],
        description=plain_text(model.get("description"))[:1000],
        images=_images(version),
        page_url=f"https://civitai.com/models/{model_id}?modelVersionId={version_id}",
        family=family,
    )


def _pick_file(version: dict[str, Any], name: str) -> dict[str, Any]:
    files = [f for f in version.get("files") or [] if isinstance(f, dict)]
    models = [f for f in files if _text(f.get("type")) in ("Model", "Pruned Model", "")] or files
    if not models:
        raise ToolboxError(ErrorCode.CIVITAI_NOT_FOUND, f"{name} has no downloadable file on CivitAI.")

    def is_safetensors(f: dict[str, Any]) -> bool:
        metadata = f.get("metadata") if isinstance(f.get("metadata"), dict) else {}
        file_format = _text(metadata.get("format"))
        file_name = _text(f.get("name")).lower()
        if file_format:
            return file_format == "SafeTensor" and not file_name.endswith(PICKLE_EXTENSIONS)
        return file_name.endswith(".safetensors")

    safe = [f for f in models if is_safetensors(f)]
    if not safe:
        raise ToolboxError(
            ErrorCode.INCOMPATIBLE_MODEL,
            f"{name} is only published as a PickleTensor file (.ckpt/.pt/.bin). Those are refused: loading one "
            "runs code from the file. Look for a SafeTensor version.",
        )
    # The primary file first, then the full model over a pruned one.
    safe.sort(key=lambda f: (not f.get("primary"), _text(f.get("type")) != "Model"))
    return safe[0]


def _images(version: dict[str, Any], limit: int = 6) -> list[dict[str, Any]]:
    found = []
    for image in version.get("images") or []:
        if not isinstance(image, dict) or not _text(image.get("url")):
            continue
        if _text(image.get("type")) not in ("", "image"):
            continue  # videos make poor thumbnails
        level = image.get("nsfwLevel")
        nsfw_label = image.get("nsfw")
        # nsfwLevel: 1 PG, 2 PG-13, 4 R, 8 X, 16 XXX; older answers carry nsfw: "None"|"Soft"|"Mature"|"X" or a bool.
        if isinstance(level, int):
            nsfw = level > 1
        else:
            nsfw = nsfw_label not in (None, False, "None")
        found.append({"url": image["url"], "nsfw": nsfw})
        if len(found) >= limit:
            break
    return found


def plain_text(html_text: Any) -> str:
    """CivitAI's descriptions are HTML: the text, tags removed and whitespace collapsed."""
    text = re.sub(r"<[^>]+>", " ", _text(html_text))
    return " ".join(html.unescape(text).split())


def clean_words(words: list[Any]) -> list[str]:
    """Trigger words, trimmed, deduplicated, without empties: CivitAI's lists are hand-typed."""
    seen: dict[str, str] = {}
    for entry in words:
        if not isinstance(entry, str):
            continue
        for word in entry.split(","):
            word = " ".join(word.split()).strip()
            if word and word.lower() not in seen and len(word) <= 200:
                seen[word.lower()] = word
    return list(seen.values())[:50]


def _int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int) and value > 0:
        return value
    if isinstance(value, str) and value.isdigit() and int(value) > 0:
        return int(value)
    return None


def _text(value: Any) -> str:
    return value.strip() if isinstance(value, str) else ""
