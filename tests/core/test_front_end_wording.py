"""Each front end names its own way out: a remedy written once where a failure is raised (`modal_services.remedies`)
reads as Discord's slash command in Discord, as the `toolbox` command in a terminal and as the operator's command
over the HTTP API; no message a CLI or API user can see names a slash command; messages name files relative to
the models folder, never by the data dir's absolute path.
"""

from __future__ import annotations

import ast
import base64
import pickle
import re
import shlex
from pathlib import Path

import pytest

from bot.api.responses import error_body, error_response
from bot.cli.common import exit_status
from bot.cli.parser import build_parser
from bot.replies import error_text
from cogs.setup import describe
from modal_services import remedies
from modal_services.base_models.registry import BASE_MODELS, optional_entries
from modal_services.base_models.states import describe_state
from modal_services.errors import ErrorCode, ToolboxError
from modal_services.remedies import FrontEnd, render
from modal_services.safety.nsfw_classifier import MISSING_MESSAGE
from tests.api.test_api import served, wait_for_status  # noqa: F401 (served: a fixture)
from tests.images import png_bytes

ROOT = Path(__file__).resolve().parents[2]
# The Discord front end's own modules: what only a Discord user reads may name Discord's commands.
DISCORD_ENTRY = "bot.cli.discord_bot"
# The Modal app hosts the Discord bot's container as well as the workers: its strings are read, its imports not followed.
MODAL_APP = "modal_services.app"
# Strings the CLI or the API can show that name Discord on purpose, each with why.
ALLOWED = {
    ("modal_services.base_models.tokens", "(set with /setup)"):
        "where a token came from (`toolbox status`), not something to do",
    ("modal_services.safety.prompt_screen", "This prompt uses words this server does not allow; please rephrase it."):
        "a server's own refused words come only with a Discord request",
}


def slash_commands() -> set[str]:
    """The bot's slash command and group names, read from the cogs."""
    names = set()
    for path in (ROOT / "cogs").glob("*.py"):
        text = path.read_text()
        names |= set(re.findall(r'(?:app_commands\.(?:command|Group)\(\s*name|group_name)="([\w-]+)"', text))
    assert {"setup", "models", "generate", "settings"} <= names
    return names


NAMES_DISCORD = re.compile(r"(?<![\w./:-])/(" + "|".join(sorted(slash_commands())) + r")(?![\w-])|this server", re.I)


def every_remedy() -> list[str]:
    return [remedies.download(), remedies.download("nsfw-classifier"), remedies.download("wd-tagger", "sdxl-vae"),
            *(remedies.enable(entry.key) for entry in optional_entries()), remedies.verify(),
            remedies.set_token("civitai"), remedies.set_token("hf"), remedies.list_library(),
            remedies.switch_checkpoint()]


def toolbox_commands(text: str) -> list[list[str]]:
    """The `toolbox ...` commands a message names, as argument lists (a placeholder given a real value)."""
    return [shlex.split(command.replace("CHECKPOINT", "illustrious-xl"))[1:]
            for command in re.findall(r"`(toolbox [^`]+)`", text)]


# -- the remedies, rendered -------------------------------------------------------------------------------------

@pytest.mark.parametrize("mark", every_remedy())
def test_discord_names_its_slash_command(mark):
    text = render(f"Something is wrong: {mark}.", FrontEnd.DISCORD)
    assert "[[" not in text and NAMES_DISCORD.search(text) and "toolbox" not in text


@pytest.mark.parametrize("mark", every_remedy())
def test_the_cli_names_a_toolbox_command_that_its_parser_takes(mark):
    text = render(f"Something is wrong: {mark}.", FrontEnd.CLI)
    assert "[[" not in text and not NAMES_DISCORD.search(text), text
    commands = toolbox_commands(text)
    if mark == remedies.set_token("civitai"):
        assert "CIVITAI_TOKEN" in text and not commands  # tokens come from the environment
        return
    if mark == remedies.set_token("hf"):
        assert "HF_TOKEN" in text and not commands
        return
    assert commands, text
    for command in commands:
        build_parser().parse_args(command)  # an unknown command or flag exits here


