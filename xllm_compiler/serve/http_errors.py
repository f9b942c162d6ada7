"""Errors as OpenAI shapes them: ``{"error": {"message", "type", "param", "code"}}`` with the matching status.

Clients (the openai package first) turn the status into an exception class and show ``message``; ``param``
names the request field at fault. FastAPI's own 422 validation shape is replaced by a 400 of this shape.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

log = logging.getLogger("xllm_compiler.serve")

#: Segments of a pydantic error location that name a union member rather than a field.
_UNION_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


class OpenAIError(Exception):
    """An error a handler answers with: the HTTP status and OpenAI's error fields."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        kind: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, kind, param, code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def bad_request(message: str, param: str | None = None) -> OpenAIError:
    return OpenAIError(400, message, param=param)


def validation_error(exc: RequestValidationError) -> OpenAIError:
    """The first problem pydantic found in a request body, as a 400 that names the field."""
    first = exc.errors()[0]
    if first.get("type") == "json_invalid":
        detail = first.get("ctx", {}).get("error", "")
        return bad_request(f"the request body is not valid JSON ({detail})" if detail else "malformed JSON body")
    path = [str(p) for p in first.get("loc", ())[1:] if str(p).lower() not in _UNION_TAGS and "[" not in str(p)]
    if not path:
        return bad_request(f"the request body must be a JSON object ({first.get('msg', 'invalid')})")
    message = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    return bad_request(f"{'.'.join(path)}: {message[:1].lower()}{message[1:]}", param=path[0])


def install_error_handlers(app: FastAPI) -> None:
    """Every error the app answers comes out in OpenAI's shape."""

    @app.exception_handler(OpenAIError)
    async def _openai(_: Request, exc: OpenAIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return validation_error(exc).response()

    @app.exception_handler(HTTPException)
    async def _http(_: Request, exc: HTTPException) -> JSONResponse:
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return OpenAIError(exc.status_code, str(exc.detail), kind=kind, headers=exc.headers).response()

    @app.exception_handler(Exception)
    async def _internal(_: Request, exc: Exception) -> JSONResponse:
        log.exception("internal error")
        return OpenAIError(500, f"internal error: {type(exc).__name__}: {exc}", kind="server_error").response()
