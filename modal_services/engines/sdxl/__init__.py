"""SDXL: the shared pipeline (checkpoint, VAE, ControlNet Tile, IP-Adapter, LoRAs), text-to-image and variations, InstantID, the tiled upscaler, and the one engine over them."""
