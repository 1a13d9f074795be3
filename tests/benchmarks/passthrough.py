"""A bare aiohttp pass-through proxy: the baseline the guard's overhead is measured against.

Every request is read whole and forwarded, method, path and query unchanged, with
one pooled :class:`aiohttp.ClientSession` to ``--upstream``; the upstream's status,
body and the two headers a V2 client needs (``Content-Type``,
``Inference-Header-Content-Length``) come back. Nothing is parsed, checked,
logged or counted: it is the least any Python proxy on aiohttp has to do.

    python tests/benchmarks/passthrough.py --upstream http://127.0.0.1:8001 --port 8002
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from collections.abc import AsyncIterator, Sequence

import aiohttp
from aiohttp import web

UPSTREAM = web.AppKey("upstream", str)
SESSION = web.AppKey("session", aiohttp.ClientSession)
FORWARDED = ("Content-Type", "Inference-Header-Content-Length")


def create_app(upstream: str) -> web.Application:
    """The proxy as an application; ``upstream`` is a base URL such as ``http://host:port``."""
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app[UPSTREAM] = upstream.rstrip("/")
    app.cleanup_ctx.append(_session)
    app.router.add_route("*", "/{tail:.*}", forward)
    return app


async def _session(app: web.Application) -> AsyncIterator[None]:
    # The same pool settings as the guard's, so both proxies pay the same client costs.
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=256),
        skip_auto_headers=("Content-Type", "User-Agent"),
    ) as session:
        app[SESSION] = session
        yield


async def forward(request: web.Request) -> web.Response:
    body = await request.read()
    headers = {k: v for k in FORWARDED if (v := request.headers.get(k)) is not None}
    url = request.app[UPSTREAM] + request.path_qs
    async with request.app[SESSION].request(
        request.method, url, data=body, headers=headers
    ) as reply:
        payload = await reply.read()
        back = {k: v for k in FORWARDED if (v := reply.headers.get(k)) is not None}
        return web.Response(status=reply.status, body=payload, headers=back)


async def serve(upstream: str, host: str, port: int) -> None:
    """Serve until SIGINT or SIGTERM."""
    runner = web.AppRunner(create_app(upstream), access_log=None, handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, host, port, backlog=1024).start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--upstream", required=True, help="base URL, e.g. http://127.0.0.1:8001")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--loop", choices=["asyncio", "uvloop"], default="asyncio")
    args = parser.parse_args(argv)
    coro = serve(args.upstream, args.host, args.port)
    if args.loop == "uvloop":
        import uvloop

        uvloop.run(coro)
    else:
        asyncio.run(coro)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
