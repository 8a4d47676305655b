"""The model library as a front end reaches it: the data dir's folders on the local backend, the workers'
volume (which the front end never sees) on Modal."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from bot.settings import Settings
    from modal_services.library.entries import Library
    from modal_services.state.store import StateStore


def library_for(settings: Settings, store: StateStore) -> Library:
    """The library whose entries live in `store`, with its files where the settings' backend keeps them."""
    # Imported here: `toolbox --help` imports the CLI's modules, and this one, without it.
    from modal_services.library.entries import Library

    return Library.for_backend(store, settings.backend == "local", settings.loras_dir, settings.models_dir)
