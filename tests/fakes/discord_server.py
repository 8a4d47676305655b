"""A small Discord on 127.0.0.1 for the real discord.py client: REST, gateway and CDN.

It speaks enough of Discord's API for `toolbox bot` to log in, connect, sync
its commands and answer interactions: the gateway (HELLO, IDENTIFY, READY,
GUILD_CREATE, heartbeats and their ACKs, INTERACTION_CREATE), command sync,
interaction callbacks, webhook edits, deletes and followups, channel messages
with the bot token, and a CDN route serving attachments (slowly on request).

Every request is recorded with its arrival time, and the server refuses what
Discord would refuse (a second callback for one interaction, webhook use
before the callback, messages over 2000 characters, unknown routes), so a
test can assert on exactly what the bot sent.

discord.py is pointed here through its own attributes: `discord.http.Route.BASE`
(REST, webhooks included) and `DiscordWebSocket.DEFAULT_GATEWAY` (a non-sharded
client connects there; READY's `resume_gateway_url` points here too).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from dataclasses import dataclass, field
from typing import Any

from aiohttp import WSMsgType, web

API = "/api/v10"
HEARTBEAT_MS = 1000
MESSAGE_LIMIT = 2000
EPHEMERAL = 64
ADMINISTRATOR = 8
DISCORD_EPOCH_MS = 1420070400000


@dataclass
class Request:
    at: float
    method: str
    path: str
    body: Any
    status: int
    files: list[str] = field(default_factory=list)


def iso(at: float | None = None) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S.000000+00:00", time.gmtime(at or time.time()))


class FakeDiscord:
    def __init__(self, guild_ids=(2002,), channel_id: int = 3003):
        self._counter = itertools.count(1)
        self.app_id = self._next_id()
        self.bot_user = self.user(self.app_id, "toolbox", bot=True)
        self.guild_ids = list(guild_ids)
        self.channel_id = channel_id
        self.requests: list[Request] = []
        self.refused: list[Request] = []
        self.commands: list[dict] = []
        self.messages: dict[int, dict] = {}
        self.interactions: dict[str, dict] = {}  # token -> what the fake knows of the interaction
        self.cdn: dict[str, tuple[bytes, str, float]] = {}  # name -> (data, content type, delay)
        self.gateway_events: list[tuple[float, str, Any]] = []  # (at, op or event, detail)
        self._sockets: list[web.WebSocketResponse] = []
        self._sequence = itertools.count(1)
        self.identified = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self.base_url = ""

    def _next_id(self) -> int:
        """A snowflake of now: discord.py reads an interaction's age (its token's life) from its id."""
        return ((int(time.time() * 1000) - DISCORD_EPOCH_MS) << 22) | (next(self._counter) & 0x3FFFFF)

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> str:
        app = web.Application(client_max_size=64 * 2**20)
        app.router.add_get("/", self.gateway)
        app.router.add_get("/cdn/{name}", self.serve_cdn)
        app.router.add_route("*", API + "/{tail:.*}", self.rest)
        self._runner = web.AppRunner(app, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        self.base_url = f"http://127.0.0.1:{port}"
        return self.base_url

    async def stop(self) -> None:
        for socket in self._sockets:
            await socket.close()
        if self._runner is not None:
            await self._runner.cleanup()

    @property
    def api_base(self) -> str:
        return self.base_url + API

    @property
    def gateway_url(self) -> str:
        return self.base_url.replace("http://", "ws://") + "/"

    # ------------------------------------------------------------------ payloads

    @staticmethod
    def user(user_id: int, name: str, bot: bool = False) -> dict:
        return {"id": str(user_id), "username": name, "discriminator": "0", "global_name": name, "avatar": None, "bot": bot}

    def member(self, user_id: int, admin: bool = False) -> dict:
        return {"user": self.user(user_id, f"user{user_id}"), "roles": [], "permissions": str(ADMINISTRATOR if admin else 0),
                "joined_at": iso(), "deaf": False, "mute": False, "flags": 0, "avatar": None, "nick": None, "pending": False}

    def guild(self, guild_id: int) -> dict:
        everyone = {"id": str(guild_id), "name": "@everyone", "permissions": "0", "position": 0, "color": 0,
                    "hoist": False, "managed": False, "mentionable": False, "flags": 0}
        channel = {"id": str(self.channel_id), "type": 0, "name": "general", "position": 0,
                   "permission_overwrites": [], "nsfw": False, "parent_id": None, "guild_id": str(guild_id)}
        return {"id": str(guild_id), "name": f"server {guild_id}", "owner_id": "1", "roles": [everyone],
                "channels": [channel], "members": [], "member_count": 2, "features": [], "emojis": [], "stickers": [],
                "threads": [], "presences": [], "voice_states": [], "stage_instances": [], "guild_scheduled_events": [],
                "premium_tier": 0, "large": False, "unavailable": False, "joined_at": iso(), "mfa_level": 0,
                "verification_level": 0, "explicit_content_filter": 0, "default_message_notifications": 0,
                "afk_timeout": 300, "nsfw_level": 0, "preferred_locale": "en-US", "system_channel_flags": 0,
                "icon": None, "splash": None, "banner": None, "description": None, "premium_subscription_count": 0}

    def message(self, content: str = "", flags: int = 0, attachments=(), components=(), interaction_id=None) -> dict:
        message = {"id": str(self._next_id()), "channel_id": str(self.channel_id), "author": self.bot_user,
                   "content": content, "timestamp": iso(), "edited_timestamp": None, "tts": False,
                   "mention_everyone": False, "mentions": [], "mention_roles": [], "attachments": list(attachments),
                   "embeds": [], "pinned": False, "type": 20 if interaction_id else 0, "flags": flags,
                   "components": list(components), "application_id": str(self.app_id)}
        if interaction_id:
            message["webhook_id"] = str(self.app_id)
        self.messages[int(message["id"])] = message
        return message

    def attachment(self, name: str, data: bytes, content_type: str = "image/png", width=None, height=None,
                   delay: float = 0.0) -> dict:
        """An attachment as Discord describes it, its bytes served by the fake CDN."""
        self.cdn[name] = (data, content_type, delay)
        described = {"id": str(self._next_id()), "filename": name, "size": len(data), "url": f"{self.base_url}/cdn/{name}",
                     "proxy_url": f"{self.base_url}/cdn/{name}", "content_type": content_type}
        if width is not None:
            described.update(width=width, height=height)
        return described

    def _interaction(self, kind: int, data: dict, user_id: int, guild_id: int, admin: bool, message=None) -> dict:
        token = f"itoken-{self._next_id()}"
        payload = {"id": str(self._next_id()), "application_id": str(self.app_id), "type": kind, "token": token,
                   "version": 1, "guild_id": str(guild_id), "channel_id": str(self.channel_id),
                   "channel": {"id": str(self.channel_id), "type": 0, "guild_id": str(guild_id), "name": "general",
                               "position": 0, "permission_overwrites": [], "nsfw": False, "parent_id": None},
                   "member": self.member(user_id, admin), "app_permissions": "117760", "locale": "en-US",
                   "guild_locale": "en-US", "entitlements": [], "authorizing_integration_owners": {"0": str(guild_id)},
                   "context": 0, "attachment_size_limit": 10 * 2**20, "data": data}
        if message is not None:
            payload["message"] = message
        self.interactions[token] = {"payload": payload, "dispatched_at": None, "callback": None, "original": None}
        return payload

    def slash(self, name: str, options: list[dict], user_id: int = 1001, guild_id: int = 2002, admin: bool = False,
              attachments: list[dict] = ()) -> dict:
        command = next(command for command in self.commands if command["name"] == name)
        data = {"id": command["id"], "name": name, "type": 1, "options": options}
        if attachments:
            data["resolved"] = {"attachments": {attachment["id"]: attachment for attachment in attachments}}
        return self._interaction(2, data, user_id, guild_id, admin)

    def button(self, custom_id: str, message: dict, user_id: int = 1001, guild_id: int = 2002, admin: bool = False) -> dict:
        return self._interaction(3, {"custom_id": custom_id, "component_type": 2}, user_id, guild_id, admin, message)

    # ------------------------------------------------------------------ gateway

    async def dispatch(self, event: str, data: Any) -> None:
        socket = self._sockets[-1]
        await socket.send_str(json.dumps({"op": 0, "t": event, "s": next(self._sequence), "d": data}))
        self.gateway_events.append((time.monotonic(), event, data.get("id") if isinstance(data, dict) else None))

    async def send_interaction(self, payload: dict) -> str:
        await self.dispatch("INTERACTION_CREATE", payload)
        self.interactions[payload["token"]]["dispatched_at"] = time.monotonic()
        return payload["token"]

    async def gateway(self, request: web.Request) -> web.WebSocketResponse:
        socket = web.WebSocketResponse()
        await socket.prepare(request)
        self._sockets.append(socket)
        self._sequence = itertools.count(1)
        await socket.send_str(json.dumps({"op": 10, "d": {"heartbeat_interval": HEARTBEAT_MS}}))
        async for frame in socket:
            if frame.type is not WSMsgType.TEXT:
                continue
            message = json.loads(frame.data)
            self.gateway_events.append((time.monotonic(), f"op{message['op']}", None))
            if message["op"] == 1:
                await socket.send_str(json.dumps({"op": 11}))
            elif message["op"] == 2:
                await self._ready(socket)
        self.gateway_events.append((time.monotonic(), "closed", socket.close_code))
        return socket

    async def _ready(self, socket: web.WebSocketResponse) -> None:
        ready = {"v": 10, "user": self.bot_user, "guilds": [{"id": str(g), "unavailable": True} for g in self.guild_ids],
                 "session_id": f"session-{self._next_id()}", "resume_gateway_url": self.gateway_url,
                 "application": {"id": str(self.app_id), "flags": 0}, "private_channels": [], "relationships": []}
        await self.dispatch("READY", ready)
        for guild_id in self.guild_ids:
            await self.dispatch("GUILD_CREATE", self.guild(guild_id))
        self.identified.set()

    # ------------------------------------------------------------------ CDN

    async def serve_cdn(self, request: web.Request) -> web.Response:
        data, content_type, delay = self.cdn[request.match_info["name"]]
        await asyncio.sleep(delay)
        return web.Response(body=data, content_type=content_type)

    # ------------------------------------------------------------------ REST

    async def rest(self, request: web.Request) -> web.StreamResponse:
        body, files = await self._read_body(request)
        path = "/" + request.match_info["tail"]
        status, answer = self._route(request.method, path, body)
        record = Request(time.monotonic(), request.method, path, body, status, files)
        self.requests.append(record)
        if status >= 400:
            self.refused.append(record)
            return self._json({"message": answer, "code": 0}, status)
        if answer is None:
            return web.Response(status=204)
        return self._json(answer, status)

    @staticmethod
    def _json(document: Any, status: int) -> web.Response:
        # discord.py parses a body as JSON only when the content type is exactly this (no charset).
        return web.Response(body=json.dumps(document).encode(), status=status, headers={"Content-Type": "application/json"})

    @staticmethod
    async def _read_body(request: web.Request) -> tuple[Any, list[str]]:
        if request.content_type.startswith("multipart/"):
            form = await request.post()
            files = [value.filename for key, value in form.items() if key.startswith("files[")]
            return json.loads(form.get("payload_json", "{}")), files
        if request.can_read_body:
            return await request.json(), []
        return None, []

    def _route(self, method: str, path: str, body: Any) -> tuple[int, Any]:
        parts = path.strip("/").split("/")
        if method == "GET" and path == "/users/@me":
            return 200, self.bot_user
        if method == "GET" and path == "/oauth2/applications/@me":
            return 200, {"id": str(self.app_id), "name": "toolbox", "description": "", "icon": None,
                         "bot_public": True, "bot_require_code_grant": False, "owner": self.user(1, "owner"),
                         "verify_key": "0" * 64, "flags": 0, "team": None}
        if method == "GET" and path == "/gateway/bot":
            return 200, {"url": self.gateway_url, "shards": 1,
                         "session_start_limit": {"total": 1000, "remaining": 999, "reset_after": 0, "max_concurrency": 1}}
        if method == "PUT" and parts[:3] == ["applications", str(self.app_id), "commands"]:
            self.commands = [{"description": "", "options": [], **command, "id": str(self._next_id()),
                              "application_id": str(self.app_id), "version": "1"} for command in body]
            return 200, self.commands
        if parts[0] == "interactions" and parts[-1] == "callback" and method == "POST":
            return self._callback(parts[2], body)
        if parts[0] == "webhooks":
            return self._webhook(method, parts[2], parts[3:], body)
        if parts[0] == "channels" and parts[2:3] == ["messages"]:
            return self._channel_message(method, parts[3:], body)
        return 404, f"no route {method} {path} in the fake Discord"

    def _check_content(self, body: Any) -> str | None:
        content = (body or {}).get("content") or ""
        return f"content is {len(content)} characters" if len(content) > MESSAGE_LIMIT else None

    def _callback(self, token: str, body: dict) -> tuple[int, Any]:
        known = self.interactions.get(token)
        if known is None:
            return 404, "Unknown interaction"
        if known["callback"] is not None:
            return 400, "Interaction has already been acknowledged."
        if (problem := self._check_content(body.get("data"))) is not None:
            return 400, problem
        known["callback"] = {"at": time.monotonic(), "type": body["type"], "data": body.get("data") or {}}
        data = body.get("data") or {}
        flags = data.get("flags", 0)
        if body["type"] in (4, 5):
            original = self.message(data.get("content", ""), flags, components=data.get("components", ()),
                                    interaction_id=known["payload"]["id"])
            known["original"] = original
        elif body["type"] in (6, 7):
            original = known["payload"].get("message")
        else:
            original = None
        interaction = {"id": known["payload"]["id"], "type": known["payload"]["type"],
                       "response_message_id": original and original["id"], "response_message_loading": body["type"] == 5,
                       "response_message_ephemeral": bool(flags & EPHEMERAL)}
        return 200, {"interaction": interaction, "resource": {"type": body["type"], "message": original} if original else None}

    def _webhook(self, method: str, token: str, rest: list[str], body: Any) -> tuple[int, Any]:
        known = self.interactions.get(token)
        if known is None or known["callback"] is None:
            return 401, "Invalid Webhook Token (no callback yet)"
        if (problem := self._check_content(body)) is not None:
            return 400, problem
        if not rest:  # a followup
            if method != "POST":
                return 405, "followups are POSTed"
            return 200, self.message((body or {}).get("content", ""), (body or {}).get("flags", 0), interaction_id=known["payload"]["id"])
        if rest[:2] != ["messages", "@original"]:
            return 404, "only @original is known"
        original = known["original"]
        if original is None:
            return 404, "Unknown Message"
        if method == "GET":
            return 200, original
        if method == "DELETE":
            self.messages.pop(int(original["id"]), None)
            known["original"] = None
            return 204, None
        if method == "PATCH":
            original.update({key: value for key, value in (body or {}).items() if key in ("content", "components")})
            return 200, original
        return 405, "not allowed"

    def _channel_message(self, method: str, rest: list[str], body: Any) -> tuple[int, Any]:
        if (problem := self._check_content(body)) is not None:
            return 400, problem
        if not rest and method == "POST":
            return 200, self.message((body or {}).get("content", ""))
        message = self.messages.get(int(rest[0])) if rest else None
        if message is None:
            return 404, "Unknown Message"
        if method == "PATCH":
            message.update({key: value for key, value in (body or {}).items() if key in ("content", "components")})
            return 200, message
        return 405, "not allowed"

    # ------------------------------------------------------------------ what the bot did

    def calls_for(self, token: str) -> list[Request]:
        """Every request that answered or edited this interaction (callback, webhook), in order."""
        return [request for request in self.requests if f"/{token}" in request.path]

    def original_edits(self, token: str) -> list[Request]:
        return [request for request in self.calls_for(token) if request.method == "PATCH"]

    def message_edits(self, message_id: int) -> list[Request]:
        return [request for request in self.requests
                if request.method == "PATCH" and request.path.endswith(f"/messages/{message_id}")]

    def callback(self, token: str) -> dict | None:
        return self.interactions[token]["callback"]

    def ack_delay(self, token: str) -> float:
        known = self.interactions[token]
        return known["callback"]["at"] - known["dispatched_at"]
