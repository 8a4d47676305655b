"""The importer's rules: which CivitAI model version may join the library, and what its import fetches.

`plan_import` fetches a version's metadata and applies the rules (SafeTensor
only, LoRA-like or checkpoint, SDXL family or a Flux LoRA), giving an
`ImportPlan`: what a preview shows and what the import engine downloads.

Runs in worker threads and in the bot (via `asyncio.to_thread`): no torch here.
"""

from __future__ import annotations

import html
import re
from dataclasses import asdict, dataclass
from typing import Any

from modal_services import remedies
from modal_services.errors import ErrorCode, ToolboxError
from modal_services.library.civitai import CivitaiClient, CivitaiRef

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
            f"{name} is a Flux checkpoint; only Flux LoRAs can be imported. For FLUX.1-dev itself, {remedies.enable('flux1-dev')}.",
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