@pytest.mark.parametrize("mark", every_remedy())
def test_the_api_names_the_operators_action(mark):
    text = render(f"Something is wrong: {mark}.", FrontEnd.API)
    assert "[[" not in text and not NAMES_DISCORD.search(text) and "operator" in text, text
    for command in toolbox_commands(text):
        build_parser().parse_args(command)


def test_the_cli_names_the_exact_keys_and_flags():
    assert render(remedies.download("nsfw-classifier"), FrontEnd.CLI) == "run `toolbox setup --only nsfw-classifier`"
    assert render(remedies.enable("flux1-dev"), FrontEnd.CLI).startswith("run `toolbox setup --enable flux1-dev`")
    assert render(remedies.download(), FrontEnd.API) == "ask the operator to run `toolbox setup`"
    assert render(remedies.download("a", "b"), FrontEnd.DISCORD) == "the bot's operator runs /setup → Download missing"


def test_a_mark_crosses_processes_as_plain_text_and_reads_in_a_log():
    error = ToolboxError(ErrorCode.MODELS_MISSING, MISSING_MESSAGE)
    assert str(error) == "MODELS_MISSING: The NSFW classifier that checks images is not installed: " \
                         "[[download nsfw-classifier]]."
    assert pickle.loads(pickle.dumps(error)).message == MISSING_MESSAGE


def test_text_without_a_known_mark_is_left_as_it_is():
    for text in ("plain words", "a [[list]] of [[things]]", "[[download ../etc]]", "[[delete everything]]"):
        assert render(text, FrontEnd.CLI) == text


def test_a_look_alike_mark_someone_typed_is_shown_as_typed_not_an_error():
    """A model name is quoted in its refusal: one that looks like a mark with the wrong arguments stays text."""
    for typed in ("[[enable]]", "[[verify now]]", "[[token github]]", "[[checkpoint a b]]"):
        text = f"No LoRA named {typed!r} in the library ({remedies.list_library()})."
        for front_end in FrontEnd:
            rendered = render(text, front_end)
            assert typed in rendered and rendered.endswith(render(remedies.list_library(), front_end) + ").")


def test_a_token_mark_for_an_unknown_service_is_refused_where_it_is_written():
    with pytest.raises(ValueError):
        remedies.set_token("github")


# -- no Discord in what the CLI and the API show ----------------------------------------------------------------

def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(tree: ast.Module, modules: dict) -> set[str]:
    """The project modules a module imports, anywhere in it (imports inside functions too)."""
    named = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            named |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            named |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    return {".".join(name.split(".")[:i]) for name in named for i in range(1, name.count(".") + 2)} & set(modules)


def reachable_from_cli_and_api() -> dict[str, ast.Module]:
    """Every module the CLI's commands (but `toolbox bot`), the HTTP API or a worker may run, parsed."""
    modules = {_module_name(path): path for top in ("bot", "cogs", "modal_services") for path in (ROOT / top).rglob("*.py")}
    trees = {name: ast.parse(path.read_text()) for name, path in modules.items()}
    to_visit = [name for name in modules if name.startswith(("bot.cli.", "bot.api.", "modal_services"))
                and name != DISCORD_ENTRY]
    seen: set[str] = set()
    while to_visit:
        name = to_visit.pop()
        if name in seen:
            continue
        seen.add(name)
        if name != MODAL_APP:
            to_visit += _imports(trees[name], modules) - seen - {DISCORD_ENTRY}
    return {name: trees[name] for name in seen}


def _docstrings(tree: ast.Module) -> set[int]:
    return {id(node.body[0].value) for node in ast.walk(tree)
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
            and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}


