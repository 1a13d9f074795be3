"""The HTTP face of the guard: V2 and TF Serving routes and health on the public
listener (:func:`create_app`); metrics and admin on the operators' (:func:`create_ops_app`).

One request: identify the client, read the body (bounded), decode it into an
:class:`~guard.inference.InferRequest`, run the model's pipeline, encode the
answer in the protocol the client spoke. Every error leaves through
:func:`error_boundary` as ``{"error": "..."}`` with its status.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path

import orjson
from aiohttp import web
from aiohttp.web_protocol import RequestPayloadError
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from guard import __version__
from guard.appkeys import EXPOSITION, LIVE, METRICS, ON_RELOAD, POLICY_PATH, PUBLIC, SESSION
from guard.backends.upstream import UpstreamClient
from guard.clients import token_matches
from guard.config import IDLE_TIMEOUT, Limits, Policy, load_policy
from guard.errors import (
    GuardError,
    NotFound,
    Overloaded,
    PayloadTooLarge,
    PolicyError,
    RateLimited,
    RequestError,
    Unauthorized,
    withheld,
)
from guard.inference import InferRequest, InferResponse
from guard.live import Live
from guard.logs import quote
from guard.metrics import GuardMetrics
from guard.pipeline import RequestContext
from guard.protocols import tfserving, v2
from guard.runtime import Runtime, build_runtime
from guard.state import StateConfig, StateStore, build_store

if sys.version_info >= (3, 11):
    from asyncio import timeout as _deadline
else:  # aiohttp depends on async-timeout before 3.11
    from async_timeout import timeout as _deadline

log = logging.getLogger(__name__)

JSON = "application/json"
MAX_REQUEST_ID = 128
SERVER_NAME = "inference-guard"


def create_app(
    policy: Policy,
    *,
    registry: CollectorRegistry | None = None,
    policy_path: str | Path | None = None,
) -> web.Application:
    """The guard's public application: the inference protocols and health, nothing else.

    ``policy_path`` enables reloads (through :func:`create_ops_app`'s admin routes,
    or :func:`reload_policy` on SIGHUP).
    """
    app = web.Application(
        middlewares=[error_boundary], client_max_size=policy.limits.max_body_bytes
    )
    app[LIVE] = Live()
    app[METRICS] = GuardMetrics(registry)
    app[METRICS].info.info({"version": __version__})
    app[POLICY_PATH] = Path(policy_path) if policy_path is not None else None
    app.cleanup_ctx.append(_state_lifecycle(policy))
    app.cleanup_ctx.append(_lifecycle(policy))
    app.add_routes(
        [
            web.get("/v2/health/live", health_live),
            web.get("/v2/health/ready", health_ready),
            web.get("/v2", server_metadata),
            web.get("/v2/models/{model}", model_metadata),
            web.get("/v2/models/{model}/versions/{version}", model_metadata),
            web.get("/v2/models/{model}/ready", model_ready),
            web.get("/v2/models/{model}/versions/{version}/ready", model_ready),
            web.post("/v2/models/{model}/infer", v2_infer),
            web.post("/v2/models/{model}/versions/{version}/infer", v2_infer),
            web.get("/", server_alive),
            web.get(r"/v1/models/{model:[^/:]+}", tf_status),
            web.get(r"/v1/models/{model:[^/:]+}/versions/{version:[^/:]+}", tf_status),
            web.get(r"/v1/models/{model:[^/:]+}/metadata", tf_metadata),
            web.get(r"/v1/models/{model:[^/:]+}/versions/{version:[^/:]+}/metadata", tf_metadata),
            web.post(r"/v1/models/{model:[^/:]+}:predict", tf_predict),
            web.post(r"/v1/models/{model:[^/:]+}/versions/{version:[^/:]+}:predict", tf_predict),
            web.post(r"/v1/models/{model:[^/:]+}:{method:classify|regress}", tf_unsupported),
            web.post(
                r"/v1/models/{model:[^/:]+}/versions/{version:[^/:]+}:{method:classify|regress}",
                tf_unsupported,
            ),
        ]
    )
    return app


def create_ops_app(
    public: web.Application,
    *,
    exposition: CollectorRegistry | None = None,
    on_reload: Callable[[], None] | None = None,
) -> web.Application:
    """The operators' application for ``public``: ``/metrics`` and ``/admin/*``.

    It serves on its own listener (``listen.metrics_host``/``metrics_port``), never
    on the public port: a client that could read ``guard_findings_total`` would see
    its own request being flagged or degraded. It holds no state of its own: the
    handlers read the public app's runtime, metrics and policy path, so the two
    share one ``Live`` and one registry, and a reload from here swaps what the
    public port serves. Start it with its own runner next to ``public``'s.

    With workers (``guard serve --workers N``), ``exposition`` is the registry that
    ``/metrics`` serves instead of ``public``'s (the sum over every worker, read from
    their files off the event loop), and ``on_reload`` runs after a successful
    ``/admin/reload`` (to have the other workers reload too).
    """
    app = web.Application(middlewares=[error_boundary])
    app[PUBLIC] = public
    app[METRICS] = public[METRICS]
    if exposition is not None:
        app[EXPOSITION] = exposition
    if on_reload is not None:
        app[ON_RELOAD] = on_reload
    app.add_routes(
        [
            web.get("/metrics", metrics),
            web.post("/admin/reload", admin_reload),
            web.get("/admin/status", admin_status),
        ]
    )
    return app


def _lifecycle(policy: Policy) -> Callable[[web.Application], AsyncIterator[None]]:
    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        session = UpstreamClient(limit=256)  # keep-alive connections per upstream
        app[SESSION] = session
        live = app[LIVE]
        live.decoder.threshold = policy.limits.offload_decode_bytes
        try:
            live.runtime = build_runtime(
                policy, session=session, state=live.state, metrics=app[METRICS]
            )
            yield
        finally:
            if live.runtime is not None:
                await live.runtime.close()
            live.decoder.close()
            await session.close()

    return lifecycle


def _state_lifecycle(policy: Policy) -> Callable[[web.Application], AsyncIterator[None]]:
    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        live = app[LIVE]
        live.state = _open_store(app, policy.state)
        try:
            yield
        finally:
            for store in list(live.stores):
                await store.close()
            live.stores.clear()

    return lifecycle


def _open_store(app: web.Application, config: StateConfig) -> StateStore:
    """A state store whose failures are counted in ``guard_state_errors_total``."""
    errors = app[METRICS].state_errors
    store = build_store(config, on_error=lambda op: errors.labels(config.backend, op).inc())
    app[LIVE].stores.add(store)
    return store


def make_runner(
    app: web.Application,
    *,
    access_log: logging.Logger | None = None,
    idle_timeout: float = IDLE_TIMEOUT,
) -> web.AppRunner:
    """The runner ``guard serve`` and ``guard demo`` use.

    After refusing a body unread (413), aiohttp drains the rest of it for up to
    ``lingering_time`` seconds so the client can read the answer; its default of
    10 s holds a connection (and shutdown) for a client that stopped sending.
    ``idle_timeout`` (``limits.idle_timeout``) closes a connection idle between
    requests, or still sending its first request's headers, after that many
    seconds; aiohttp's own default is an hour.
    """
    _quiet_client_faults()
    return web.AppRunner(
        app,
        access_log=access_log,
        handle_signals=False,
        lingering_time=1.0,
        keepalive_timeout=idle_timeout,
    )


class _ClientFaultFilter(logging.Filter):
    """aiohttp logs a traceback when a body the guard refused unread turns out broken
    as aiohttp drains it after the answer (a lying ``Content-Encoding``), or its client
    vanished: the client's fault, not the guard's. Logged as one warning line instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, (RequestPayloadError, ConnectionResetError, BrokenPipeError)):
            record.msg, record.args = "client sent a broken body: %s", (_first_line(exc),)
            record.exc_info = record.exc_text = None
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return ascii(" ".join(line.strip() for line in text))[1:-1][:200] or type(exc).__name__


