"""One error shape for the whole API (OpenAI's, so its clients read it):
{"error": {"message": ..., "type": ..., "param": ..., "code": ...}}"""
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException

log = logging.getLogger("quill")

ERROR_DESCRIPTIONS = {
    400: "Request body could not be read (not UTF-8)",
    401: "Missing or wrong API key (when the server has one)",
    404: "No such model",
    413: "Request body too large",
    422: "Invalid request body",
    429: "The model is at capacity: retry after Retry-After seconds",
    431: "Too many request headers, or too large",
    500: "Internal error",
    503: "Starting or shutting down: retry after Retry-After seconds",
}


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: int


class ErrorBody(BaseModel):
    error: ErrorDetail


def error_responses(*statuses):
    """OpenAPI `responses` for these statuses, each in the one error shape (so the schema tells the truth)."""
    return {status: {"model": ErrorBody, "description": ERROR_DESCRIPTIONS[status]} for status in statuses}


class APIError(Exception):
    def __init__(self, status, message, type="invalid_request_error", param=None, headers=None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.headers = status, message, type, param, headers


def error_body(message, type, param=None, code=None):
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_response(status, message, type, param=None, headers=None):
    return JSONResponse(error_body(message, type, param, status), status_code=status, headers=headers)


def _field(loc):
    parts = [str(p) for p in loc if p != "body"]
    return ".".join(parts) or "body"


def _validation_message(errors):
    def one(e):
        if e["type"] == "json_invalid":
            return f"body is not valid JSON ({e.get('ctx', {}).get('error', 'parse error')})"
        return f"{_field(e['loc'])}: {e['msg']}"
    return "; ".join(one(e) for e in errors[:5])


def install_error_handlers(app: FastAPI):
    @app.exception_handler(RequestValidationError)
    async def validation(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        param = _field(errors[0]["loc"]) if errors and errors[0]["type"] != "json_invalid" else None
        return error_response(422, _validation_message(errors), "invalid_request_error", param)

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError):
        return error_response(exc.status, exc.message, exc.type, exc.param, exc.headers)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        return error_response(exc.status_code, str(exc.detail), "invalid_request_error", headers=exc.headers)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception):
        log.exception("unhandled error on %s", request.url.path)
        return error_response(500, "internal server error", "server_error")
