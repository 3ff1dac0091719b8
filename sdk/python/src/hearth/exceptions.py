"""Typed exceptions.

Every error the SDK raises is a :class:`HearthError`. API errors (from boto3's
``ClientError`` or hearth's extension routes) become the subclass named after
their AWS error code, so callers catch ``hearth.NotFoundError`` instead of
inspecting ``error.response["Error"]["Code"]``; the original exception stays
in ``__cause__``.
"""

from __future__ import annotations

from typing import Optional


class HearthError(Exception):
    """Base of every error this SDK raises."""


class ApiError(HearthError):
    """An error answer of the API: ``code`` is the AWS error code
    (e.g. ``ResourceNotFoundException``), ``status`` the HTTP status."""

    def __init__(self, message: str, *, code: str = "", status: Optional[int] = None):
        super().__init__(message)
        self.message = message
        self.code = code
        self.status = status

    def __str__(self) -> str:
        return f"{self.code}: {self.message}" if self.code else self.message


class NotFoundError(ApiError):
    """``ResourceNotFoundException`` (404): no such microVM, image or file."""


class ConflictError(ApiError):
    """``ConflictException`` / ``ResourceConflictException`` (409): the
    resource is in a state that does not allow the call (e.g. suspending a
    microVM that is not RUNNING)."""


class ValidationError(ApiError):
    """``ValidationException`` / ``InvalidParameterValueException`` (400)."""


class ThrottlingError(ApiError):
    """``ThrottlingException`` / ``TooManyRequestsException`` (429)."""


class AccessDeniedError(ApiError):
    """``AccessDeniedException`` or a refused signature or token (403)."""


class QuotaExceededError(ApiError):
    """``ServiceQuotaExceededException`` (402)."""


class ServerError(ApiError):
    """``InternalServerException``, ``ServiceException``,
    ``InsufficientCapacityException`` (5xx), or a 502 of the endpoint when the
    microVM cannot be reached."""


class ConnectionError(HearthError):  # noqa: A001 - the SDK's own, as hearth.ConnectionError
    """The server or the endpoint could not be reached."""


class SandboxError(HearthError):
    """A microVM did not reach the state a call waits for (it terminated, or
    the wait timed out); ``state`` and ``state_reason`` are GetMicrovm's."""

    def __init__(self, message: str, *, state: Optional[str] = None, state_reason: Optional[str] = None):
        super().__init__(message)
        self.state = state
        self.state_reason = state_reason


class CommandExitError(HearthError):
    """A command exited with a non-zero status (as E2B's). ``exit_code`` is
    the status, or 128 + the signal number for a command killed by a signal
    (``signal`` then holds the number); ``stdout`` and ``stderr`` are all it
    printed."""

    def __init__(self, *, stdout: str, stderr: str, exit_code: int, signal: Optional[int] = None,
                 error: Optional[str] = None):
        self.stdout = stdout
        self.stderr = stderr
        self.exit_code = exit_code
        self.signal = signal
        self.error = error
        detail = f"signal {signal}" if signal is not None else f"exit code {exit_code}"
        tail = stderr.strip().splitlines()[-1] if stderr.strip() else ""
        super().__init__(f"command failed with {detail}" + (f": {tail}" if tail else ""))


class CommandTimeoutError(CommandExitError, TimeoutError):
    """A command ran longer than its ``timeout`` and was killed (SIGKILL)."""


class BuildError(HearthError):
    """An image build failed: ``state_reason`` is the build's ``stateReason``
    (e.g. ``CONTAINER_BUILD_FAILED: step 2/5 ...``), ``log`` its whole log."""

    def __init__(self, message: str, *, image: str, version: Optional[str], build_id: Optional[str],
                 state_reason: Optional[str], log: str = ""):
        super().__init__(message)
        self.image = image
        self.version = version
        self.build_id = build_id
        self.state_reason = state_reason
        self.log = log


_BY_CODE = {
    "ResourceNotFoundException": NotFoundError,
    "NoSuchBucket": NotFoundError,
    "NoSuchKey": NotFoundError,
    "ConflictException": ConflictError,
    "ResourceConflictException": ConflictError,
    "ValidationException": ValidationError,
    "InvalidParameterValueException": ValidationError,
    "ThrottlingException": ThrottlingError,
    "TooManyRequestsException": ThrottlingError,
    "AccessDeniedException": AccessDeniedError,
    "AccessDenied": AccessDeniedError,
    "InvalidSignatureException": AccessDeniedError,
    "UnrecognizedClientException": AccessDeniedError,
    "ServiceQuotaExceededException": QuotaExceededError,
    "InternalServerException": ServerError,
    "ServiceException": ServerError,
    "InsufficientCapacityException": ServerError,
}

_BY_STATUS = {
    400: ValidationError,
    402: QuotaExceededError,
    403: AccessDeniedError,
    404: NotFoundError,
    409: ConflictError,
    429: ThrottlingError,
}


def error_for(code: str, message: str, status: Optional[int]) -> ApiError:
    """The typed exception for an AWS error code, falling back on the HTTP
    status when the code is unknown."""
    cls = _BY_CODE.get(code)
    if cls is None and status is not None:
        cls = _BY_STATUS.get(status, ServerError if status >= 500 else ApiError)
    return (cls or ApiError)(message or code or f"HTTP {status}", code=code, status=status)


def from_client_error(err) -> ApiError:
    """Maps a botocore ``ClientError``."""
    error = err.response.get("Error", {})
    status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return error_for(error.get("Code", ""), error.get("Message", ""), status)


def from_response(response) -> ApiError:
    """Maps an error answer of a ``requests`` response (an extension route of
    the API, or the endpoint's agent API, whose bodies are ``{"message"}``)."""
    code = response.headers.get("x-amzn-errortype", "").split(":", 1)[0]
    message = ""
    try:
        body = response.json()
        if isinstance(body, dict):
            message = body.get("message") or body.get("Message") or ""
            code = code or str(body.get("__type", "")).rsplit("#", 1)[-1]
    except ValueError:
        message = response.text[:500]
    return error_for(code, message, response.status_code)
