"""The command tree as Discord will receive it at sync: every command within Discord's limits.

A command that breaks a limit makes the whole sync fail in production (HTTP 400),
so every command is serialised here exactly as `tree.sync()` would send it.
"""

from __future__ import annotations

import re

import pytest


NAME = re.compile(r"^[-_\w]{1,32}$")


@pytest.fixture
async def payloads(make_toolbox_bot):
    toolbox_bot = await make_toolbox_bot()
    return [command.to_dict(toolbox_bot.tree) for command in toolbox_bot.tree.get_commands()]


def check_options(options: list[dict], where: str) -> None:
    assert len(options) <= 25, f"{where}: {len(options)} options"
    required_seen_optional = False
    for option in options:
        path = f"{where} {option['name']}"
        assert NAME.match(option["name"]) and option["name"] == option["name"].lower(), path
        assert 1 <= len(option["description"]) <= 100, path
        assert len(option.get("choices") or []) <= 25, path
        assert not (option.get("choices") and option.get("autocomplete")), f"{path}: choices and autocomplete"
        if option.get("options"):  # a subcommand or group
            check_options(option["options"], path)
        elif option["type"] not in (1, 2):
            if option.get("required"):
                assert not required_seen_optional, f"{path}: a required option after an optional one"
            else:
                required_seen_optional = True


def test_every_command_is_within_discords_limits(payloads):
    names = [payload["name"] for payload in payloads]
    assert len(set(names)) == len(names)
    slash = [payload for payload in payloads if payload.get("type", 1) == 1]
    menus = [payload for payload in payloads if payload.get("type") == 3]
    assert len(slash) <= 100 and len(menus) <= 5
    for payload in slash:
        assert NAME.match(payload["name"]) and payload["name"] == payload["name"].lower(), payload["name"]
        assert 1 <= len(payload["description"]) <= 100, payload["name"]
        check_options(payload.get("options", []), payload["name"])
    for payload in menus:
        assert 1 <= len(payload["name"]) <= 32


def test_admin_commands_are_hidden_from_members_by_default(payloads):
    by_name = {payload["name"]: payload for payload in payloads}
    for admin_only in ("setup", "settings"):
        assert by_name[admin_only]["default_member_permissions"] is not None, admin_only
    for everyone in ("caption", "upscale", "status", "cancel", "models"):
        assert by_name[everyone].get("default_member_permissions") is None, everyone
