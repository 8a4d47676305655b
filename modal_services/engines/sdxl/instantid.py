"""InstantID on the shared SDXL models: the same person's face in every image of a request.

InstantID adds two things to SDXL, and this module lends them to the
worker's one loaded pipeline for the length of a call, so no second SDXL is
ever loaded:

- the face adapter: a Resampler projecting the reference face's 512-d
  identity embedding to a few tokens, and image cross-attention layers that
  add those tokens to every UNet cross-attention (at `identity_strength`).
  They are diffusers' own IP-Adapter classes, built once from the adapter's
  weights by diffusers' IP-Adapter conversion, and swapped in for the
  upscaler's IP-Adapter during the call;
- the IdentityNet: a ControlNet driven by the face's five keypoints drawn
  as InstantID draws them (at `controlnet_strength`). It attends to the face
  tokens instead of the prompt, as InstantID trained it: a forward pre-hook
  hands it those tokens during the call.

When the call ends the UNet has its own attention processors and image
projection back and the hook is gone, so the next job runs on exactly what a
fresh engine holds. The keypoints come from the reference photo or, with a
pose image, from the largest face in that one.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass
from typing import Any, Iterator

from PIL import Image

from modal_services.engines.loading import loading
from modal_services import remedies
from modal_services.errors import ErrorCode, ToolboxError
from modal_services.engines.sdxl.faces import FaceAnalyser, FaceReading, draw_keypoints, keypoints_on_canvas, read_face
from modal_services.imaging import decode_image
from modal_services.layout import INSTANTID_ADAPTER_FILE, INSTANTID_CONTROLNET_DIR
from modal_services.engines.sdxl.pipeline import SdxlModels


# A reference photo is decoded with this bound (a 24-megapixel camera picture fits).
MAX_FACE_PIXELS = 6000 * 4000


@dataclass(frozen=True, eq=False)
class FaceInputs:
    """What a request's photos gave: the identity face, and the face whose keypoints set the pose."""

    identity: FaceReading
    pose: FaceReading

    def keypoint_image(self, width: int, height: int) -> Image.Image:
        return draw_keypoints(keypoints_on_canvas(self.pose, width, height), width, height)

    def summary(self) -> dict[str, int | None]:
        return {"faces_found": self.identity.count, "pose_faces_found": self.pose.count if self.pose is not self.identity else None}


def adapter_state_dicts(flat: dict) -> dict[str, dict]:
    """`image_proj.*` / `ip_adapter.*` keys of the converted file as the two dicts diffusers converts."""
    nested: dict[str, dict] = {"image_proj": {}, "ip_adapter": {}}
    for key, tensor in flat.items():
        part, _, rest = key.partition(".")
        if part not in nested or not rest:
            raise ValueError(f"unexpected key {key!r} in the face adapter")
        nested[part][rest] = tensor
    return nested


@contextlib.contextmanager
def unet_without_projection(unet) -> Iterator[None]:
    """The UNet with no image projection inside the block: the projection's own attention layers
    (a Resampler's) are not the UNet's, and would count among its processors (as diffusers notes)."""
    projection = unet.encoder_hid_proj
    unet.encoder_hid_proj = None
    try:
        yield
    finally:
        unet.encoder_hid_proj = projection


