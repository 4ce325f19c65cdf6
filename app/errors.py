"""One error shape for the whole API, HTTP or in a stream (OpenAI's, so its clients read it):
{"error": {"message": ..., "type": ..., "param": ..., "code": ...}}. `code` is a string a client may act on, or
null: "invalid_api_key", "model_not_found", "rate_limit_exceeded", "server_starting", "server_shutdown",
"model_unavailable", "engine_failed". A client never sees a Python exception's text: the log has it, with the
request id that the client gets too (the X-Request-ID header, and the message)."""

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
    403: "A body not declared application/json, from a web page on another site",
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
    code: str | None


class ErrorBody(BaseModel):
    error: ErrorDetail


def error_responses(*statuses):
    """OpenAPI `responses` for these statuses, each in the one error shape (so the schema tells the truth)."""
    return {status: {"model": ErrorBody, "description": ERROR_DESCRIPTIONS[status]} for status in statuses}


class APIError(Exception):
    """An error for the client. `detail`, when given, is what went wrong for the log only (an exception's text):
    the client's message then names the request id that the log line has."""

    def __init__(self, status, message, type="invalid_request_error", param=None, headers=None, code=None, detail=None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.headers = status, message, type, param, headers
        self.code, self.detail = code, detail


def error_body(message, type, param=None, code=None):
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_response(status, message, type, param=None, headers=None, code=None):
    return JSONResponse(error_body(message, type, param, code), status_code=status, headers=headers)


def request_id(request):
    """The id app.middleware.RequestIDMiddleware gave this request (and sent back as X-Request-ID)."""
    return getattr(request.state, "request_id", None)


def client_message(exc: APIError, request):
    """exc's message for the client; with a detail, the detail is logged and the message names the request id."""
    if exc.detail is None:
        return exc.message
    rid = request_id(request)
    log.error("request %s: %s: %s", rid, exc.message, exc.detail)
    return f"{exc.message}; request id {rid}"


def _field(loc):
    parts = [str(p) for p in loc if p != "body"]
    return ".".join(parts) or "body"


JSON_KINDS = {
    list: "an array",
    str: "a string",
    bool: "a boolean",
    int: "a number",
    float: "a number",
    type(None): "null",
}


def _body_problem(e):
    """What is wrong with the body as a whole, or None when one field is to blame."""
    if e["type"] == "json_invalid":
        return f"it is not valid JSON: {e.get('ctx', {}).get('error', 'parse error')} at character {e['loc'][-1]}"
    if tuple(e["loc"]) != ("body",):
        return None
    if e["type"] == "missing":
        return "it is empty"
    return f"it is {JSON_KINDS.get(type(e['input']), 'something else')}"


def _validation_message(errors):
    def one(e):
        # Every body is read as JSON whatever its Content-Type (app.middleware.JSONBodyMiddleware), so a
        # body that is not a JSON object may have been meant as a form: say what to send instead.
        if (problem := _body_problem(e)) is not None:
            return f"the body must be a JSON object ({problem}); send Content-Type: application/json"
        return f"{_field(e['loc'])}: {e['msg']}"

    return "; ".join(one(e) for e in errors[:5])


def _not_utf8(e):
    """What FastAPI reports as "There was an error parsing the body" when the body's bytes are not UTF-8."""
    return f"the body is not UTF-8 ({e.reason} at byte {e.start}); send JSON text encoded in UTF-8"


def install_error_handlers(app: FastAPI):
    @app.exception_handler(RequestValidationError)
    async def validation(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        param = _field(errors[0]["loc"]) if errors and _body_problem(errors[0]) is None else None
        return error_response(422, _validation_message(errors), "invalid_request_error", param)

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError):
        return error_response(exc.status, client_message(exc, request), exc.type, exc.param, exc.headers, exc.code)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        cause = exc.__cause__
        message = _not_utf8(cause) if isinstance(cause, UnicodeDecodeError) else str(exc.detail)
        return error_response(exc.status_code, message, "invalid_request_error", headers=exc.headers)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception):
        # Starlette sends this response outside the app's middleware, so the id's header is added here.
        rid = request_id(request)
        log.exception("request %s: unhandled error on %s", rid, request.url.path)
        headers = {"X-Request-ID": rid} if rid else None
        return error_response(500, f"internal server error; request id {rid}", "server_error", headers=headers)
