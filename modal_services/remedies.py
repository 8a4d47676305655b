"""What a person can do about a failure, said the way their front end does it.

A message is written once, where the failure is raised, and then crosses
threads, processes and Modal as plain text (a ToolboxError's message, a job
record, a download's state). So the way out travels inside it as a mark,
`[[download nsfw-classifier]]`, built by the functions below and readable as
it stands in a log. Each front end renders the marks when it shows the
message: Discord names its slash command and button, the CLI the `toolbox`
command to run, the HTTP API the command to ask the operator for (a client of
the API cannot run it). A message written for a single front end needs no mark.
"""

from __future__ import annotations

import re
from enum import Enum


class FrontEnd(str, Enum):
    DISCORD = "discord"
    CLI = "cli"
    API = "api"


def download(*keys: str) -> str:
    """Download these base models (every missing one when none is named): "... is not installed: <this>."."""
    return _mark("download", *keys)


def enable(key: str) -> str:
    """Enable an optional model and download it: "... is not enabled: <this>."."""
    return _mark("enable", key)


def verify() -> str:
    """Check a model's files and fetch the wrong ones again: "Its files may be damaged: <this>."."""
    return _mark("verify")


def set_token(service: str) -> str:
    """Set a CivitAI (`civitai`) or Hugging Face (`hf`) token: "..., then <this>."."""
    from modal_services.base_models.tokens import SERVICES

    if service not in SERVICES:
        raise ValueError(f"no token service {service!r}")
    return _mark("token", service)


def list_library() -> str:
    """Where the library's model names are listed: "No LoRA named 'x' in the library (<this>)."."""
    return _mark("library")


def switch_checkpoint() -> str:
    """Make another checkpoint the active one: "X is the active checkpoint: <this> first."."""
    return _mark("checkpoint")


def _setup_command(keys: tuple[str, ...]) -> str:
    return f"`toolbox setup --only {' '.join(keys)}`" if keys else "`toolbox setup`"


def _token(front_end: FrontEnd, service: str) -> str:
    from modal_services.base_models.tokens import ENV_NAMES, LABELS  # the state store's imports, only when needed

    name, variable = LABELS[service], ENV_NAMES[service]
    return {
        FrontEnd.DISCORD: f"the bot's operator sets a {name} token in /setup → Set tokens",
        FrontEnd.CLI: f"set {variable} in the environment or the `.env` file",
        FrontEnd.API: f"ask the operator to set a {name} token",
    }[front_end]


# Each action's words per front end, from the mark's arguments.
_PHRASES = {
    "download": lambda front_end, *keys: {
        FrontEnd.DISCORD: "the bot's operator runs /setup → Download missing",
        FrontEnd.CLI: f"run {_setup_command(keys)}",
        FrontEnd.API: f"ask the operator to run {_setup_command(keys)}",
    }[front_end],
    "enable": lambda front_end, key: {
        FrontEnd.DISCORD: "the bot's operator enables it in /setup (accepting its licence), then runs Download missing",
        FrontEnd.CLI: f"run `toolbox setup --enable {key}`, which accepts its licence and downloads it",
        FrontEnd.API: f"ask the operator to run `toolbox setup --enable {key}`",
    }[front_end],
    "verify": lambda front_end: {
        FrontEnd.DISCORD: "the bot's operator checks them with /setup → Verify",
        FrontEnd.CLI: "run `toolbox setup`, which checks them and fetches again any that are wrong",
        FrontEnd.API: "ask the operator to check them with `toolbox setup`",
    }[front_end],
    "token": _token,
    "library": lambda front_end: {
        FrontEnd.DISCORD: "see /models list",
        FrontEnd.CLI: "see `toolbox models list`",
        FrontEnd.API: "the operator lists them with `toolbox models list`",
    }[front_end],
    "checkpoint": lambda front_end: {
        FrontEnd.DISCORD: "switch to another one with /models checkpoint",
        FrontEnd.CLI: "switch to another one with `toolbox models use CHECKPOINT`",
        FrontEnd.API: "ask the operator to switch to another one with `toolbox models use CHECKPOINT`",
    }[front_end],
}
_MARK = re.compile(r"\[\[(" + "|".join(_PHRASES) + r")((?: [\w.-]+)*)\]\]")


def _mark(action: str, *arguments: str) -> str:
    return f"[[{' '.join((action, *arguments))}]]"


def has_mark(text: str) -> bool:
    """Whether `text` already says a way out."""
    return _MARK.search(text) is not None


def render(text: str, front_end: FrontEnd) -> str:
    """`text` with each mark in `front_end`'s words (text without marks is returned as it is)."""
    return _MARK.sub(lambda match: _phrase(match, front_end), text)


def _phrase(match: re.Match, front_end: FrontEnd) -> str:
    try:
        return _PHRASES[match[1]](front_end, *match[2].split())
    except (TypeError, KeyError):
        # Not a mark of ours but look-alike text quoted in a message (a model name someone typed): kept as it is.
        return match[0]
