"""OpenAI error bodies: {"error": {"message", "type", "param", "code"}}, for every error the server
returns, its own and FastAPI's (validation, unknown route, wrong method)."""
from __future__ import annotations

from http import HTTPStatus

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException


class APIError(Exception):
    """An error answered with an OpenAI error body."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers  # of the response, e.g. Retry-After

    def body(self) -> dict:
        return {"error": {"message": _encodable(self.message), "type": self.type,
                          "param": None if self.param is None else _encodable(self.param), "code": self.code}}


def _encodable(text: str) -> str:
    """text with any lone surrogate (from a client's input quoted in a message) escaped: the body
    must encode as UTF-8."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param=param)


def unavailable(message: str) -> APIError:
    return APIError(503, message, type="service_unavailable", code="service_unavailable")


def error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(APIError, lambda request, e: error_response(e))
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error)


def _validation_error(request: Request, e: RequestValidationError) -> JSONResponse:
    """OpenAI answers a malformed body with 400 (FastAPI's default is 422), naming the first bad field."""
    errors = e.errors()
    first = errors[0] if errors else {}
    where = [str(p) for p in first.get("loc", ()) if p != "body"]
    message = first.get("msg", "invalid request")
    if where:
        message = f"{'.'.join(where)}: {message}"
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more problems)"
    return error_response(bad_request(message, param=".".join(where) or None))


def _http_error(request: Request, e: HTTPException) -> JSONResponse:
    phrase = HTTPStatus(e.status_code).phrase if e.status_code in HTTPStatus._value2member_map_ else "error"
    message = e.detail if isinstance(e.detail, str) else phrase
    kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
    code = "request_too_large" if e.status_code == 413 else None  # a chunked body past the limit (limits.py)
    response = error_response(APIError(e.status_code, message, type=kind, code=code))
    for key, value in (e.headers or {}).items():
        response.headers[key] = value
    return response
