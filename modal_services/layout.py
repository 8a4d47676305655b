"""Where things live on the volumes (Modal) and under the data dir (local).

The models volume holds one folder per base model (seed 000's layout); the
LoRA volume holds `loras/` and `checkpoints/` (seed 001's layout).
"""

from __future__ import annotations

from pathlib import Path

MODELS_VOLUME = "ai-toolbox-models"
LORAS_VOLUME = "ai-toolbox-loras"
MODELS_MOUNT = Path("/vol/models")
LORAS_MOUNT = Path("/vol/loras")

CAPTION_MODEL = "qwen3-vl-2b"


def state_dict_name(app_name: str) -> str:
    return f"{app_name}-state"


def local_models_dir(data_dir: Path) -> Path:
    return data_dir / "models"


def local_loras_dir(data_dir: Path) -> Path:
    return data_dir / "loras"


def local_state_path(data_dir: Path) -> Path:
    return data_dir / "state.sqlite3"
