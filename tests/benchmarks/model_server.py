"""A bare aiohttp + onnxruntime V2 server: the model the proxies are measured in front of.

``POST /v2/models/<name>/infer`` with a V2 JSON body (FP32 inputs): the ONNX model's
outputs as V2 JSON. ``GET /v2/models/<name>`` (metadata) and ``/v2/health/ready``
answer too. No validation beyond what numpy and onnxruntime do, no metrics, no
logging: the least a Python model server does, so that what a proxy adds is what
shows. One onnxruntime thread (the machines this targets have 2 cores).

    python tests/benchmarks/model_server.py --model digits --port 8001 [--loop uvloop]

``--model`` is a builtin model name (``guard.models.model_path``) or an ``.onnx`` file.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort
import orjson
from aiohttp import web

SESSION = web.AppKey("session", ort.InferenceSession)
NAME = web.AppKey("name", str)
DATATYPES = {"tensor(float)": "FP32", "tensor(int64)": "INT64", "tensor(double)": "FP64"}


def create_app(model: Path, name: str) -> web.Application:
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app[SESSION] = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    app[NAME] = name
    app.router.add_post("/v2/models/{name}/infer", infer)
    app.router.add_get("/v2/models/{name}", metadata)
    app.router.add_get("/v2/health/ready", ready)
    return app


async def ready(request: web.Request) -> web.Response:
    return web.Response()


def _spec(arg: ort.NodeArg) -> dict[str, object]:
    shape = [d if isinstance(d, int) else -1 for d in arg.shape]
    return {"name": arg.name, "datatype": DATATYPES.get(arg.type, "FP32"), "shape": shape}


async def metadata(request: web.Request) -> web.Response:
    session = request.app[SESSION]
    body = {
        "name": request.app[NAME],
        "platform": "onnxruntime_onnx",
        "inputs": [_spec(a) for a in session.get_inputs()],
        "outputs": [_spec(a) for a in session.get_outputs()],
    }
    return web.Response(body=orjson.dumps(body), content_type="application/json")


async def infer(request: web.Request) -> web.Response:
    session = request.app[SESSION]
    doc = orjson.loads(await request.read())
    feeds = {
        t["name"]: np.asarray(t["data"], dtype=np.float32).reshape(t["shape"])
        for t in doc["inputs"]
    }
    names = [o.name for o in session.get_outputs()]
    values = session.run(names, feeds)
    outputs = [
        {
            "name": n,
            "datatype": "INT64" if v.dtype == np.int64 else "FP32",
            "shape": list(v.shape),
            "data": v.ravel().tolist(),
        }
        for n, v in zip(names, values, strict=True)
    ]
    body = orjson.dumps({"model_name": request.match_info["name"], "outputs": outputs})
    return web.Response(body=body, content_type="application/json")


async def serve(app: web.Application, host: str, port: int) -> None:
    """Serve until SIGINT or SIGTERM."""
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
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
    parser.add_argument("--model", default="digits", help="builtin name or .onnx file")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--loop", choices=["asyncio", "uvloop"], default="asyncio")
    args = parser.parse_args(argv)
    if args.model.endswith(".onnx"):
        path, name = Path(args.model), Path(args.model).stem
    else:
        from guard.models import model_path

        path, name = model_path(args.model), args.model
    coro = serve(create_app(path, name), args.host, args.port)
    if args.loop == "uvloop":
        import uvloop

        uvloop.run(coro)
    else:
        asyncio.run(coro)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
