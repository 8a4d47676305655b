"""Where things live on the volumes (Modal) and under the data dir (local).

The models volume holds one folder per base model, named by its registry key
(and `toolbox-manifests/`, what was verified of each); the LoRA volume holds
`loras/` and `checkpoints/`, each model file with its sidecar; the records
volume holds settings, optional-model acceptances, the active checkpoint and
what result buttons reuse; the tokens volume holds the tokens
(`state/durable.py`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from modal_services.state.store import StateStore

MODELS_VOLUME = "ai-toolbox-models"
LORAS_VOLUME = "ai-toolbox-loras"
RECORDS_VOLUME = "ai-toolbox-records"
TOKENS_VOLUME = "ai-toolbox-tokens"
MODELS_MOUNT = Path("/vol/models")
LORAS_MOUNT = Path("/vol/loras")
RECORDS_MOUNT = Path("/vol/records")
TOKENS_MOUNT = Path("/vol/tokens")

# Base models on the models volume, relative to its root.
# The keys double as the registry keys and `toolbox setup --only` names.
CAPTION_MODEL = "qwen3-vl-2b"
ILLUSTRIOUS_CHECKPOINT = "illustrious-xl/Illustrious-XL-v2.0.safetensors"
CONTROLNET_TILE_DIR = "controlnet-tile"
SDXL_VAE_DIR = "sdxl-vae"
IP_ADAPTER_FILE = "ip-adapter/ip-adapter-plus_sdxl_vit-h.safetensors"
CLIP_VIT_H_DIR = "clip-vit-h"
# The NSFW image classifier that judges generated and upscaled images (a transformers folder).
NSFW_CLASSIFIER_DIR = "nsfw-classifier"
# The booru tagger (SmilingWolf's WD tagger: model.onnx and selected_tags.csv) that reads drawn images beside it.
TAGGER_DIR = "wd-tagger"
# SDXL's diffusers configs and tokenizers (no weights): what loading a
# single-file checkpoint needs offline (`from_single_file(..., config=...)`).
SDXL_CONFIG_DIR = "sdxl-base"
# InstantID (optional): the IdentityNet ControlNet and the face adapter (its image projection and
# attention weights, converted from upstream's pickle at download), and the face-analysis models.
INSTANTID_DIR = "instantid"
INSTANTID_CONTROLNET_DIR = f"{INSTANTID_DIR}/ControlNetModel"
INSTANTID_ADAPTER_FILE = f"{INSTANTID_DIR}/ip-adapter.safetensors"
ANTELOPEV2_DIR = "antelopev2"
# FLUX.1-dev in the diffusers layout (model_index.json, transformer/, text_encoder(_2)/, ...).
FLUX_DIR = "flux1-dev"

# On the LoRA volume.
LORAS_SUBDIR = "loras"
CHECKPOINTS_SUBDIR = "checkpoints"


@dataclass(frozen=True)
class Layout:
    """What every engine is built on: the models folder (one folder per base model), the LoRA
    folder (`loras/` and `checkpoints/` inside) and the state store. Modal mounts the volumes at
    MODELS_MOUNT and LORAS_MOUNT over the shared Dict; the local backend uses the data dir."""

    models_dir: Path
    loras_dir: Path | None = None
    store: StateStore | None = None


def state_dict_name(app_name: str) -> str:
    return f"{app_name}-state"


def local_models_dir(data_dir: Path) -> Path:
    return data_dir / "models"


def local_loras_dir(data_dir: Path) -> Path:
    return data_dir / "loras"


def local_state_path(data_dir: Path) -> Path:
    return data_dir / "state.sqlite3"


def local_records_dir(data_dir: Path) -> Path:
    return data_dir / "records"


def local_tokens_dir(data_dir: Path) -> Path:
    return data_dir / "tokens"
