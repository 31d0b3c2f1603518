"""The error hierarchy of sdq. The HTTP layer maps these to status codes in one place."""

from __future__ import annotations


class SdqError(Exception):
    """Base of every error sdq raises on purpose."""

    status_code = 500
    message = "internal error"

    #: The message is written for a job's owner (no endpoint, path or library text).
    public = False

    def __init__(self, message: str | None = None, **details: object) -> None:
        self.message = message or self.message
        #: Extra fields for the error body (a job id, the credits left).
        self.details = details
        super().__init__(self.message)


class InvalidRequest(SdqError, ValueError):
    status_code = 400
    message = "invalid request"


class AuthError(SdqError):
    """No credentials at all (401)."""

    status_code = 401
    message = "missing API key: send it in the Authorization header"


class Forbidden(AuthError):
    """Credentials that do not match a key (403)."""

    status_code = 403
    message = "invalid API key"


class NotFound(SdqError, LookupError):
    status_code = 404
    message = "not found"


class Conflict(SdqError):
    status_code = 409
    message = "conflict"


class InsufficientCredits(SdqError):
    status_code = 429
    message = "not enough credits"


class RateLimited(SdqError):
    """Over one of the key's limits (rate, jobs at once, streams): wait ``retry_after``."""

    status_code = 429
    message = "rate limit exceeded"

    def __init__(self, message: str | None = None, *, retry_after: float = 1.0, **details: object):
        super().__init__(message, **details)
        self.retry_after = retry_after


class PayloadTooLarge(SdqError):
    status_code = 413
    message = "request body too large"


class StorageError(SdqError, OSError):
    status_code = 503
    message = "object storage unavailable"


class ModelLoadError(SdqError, RuntimeError):
    message = "the model could not be loaded"


class ModelNotHere(ModelLoadError):
    """This worker does not serve the job's model or tier, in words for the job's owner."""

    public = True


class HardwareMismatch(SdqError, RuntimeError):
    """A worker was asked to serve a tier its device does not qualify for."""

    message = "this device cannot serve the tier"


class RemoteApiError(SdqError):
    status_code = 502
    message = "the remote API failed"


class JobTimeout(SdqError, TimeoutError):
    status_code = 504
    message = "the job did not finish within the wait limit"
