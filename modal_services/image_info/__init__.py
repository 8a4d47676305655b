"""Generation data in images: what the toolbox writes into its results, and what it reads back from anyone's.

Writing (`writing`, on the workers): every result PNG carries an A1111-style
`parameters` text chunk (`infotext`), with the checkpoint's and LoRAs' CivitAI
AutoV2 hashes where the library or a base-model manifest knows their sha256
(`model_hashes`). Results re-encoded to fit Discord keep it as EXIF
(`containers.exif_with_user_comment`).

Reading (`reading`, on the bot and the CLI): the metadata blocks of a PNG, JPEG
or WebP are walked without decoding a pixel (`containers`), then A1111/Forge's
`parameters`, ComfyUI's `prompt`/`workflow`, NovelAI's `Comment` and InvokeAI's
`invokeai_metadata` become one `GenerationSettings` (`settings`), its text
cleaned of control characters and bounded in length.

Pillow and the standard library only: the bot imports it.
"""
