"""Per-tile prompts for /upscale and `toolbox upscale --tile-captions`.

The source is cut into the tiles the worker will denoise (the same plan), each
crop is tagged by the caption engine in one batched job, and each tag list
becomes the prompt of its region, as the seeds' toolbox did.
"""

from __future__ import annotations

import asyncio
import io
from typing import Any, Awaitable, Callable

from PIL import Image

from bot.backend import Backend
from bot.core.following import follow_job
from modal_services.imaging import encode_png
from modal_services.jobs.requests import CaptionRequest
from modal_services.jobs.records import Job
from modal_services.engines.sdxl.tiling import plan_tiles, source_boxes


def crop_pngs(png: bytes, boxes: list[tuple[int, int, int, int]]) -> list[bytes]:
    """Blocking: the source cut into `boxes`, each as PNG."""
    image = Image.open(io.BytesIO(png))
    return [encode_png(image.crop(box)) for box in boxes]


async def tile_prompts(
    backend: Backend,
    png: bytes,
    source_size: tuple[int, int],
    output_size: tuple[int, int],
    on_update: Callable[[Job], Awaitable[Any]],
    owner: dict[str, Any] | None = None,
) -> list[dict]:
    """Region prompts (`box` in source pixels, `prompt`) for every tile of the output."""
    boxes = source_boxes(plan_tiles(*output_size), *source_size)
    crops = await asyncio.to_thread(crop_pngs, png, boxes)
    job = await backend.submit(CaptionRequest.parse({"images": crops, "style": "tags"}), owner=owner, meta={"title": f"Captioning {len(boxes)} tiles"})
    captions = await follow_job(backend, job.id, on_update)
    return [{"box": list(box), "prompt": caption} for box, caption in zip(boxes, captions)]
