"""/docs (Swagger UI) and /redoc from files installed with the project, never from a CDN.

FastAPI's own pages load their scripts from a public CDN, and stay blank on a machine with no internet (a
LAN-only `toolbox serve`). The fastapi-offline package ships Swagger UI's and ReDoc's files; they are
served from /docs/assets. An install without that package answers /docs with a page that says so and
points to /openapi.json, which needs nothing.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

ASSETS_PATH = "/docs/assets"


def add_docs(app: FastAPI) -> None:
    """/docs and /redoc for `app` (made with `docs_url=None, redoc_url=None`), out of the OpenAPI schema."""
    folder = _assets_folder()
    if folder is None:
        app.add_route("/docs", _without_assets, include_in_schema=False)
        return
    app.mount(ASSETS_PATH, StaticFiles(directory=folder), name="docs-assets")

    async def swagger_ui(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return get_swagger_ui_html(openapi_url=root + app.openapi_url, title=f"{app.title} - API docs",
                                   swagger_js_url=f"{root}{ASSETS_PATH}/swagger-ui-bundle.js",
                                   swagger_css_url=f"{root}{ASSETS_PATH}/swagger-ui.css",
                                   swagger_favicon_url=f"{root}{ASSETS_PATH}/favicon.png",
                                   # No badge from Swagger's online validator (fetched from its site otherwise).
                                   swagger_ui_parameters={"validatorUrl": None})

    async def redoc(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return get_redoc_html(openapi_url=root + app.openapi_url, title=f"{app.title} - API docs",
                              redoc_js_url=f"{root}{ASSETS_PATH}/redoc.standalone.js",
                              redoc_favicon_url=f"{root}{ASSETS_PATH}/favicon.png", with_google_fonts=False)

    app.add_route("/docs", swagger_ui, include_in_schema=False)
    app.add_route("/redoc", redoc, include_in_schema=False)


def _assets_folder() -> Path | None:
    try:
        import fastapi_offline
    except ModuleNotFoundError:
        return None
    return Path(fastapi_offline.__file__).parent / "static"


async def _without_assets(request: Request) -> HTMLResponse:
    return HTMLResponse(
        "<!doctype html><title>API docs</title><p>The interactive docs need the <code>fastapi-offline</code> "
        "package, which this install lacks: reinstall the project (<code>pip install -e .</code>). The API's "
        "full description is at <a href=\"openapi.json\">/openapi.json</a>.</p>", status_code=503)
