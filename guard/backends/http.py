"""A V2 (Open Inference Protocol) upstream over HTTP.

The request is re-encoded for the upstream, so a client that sends binary
tensors reaches an upstream that speaks only JSON (MLServer) unchanged. Faults
map to clear statuses: unreachable → 503, broken or garbled answer → 502,
too slow → 504; an upstream's own 4xx is passed on with its message.

A client reads which model's upstream failed and how (``upstream for model
digits is unreachable``), never its URL, address or the socket error: those go
to the log (the ``guard.backends.http`` logger, escaped like every log line).

Exchanges go through the application's :class:`~guard.backends.upstream.UpstreamClient`
(pooled keep-alive HTTP/1.1 connections, one write a request, a hand parser).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from guard.backends.upstream import (
    BrokenExchange,
    ConnectError,
    Origin,
    ResponseTooLarge,
    UpstreamClient,
    header_block,
    quote_path,
)
from guard.errors import (
    PolicyError,
    RequestError,
    UpstreamError,
    UpstreamRejected,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from guard.inference import InferRequest, InferResponse, ModelMetadata, TensorSpec
from guard.logs import quote
from guard.protocols import v2

log = logging.getLogger(__name__)
LOG_EVERY_S = 10.0
_HEADER_LENGTH = v2.HEADER_LENGTH.lower()  # the client's header names are in lower case


@dataclass(frozen=True, kw_only=True, slots=True)
class UpstreamConfig:
    url: str
    model: str | None = None  # the upstream's name for the model; default: the policy's name
    version: str | None = None
    timeout: float = 30.0
    connect_timeout: float = 2.0
    binary: bool = False  # send binary tensors (Triton); JSON suits every V2 server
    retries: int = 1  # on a dropped connection (never on a timeout)
    headers: Mapping[str, str] = field(default_factory=dict)


class HttpBackend:
    def __init__(
        self, config: UpstreamConfig, *, name: str, session: UpstreamClient | None
    ) -> None:
        self.config = config
        self.name = name
        self.session = session
        model = config.model or name
        try:
            self._origin = Origin.parse(config.url.rstrip("/"))
        except ValueError as exc:
            raise PolicyError(f"model {name}: upstream.url: {exc}") from None
        self._model_path = f"{self._origin.prefix}/v2/models/{quote_path(model)}"
        if config.version:
            self._model_path += f"/versions/{quote_path(config.version)}"
        self._headers = dict(config.headers)
        try:
            self._header_block = header_block(self._headers)
        except ValueError as exc:
            raise PolicyError(f"model {name}: upstream.headers: {exc}") from None
        self._overridable = bool(
            {k.lower() for k in self._headers} & {"content-type", _HEADER_LENGTH, "x-request-id"}
        )
        self._logged: dict[str, float] = {}  # failure kind -> when it was last logged
        self._quiet: dict[str, int] = {}  # failure kind -> lines left out since

    async def infer(self, request: InferRequest, *, passthrough: bool = False) -> InferResponse:
        body, headers = v2.encode_request(request, binary=self.config.binary)
        if request.id and _header_safe(request.id):  # the id is the client's: any string
            headers["X-Request-Id"] = request.id
        # Ours (a content type, a length, an id checked above) need no checking.
        block = "".join([f"{k}: {v}\r\n" for k, v in headers.items()])
        if self._overridable:  # the request's own headers win over the configured ones
            ours = {k.lower() for k in headers}
            block += "".join(
                f"{k}: {v}\r\n" for k, v in self._headers.items() if k.lower() not in ours
            )
        else:
            block += self._header_block
        status, reply_headers, payload = await self._call("POST", "/infer", body, block)
        if status != 200:
            raise self._rejected(status, payload)
        length = reply_headers.get(_HEADER_LENGTH)
        if passthrough and length is None and self._same_names(request) and _is_v2_json(payload):
            # Nothing reads the outputs and the client wants JSON: skip building
            # arrays and re-encoding them (the request itself was re-encoded).
            return InferResponse(model_name=request.model_name, outputs={}, raw=payload)
        try:
            header_length = v2.parse_header_length(length)
        except RequestError as exc:
            raise UpstreamError(f"upstream sent a bad {exc.message}") from None
        response = v2.decode_response(payload, header_length=header_length)
        # The client asked us, not the upstream: answer in our model's name.
        response.model_name = request.model_name
        if request.model_version is not None:
            response.model_version = request.model_version
        if response.id is None:
            response.id = request.id
        return response

    def _same_names(self, request: InferRequest) -> bool:
        """Whether the upstream answers under the model name and version the client used."""
        return (
            self.config.model in (None, self.name)
            and self.config.version is None
            and request.model_version is None
        )

    async def metadata(self) -> ModelMetadata:
        status, _, payload = await self._call("GET", "", None, self._header_block)
        if status != 200:
            raise self._rejected(status, payload)
        try:
            body = orjson.loads(payload)
            return ModelMetadata(
                name=self.name,
                platform=str(body.get("platform", "")),
                inputs=tuple(_spec(t) for t in body.get("inputs", ())),
                outputs=tuple(_spec(t) for t in body.get("outputs", ())),
                versions=tuple(str(v) for v in body.get("versions", ()) or ()),
            )
        except (orjson.JSONDecodeError, AttributeError, KeyError, TypeError, ValueError) as exc:
            self._log("sent unreadable model metadata: %s", exc)
            raise UpstreamError(
                f"upstream for model {self.name} sent unreadable model metadata"
            ) from exc

    async def ready(self) -> bool:
        try:
            status, _, _ = await self._call("GET", "/ready", None, self._header_block)
        except UpstreamError:
            return False
        return status == 200

    async def close(self) -> None:
        """The client belongs to the application; nothing to close here."""

    async def _call(
        self, method: str, suffix: str, body: bytes | None, headers: str
    ) -> tuple[int, Mapping[str, str], bytes]:
        """One exchange with the upstream, retried on a dropped connection.

        Servers close idle or failed keep-alive connections (uvicorn does after a
        500), and the next request on that pooled connection fails at once.
        Inference has no side effects, so such failures are retried
        ``retries`` times on a fresh connection; timeouts are not retried, nor are
        refused connections or answers over the client's size cap.
        """
        path = self._model_path + suffix
        client = self.session
        if client is None:  # built only to be checked (guard check)
            raise UpstreamUnavailable(f"upstream for model {self.name} has no client session")
        config = self.config
        attempt = 0
        while True:
            try:
                reply = await client.request(
                    self._origin,
                    method,
                    path,
                    body,
                    headers,
                    timeout=config.timeout,
                    connect_timeout=config.connect_timeout,
                )
                return reply.status, reply.headers, reply.body
            except asyncio.TimeoutError as exc:
                self._log(f"did not answer {method} {suffix or '/'} in {config.timeout:g} s")
                raise UpstreamTimeout(
                    f"upstream for model {self.name} did not answer in time"
                ) from exc
            except ConnectError as exc:
                self._log("is unreachable", exc.strerror)
                raise UpstreamUnavailable(f"upstream for model {self.name} is unreachable") from exc
            except ResponseTooLarge as exc:
                self._log("sent too large an answer", exc)
                raise UpstreamError(f"upstream for model {self.name} failed") from exc
            except (BrokenExchange, OSError) as exc:
                attempt += 1
                if attempt > self.config.retries:
                    self._log(f"failed after {attempt} attempt(s)", f"{type(exc).__name__}: {exc}")
                    raise UpstreamError(f"upstream for model {self.name} failed") from exc

    def _log(self, event: str, detail: object | None = None) -> None:
        """What a client is not told: which URL failed, how, and why (``detail``, quoted:
        a socket error's or an upstream's text is not ours).

        At most one line per kind of failure every ``LOG_EVERY_S`` seconds, with the
        number left out since: an outage under load must not turn every request into a
        log line (nor let a client write the log at its own rate through ``/ready``).
        """
        now = time.monotonic()
        last = self._logged.get(event)
        if last is not None and now - last < LOG_EVERY_S:
            self._quiet[event] = self._quiet.get(event, 0) + 1
            return
        self._logged[event] = now
        quiet = self._quiet.pop(event, 0)
        log.warning(
            "model %s: upstream %s %s%s%s",
            self.name,
            self.config.url,
            event,
            "" if detail is None else f": {quote(detail)}",
            f" ({quiet} more like it since the last such line)" if quiet else "",
            extra={"model": self.name, "upstream": self.config.url},
        )

    def _rejected(self, status: int, payload: bytes) -> UpstreamError:
        message = _error_message(payload)
        if 400 <= status < 500:  # about the request: the upstream's own message is passed on
            return UpstreamRejected(f"upstream: {message}", status=status)
        self._log(f"answered {status}", message)
        what = f"upstream for model {self.name} answered {status}"
        if status in (503, 504):
            cls = UpstreamUnavailable if status == 503 else UpstreamTimeout
            return cls(what)
        return UpstreamError(what)


def _is_v2_json(payload: bytes) -> bool:
    """A cheap shape check before an answer is passed on undecoded."""
    try:
        doc = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return False
    return isinstance(doc, dict) and isinstance(doc.get("outputs"), list)


def _error_message(payload: bytes) -> str:
    """The upstream's own message, only when it is one: a JSON ``error`` or ``detail``.

    Plain-text bodies are not repeated to the client: some servers answer 500
    with a whole Python traceback (MLServer in its default debug mode).
    """
    try:
        body: Any = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return "no readable message"
    if not isinstance(body, dict):
        return "no readable message"
    if isinstance(body.get("error"), str):
        return body["error"][:500]
    detail = body.get("detail")  # FastAPI-based servers (MLServer) answer 422 this way
    if isinstance(detail, str):
        return detail[:500]
    if isinstance(detail, list) and detail and isinstance(detail[0], dict):
        first = detail[0]
        where = ".".join(str(part) for part in first.get("loc", ()))
        return f"{where}: {first.get('msg', 'invalid')}"[:500]
    return "no readable message"


def _spec(tensor: Mapping[str, Any]) -> TensorSpec:
    return TensorSpec(
        str(tensor["name"]), str(tensor["datatype"]), tuple(int(d) for d in tensor["shape"])
    )


def _header_safe(value: str) -> bool:
    """Whether ``value`` can be sent as a header value as it is (short printable ASCII)."""
    return len(value) <= 256 and value.isascii() and value.isprintable()
