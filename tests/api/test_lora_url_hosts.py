"""`lora_url` over plain http: admitted for a host in TOOLBOX_ALLOWED_HOSTS (a self-hoster's LAN bucket), refused
for any other, as the worker's fetch does."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from bot.api.schema import GenerateImageRequest


def test_plain_http_to_an_allowed_host_is_accepted(monkeypatch):
    monkeypatch.setenv("TOOLBOX_ALLOWED_HOSTS", "minio.lan:9000")
    url = "http://minio.lan:9000/loras/style.safetensors?X-Amz-Signature=abc"
    assert str(GenerateImageRequest.model_validate({"prompt": "a cat", "lora_url": url}).lora_url) == url


@pytest.mark.parametrize("url", [
    "http://plain.example/x.safetensors",  # not in the list
    "http://minio.lan:9001/x.safetensors",  # another port of a listed host
    "http://minio.lan.evil.example:9000/x.safetensors",
])
def test_plain_http_to_any_other_host_is_refused(monkeypatch, url):
    monkeypatch.setenv("TOOLBOX_ALLOWED_HOSTS", "minio.lan:9000")
    with pytest.raises(ValidationError) as caught:
        GenerateImageRequest.model_validate({"prompt": "a cat", "lora_url": url})
    assert "https" in str(caught.value) and "TOOLBOX_ALLOWED_HOSTS" in str(caught.value)
