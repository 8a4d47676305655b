"""Settings from the environment, or a `.env` file in the working directory.

The environment wins over `.env`. The Discord and API tokens are kept out of `repr` so
that a logged Settings object shows no secret; the CivitAI and Hugging Face
tokens are read where they are used (modal_services/tokens.py: /setup's, else
the environment's).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from dotenv import dotenv_values, load_dotenv

from modal_services.env_numbers import env_number
from modal_services.errors import ErrorCode, ToolboxError
from modal_services.layout import local_loras_dir, local_models_dir, local_state_path, state_dict_name

BACKENDS = ("local", "modal")


def default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base) / "ai-toolbox"


def _ids(value: str | None, problem: str) -> tuple[int, ...]:
    """`1, 2,3` as (1, 2, 3); anything but digits between the commas: INVALID_INPUT saying `problem`."""
    parts = [part.strip() for part in (value or "").split(",") if part.strip()]
    if not all(part.isascii() and part.isdigit() for part in parts):
        raise ToolboxError(ErrorCode.INVALID_INPUT, problem)
    return tuple(int(part) for part in parts)


@dataclass(frozen=True)
class Settings:
    backend: str = "local"
    data_dir: Path = field(default_factory=default_data_dir)
    modal_app: str = "ai-toolbox"
    guild_ids: tuple[int, ...] = ()
    # Discord user ids of the deployment's operators, besides the application's owner or team.
    operator_ids: tuple[int, ...] = ()
    civitai_api_base: str = "https://civitai.com"
    discord_token: str | None = field(default=None, repr=False)
    # The HTTP API's bearer token (`toolbox serve`, the Modal endpoint, `toolbox generate --api`).
    api_token: str | None = field(default=None, repr=False)
    # Jobs one API token may have queued or running at once.
    api_concurrency: int = 4
    # How `toolbox serve` treats slow or greedy clients (bot/api/server.py): a request's headers must be
    # complete within this many seconds, its body must arrive at this many KB/s on average (after a grace),
    # and one client address may hold this many connections open at once.
    api_header_timeout: float = 30.0
    api_min_body_rate: float = 8.0
    api_connections_per_client: int = 32

    @classmethod
    def load(cls, environ: Mapping[str, str] | None = None, env_file: str | Path = ".env") -> "Settings":
        """From `environ` over `.env`; with no `environ`, the process environment, into which `.env`
        is loaded first (without overriding) so that libraries reading their own variables
        (huggingface_hub's HF_ENDPOINT and HF_TOKEN) see the file's values too."""
        values: dict[str, str | None] = {}
        if environ is None:
            load_dotenv(env_file, override=False)
            values.update(os.environ)
        else:
            if Path(env_file).is_file():
                values.update(dotenv_values(env_file))
            values.update(environ)

        def get(name: str) -> str | None:
            value = values.get(name)
            return value.strip() if value and value.strip() else None

        backend = (get("TOOLBOX_BACKEND") or "local").lower()
        if backend not in BACKENDS:
            raise ToolboxError(ErrorCode.INVALID_INPUT, f"TOOLBOX_BACKEND must be one of {', '.join(BACKENDS)}, not {backend!r}.")
        guild_ids = _ids(get("TOOLBOX_GUILD_IDS"), "TOOLBOX_GUILD_IDS must be comma-separated numeric ids.")
        operator_ids = _ids(get("TOOLBOX_OPERATOR_IDS"),
                            "TOOLBOX_OPERATOR_IDS must be comma-separated numeric Discord user ids.")
        data_dir = get("TOOLBOX_DATA_DIR")
        try:
            api_concurrency = int(get("TOOLBOX_API_CONCURRENCY") or 4)
        except ValueError:
            api_concurrency = 0
        if api_concurrency < 1:
            raise ToolboxError(ErrorCode.INVALID_INPUT, "TOOLBOX_API_CONCURRENCY must be a whole number, at least 1.")
        numbers = {name: value or "" for name, value in values.items()}  # `.env`'s bare `NAME` reads as None
        return cls(
            backend=backend,
            data_dir=Path(data_dir).expanduser() if data_dir else default_data_dir(),
            modal_app=get("TOOLBOX_MODAL_APP") or "ai-toolbox",
            guild_ids=guild_ids,
            operator_ids=operator_ids,
            civitai_api_base=(get("CIVITAI_API_BASE") or "https://civitai.com").rstrip("/"),
            discord_token=get("DISCORD_TOKEN"),
            api_token=get("TOOLBOX_API_TOKEN"),
            api_concurrency=api_concurrency,
            api_header_timeout=env_number("TOOLBOX_API_HEADER_TIMEOUT", 30.0, minimum=1, maximum=600, environ=numbers),
            api_min_body_rate=env_number("TOOLBOX_API_MIN_BODY_RATE", 8.0, minimum=0.1, maximum=100_000,
                                         environ=numbers),
            api_connections_per_client=env_number("TOOLBOX_API_CONNECTIONS_PER_CLIENT", 32, minimum=1,
                                                  maximum=100_000, whole=True, environ=numbers),
        )

    @property
    def models_dir(self) -> Path:
        return local_models_dir(self.data_dir)

    @property
    def loras_dir(self) -> Path:
        return local_loras_dir(self.data_dir)

    @property
    def state_path(self) -> Path:
        return local_state_path(self.data_dir)

    @property
    def state_dict(self) -> str:
        return state_dict_name(self.modal_app)

