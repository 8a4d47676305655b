"""The CivitAI and Hugging Face tokens: checked before they are kept, shown only masked.

Stored in the state store (`secret:civitai`, `secret:hf`) so that the workers
see what an admin set through /setup; the environment (`CIVITAI_TOKEN`,
`HF_TOKEN`) is the fallback. A token never appears in a message, a log line
or an exception text: errors here are built from status codes, never from
the token or from the text of the request that carried it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass
from typing import Mapping

from modal_services.errors import ErrorCode, ToolboxError
from modal_services.state.keys import secret_key
from modal_services.state.store import StateStore

log = logging.getLogger(__name__)

SERVICES = ("civitai", "hf")
LABELS = {"civitai": "CivitAI", "hf": "Hugging Face"}
ENV_NAMES = {"civitai": "CIVITAI_TOKEN", "hf": "HF_TOKEN"}
# Where a token came from, as /setup and `toolbox status` say it.
ORIGINS = {"setup": "(set with /setup)", "env": "(from the environment)", "secret": "(from the Modal secret)"}
MAX_TOKEN_CHARS = 512
CHECK_TIMEOUT = 20.0
MAX_ANSWER_BYTES = 1 << 20  # a who-am-I answer is a few hundred bytes


def mask(token: str | None) -> str:
    """`••••a1b2`: enough for an admin to recognise a token, useless to anyone else."""
    if not token:
        return "not set"
    return "••••" + (token[-4:] if len(token) >= 12 else "")


@dataclass(frozen=True)
class TokenState:
    service: str
    masked: str
    source: str | None  # "setup" (the state store), "secret" (env on Modal), "env", or None when unset
    user: str | None = None

    @property
    def is_set(self) -> bool:
        return self.source is not None

    def label(self) -> str:
        """The service, the masked token and its user: `CivitAI: ••••a1b2 (alice)`."""
        if not self.is_set:
            return f"{LABELS[self.service]}: not set"
        who = f" ({self.user})" if self.user else ""
        return f"{LABELS[self.service]}: {self.masked}{who}"

    def describe(self) -> str:
        """The label and where the token came from."""
        return self.label() + (f" {ORIGINS[self.source]}" if self.is_set else "")


def _check_service(service: str) -> None:
    if service not in SERVICES:
        raise ToolboxError(ErrorCode.INVALID_INPUT, f"Unknown token kind {service!r}.")


async def get_token(store: StateStore, service: str, environ: Mapping[str, str] | None = None) -> str | None:
    _check_service(service)
    record = await store.get(secret_key(service))
    if record and record.get("token"):
        return record["token"]
    value = (os.environ if environ is None else environ).get(ENV_NAMES[service], "").strip()
    return value or None


async def token_state(store: StateStore, service: str, environ: Mapping[str, str] | None = None) -> TokenState:
    _check_service(service)
    record = await store.get(secret_key(service))
    if record and record.get("token"):
        return TokenState(service, mask(record["token"]), "setup", record.get("user"))
    env = os.environ if environ is None else environ
    value = env.get(ENV_NAMES[service], "").strip()
    if not value:
        return TokenState(service, mask(value), None)
    # Inside a Modal container the environment's tokens are the deployed secret's.
    return TokenState(service, mask(value), "secret" if env.get("MODAL_IS_REMOTE") == "1" else "env")


def clean_token(service: str, token: str) -> str:
    token = token.strip()
    if token.lower().startswith("bearer "):
        token = token[len("bearer "):].strip()
    if not token or len(token) > MAX_TOKEN_CHARS or not token.isascii() or any(c.isspace() for c in token):
        raise ToolboxError(ErrorCode.INVALID_INPUT, f"That does not look like a {LABELS[service]} token; nothing was stored.")
    return token


def check_hf_token(token: str, endpoint: str | None = None) -> str:
    """Blocking: the user name Hugging Face knows this token by (`whoami` against HF_ENDPOINT)."""
    import httpx2
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    endpoint = endpoint or os.environ.get("HF_ENDPOINT") or None
    try:
        info = HfApi(endpoint=endpoint).whoami(token=token)
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else None
        if status in (401, 403):
            raise ToolboxError(
                ErrorCode.INVALID_INPUT,
                f"Hugging Face rejected this token (HTTP {status}): it is wrong or revoked. "
                "Create a read token at huggingface.co/settings/tokens; nothing was stored.",
            ) from None
        if status == 429:
            raise ToolboxError(ErrorCode.RATE_LIMITED, "Hugging Face is rate-limiting token checks; try again in a minute.") from None
        log.warning("Hugging Face token check failed with HTTP %s", status)
        raise ToolboxError(ErrorCode.DOWNLOAD_FAILED, f"Hugging Face answered HTTP {status}; nothing was stored. Try again later.") from None
    except (OSError, httpx2.TransportError) as exc:  # connection refused, DNS, timeouts
        log.warning("Hugging Face token check could not connect (%s)", type(exc).__name__)
        raise ToolboxError(ErrorCode.DOWNLOAD_FAILED, "Hugging Face could not be reached to check the token; nothing was stored.") from None
    return str(info.get("name") or info.get("fullname") or "unknown user")


def check_civitai_token(token: str, api_base: str) -> str:
    """Blocking: the CivitAI user this token belongs to (`GET /api/v1/me`, which needs a valid key)."""
    import urllib3

    from modal_services.net.egress import Credentials, Purpose, open_url

    base = api_base.rstrip("/")
    try:
        response = open_url(f"{base}/api/v1/me", Purpose.CIVITAI, headers={"Accept": "application/json"},
                            credentials=Credentials.for_base(base, {"Authorization": f"Bearer {token}"}),
                            trusted=(base,), timeout=(CHECK_TIMEOUT, CHECK_TIMEOUT))
    except (OSError, urllib3.exceptions.HTTPError) as exc:
        log.warning("CivitAI token check could not connect (%s)", type(exc).__name__)
        raise ToolboxError(ErrorCode.CIVITAI_UNAVAILABLE, "CivitAI could not be reached to check the token; nothing was stored.") from None
    with response:
        status = response.status
        if status in (401, 403):
            raise ToolboxError(
                ErrorCode.INVALID_INPUT,
                f"CivitAI rejected this token (HTTP {status}): it is wrong or revoked. "
                "Copy an API key from civitai.com/user/account; nothing was stored.",
            )
        if status == 429:
            raise ToolboxError(ErrorCode.RATE_LIMITED, "CivitAI is rate-limiting requests; try again in a minute.")
        if status != 200:
            raise ToolboxError(ErrorCode.CIVITAI_UNAVAILABLE, f"CivitAI answered HTTP {status}; nothing was stored.")
        try:
            body = response.json(MAX_ANSWER_BYTES, time.monotonic() + CHECK_TIMEOUT)
        except (ValueError, ToolboxError, OSError, urllib3.exceptions.HTTPError):
            body = None
    if not isinstance(body, dict):
        raise ToolboxError(ErrorCode.CIVITAI_UNAVAILABLE, "CivitAI answered with something that is not JSON; nothing was stored.")
    return str(body.get("username") or body.get("id") or "unknown user")


async def set_token(
    store: StateStore,
    service: str,
    token: str,
    *,
    civitai_api_base: str = "https://civitai.com",
    hf_endpoint: str | None = None,
) -> TokenState:
    """Check `token` against its service, then keep it. A rejected token is not stored."""
    _check_service(service)
    token = clean_token(service, token)
    if service == "hf":
        user = await asyncio.to_thread(check_hf_token, token, hf_endpoint)
    else:
        user = await asyncio.to_thread(check_civitai_token, token, civitai_api_base)
    await store.put(secret_key(service), {"token": token, "user": user, "set_at": time.time()})
    log.info("%s token set for user %s", LABELS[service], user)
    return TokenState(service, mask(token), "setup", user)


async def clear_token(store: StateStore, service: str) -> None:
    _check_service(service)
    await store.pop(secret_key(service))
