"""`toolbox serve`: the HTTP API on the local backend."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from modal_services.errors import ErrorCode, ToolboxError

if TYPE_CHECKING:
    from bot.settings import Settings

LOOPBACK = "127.0.0.1"


def register(commands) -> None:
    serve = commands.add_parser("serve", help="run the HTTP API on the local backend")
    serve.add_argument("--host", default=LOOPBACK, help=f"address to listen on (default {LOOPBACK})")
    serve.add_argument("--port", type=int, default=8000, help="port to listen on, 1-65535 (default 8000)")
    serve.add_argument("--no-auth", action="store_true", help=f"no token (only with --host {LOOPBACK})")
    serve.set_defaults(run=serve_api)


def serve_api(settings: Settings, args: argparse.Namespace) -> None:
    """The HTTP API with uvicorn on the local backend. No token is only allowed on loopback, and only when asked for."""
    if not 1 <= args.port <= 65535:
        raise ToolboxError(ErrorCode.INVALID_INPUT, f"--port must be from 1 to 65535, not {args.port}.")
    if args.no_auth and args.host != LOOPBACK:
        raise ToolboxError(ErrorCode.INVALID_INPUT, f"--no-auth is only allowed with --host {LOOPBACK}.")
    if not args.no_auth and not settings.api_token:
        raise ToolboxError(ErrorCode.INVALID_INPUT,
                           f"Set TOOLBOX_API_TOKEN (or run on {LOOPBACK} with --no-auth) before serving the API.")
    from bot.api import api_for_settings
    from bot.api.server import ServingLimits, listening_socket, run_api
    from bot.logs import setup_logging

    # Bound first: an address in use or out of reach is one line before anything is built.
    with listening_socket(args.host, args.port) as sock:
        setup_logging()
        app = api_for_settings(settings, None if args.no_auth else settings.api_token)
        run_api(app, sock, ServingLimits.from_settings(settings))

