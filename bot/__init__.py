"""The Discord runtime: client, settings, the backend seam, progress, attachment I/O.

Never imports torch, diffusers or transformers: the bot image stays small.
"""
