"""What the `toolbox setup` tests share: the fake hub at test speed."""

from __future__ import annotations

import pytest

from modal_services.base_models import downloads
from modal_services.net.transfer import retrying


@pytest.fixture
def hub(fake_hub, monkeypatch):
    monkeypatch.setattr(downloads, "TICK_SECONDS", 0.05)
    monkeypatch.setattr(retrying, "wait_before_retry", lambda seconds, interrupt=None: None)
    return fake_hub