def test_no_message_a_cli_or_api_user_sees_names_discord():
    """Every string (f-string parts included, docstrings not) of every module the CLI and the API reach."""
    modules = reachable_from_cli_and_api()
    assert "modal_services.safety.nsfw_classifier" in modules and "bot.replies" not in modules and "cogs.setup" not in modules
    found = []
    for name, tree in modules.items():
        if name == "modal_services.remedies":
            continue  # the one place that knows each front end's words
        docstrings = _docstrings(tree)
        for node in ast.walk(tree):
            if (isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings
                    and NAMES_DISCORD.search(node.value) and (name, node.value) not in ALLOWED):
                found.append(f"{name}:{node.lineno}: {node.value!r}")
    assert found == []


# -- each front end's renderer -----------------------------------------------------------------------------------

def test_the_cli_error_line_is_in_the_clis_words(capsys):
    def missing():
        raise ToolboxError(ErrorCode.MODELS_MISSING, MISSING_MESSAGE)

    assert exit_status(missing) == 1
    assert capsys.readouterr().err == ("error: MODELS_MISSING: The NSFW classifier that checks images is not installed: "
                                       "run `toolbox setup --only nsfw-classifier`.\n")


def test_the_api_error_body_is_in_the_apis_words():
    error = ToolboxError(ErrorCode.MODELS_MISSING, MISSING_MESSAGE)
    expected = ("The NSFW classifier that checks images is not installed: ask the operator to run "
                "`toolbox setup --only nsfw-classifier`.")
    assert error_body(error).error == expected
    response = error_response(error)
    assert response.status_code == 503 and expected.encode() in response.body and b"[[" not in response.body


def test_a_discord_reply_is_in_discords_words():
    text = error_text(ToolboxError(ErrorCode.MODELS_MISSING, MISSING_MESSAGE))
    assert text.endswith("· The NSFW classifier that checks images is not installed: the bot's operator runs "
                         "/setup → Download missing.")


def test_a_failed_downloads_state_is_worded_for_the_setup_panel_and_toolbox_status():
    """A download's error is stored with its mark; /setup's panel and `toolbox status` each say it their way."""
    entry = BASE_MODELS["ip-adapter"]
    message = f"Hugging Face refused access to h94/IP-Adapter (HTTP 401): {remedies.set_token('hf')}."
    state = describe_state(entry, None, {"status": "failed", "error_code": "DOWNLOAD_FAILED", "error": message})
    assert describe(state).endswith("the bot's operator sets a Hugging Face token in /setup → Set tokens.")
    assert state.worded_for(FrontEnd.CLI).detail.endswith("set HF_TOKEN in the environment or the `.env` file.")
    assert state.worded_for(FrontEnd.API).to_dict()["detail"].endswith("ask the operator to set a Hugging Face token.")


def test_a_missing_library_model_names_the_cli_listing(capsys):
    from bot.cli import main

    assert main(["models", "info", "nothing"]) == 2
    assert capsys.readouterr().err == ("error: INVALID_INPUT: No model named 'nothing' in the library "
                                       "(see `toolbox models list`).\n")


# -- no absolute paths -------------------------------------------------------------------------------------------

@pytest.mark.slow  # the tiny classifier the API's fixture installs, and torch, take seconds to build and import
async def test_a_caption_jobs_error_names_files_inside_the_models_folder(served, tmp_path):
    """The real caption engine, its model absent: the refusal says what is missing without the data dir."""
    client, _ = await served()
    image = base64.b64encode(png_bytes()).decode()
    refused = await client.post("/jobs", json={"kind": "caption", "style": "descriptive", "images_base64": [image]})
    assert refused.status_code == 503 and refused.json()["error_code"] == "MODELS_MISSING"
    error = refused.json()["error"]
    assert str(tmp_path) not in error and "/data/" not in error
    assert error.startswith("Not installed yet: qwen3-vl-2b (config.json")
    assert error.endswith("ask the operator to run `toolbox setup --only qwen3-vl-2b`.")
