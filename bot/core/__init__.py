"""What the three front ends (the Discord cogs, the CLI, the HTTP API) share, without discord.py:
following a job, the words and numbers they show, and turning what a person asked for into a job request."""