_CLIENT_FAULTS = _ClientFaultFilter()


def _quiet_client_faults() -> None:
    server_log = logging.getLogger("aiohttp.server")
    if _CLIENT_FAULTS not in server_log.filters:
        server_log.addFilter(_CLIENT_FAULTS)


# -- error boundary -----------------------------------------------------------


@web.middleware
async def error_boundary(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Turn every failure into the protocol's error body; never leak a stack trace."""
    metrics = request.app[METRICS]
    try:
        return await handler(request)
    except GuardError as exc:
        metrics.errors.labels(type(exc).__name__).inc()
        return error_response(exc)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        metrics.errors.labels(f"http_{exc.status}").inc()
        return _json_error(
            exc.reason if exc.status != 404 else f"no route for {request.path}", exc.status
        )
    except ClientGone:  # nobody to answer: count it, close quietly
        metrics.errors.labels("client_gone").inc()
        response = web.Response(status=400)
        response.force_close()
        return response
    except asyncio.CancelledError:
        raise
    except Exception:
        metrics.errors.labels("internal").inc()
        log.exception(
            "unhandled error serving %s %s",
            request.method,  # an HTTP token: the parser refuses anything else
            quote(request.path),
            extra={"method": request.method, "path": request.path},
        )
        return _json_error("internal error in the guard", 500)


def error_response(exc: GuardError, headers: dict[str, str] | None = None) -> web.Response:
    response = _json_error(exc.message, exc.status, headers)
    if isinstance(exc, RateLimited) and exc.retry_after is not None:
        response.headers["Retry-After"] = str(max(1, round(exc.retry_after)))
    if isinstance(exc, PayloadTooLarge) or exc.status == 408:
        response.force_close()  # the rest of the body is unread: no keep-alive
    return response


def _json_error(message: str, status: int, headers: dict[str, str] | None = None) -> web.Response:
    try:
        body = v2.error_body(message)
    except TypeError:  # the message quotes a lone surrogate from the request ("\ud800" in JSON)
        body = v2.error_body(message.encode("utf-8", "backslashreplace").decode("utf-8"))
    return web.Response(body=body, status=status, content_type=JSON, headers=headers)


# -- inference ----------------------------------------------------------------

Decode = Callable[[bytes], InferRequest]
Encode = Callable[[InferResponse, InferRequest], tuple[bytes, dict[str, str]]]


async def _serve(
    http: web.Request,
    *,
    model_name: str,
    version: str | None,
    protocol: str,
    decode: Callable[[Runtime, bytes], Awaitable[tuple[InferRequest, Encode]]],
) -> web.Response:
    live = http.app[LIVE]

    async def read(runtime: Runtime, client: str) -> tuple[InferRequest, Encode]:
        body = await _receive(http, live, client, runtime.policy.limits)
        return await decode(runtime, body)

    try:
        payload, headers = await serve_inference(
            http.app,
            model_name=model_name,
            version=version,
            protocol=protocol,
            request_id=_request_id(http.headers.get("X-Request-Id")),
            headers=http.headers,
            remote=http.remote,
            read=read,
        )
    except Refusal as refusal:
        response = error_response(refusal.error, refusal.headers)
        if not http.content.is_eof():  # refused before its body was all read: drop it, do
            response.force_close()  # not drain it (a broken body would raise there)
        return response
    return web.Response(body=payload, headers=headers)


Read = Callable[[Runtime, str], Awaitable[tuple[InferRequest, Encode]]]


class Refusal(Exception):
    """What :func:`serve_inference` answers instead of a result: the error as the client
    may see it (:func:`~guard.errors.withheld` applied) and the headers to send with it."""

    def __init__(self, error: GuardError, headers: dict[str, str]) -> None:
        super().__init__(error.message)
        self.error = error
        self.headers = headers


async def serve_inference(
    app: web.Application,
    *,
    model_name: str,
    version: str | None,
    protocol: str,
    request_id: str,
    headers: Mapping[str, str],
    remote: str | None,
    read: Read,
) -> tuple[bytes, dict[str, str]]:
    """One inference request from any front end (REST or gRPC): admission, the client
    (identified from ``headers``, a case-insensitive mapping, and ``remote``), its
    authorization, the model's pipeline, metrics and audit. ``read(runtime, client)``
    receives and decodes the request once the client is admitted.

    Returns the encoded answer and its headers; raises :class:`Refusal` otherwise,
    counted in the metrics like every request.
    """
    live = app[LIVE]
    runtime = live.current()
    policy = runtime.policy
    limits = policy.limits
    if live.in_flight >= limits.max_in_flight:
        raise Overloaded(f"the guard is serving {live.in_flight} requests; try again shortly")
    started = time.perf_counter()
    runtime.enter()
    ctx: RequestContext | None = None
    counted = False
    try:
        client = policy.clients.identify(headers, remote)
        policy.clients.authorize(client, model_name)
        model = runtime.model(model_name)
        await model.require_version(version)
        with live.slots.hold(client.name, limits.max_in_flight_per_client):
            infer_request, encode = await read(runtime, client.name)
            if live.in_flight >= limits.max_in_flight:
                raise Overloaded(
                    f"the guard is serving {live.in_flight} requests; try again shortly"
                )
            live.in_flight += 1
            app[METRICS].in_flight.inc()
            counted = True
            if infer_request.id is None:
                infer_request.id = request_id
            ctx = RequestContext(
                request_id=request_id,
                model=model_name,
                client=client,
                request=infer_request,
                shadow_mode=policy.shadow,
                request_headers=headers,
            )
            passthrough = protocol == "v2" and not _wants_binary(infer_request)
            response = await model.pipeline.run(ctx, model.backend, passthrough=passthrough)
            payload, answer_headers = encode(response, infer_request)
        answer_headers["X-Request-Id"] = request_id
        if policy.expose_headers:
            answer_headers["X-Guard-Verdict"] = ctx.verdict
            answer_headers.update(ctx.headers)
        _finish(app, runtime, ctx, protocol, 200, started)
        return payload, answer_headers
    except GuardError as exc:
        refusal_headers = {"X-Request-Id": request_id}
        if policy.expose_headers:  # a refusal is a refusal, whichever stage (if any) made it
            refusal_headers["X-Guard-Verdict"] = "deny" if exc.status < 500 else "error"
        if ctx is not None:
            app[METRICS].errors.labels(type(exc).__name__).inc()
            _finish(app, runtime, ctx, protocol, exc.status, started)
            if not policy.disclose.reasons:  # the pipeline's refusal: stage and numbers unsaid
                exc = withheld(exc)
        else:  # refused before the pipeline: count it under a bounded model label
            count_refusal(app, runtime, model_name, protocol, exc)
        raise Refusal(exc, refusal_headers) from None
    finally:
        runtime.leave()
        if counted:
            live.in_flight -= 1
            app[METRICS].in_flight.dec()


def count_refusal(
    app: web.Application, runtime: Runtime, model_name: str, protocol: str, exc: GuardError
) -> None:
    """Count a request refused before its pipeline ran (no context to observe)."""
    metrics = app[METRICS]
    metrics.errors.labels(type(exc).__name__).inc()
    label = model_name if model_name in runtime.models else "unknown"
    verdict = "rejected" if exc.status < 500 else "error"
    metrics.requests.labels(label, protocol, verdict, str(exc.status)).inc()


def _request_id(given: str | None) -> str:
    """The client's ``X-Request-Id`` when it is short printable ASCII, else a fresh one.

    The id is echoed in headers, JSON bodies, logs and the upstream request; a header
    that was not valid UTF-8 reaches us with surrogates, which none of them can carry.
    """
    if given and len(given) <= MAX_REQUEST_ID and given.isascii() and given.isprintable():
        return given
    return os.urandom(8).hex()


def _finish(
    app: web.Application,
    runtime: Runtime,
    ctx: RequestContext,
    protocol: str,
    code: int,
    started: float,
) -> None:
    app[METRICS].observe(ctx, protocol=protocol, code=code, seconds=time.perf_counter() - started)
    runtime.audit.record(ctx)


async def _receive(http: web.Request, live: Live, client: str, limits: Limits) -> bytes:
    """The body, paid for from the client's decode bucket (:mod:`guard.admission`): the
    declared length before reading (at most the body limit: 413 past it), the rest after."""
    rate = limits.parse_bytes_per_second
    declared = min(http.content_length or 0, limits.max_body_bytes)
    live.meter.spend(client, declared, rate=rate, burst=max(rate, limits.max_body_bytes))
    body = await read_body(http, limits)
    live.meter.debit(client, len(body) - declared)
    return body


class ClientGone(Exception):
    """The client closed its connection while sending: nobody is left to answer."""


async def read_body(http: web.Request, limits: Limits) -> bytes:
    """The request body, refused with 413 past ``max_body_bytes`` (decoded bytes, checked
    while reading), and with 408 when it has not all arrived ``body_timeout`` seconds
    after reading began or no byte came for ``body_stall_timeout`` seconds.

    A body the client declared compressed (``Content-Encoding``) reaches us decoded by
    aiohttp, so its ``Content-Length`` (the compressed size) says nothing of its length:
    it is read to its end. A body that does not decode is a 400 naming the encoding.
    """
    timeout = limits.body_timeout
    try:
        content = http.content
        if content.is_eof() and not http.headers.get("Content-Encoding"):
            # It all came with the headers (most inference bodies): nothing to wait for.
            return _whole_body(content.read_nowait(), http.content_length, limits.max_body_bytes)
        async with _deadline(timeout):  # no extra task, unlike wait_for before 3.12
            return await _read_body(http, limits.max_body_bytes, limits.body_stall_timeout)
    except asyncio.TimeoutError:
        raise RequestError(f"request body not received within {timeout:g} s", status=408) from None
    except RequestPayloadError:
        http.content.feed_eof()  # nothing more will come: aiohttp must not drain it after us
        encoding = http.headers.get("Content-Encoding", "")
        if encoding:
            raise RequestError(
                f"body is not valid {_quote(encoding)} data (Content-Encoding)"
            ) from None
        raise RequestError("body is malformed (chunked transfer encoding)") from None
    except (ConnectionResetError, ConnectionAbortedError, BrokenPipeError):
        http.content.feed_eof()
        raise ClientGone from None


def _whole_body(body: bytes, length: int | None, limit: int) -> bytes:
    """A body already received whole, checked as :func:`_read_body` checks one it reads."""
    if len(body) > limit:
        raise PayloadTooLarge(f"body of {len(body)} bytes exceeds the limit of {limit}")
    if length is not None and len(body) != length:
        raise RequestError(f"body ended after {len(body)} of {length} bytes (Content-Length)")
    return body


async def _read_body(http: web.Request, limit: int, stall: float) -> bytes:
    length = None if http.headers.get("Content-Encoding") else http.content_length
    if length is not None and length > limit:
        raise PayloadTooLarge(f"body of {length} bytes exceeds the limit of {limit}")
    chunks: list[bytes] = []
    size = 0
    while True:
        try:
            async with _deadline(stall):
                chunk = await http.content.readany()
        except asyncio.TimeoutError:
            raise RequestError(
                f"request body stalled: no data for {stall:g} s", status=408
            ) from None
        if not chunk:
            break
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return _whole_body(b"".join(chunks), length, limit)


def _quote(text: str) -> str:
    """A client's header value, short and printable, for a message."""
    return ascii(text[:40])


def _wants_binary(request: InferRequest) -> bool:
    return request.binary_outputs or any(o.binary for o in request.outputs)


async def v2_infer(http: web.Request) -> web.Response:
    model_name = http.match_info["model"]
    version = http.match_info.get("version")
    header_length = v2.parse_header_length(http.headers.get(v2.HEADER_LENGTH))

    async def decode(runtime: Runtime, body: bytes) -> tuple[InferRequest, Encode]:
        request = await decoder(
            v2.decode_request,
            body,
            header_length=header_length,
            model_name=model_name,
            model_version=version,
        )
        return request, lambda response, req: v2.encode_response(response, request=req)

    decoder = http.app[LIVE].decoder
    return await _serve(http, model_name=model_name, version=version, protocol="v2", decode=decode)


async def tf_predict(http: web.Request) -> web.Response:
    model_name = http.match_info["model"]
    version = http.match_info.get("version")

    async def decode(runtime: Runtime, body: bytes) -> tuple[InferRequest, Encode]:
        metadata = await runtime.model(model_name).metadata()
        request, fmt = await decoder(
            tfserving.decode_predict,
            body,
            model_name=model_name,
            model_version=version,
            inputs=metadata.inputs,
        )
        return request, lambda response, _req: (
            tfserving.encode_predict(response, fmt),
            {"Content-Type": JSON},
        )

    decoder = http.app[LIVE].decoder
    return await _serve(
        http, model_name=model_name, version=version, protocol="tfserving", decode=decode
    )


# -- health and metadata ------------------------------------------------------


# Health bodies: KServe's SDK reads ``{"live": true}`` / ``{"ready": true}`` (and
# ``{"status": "alive"}`` at ``/`` for V1); Triton's clients read only the status.


async def health_live(http: web.Request) -> web.Response:
    return web.json_response({"live": True}, dumps=_dumps)


async def health_ready(http: web.Request) -> web.Response:
    ready = http.app[LIVE].runtime is not None
    return web.json_response({"ready": ready}, status=200 if ready else 503, dumps=_dumps)


async def server_alive(http: web.Request) -> web.Response:
    return web.json_response({"status": "alive"}, dumps=_dumps)


async def server_metadata(http: web.Request) -> web.Response:
    body = {"name": SERVER_NAME, "version": __version__, "extensions": ["binary_tensor_data"]}
    return web.json_response(body, dumps=_dumps)


async def model_metadata(http: web.Request) -> web.Response:
    runtime = http.app[LIVE].current()
    name = http.match_info["model"]
    _authorize(http, runtime, name)
    await runtime.model(name).require_version(http.match_info.get("version"))
    metadata = await runtime.model(name).metadata()
    body = metadata.as_v2()
    body["name"] = name
    if "version" in http.match_info:
        body["versions"] = [http.match_info["version"]]
    return web.json_response(body, dumps=_dumps)


async def model_ready(http: web.Request) -> web.Response:
    runtime = http.app[LIVE].current()
    name = http.match_info["model"]
    _authorize(http, runtime, name)
    await runtime.model(name).require_version(http.match_info.get("version"))
    if not await runtime.model(name).backend.ready():
        return _json_error(f"model {name} is not ready", 503)
    return web.json_response({"name": name, "ready": True}, dumps=_dumps)


async def tf_status(http: web.Request) -> web.Response:
    runtime = http.app[LIVE].current()
    name = http.match_info["model"]
    _authorize(http, runtime, name)
    await runtime.model(name).require_version(http.match_info.get("version"))
    ready = await runtime.model(name).backend.ready()
    body = tfserving.status_body(name, http.match_info.get("version", "1"), ready)
    return web.json_response(body, dumps=_dumps)


async def tf_metadata(http: web.Request) -> web.Response:
    runtime = http.app[LIVE].current()
    name = http.match_info["model"]
    _authorize(http, runtime, name)
    await runtime.model(name).require_version(http.match_info.get("version"))
    metadata = await runtime.model(name).metadata()
    version = http.match_info.get("version") or (metadata.versions or ("1",))[-1]
    body = tfserving.metadata_body(name, version, metadata.inputs, metadata.outputs)
    return web.json_response(body, dumps=_dumps)


async def tf_unsupported(http: web.Request) -> web.Response:
    method = http.match_info["method"]
    raise GuardError(f":{method} is not supported by the guard; use :predict", status=501)


def _authorize(http: web.Request, runtime: Runtime, model: str) -> None:
    clients = runtime.policy.clients
    clients.authorize(clients.identify(http.headers, http.remote), model)
    runtime.model(model)  # 404 for unknown models, after authentication


async def metrics(http: web.Request) -> web.Response:
    exposition = http.app.get(EXPOSITION)
    if exposition is None:
        body = generate_latest(http.app[METRICS].registry)
    else:  # reads every worker's files
        body = await asyncio.get_running_loop().run_in_executor(None, generate_latest, exposition)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


# -- admin ----------------------------------------------------------------------


def _require_admin(http: web.Request) -> None:
    digest = http.app[PUBLIC][LIVE].current().policy.admin_token_sha256
    if digest is None:
        raise NotFound("admin endpoints are disabled: the policy sets no admin token")
    auth = http.headers.get("Authorization", "")
    token = auth[7:] if auth.startswith("Bearer ") else http.headers.get("X-Admin-Token")
    if not token_matches(token, digest):
        raise Unauthorized("admin endpoints need the admin token (Authorization: Bearer ...)")


async def admin_status(http: web.Request) -> web.Response:
    _require_admin(http)
    live = http.app[PUBLIC][LIVE]
    body = {"version": __version__, "in_flight": live.in_flight, **live.current().describe()}
    return web.json_response(body, dumps=_dumps)


async def admin_reload(http: web.Request) -> web.Response:
    _require_admin(http)
    try:
        runtime = await reload_policy(http.app[PUBLIC])
    except PolicyError as exc:
        return _json_error(f"reload failed; the previous policy stays in force: {exc}", 400)
    on_reload = http.app.get(ON_RELOAD)
    if on_reload is not None:
        on_reload()
    return web.json_response({"reloaded": runtime.policy.source}, dumps=_dumps)


async def reload_policy(app: web.Application) -> Runtime:
    """Load the policy file again and swap it in; on any error keep the old one.

    ``app`` is the public application (the one :func:`create_app` built)."""
    live = app[LIVE]
    path = app[POLICY_PATH]
    metrics = app[METRICS]
    if path is None:
        raise PolicyError("this guard was started without a policy file; nothing to reload")
    loop = asyncio.get_running_loop()
    async with live.reload_lock:
        state = None
        try:
            # Reading and hashing files and opening onnxruntime sessions take long: in a
            # thread, so requests go on being served by the old policy meanwhile.
            policy = await loop.run_in_executor(None, load_policy, path)
            if live.runtime is not None and policy.state == live.runtime.policy.state:
                state = live.state  # unchanged: keep the store, its connections and its contents
            else:
                state = _open_store(app, policy.state)
            build = functools.partial(
                build_runtime, policy, session=app[SESSION], state=state, metrics=metrics
            )
            runtime = await loop.run_in_executor(None, build)
        except PolicyError as exc:
            if state is not None and state is not live.state:
                live.stores.discard(state)
                await state.close()
            metrics.reloads.labels("failure").inc()
            log.error("policy reload failed, keeping the previous policy: %s", exc)
            raise
        old, live.runtime = live.runtime, runtime
        old_state, live.state = live.state, state
        live.decoder.threshold = policy.limits.offload_decode_bytes
        metrics.reloads.labels("success").inc()
        log.info("policy %s reloaded", path)
    if old is not None:
        retired = old_state if old_state is not state else None
        task = asyncio.get_running_loop().create_task(_retire(live, old, retired))
        live.retiring.add(task)
        task.add_done_callback(live.retiring.discard)
    return runtime


async def _retire(live: Live, runtime: Runtime, state: StateStore | None) -> None:
    """Retire a replaced runtime, then the state store it alone was using."""
    await runtime.retire()
    if state is not None:
        live.stores.discard(state)
        await state.close()


def _dumps(value: object) -> str:
    return orjson.dumps(value).decode()
