"""Test-wide guards (nothing reaches a hub or Modal, nothing writes outside tmp dirs) and the fixtures
that tests in several folders share; a fixture one folder uses lives in that folder's conftest."""

from __future__ import annotations

import logging
import os

import pytest

# Set before any test module imports huggingface_hub or transformers.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.pop("MODAL_TOKEN_ID", None)
os.environ.pop("MODAL_TOKEN_SECRET", None)


@pytest.fixture(autouse=True)
def _isolated_environment(monkeypatch, tmp_path):
    """Settings come from each test's own environment, never the developer's .env or data dir."""
    for name in ("DISCORD_TOKEN", "CIVITAI_TOKEN", "HF_TOKEN", "TOOLBOX_BACKEND", "TOOLBOX_GUILD_IDS",
                 "TOOLBOX_MODAL_APP", "CIVITAI_API_BASE", "MODAL_TOKEN_ID", "MODAL_TOKEN_SECRET"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("TOOLBOX_DATA_DIR", str(tmp_path / "data"))
    # The fakes listen on 127.0.0.1: allowed the way an admin allows a LAN host (127.0.0.2 and the rest stay refused).
    monkeypatch.setenv("TOOLBOX_ALLOWED_HOSTS", "127.0.0.1")
    monkeypatch.delenv("TOOLBOX_STALL_SECONDS", raising=False)
    monkeypatch.chdir(tmp_path)


@pytest.fixture(autouse=True)
def _root_logging_restored():
    """A test that starts the bot's entry point gets discord.py's log handler on the root logger, bound to
    that test's captured stderr; it leaves with the test, so later tests never log into a closed stream."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture(scope="session")
def _cdn_server():
    from tests.fakes.discord_cdn import FakeCdn

    with FakeCdn() as cdn:
        yield cdn


@pytest.fixture
def fake_cdn(_cdn_server, _isolated_environment, monkeypatch):
    """The fake Discord CDN that `fake_attachment` publishes to, allowed as an admin allows a host."""
    from tests.fakes import discord_fakes

    monkeypatch.setattr(discord_fakes, "cdn", _cdn_server)
    monkeypatch.setenv("TOOLBOX_ALLOWED_HOSTS", f"{os.environ['TOOLBOX_ALLOWED_HOSTS']},{_cdn_server.host_port}")
    yield _cdn_server
    _cdn_server.reset()


@pytest.fixture(autouse=True)
def _cdn_for_fake_attachments(request):
    """A test module that builds `fake_attachment`s gets the fake CDN serving them; the rest run without it."""
    if hasattr(request.module, "fake_attachment"):
        request.getfixturevalue("fake_cdn")


@pytest.fixture(scope="session")
def tiny_qwen_dir(tmp_path_factory):
    """A tiny random Qwen3-VL snapshot, built once per test run."""
    from tests.fixtures.tiny_qwen import build_tiny_qwen3vl

    return build_tiny_qwen3vl(tmp_path_factory.mktemp("tiny-qwen") / "qwen3-vl-2b")


@pytest.fixture(scope="session")
def tiny_nsfw_dirs(tmp_path_factory):
    """Tiny ViT classifiers in the NSFW classifier's layout, built once per test run: one that passes
    every image and one that flags every image."""
    from tests.fixtures.tiny_nsfw import FLAGS, PASSES, write_tiny_nsfw_classifier

    root = tmp_path_factory.mktemp("tiny-nsfw")
    return {"passes": write_tiny_nsfw_classifier(root / "passes", PASSES),
            "flags": write_tiny_nsfw_classifier(root / "flags", FLAGS)}


def _installer(built_dirs: dict, folder):
    """install(verdict): the tiny model built for `verdict` linked at `folder` (where the local backend looks)."""
    def install(verdict: str):
        folder.parent.mkdir(parents=True, exist_ok=True)
        if folder.is_symlink():
            folder.unlink()
        folder.symlink_to(built_dirs[verdict], target_is_directory=True)
        return folder

    return install


@pytest.fixture
def install_nsfw_classifier(tiny_nsfw_dirs, tmp_path):
    """install_nsfw_classifier("passes" | "flags"): that tiny classifier where the local backend looks for it."""
    from modal_services.layout import NSFW_CLASSIFIER_DIR

    install = _installer(tiny_nsfw_dirs, tmp_path / "data" / "models" / NSFW_CLASSIFIER_DIR)
    return lambda verdict="passes": install(verdict)


@pytest.fixture(scope="session")
def tiny_tagger_dirs(tmp_path_factory):
    """Tiny ONNX stand-ins for the booru tagger, built once per test run, one per verdict of
    `tests.fixtures.tiny_tagger.VERDICTS` ("safe", "minor_explicit", "adult_explicit", "minor_general")."""
    from tests.fixtures.tiny_tagger import VERDICTS, write_tiny_tagger

    root = tmp_path_factory.mktemp("tiny-tagger")
    return {verdict: write_tiny_tagger(root / verdict, scores) for verdict, scores in VERDICTS.items()}


@pytest.fixture
def install_tagger(tiny_tagger_dirs, tmp_path):
    """install_tagger("safe" | "minor_explicit" | ...): that tiny tagger where the local backend looks for it."""
    from modal_services.layout import TAGGER_DIR

    install = _installer(tiny_tagger_dirs, tmp_path / "data" / "models" / TAGGER_DIR)
    return lambda verdict="safe": install(verdict)


@pytest.fixture
def fake_hub(monkeypatch):
    """A fake Hugging Face Hub on loopback, serving a stand-in for every repo of the registry, as HF_ENDPOINT."""
    import huggingface_hub.constants

    from tests.fakes.hf_server import FakeHub, serve_registry

    with FakeHub() as server:
        serve_registry(server)
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
        yield server


@pytest.fixture
def fake_civitai(monkeypatch):
    """A fake CivitAI on loopback, as CIVITAI_API_BASE, with the downloader's retries not waiting."""
    from modal_services.net.transfer import retrying
    from tests.fakes.civitai_server import FakeCivitai

    server = FakeCivitai().start()
    monkeypatch.setenv("CIVITAI_API_BASE", server.base)
    monkeypatch.setattr(retrying, "wait_before_retry", lambda seconds, interrupt=None: None)
    yield server
    server.stop()


@pytest.fixture
def fast_progress(monkeypatch):
    """Progress writes, polls and reply edits at test speed instead of Discord-safe pacing."""
    import bot.core.following
    import bot.progress
    import modal_services.jobs.records

    monkeypatch.setattr(bot.progress, "MIN_EDIT_INTERVAL", 0.02)
    monkeypatch.setattr(bot.core.following, "POLL_INTERVAL", 0.01)
    monkeypatch.setattr(modal_services.jobs.records, "PROGRESS_WRITE_INTERVAL", 0.02)


@pytest.fixture
def stand_in_engines(install_nsfw_classifier, install_tagger):
    """The engine factory of this test's local backends: `stand_in_engines.use(GenerateRequest, engine)` runs
    that request's engine class on a stand-in, every other on the real engine; for a class whose images are
    judged, with the tiny classifier that passes every image and the tiny tagger that finds them safe installed.
    `make_toolbox_bot` gives it to the backends it makes; tests that build a `LocalBackend` give it as `engines=`."""
    from tests.fakes.engines import StandInEngines

    return StandInEngines(on_judged=lambda: (install_nsfw_classifier("passes"), install_tagger("safe")))


@pytest.fixture
def backends_from_settings(monkeypatch, stand_in_engines):
    """The front ends that open a backend of their own from the settings (the CLI's commands, `toolbox bot`'s
    supervisor, `api_for_settings`) get theirs with this test's `stand_in_engines` too."""
    import bot.backend

    make_backend = bot.backend.make_backend
    monkeypatch.setattr(bot.backend, "make_backend",
                        lambda settings: bot.backend.LocalBackend(settings, engines=stand_in_engines)
                        if settings.backend == "local" else make_backend(settings))
    return stand_in_engines


@pytest.fixture
def app_module(monkeypatch):
    """modal_services.app imported afresh, with every @app.cls / @app.function call's options recorded."""
    import importlib
    import sys

    import modal

    recorded: dict[str, dict] = {}
    real_cls, real_function = modal.App.cls, modal.App.function

    def recording(real):
        def decorator_factory(self, *args, **kwargs):
            decorator = real(self, *args, **kwargs)

            def wrap(target):
                # A web endpoint arrives as a modal PartialFunction: named by the function it wraps.
                function = target._get_raw_f() if hasattr(target, "_get_raw_f") else target
                recorded[getattr(function, "__name__", repr(function))] = kwargs
                return decorator(target)

            return wrap

        return decorator_factory

    monkeypatch.setattr(modal.App, "cls", recording(real_cls))
    monkeypatch.setattr(modal.App, "function", recording(real_function))
    real_enter = modal.enter

    def recording_enter(*args, **kwargs):
        decorator = real_enter(*args, **kwargs)

        def wrap(method):
            recorded[method.__qualname__] = kwargs
            return decorator(method)

        return wrap

    monkeypatch.setattr(modal, "enter", recording_enter)
    monkeypatch.setenv("TOOLBOX_CAPTION_GPU", "T4")
    sys.modules.pop("modal_services.app", None)
    module = importlib.import_module("modal_services.app")
    module.recorded_options = recorded
    yield module
    sys.modules.pop("modal_services.app", None)


@pytest.fixture
async def make_toolbox_bot(stand_in_engines):
    """make_toolbox_bot(*extensions, backend=None): a ToolboxBot (not connected) on this test's settings,
    the backend from the settings unless given (a local one with this test's `stand_in_engines`), all cogs
    unless named; closed after the test. Not logged in, it cannot ask Discord who owns the application:
    its owner is `APPLICATION_OWNER_ID`, set as discord.py's `owner_id`."""
    from bot.backend import LocalBackend, make_backend
    from bot.client import EXTENSIONS, ToolboxBot
    from bot.settings import Settings
    from tests.fakes.discord_fakes import APPLICATION_OWNER_ID

    made = []

    async def make(*extensions: str, backend=None):
        settings = Settings.load()
        if backend is None:
            local = settings.backend == "local"
            backend = LocalBackend(settings, engines=stand_in_engines) if local else make_backend(settings)
        toolbox_bot = ToolboxBot(settings, backend)
        toolbox_bot.owner_id = APPLICATION_OWNER_ID
        for extension in extensions or EXTENSIONS:
            await toolbox_bot.load_extension(extension)
        made.append(toolbox_bot)
        return toolbox_bot

    yield make
    for toolbox_bot in made:
        await toolbox_bot.backend.close()


@pytest.fixture
def modal_deployment(monkeypatch):
    """A deployed Modal app faked at the seam (Dict, Cls, FunctionCall), on TOOLBOX_BACKEND=modal.

    Its `work(payload, progress)` runs each spawned job as a container would;
    the default captions quickly, tests replace it as they need.
    """
    import modal

    from tests.fakes.modal_fakes import FakeDeployment, FakeModalDict, fake_volumes

    def work(payload, progress):
        for step in range(3):
            progress(step / 3, "captioning")
        return [f"{payload['style']} caption {i}" for i, _ in enumerate(payload["images"])]

    state = FakeModalDict()
    fake = FakeDeployment(state, work)
    monkeypatch.setattr(modal.Dict, "from_name", lambda name, create_if_missing=False: state)
    fake.volumes = fake_volumes(monkeypatch)
    monkeypatch.setattr(modal.Cls, "from_name", fake.cls_from_name)
    monkeypatch.setattr(modal.FunctionCall, "from_id", fake.call_from_id)
    monkeypatch.setenv("TOOLBOX_BACKEND", "modal")
    return fake
