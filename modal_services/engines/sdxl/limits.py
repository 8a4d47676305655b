"""Upscale size limits, in plain Python: the bot checks them before uploading, the engine before any GPU work."""

from __future__ import annotations

from modal_services.env_numbers import env_number
from modal_services.errors import ErrorCode, ToolboxError
from modal_services.jobs.limits import SCALE

# "16 MP" (16 x 2^20: a 1024² image upscaled 4x, 4096², must fit). A deployment
# with a bigger GPU can raise it with TOOLBOX_UPSCALE_MAX_MP, read by the bot
# and the worker alike so that both refuse the same requests.
UPSCALE_MAX_MP_SETTING = "TOOLBOX_UPSCALE_MAX_MP"
DEFAULT_MAX_OUTPUT_PIXELS = int(env_number(UPSCALE_MAX_MP_SETTING, 16, minimum=1, maximum=1024) * 2**20)
# Anything larger cannot be upscaled even 1.5x within the output limit.
DEFAULT_MAX_INPUT_PIXELS = 8_000_000
MIN_INPUT_SIDE = 16


def output_size(width: int, height: int, scale: float) -> tuple[int, int]:
    return max(1, round(width * scale)), max(1, round(height * scale))


def check_upscale_size(
    width: int,
    height: int,
    scale: float,
    max_input_pixels: int = DEFAULT_MAX_INPUT_PIXELS,
    max_output_pixels: int = DEFAULT_MAX_OUTPUT_PIXELS,
) -> tuple[int, int]:
    """The output size of a checked scale, or INVALID_INPUT saying which size limit the request breaks."""
    if min(width, height) < MIN_INPUT_SIDE:
        raise ToolboxError(
            ErrorCode.INVALID_INPUT, f"The image is {width}×{height}: at least {MIN_INPUT_SIDE} px a side, please."
        )
    if width * height > max_input_pixels:
        raise ToolboxError(
            ErrorCode.INVALID_INPUT,
            f"The image is {width}×{height} ({width * height / 1e6:.1f} MP); the upscaler takes at most "
            f"{max_input_pixels / 1e6:.1f} MP.",
        )
    out_width, out_height = output_size(width, height, scale)
    if out_width * out_height > max_output_pixels:
        largest = (max_output_pixels / (width * height)) ** 0.5
        hint = f" The largest scale for this image is {int(largest * 100) / 100:g}x." if largest >= SCALE.low else ""
        raise ToolboxError(
            ErrorCode.INVALID_INPUT,
            f"{width}×{height} at {scale:g}x would be {out_width}×{out_height} "
            f"({out_width * out_height / 1e6:.1f} MP); the limit is {max_output_pixels / 2**20:.0f} MP.{hint}",
        )
    return out_width, out_height
