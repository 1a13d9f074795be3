"""The guard's gRPC face: the Open Inference Protocol's ``GRPCInferenceService``.

Served by grpcio's asyncio server on its own port (``guard serve --grpc-port``; Triton
serves gRPC on 8001), beside the REST listener and on the same event loop. It is
started and stopped with the public aiohttp application (:func:`add_grpc_listener`
adds a ``cleanup_ctx``), and shares everything with it: the policy in force (reloads
included), the pipeline, clients, admission, metrics (``protocol="grpc"``) and audit.
``ModelInfer`` runs through :func:`guard.server.serve_inference`, the path REST
requests take.

* **Clients** are identified as over REST: the API key travels in the call's metadata
  under the policy's ``clients.header``, lowercased (``x-api-key``); without a keys
  file, by the peer's address. Metadata is read case-insensitively, like headers.
* **Errors** are gRPC status codes carrying the message a REST client reads in
  ``{"error": ...}`` (:data:`STATUS_CODES`: 400 ``INVALID_ARGUMENT``, 401
  ``UNAUTHENTICATED``, 403 ``PERMISSION_DENIED``, 404 ``NOT_FOUND``, 429
  ``RESOURCE_EXHAUSTED``, 503 ``UNAVAILABLE``, ...).
* **Headers** a REST answer carries come back as trailing metadata, lowercased:
  ``x-request-id`` (the client's ``x-request-id`` metadata when it is short
  printable ASCII), and, when the policy exposes them, ``x-guard-verdict`` and the
  other ``x-guard-*`` headers; ``retry-after`` with a 429. Trailing rather than
  initial metadata: it travels with the status in one batch (sending initial
  metadata separately cost about 15% of gRPC throughput in ``bench_grpc.py``).
* **Messages** larger than ``limits.max_body_bytes`` (as in force at startup) are
  refused by grpcio with ``RESOURCE_EXHAUSTED``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc
from aiohttp import web
from multidict import CIMultiDict

from guard import __version__
from guard.appkeys import LIVE, METRICS
from guard.errors import GuardError, PayloadTooLarge, RateLimited
from guard.inference import InferRequest, InferResponse
from guard.protocols.grpc import codec
from guard.protocols.grpc import inference_pb2 as pb
from guard.runtime import Runtime
from guard.server import (
    SERVER_NAME,
    Refusal,
    _request_id,
    count_refusal,
    serve_inference,
)

__all__ = ["GRPC", "STATUS_CODES", "GrpcListener", "add_grpc_listener", "status_code"]

log = logging.getLogger(__name__)

SERVICE = "inference.GRPCInferenceService"
GRACE_SECONDS = 10.0
INTERNAL_MESSAGE = "internal error in the guard"

# HTTP status of a GuardError -> gRPC status code.
STATUS_CODES: dict[int, grpc.StatusCode] = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    408: grpc.StatusCode.DEADLINE_EXCEEDED,
    409: grpc.StatusCode.ABORTED,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    415: grpc.StatusCode.INVALID_ARGUMENT,
    422: grpc.StatusCode.INVALID_ARGUMENT,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    500: grpc.StatusCode.INTERNAL,
    501: grpc.StatusCode.UNIMPLEMENTED,
    502: grpc.StatusCode.UNKNOWN,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}


def status_code(http_status: int) -> grpc.StatusCode:
    """The gRPC code for an HTTP status; other 4xx are ``INVALID_ARGUMENT``, other
    5xx ``UNKNOWN``."""
    code = STATUS_CODES.get(http_status)
    if code is not None:
        return code
    return grpc.StatusCode.INVALID_ARGUMENT if http_status < 500 else grpc.StatusCode.UNKNOWN


@dataclass(slots=True)
class GrpcListener:
    """Where the gRPC listener binds; ``port`` 0 picks a free one, and holds the bound
    port once the app has started. ``tls``: ``(cert, key)`` PEM files, else plaintext."""

    host: str
    port: int
    tls: tuple[Path, Path] | None = None
    server: grpc.aio.Server | None = None


GRPC: web.AppKey[GrpcListener] = web.AppKey("grpc")


def add_grpc_listener(
    app: web.Application, host: str, port: int, *, tls: tuple[Path, Path] | None = None
) -> GrpcListener:
    """Serve ``app``'s models over gRPC on ``host:port`` while ``app`` runs.

    Call it after :func:`guard.server.create_app` and before the app starts: the
    listener starts after the runtime is built and stops (draining calls in flight for
    up to ``GRACE_SECONDS``) before it is closed. A port that cannot be bound fails
    the app's startup with an ``OSError`` naming it.
    """
    listener = GrpcListener(host, port, tls)
    app[GRPC] = listener
    app.cleanup_ctx.append(_lifecycle(listener))
    return listener


def _lifecycle(listener: GrpcListener) -> Callable[[web.Application], AsyncIterator[None]]:
    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        limits = app[LIVE].current().policy.limits
        server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", limits.max_body_bytes),
                ("grpc.max_send_message_length", -1),
                ("grpc.so_reuseport", 0),
            ]
        )
        server.add_generic_rpc_handlers((_handlers(Service(app)),))
        address = f"{listener.host}:{listener.port}"
        try:
            if listener.tls is None:
                bound = server.add_insecure_port(address)
            else:
                cert, key = (path.read_bytes() for path in listener.tls)
                credentials = grpc.ssl_server_credentials([(key, cert)])
                bound = server.add_secure_port(address, credentials)
        except RuntimeError as exc:  # grpcio's "Failed to bind to address"
            raise OSError(f"cannot listen for gRPC on {address}: {exc}") from None
        if not bound:
            raise OSError(f"cannot listen for gRPC on {address}")
        await server.start()
        listener.port, listener.server = bound, server
        try:
            yield
        finally:
            await server.stop(GRACE_SECONDS)
            listener.server = None

    return lifecycle


def _handlers(service: Service) -> grpc.GenericRpcHandler:
    def unary(
        method: Callable[..., Awaitable[Any]], request: Any, response: Any
    ) -> grpc.RpcMethodHandler:
        return grpc.unary_unary_rpc_method_handler(
            method,
            request_deserializer=request.FromString,
            response_serializer=response.SerializeToString,
        )

    return grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "ServerLive": unary(service.server_live, pb.ServerLiveRequest, pb.ServerLiveResponse),
            "ServerReady": unary(
                service.server_ready, pb.ServerReadyRequest, pb.ServerReadyResponse
            ),
            "ServerMetadata": unary(
                service.server_metadata, pb.ServerMetadataRequest, pb.ServerMetadataResponse
            ),
            "ModelReady": unary(service.model_ready, pb.ModelReadyRequest, pb.ModelReadyResponse),
            "ModelMetadata": unary(
                service.model_metadata, pb.ModelMetadataRequest, pb.ModelMetadataResponse
            ),
            # bytes in, bytes out: parsed and encoded by the shared inference path
            "ModelInfer": grpc.unary_unary_rpc_method_handler(service.model_infer),
        },
    )


T = TypeVar("T")


class Service:
    """The RPCs, each answering from the app's current runtime."""

    def __init__(self, app: web.Application) -> None:
        self.app = app
        self.live = app[LIVE]
        self.metrics = app[METRICS]

    # -- health and metadata ---------------------------------------------------

    async def server_live(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return pb.ServerLiveResponse(live=True)

    async def server_ready(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return pb.ServerReadyResponse(ready=self.live.runtime is not None)

    async def server_metadata(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=__version__, extensions=[])

    async def model_ready(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        async def answer() -> Any:
            model = await self._model(request, context)
            return pb.ModelReadyResponse(ready=await model.backend.ready())

        return await self._guarded("ModelReady", context, answer)

    async def model_metadata(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        async def answer() -> Any:
            metadata = await (await self._model(request, context)).metadata()
            versions = [request.version] if request.version else list(metadata.versions)
            return pb.ModelMetadataResponse(
                name=request.name,
                versions=versions,
                platform=metadata.platform,
                inputs=[_tensor(t) for t in metadata.inputs],
                outputs=[_tensor(t) for t in metadata.outputs],
            )

        return await self._guarded("ModelMetadata", context, answer)

    async def _model(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        """The model ``request`` names, for a client allowed to call it (as REST's)."""
        runtime = self.live.current()
        clients = runtime.policy.clients
        clients.authorize(clients.identify(_metadata(context), _remote(context)), request.name)
        model = runtime.model(request.name)
        await model.require_version(request.version or None)
        return model

    # -- inference -------------------------------------------------------------

    async def model_infer(self, body: bytes, context: grpc.aio.ServicerContext) -> bytes:
        headers = _metadata(context)
        request_id = _request_id(headers.get("x-request-id"))
        live = self.live

        async def answer() -> bytes:
            try:
                message = codec.parse(body)
            except GuardError as exc:  # not even a message: refused before identification
                runtime = live.current()
                count_refusal(self.app, runtime, "unknown", "grpc", exc)
                refusal = {"X-Request-Id": request_id}
                if runtime.policy.expose_headers:
                    refusal["X-Guard-Verdict"] = "deny"
                raise Refusal(exc, refusal) from None

            async def read(runtime: Runtime, client: str) -> tuple[InferRequest, Any]:
                limits = runtime.policy.limits
                if len(body) > limits.max_body_bytes:
                    raise PayloadTooLarge(
                        f"message of {len(body)} bytes exceeds the limit of {limits.max_body_bytes}"
                    )
                rate = limits.parse_bytes_per_second
                burst = max(rate, limits.max_body_bytes)
                live.meter.spend(client, len(body), rate=rate, burst=burst)
                if live.decoder.offloads(len(body)):  # large typed contents: off the loop
                    request = await live.decoder(codec.decode_request, body)
                else:
                    request = codec.request_from(message)
                return request, _encode

            payload, answer_headers = await serve_inference(
                self.app,
                model_name=message.model_name,
                version=message.model_version or None,
                protocol="grpc",
                request_id=request_id,
                headers=headers,
                remote=_remote(context),
                read=read,
            )
            context.set_trailing_metadata(_outgoing(answer_headers))
            return payload

        return await self._guarded("ModelInfer", context, answer, request_id=request_id)

    # -- errors ----------------------------------------------------------------

    async def _guarded(
        self,
        method: str,
        context: grpc.aio.ServicerContext,
        answer: Callable[[], Awaitable[T]],
        *,
        request_id: str | None = None,
    ) -> T:
        """``answer()``, or an abort with the gRPC code and message of its error."""
        started = time.perf_counter()
        try:
            return await answer()
        except Refusal as refusal:
            error, headers = refusal.error, refusal.headers
        except GuardError as exc:  # outside the inference path (health, metadata, startup)
            self.metrics.errors.labels(type(exc).__name__).inc()
            error, headers = exc, {} if request_id is None else {"X-Request-Id": request_id}
        except asyncio.CancelledError:
            raise
        except Exception:
            self.metrics.errors.labels("internal").inc()
            log.exception(
                "unhandled error serving gRPC %s after %.3f s",
                method,
                time.perf_counter() - started,
                extra={"method": method, "protocol": "grpc"},
            )
            error, headers = GuardError(INTERNAL_MESSAGE), {}
        trailing = dict(headers)
        if isinstance(error, RateLimited) and error.retry_after is not None:
            trailing["Retry-After"] = str(max(1, round(error.retry_after)))
        await context.abort(status_code(error.status), _details(error.message), _outgoing(trailing))
        raise AssertionError("unreachable")  # pragma: no cover  (abort raises)


def _encode(response: InferResponse, request: InferRequest) -> tuple[bytes, dict[str, str]]:
    return codec.encode_response(response, request), {}


def _tensor(spec: Any) -> Any:
    return pb.ModelMetadataResponse.TensorMetadata(
        name=spec.name, datatype=spec.datatype, shape=list(spec.shape)
    )


def _metadata(context: grpc.aio.ServicerContext) -> CIMultiDict[str]:
    """The call's metadata as a case-insensitive multi-map, as HTTP headers are read
    (binary ``-bin`` entries left out)."""
    entries = context.invocation_metadata() or ()
    return CIMultiDict((k, v) for k, v in entries if isinstance(v, str))


def _outgoing(headers: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    """Headers as gRPC metadata: lowercase keys, printable ASCII values only."""
    return tuple((k.lower(), v) for k, v in headers.items() if v.isascii() and v.isprintable())


def _remote(context: grpc.aio.ServicerContext) -> str | None:
    """The peer's address as aiohttp's ``request.remote`` spells it: ``ipv4:1.2.3.4:5``
    is ``1.2.3.4``, ``ipv6:[::1]:5`` is ``::1``; a Unix socket gives its path."""
    peer = context.peer() or ""
    kind, _, rest = peer.partition(":")
    if kind == "ipv4":
        return rest.rpartition(":")[0] or None
    if kind == "ipv6":
        host = rest.rpartition(":")[0]
        return host.strip("[]").replace("%25", "%") or None
    return rest or None


def _details(message: str) -> str:
    """A status message gRPC can carry: valid UTF-8 (a lone surrogate from the client's
    input is escaped)."""
    return message.encode("utf-8", "backslashreplace").decode("utf-8")
