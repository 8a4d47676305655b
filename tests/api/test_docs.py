"""/docs and /redoc load everything from the API itself: they work on a machine with no internet."""

from __future__ import annotations

import re
import sys

import pytest
from fastapi.testclient import TestClient

from bot.api import api_for_settings
from bot.settings import Settings


@pytest.fixture
def client():
    return TestClient(api_for_settings(Settings.load(), "docs-test-token"))


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_the_docs_pages_fetch_nothing_from_elsewhere(client, page):
    html = client.get(page).text
    fetched = re.findall(r"""(?:src|href)=["']([^"']+)["']""", html) + re.findall(r"""url: ?["']([^"']+)["']""", html)
    assert fetched and not [url for url in fetched if "//" in url], fetched  # no CDN, no Google fonts
    for url in fetched:
        answer = client.get(url)
        assert answer.status_code == 200 and len(answer.content) > 100, url
    assert "/openapi.json" in html
    if page == "/docs":
        assert '"validatorUrl": null' in html  # Swagger UI would fetch a badge from its validator's site


def test_the_docs_are_not_in_the_schema(client):
    assert not [path for path in client.get("/openapi.json").json()["paths"] if "docs" in path or "redoc" in path]


def test_without_the_assets_package_docs_says_so_and_points_to_the_schema(monkeypatch):
    monkeypatch.setitem(sys.modules, "fastapi_offline", None)  # as on an install that lacks it
    client = TestClient(api_for_settings(Settings.load(), "docs-test-token"))
    answer = client.get("/docs")
    assert answer.status_code == 503 and "fastapi-offline" in answer.text and "openapi.json" in answer.text
    assert "//" not in answer.text.replace("<!doctype html>", "")
