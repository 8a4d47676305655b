"""The one list of error codes, shared by the services, the bot and the CLI.

A `ToolboxError` carries a code and a message meant for the person who ran the
command. Messages must never contain secrets (tokens, signed URLs).
"""

from __future__ import annotations

from enum import Enum


class ErrorCode(str, Enum):
    INVALID_INPUT = "INVALID_INPUT"
    # A generation prompt that is empty or too long.
    INVALID_PROMPT = "INVALID_PROMPT"
    MODELS_MISSING = "MODELS_MISSING"
    MODEL_LOAD_FAILED = "MODEL_LOAD_FAILED"
    LORA_LOAD_FAILED = "LORA_LOAD_FAILED"
    LORA_DOWNLOAD_FAILED = "LORA_DOWNLOAD_FAILED"
    GENERATION_FAILED = "GENERATION_FAILED"
    CUDA_OOM = "CUDA_OOM"
    TIMEOUT = "TIMEOUT"
    CIVITAI_AUTH_REQUIRED = "CIVITAI_AUTH_REQUIRED"
    CIVITAI_NOT_FOUND = "CIVITAI_NOT_FOUND"
    CIVITAI_UNAVAILABLE = "CIVITAI_UNAVAILABLE"
    INCOMPATIBLE_MODEL = "INCOMPATIBLE_MODEL"
    CHECKSUM_MISMATCH = "CHECKSUM_MISMATCH"
    STORAGE_FULL = "STORAGE_FULL"
    RATE_LIMITED = "RATE_LIMITED"
    PERMISSION_DENIED = "PERMISSION_DENIED"
    CANCELLED = "CANCELLED"
    BACKEND_UNAVAILABLE = "BACKEND_UNAVAILABLE"
    # A base-model download failed for a reason the other codes do not name
    # (the source kept answering 5xx, refused access, or does not exist).
    DOWNLOAD_FAILED = "DOWNLOAD_FAILED"
    # Every image of a finished job was withheld by the safety check: there is no image to give
    # (a request with several images, some kept, answers with those instead).
    CONTENT_WITHHELD = "CONTENT_WITHHELD"
    # No such thing for this caller (an HTTP API job id, an unknown path).
    NOT_FOUND = "NOT_FOUND"
    INTERNAL = "INTERNAL"


class ToolboxError(Exception):
    """An expected failure with a code and a user-facing message."""

    def __init__(self, code: ErrorCode | str, message: str):
        self.code = ErrorCode(code)
        self.message = message
        super().__init__(f"{self.code.value}: {message}")

    def __reduce__(self):
        # Keeps the error intact when it crosses a process or Modal boundary.
        return (type(self), (self.code.value, self.message))

    def to_dict(self) -> dict:
        return {"code": self.code.value, "message": self.message}
