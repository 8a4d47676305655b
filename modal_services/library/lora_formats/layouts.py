"""The layers a LoRA must fit: SDXL's, SD 1.5's and FLUX.1's, built from their configs on the meta device.

No weights are loaded: the models are instantiated on `meta`, and only each
Linear/Conv layer's weight shape is kept.
"""

from __future__ import annotations

import functools

# SDXL 1.0 base: the layer layout every SDXL-family model shares (diffusers' and
# transformers' config names; everything else is their defaults).
SDXL_UNET_CONFIG = {
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 2,
    "block_out_channels": [320, 640, 1280],
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "attention_head_dim": [5, 10, 20],
    "transformer_layers_per_block": [1, 2, 10],
    "cross_attention_dim": 2048,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
}
SDXL_TEXT_ENCODER_CONFIG = {  # CLIP ViT-L/14
    "hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12, "num_hidden_layers": 12,
    "projection_dim": 768, "hidden_act": "quick_gelu", "max_position_embeddings": 77, "vocab_size": 49408,
}
SDXL_TEXT_ENCODER_2_CONFIG = {  # OpenCLIP ViT-bigG/14
    "hidden_size": 1280, "intermediate_size": 5120, "num_attention_heads": 20, "num_hidden_layers": 32,
    "projection_dim": 1280, "hidden_act": "gelu", "max_position_embeddings": 77, "vocab_size": 49408,
}

# SD 1.5's UNet (its text encoder is SDXL's first, CLIP ViT-L/14): the layers an
# SDXL LoRA must go beyond, since an SD 1.5 LoRA touching only layers whose
# shapes both models share would load into SDXL and do nonsense.
SD15_UNET_CONFIG = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 2,
    "block_out_channels": [320, 640, 1280, 1280],
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "attention_head_dim": 8,
    "cross_attention_dim": 768,
}
# FLUX.1-dev's transformer (black-forest-labs/FLUX.1-dev transformer/config.json).
FLUX_TRANSFORMER_CONFIG = {
    "patch_size": 1, "in_channels": 64, "num_layers": 19, "num_single_layers": 38, "attention_head_dim": 128,
    "num_attention_heads": 24, "joint_attention_dim": 4096, "pooled_projection_dim": 768, "guidance_embeds": True,
    "axes_dims_rope": [16, 56, 56],
}


class ModelLayout:
    """The Linear/Conv layers of a UNet and two text encoders, from configs, on the meta device."""

    def __init__(self, unet_config: dict, text_encoder_config: dict, text_encoder_2_config: dict):
        self._configs = (dict(unet_config), dict(text_encoder_config), dict(text_encoder_2_config))

    @classmethod
    @functools.cache
    def sdxl(cls) -> "ModelLayout":
        return cls(SDXL_UNET_CONFIG, SDXL_TEXT_ENCODER_CONFIG, SDXL_TEXT_ENCODER_2_CONFIG)

    @classmethod
    @functools.cache
    def sd15(cls) -> "ModelLayout":
        """SD 1.5's layers (the second text encoder is a stand-in: SD 1.5 has none)."""
        return cls(SD15_UNET_CONFIG, SDXL_TEXT_ENCODER_CONFIG, SDXL_TEXT_ENCODER_CONFIG)

    @classmethod
    def of_pipeline(cls, pipe) -> "ModelLayout":
        return cls(dict(pipe.unet.config), pipe.text_encoder.config.to_dict(), pipe.text_encoder_2.config.to_dict())

    @functools.cached_property
    def _built(self):
        import torch
        from diffusers import UNet2DConditionModel
        from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

        unet_config, te_config, te2_config = self._configs
        with torch.device("meta"):
            unet = UNet2DConditionModel.from_config(unet_config)
            te = CLIPTextModel(CLIPTextConfig(**te_config))
            te2 = CLIPTextModelWithProjection(CLIPTextConfig(**te2_config))
        layers = {
            name: {path: tuple(module.weight.shape) for path, module in model.named_modules()
                   if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d))}
            for name, model in (("unet", unet), ("text_encoder", te), ("text_encoder_2", te2))
        }
        flattened = {"text_encoder": not hasattr(te, "text_model"), "text_encoder_2": not hasattr(te2, "text_model")}
        return unet.config, layers, flattened

    @property
    def unet_config(self):
        return self._built[0]

    @property
    def layers(self) -> dict[str, dict[str, tuple[int, ...]]]:
        return self._built[1]

    def text_model_flattened(self, component: str) -> bool:
        return self._built[2][component]


class FluxLayout:
    """The Linear layers of a Flux transformer and its CLIP-L text encoder, from configs, on the meta device."""

    def __init__(self, transformer_config: dict, text_encoder_config: dict):
        self._configs = (dict(transformer_config), dict(text_encoder_config))

    @classmethod
    @functools.cache
    def flux1_dev(cls) -> "FluxLayout":
        return cls(FLUX_TRANSFORMER_CONFIG, SDXL_TEXT_ENCODER_CONFIG)

    @classmethod
    def of_pipeline(cls, pipe) -> "FluxLayout":
        return cls(dict(pipe.transformer.config), pipe.text_encoder.config.to_dict())

    @functools.cached_property
    def layers(self) -> dict[str, dict[str, tuple[int, ...]]]:
        import torch
        from diffusers import FluxTransformer2DModel
        from transformers import CLIPTextConfig, CLIPTextModel

        transformer_config, text_config = self._configs
        with torch.device("meta"):
            transformer = FluxTransformer2DModel.from_config(transformer_config)
            text_encoder = CLIPTextModel(CLIPTextConfig(**text_config))
        return {
            name: {path: tuple(module.weight.shape) for path, module in model.named_modules()
                   if isinstance(module, torch.nn.Linear)}
            for name, model in (("transformer", transformer), ("text_encoder", text_encoder))
        }