class InstantId:
    """The IdentityNet and face adapter, loaded at the first face request and kept, and the analyser."""

    def __init__(self, models: SdxlModels, analyser: FaceAnalyser):
        self.models = models
        self.analyser = analyser
        self.identitynet = None
        self.processors: dict[str, Any] | None = None
        self.projection = None
        # (the loaded pipeline they were made from, text-to-image, img2img)
        self._pipes: tuple[Any, Any, Any] | None = None
        self._lock = threading.Lock()

    def missing_files(self) -> list[str]:
        models_dir = self.models.models_dir
        needed = [f"{INSTANTID_CONTROLNET_DIR}/config.json", f"{INSTANTID_CONTROLNET_DIR}/*.safetensors",
                  INSTANTID_ADAPTER_FILE]
        return [pattern for pattern in needed if not any(models_dir.glob(pattern))]

    # ------------------------------------------------------------------ faces

    def read(self, face_image: bytes, pose_image: bytes | None) -> FaceInputs:
        """The photos' faces; INVALID_INPUT for a photo without one (before any SDXL work)."""
        identity = read_face(self.analyser, decode_image(face_image, MAX_FACE_PIXELS, "The face image").image,
                             "the face image")
        pose = identity
        if pose_image is not None:
            pose = read_face(self.analyser, decode_image(pose_image, MAX_FACE_PIXELS, "The pose image").image,
                             "the pose image")
        return FaceInputs(identity=identity, pose=pose)

    # ------------------------------------------------------------------ models

    def load(self) -> None:
        """The IdentityNet and the face adapter on the SDXL models' device (once)."""
        with self._lock:
            if self.identitynet is not None:
                return
            missing = self.missing_files()
            if missing:
                raise ToolboxError(
                    ErrorCode.MODELS_MISSING,
                    f"InstantID's models are not installed ({', '.join(missing)}): {remedies.download('instantid')}.",
                )
            from diffusers import ControlNetModel
            from diffusers.models.embeddings import MultiIPAdapterImageProjection
            from safetensors.torch import load_file

            models_dir, device, dtype = self.models.models_dir, self.models.device, self.models.dtype
            unet = self.models.pipe.unet
            with loading("InstantID's models", models_dir):
                identitynet = ControlNetModel.from_pretrained(models_dir / INSTANTID_CONTROLNET_DIR, torch_dtype=dtype)
                state = adapter_state_dicts(load_file(str(models_dir / INSTANTID_ADAPTER_FILE)))
                # diffusers' own IP-Adapter conversion (what `load_ip_adapter` runs), kept aside from the UNet.
                with unet_without_projection(unet):
                    processors = unet._convert_ip_adapter_attn_to_diffusers([state])
                projection = MultiIPAdapterImageProjection([unet._convert_ip_adapter_image_proj_to_diffusers(state["image_proj"])])
            for processor in processors.values():
                if hasattr(processor, "to"):
                    processor.to(device=device, dtype=dtype)
            self.processors = processors
            self.projection = projection.to(device=device, dtype=dtype).eval()
            self.identitynet = identitynet.to(device).eval()

    def pipelines(self):
        """ControlNet text-to-image and img2img pipelines over the loaded SDXL, with the IdentityNet."""
        from diffusers import StableDiffusionXLControlNetImg2ImgPipeline, StableDiffusionXLControlNetPipeline

        source = self.models.pipe
        if self._pipes is None or self._pipes[0] is not source:
            text_to_image = StableDiffusionXLControlNetPipeline.from_pipe(source, controlnet=self.identitynet)
            img2img = StableDiffusionXLControlNetImg2ImgPipeline.from_pipe(source, controlnet=self.identitynet)
            for pipe in (text_to_image, img2img):
                pipe.set_progress_bar_config(disable=True)
            self._pipes = (source, text_to_image, img2img)
        return self._pipes[1], self._pipes[2]

    @contextlib.contextmanager
    def conditioned(self, pipe, faces: FaceInputs, images: int, width: int, height: int, guided: bool,
                    identity_strength: float, controlnet_strength: float, variation: bool) -> Iterator[dict]:
        """The face adapter and the IdentityNet's tokens in place for one call making `images`
        images; yields the call's extra arguments. Everything is put back however the call ends."""
        import torch

        unet = self.models.pipe.unet
        embedding = torch.as_tensor(faces.identity.face.embedding, device=self.models.device, dtype=self.models.dtype)
        face = embedding.reshape(1, 1, 1, -1)
        # Negative (no face: zeros) then positive under classifier-free guidance, as the pipeline splits them.
        embeds = torch.cat([torch.zeros_like(face), face]) if guided else face
        with torch.inference_mode():
            tokens = self.projection.image_projection_layers[0](
                torch.cat([embeds[:1]] * images + ([embeds[1:]] * images if guided else []))[:, 0]
            )

        def face_tokens_for_identitynet(module, args, kwargs):
            if kwargs["encoder_hidden_states"].shape[0] != tokens.shape[0]:
                raise RuntimeError("the IdentityNet was called for another batch than its face tokens")
            return args, {**kwargs, "encoder_hidden_states": tokens}

        saved_projection = unet.encoder_hid_proj
        with unet_without_projection(unet):
            saved_processors = unet.attn_processors
            unet.set_attn_processor(dict(self.processors))
        unet.encoder_hid_proj = self.projection
        hook = self.identitynet.register_forward_pre_hook(face_tokens_for_identitynet, with_kwargs=True)
        try:
            pipe.set_ip_adapter_scale(identity_strength)
            keypoints = faces.keypoint_image(width, height)
            yield {
                "ip_adapter_image_embeds": [embeds],
                "controlnet_conditioning_scale": controlnet_strength,
                ("control_image" if variation else "image"): keypoints,
            }
        finally:
            hook.remove()
            with unet_without_projection(unet):
                unet.set_attn_processor(saved_processors)
            unet.encoder_hid_proj = saved_projection
