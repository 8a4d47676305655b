"""The README's promises against the code: the quick start's steps, the download size, the ranges and styles
it quotes. A figure the README gives is read from the README and compared with what the code says."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import discord

from bot.cli.parser import build_parser
from bot.settings import Settings
from modal_services.base_models.registry import BASE_MODELS
from modal_services.jobs.requests import CAPTION_STYLES, UpscaleRequest
from modal_services.jobs.validation import field_bounds
from tests.core.test_front_end_wording import slash_commands

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
FLAT = " ".join(README.split())  # sentences whatever their line breaks


def section(title: str) -> str:
    """The README's text under `## <title>`, up to the next section of that level."""
    start = README.index(f"## {title}\n")
    following = README.find("\n## ", start + 1)
    return README[start:following if following != -1 else None]


QUICK_START = section("Quick start (local backend, no Modal account)")


def test_the_download_size_is_the_registrys_base_set_in_every_place():
    """Download missing fetches the base set (the optional models only once enabled)."""
    total = sum(entry.approx_bytes for entry in BASE_MODELS.values() if entry.optional is None)
    quoted = re.findall(r"Download missing\*\* \(about (\d+) GB", FLAT) + re.findall(r"base models add up to about (\d+) GB", FLAT)
    assert len(quoted) >= 3  # the quick start, the GPU box, the Modal deployment
    assert set(quoted) == {str(round(total / 1e9))}


def test_the_upscale_scales_are_the_requests():
    lowest, highest = field_bounds(UpscaleRequest, "scale")
    assert re.search(r"`upscale --scale` takes ([\d.]+)x-([\d.]+)x", FLAT).groups() == (f"{lowest:g}", f"{highest:g}")


def test_the_apis_caption_styles_are_every_style_a_caption_job_takes():
    listed = re.search(r"Caption jobs take .*?`style` \(([^)]*)\)", " ".join(section("The HTTP API").split()))[1]
    assert set(re.findall(r"`(\w+)`", listed)) == set(CAPTION_STYLES)


def test_the_quick_start_reaches_generate_step_by_step():
    steps = re.findall(r"^(\d+)\. \*\*(.+?)\*\*", QUICK_START, re.M)
    assert [int(number) for number, _ in steps] == list(range(1, len(steps) + 1))
    titles = " ".join(title.lower() for _, title in steps)
    for words in ("create the discord bot", "invite", "server's id", ".env", "install and start", "download", "generate"):
        assert words in titles
    used = set(re.findall(r"`/(\w+)", QUICK_START))
    assert {"setup", "generate"} <= used <= slash_commands()


def test_the_invite_link_asks_for_the_permissions_it_names():
    asked = re.search(r"scope=bot\+applications\.commands&permissions=(\d+)", QUICK_START)
    named = discord.Permissions(view_channel=True, send_messages=True, embed_links=True, attach_files=True,
                                read_message_history=True)
    assert int(asked[1]) == named.value
    assert "View Channels, Send Messages, Embed Links, Attach Files and Read Message History" in " ".join(QUICK_START.split())


def test_the_quick_starts_env_file_is_what_the_settings_read(tmp_path):
    """Step 4's file, as written (the conftest runs each test in its own folder, without those variables)."""
    env_block = re.search(r"\*\*Write a `\.env` file\*\*.*?```\n(.*?)```", QUICK_START, re.S)[1]
    lines = [line.strip() for line in env_block.strip().splitlines()]
    values = {"<the bot token>": "a-bot-token", "<the server id>": "123456789012345678"}
    (tmp_path / ".env").write_text("\n".join(re.sub(r"<[^>]+>", lambda m: values[m[0]], line) for line in lines) + "\n")
    settings = Settings.load()
    assert settings.discord_token == "a-bot-token" and settings.guild_ids == (123456789012345678,)


def test_the_quick_starts_commands_are_the_clis():
    [install_and_run] = re.findall(r"```bash\n\s*(.*?)\n\s*```", QUICK_START, re.S)
    assert install_and_run.startswith("python3 -m venv .venv && .venv/bin/pip install torch==2.13.0 -e '.[engines]'")
    commands = [shlex.split(part)[1:] for part in re.findall(r"\.venv/bin/(toolbox [^`&]+?)\s*(?:`|&&|$)", QUICK_START)]
    assert ["bot"] in commands and ["setup"] in commands
    for command in commands:
        build_parser().parse_args(command)


def test_the_test_command_is_what_ci_runs():
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    [command] = re.findall(r"```bash\n(.*?)\n```", section("Tests"), re.S)
    assert command == ci
