"""The one exception tree of the guard.

Every error a client can see carries its HTTP status and a message that names
the offending field. The error boundary in :mod:`guard.server` turns any
:class:`GuardError` into the protocol's own error body; anything else becomes a
500 with a generic message and a log line (never a stack trace to the client).

::

    GuardError
    ├── RequestError            400  the request is malformed or violates the policy's input rules
    │   ├── PayloadTooLarge     413
    │   └── UnsupportedMediaType 415
    ├── Unauthorized            401  missing or unknown API key / admin token
    ├── Forbidden               403  client may not call this model
    ├── Denied                  403  a stage's finding with action ``deny``
    ├── NotFound                404  unknown model or version
    ├── RateLimited             429  budget or quota exhausted (``retry_after`` seconds)
    ├── Overloaded              503  the guard itself sheds load
    │   └── StateUnavailable    503  the shared state store (Redis) failed or timed out
    └── UpstreamError           502  the upstream answered garbage or an error we cannot pass on
        ├── UpstreamRejected    4xx/5xx passed through with the upstream's own message
        ├── UpstreamUnavailable 503  connection refused / reset
        └── UpstreamTimeout     504

    PolicyError                      a policy or keys file is invalid (load time, never per request)
    UsageError                       an offline command's model or data cannot be used as named

What a client reads is only ever the message: upstream errors name the model, never
the upstream's URL or socket address (those go to the log). A refusal from the
pipeline (deny, quota, a stage's own failure) passes through :func:`withheld` unless
the policy's ``disclose.reasons`` is true, so it names neither stage nor threshold.
"""

from __future__ import annotations


class GuardError(Exception):
    """An error with an HTTP status and a client-safe message."""

    status: int = 500

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status

    def __str__(self) -> str:
        return self.message

    def __reduce__(self) -> tuple[object, ...]:
        # Decoding may run in a worker process: its errors cross back pickled, with
        # their status (and a subclass's own attributes such as ``retry_after``).
        return (_rebuild, (type(self), self.message, dict(self.__dict__)))


def _rebuild(cls: type[GuardError], message: str, attributes: dict[str, object]) -> GuardError:
    error = cls.__new__(cls)
    Exception.__init__(error, message)
    error.__dict__.update(attributes)
    return error


class RequestError(GuardError):
    status = 400


class PayloadTooLarge(RequestError):
    status = 413


class UnsupportedMediaType(RequestError):
    status = 415


class Unauthorized(GuardError):
    status = 401


class Forbidden(GuardError):
    status = 403


class Denied(GuardError):
    status = 403


class NotFound(GuardError):
    status = 404


class RateLimited(GuardError):
    status = 429

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Overloaded(GuardError):
    status = 503


class StateUnavailable(Overloaded):
    """The state store failed; the stage that needed it applies its ``on_error``."""


class UpstreamError(GuardError):
    status = 502


class UpstreamRejected(UpstreamError):
    """The upstream refused the request; its status and message are passed on."""


class UpstreamUnavailable(UpstreamError):
    status = 503


class UpstreamTimeout(UpstreamError):
    status = 504


REFUSED = "request refused by policy"
UNAVAILABLE = "the guard cannot serve this request now; try again shortly"


def withheld(exc: GuardError) -> GuardError:
    """``exc`` as a client sees it when the policy does not disclose reasons.

    A deny (403) says only that the policy refused; a quota (429) keeps its
    ``retry_after`` and says when to retry, not which quota or how many were
    used; a stage's failure or a state-store outage (503) names neither. Other
    errors (the client's own input, upstream errors) are returned unchanged.
    """
    if isinstance(exc, Denied):
        return Denied(REFUSED)
    if isinstance(exc, RateLimited):
        when = "" if exc.retry_after is None else f"; retry in {max(1, round(exc.retry_after))} s"
        return RateLimited(f"quota exhausted for this model{when}", retry_after=exc.retry_after)
    if type(exc) in (Overloaded, StateUnavailable):
        return Overloaded(UNAVAILABLE)
    return exc


class PolicyError(Exception):
    """A policy, keys file or model file is invalid. Raised at load, never per request."""


class UsageError(Exception):
    """An offline command (attack, tune, certify, calibrate-squeeze) was pointed at a
    model or data it cannot use, or something it needs is unknown; the message names the
    flag that supplies it. ``guard`` exits 2 with the message on one line."""
