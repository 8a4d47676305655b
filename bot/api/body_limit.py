"""The request body limit, answered in the API's own error shape."""

from __future__ import annotations

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException

from bot.api.responses import error_response
from modal_services.errors import ErrorCode, ToolboxError


class BodyLimit:
    """Refuses request bodies over `max_bytes` with the API's error body (413): at once when the
    Content-Length says so, else as soon as what arrives passes the limit. (Starlette's own limit
    answers in plain text, outside this API's error shape.)"""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    def too_large(self) -> HTTPException:
        return HTTPException(413, f"The request body is larger than {self.max_bytes // 2**20} MB.")

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_bytes:
            return await error_response(ToolboxError(ErrorCode.INVALID_INPUT, self.too_large().detail),
                                        status=413)(scope, receive, send)
        received = 0

        async def counted_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    # An HTTPException passes through FastAPI's body reading to the error handler.
                    raise self.too_large()
            return message

        await self.app(scope, counted_receive, send)
