"""The front ends and the seam: the Discord runtime at this package's root (client, tracker, replies,
attachments), the `toolbox` CLI (`bot.cli`), the HTTP API (`bot.api`), what the three share without
discord.py (`bot.core`), and the `Backend` seam they all submit jobs through (`bot.backend`).

Never imports torch, diffusers or transformers: the bot image stays small.
"""
