"""What each stage of the default policy costs per request, in-process, at two input widths.

Each stage of ``policies/default.yaml`` (quotas raised, so nothing is refused) is built on
its own and run through a :class:`~guard.pipeline.Pipeline` of its own, at two widths:

- 64 values: the ``digits`` model's stages (inputs in [0, 16]) against a synthetic
  backend (a fixed random linear map and a softmax);
- 3,072 values: the ``shapes`` model's stages (the built-in 32x32x3 image model, inputs
  in [0, 1], ``coverage`` calibrated on its shipped images) against the real
  ``builtin:shapes`` ONNX model (onnxruntime, one thread).

The backend's time is not counted (its CPU time on this thread is taken out of ``cpu``).
Any other width runs the ``digits`` stages on the synthetic backend, ``coverage`` given
``radius`` instead of its ``reference`` (the same cost: one distance per remembered
query). Every request is a fresh uniform random input from one client, so the detectors'
histories grow as they do under load; the time is what the pipeline itself records per
stage (``ctx.stage_seconds``: every hook, prepares included), by default in this
thread's CPU time (``--clock wall``: the wall clock), the mean over the second half of
``--requests`` (the history then holds at least half of them), the least of ``--repeat``
rounds, each round timing every stage alone and then the whole default chain.

    python tests/benchmarks/bench_stages.py [--requests 2000] [--widths 64 3072] [--repeat 5]
        [--clock cpu|wall] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import os
import sys
import time
import types
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from guard.clients import Client  # noqa: E402
from guard.configreader import Section  # noqa: E402
from guard.inference import InferRequest, InferResponse, ModelMetadata, TensorSpec  # noqa: E402
from guard.models import model_info, model_path  # noqa: E402
from guard.pipeline import Pipeline, RequestContext  # noqa: E402
from guard.stages import STAGES, StageEnv  # noqa: E402
from guard.stages.scale import InputScale  # noqa: E402
from guard.state.memory import MemoryStore  # noqa: E402

CLASSES = 10
RAISED = [{"queries": 100_000_000, "per": "1m"}, {"queries": 100_000_000, "per": "1d"}]


REAL = {3072: "shapes"}  # widths served by a built-in model; the others: digits, synthetic


def model_of(width: int) -> str:
    return REAL.get(width, "digits")


def default_stages(model: str = "digits") -> list[tuple[str, dict[str, Any]]]:
    """The default policy's stages for ``model``, in order, quotas raised."""
    policy = yaml.safe_load((ROOT / "policies" / "default.yaml").read_text())
    stages = []
    for entry in policy["models"][model]["stages"]:
        ((name, options),) = entry.items()
        options = copy.deepcopy(options or {})
        if name == "budget":
            options["limits"] = RAISED
        stages.append((name, options))
    return stages


class LinearBackend:
    """A fixed random linear map of ``width`` inputs to 10 classes, then a softmax."""

    def __init__(self, width: int, rng: np.random.Generator) -> None:
        self.weights = rng.normal(0, 1 / np.sqrt(width), (width, CLASSES)).astype(np.float32)
        self.cpu_seconds = 0.0  # this thread's CPU time spent here, left out of the stages'

    async def infer(self, request: InferRequest, *, passthrough: bool = False) -> InferResponse:
        started = time.thread_time()
        try:
            return self._infer(request)
        finally:
            self.cpu_seconds += time.thread_time() - started

    def _infer(self, request: InferRequest) -> InferResponse:
        logits = request.inputs["input"] @ self.weights
        e = np.exp(logits - logits.max(axis=1, keepdims=True))
        p = (e / e.sum(axis=1, keepdims=True)).astype(np.float32)
        outputs = {"label": p.argmax(axis=1).astype(np.int64), "probabilities": p}
        return InferResponse(model_name=request.model_name, outputs=outputs)


class OnnxModel:
    """A built-in ONNX model (one onnxruntime thread, run on the calling thread)."""

    def __init__(self, name: str) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(
            str(model_path(name)), options, providers=["CPUExecutionProvider"]
        )
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.cpu_seconds = 0.0

    async def infer(self, request: InferRequest, *, passthrough: bool = False) -> InferResponse:
        started = time.thread_time()
        try:
            results = self.session.run(self.outputs, dict(request.inputs))
        finally:
            self.cpu_seconds += time.thread_time() - started
        return InferResponse(
            model_name=request.model_name, outputs=dict(zip(self.outputs, results, strict=True))
        )


def real_metadata(name: str) -> ModelMetadata:
    info = model_info(name)
    specs = {
        part: tuple(TensorSpec(t["name"], t["datatype"], tuple(t["shape"])) for t in info[part])
        for part in ("inputs", "outputs")
    }
    return ModelMetadata(name, "onnxruntime_onnx", specs["inputs"], specs["outputs"])


def metadata(width: int) -> ModelMetadata:
    return ModelMetadata(
        name="digits",
        platform="onnxruntime_onnx",
        inputs=(TensorSpec("input", "FP32", (-1, width)),),
        outputs=(
            TensorSpec("label", "INT64", (-1,)),
            TensorSpec("probabilities", "FP32", (-1, CLASSES)),
        ),
    )


def sample_shape(width: int) -> tuple[int, ...]:
    model = model_of(width)
    return tuple(model_info(model)["input_shape"]) if model != "digits" else (width,)


def input_range(width: int) -> tuple[float, float]:
    lo, hi = model_info(model_of(width))["input_range"]
    return float(lo), float(hi)


def build(stages: list[tuple[str, dict[str, Any]]], width: int) -> Pipeline:
    model = model_of(width)
    env = StageEnv(
        model=model,
        backend=None,
        local=None,
        metadata=metadata(width) if model == "digits" else real_metadata(model),
        # the defaults in input units follow the declared range and shape
        scale=InputScale(input_range(width), sample_shape(width)),
        state=MemoryStore(),
    )
    built = []
    for i, (name, options) in enumerate(stages):
        if name == "coverage" and width != 64 and model == "digits":
            options = {k: v for k, v in options.items() if k != "reference"}
            options["radius"] = 0.5 * np.sqrt(width)  # calibrated on digits: ~ 0.4 per sqrt(W)
        section = Section(options, source="default.yaml", path=f"stages[{i}].{name}")
        built.append(STAGES[name](section, env))
    return Pipeline(built)


async def measure(
    stages: list[tuple[str, dict[str, Any]]], width: int, requests: int, seed: int
) -> dict[str, float]:
    """Mean µs per request of each stage, and of the chain (``total``), over the second half;
    ``cpu``: the thread's CPU µs per request in the pipeline outside the backend (all the
    stages together; steadier than wall time on a machine shared with other work)."""
    rng = np.random.default_rng(seed)
    model = model_of(width)
    pipeline = build(stages, width)
    backend: LinearBackend | OnnxModel = (
        LinearBackend(width, rng) if model == "digits" else OnnxModel(model)
    )
    client = Client("bench")
    spent: dict[str, float] = {}
    lo, hi = input_range(width)
    inputs = rng.uniform(lo, hi, (requests, 1, *sample_shape(width))).astype(np.float32)
    cpu = 0.0
    for i in range(requests):
        request = InferRequest(model_name=model, inputs={"input": inputs[i]})
        ctx = RequestContext(request_id=str(i), model=model, client=client, request=request)
        if i == requests // 2:
            backend.cpu_seconds, cpu = 0.0, time.thread_time()
        await pipeline.run(ctx, backend)  # type: ignore[arg-type]
        if i >= requests // 2:
            for name, seconds in ctx.stage_seconds.items():
                spent[name] = spent.get(name, 0.0) + seconds
    cpu = time.thread_time() - cpu - backend.cpu_seconds
    counted = requests - requests // 2
    out = {name: seconds / counted * 1e6 for name, seconds in spent.items()}
    out["total"] = sum(out.values())
    out["cpu"] = cpu / counted * 1e6
    return out


CLOCK = ["wall"]  # what the stages are timed by


def cpu_clock() -> None:
    """Time the stages by this thread's CPU time instead of the wall clock: time the
    machine gave other work (a shared or virtual machine) is then not counted."""
    import guard.pipeline

    guard.pipeline.time = types.SimpleNamespace(perf_counter=time.thread_time)  # type: ignore[assignment]
    CLOCK[0] = "CPU"


def run(
    widths: Sequence[int], requests: int, seed: int, repeat: int = 3
) -> dict[int, dict[str, dict[str, float]]]:
    """``{width: {"alone": {stage: µs}, "chain": {stage: µs, total: µs}}}``: per stage the
    least of ``repeat`` rounds (the one other work on the machine disturbed least), each
    round measuring every stage and the chain once, so a slow spell of the machine falls
    on one round of each rather than on every run of one stage."""
    results: dict[int, dict[str, dict[str, float]]] = {}
    for width in widths:
        stages = default_stages(model_of(width))
        alone: dict[str, float] = {}
        chain: dict[str, float] = {}
        for _ in range(repeat):
            for name, options in stages:
                spent = asyncio.run(measure([(name, options)], width, requests, seed))[name]
                alone[name] = min(alone.get(name, spent), spent)
            chained = asyncio.run(measure(stages, width, requests, seed))
            chain = {k: min(chain.get(k, v), v) for k, v in chained.items()}
        for name in alone:
            print(f"  width {width:5}  {name:11} {alone[name]:8.1f} µs", file=sys.stderr)
        print(f"  width {width:5}  {'chain':11} {chain['total']:8.1f} µs", file=sys.stderr)
        results[width] = {"alone": alone, "chain": chain}
    return results


DETECTOR_TARGETS = {64: 50.0, 3072: 150.0}  # µs per request, each detector (issue 16)
DETECTORS = ("blacklight", "provenance", "prada", "coverage")


def table(results: dict[int, dict[str, dict[str, float]]], requests: int) -> str:
    widths = list(results)
    names = list(next(iter(results.values()))["alone"])
    head = " | ".join(f"{w:,} values: alone · in the chain" for w in widths)
    lines = [
        f"Stage cost, µs per request (mean over requests {requests // 2}..{requests} of one "
        f"client, fresh uniform inputs, {CLOCK[0]} time, least of the rounds; load average {', '.join(f'{x:.2f}' for x in os.getloadavg())}):",
        "",
        f"| stage | {head} | detector target met |",
        "|---|" + "---:|" * len(widths) + "---|",
    ]
    for name in names:
        cells = " | ".join(
            f"{results[w]['alone'][name]:.1f} · {results[w]['chain'].get(name, 0.0):.1f}"
            for w in widths
        )
        met = ""
        if name in DETECTORS:
            met = ", ".join(
                f"{w}: {'yes' if results[w]['alone'][name] <= DETECTOR_TARGETS[w] else 'no'}"
                for w in widths
                if w in DETECTOR_TARGETS
            )
        lines.append(f"| {name} | {cells} | {met} |")
    totals = " | ".join(
        f"{sum(results[w]['alone'].values()):.1f} · {results[w]['chain']['total']:.1f}"
        for w in widths
    )
    lines.append(f"| **all** | {totals} | |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--widths", type=int, nargs="+", default=[64, 3072])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeat", type=int, default=5, help="rounds; the least is kept")
    parser.add_argument(
        "--clock",
        choices=["cpu", "wall"],
        default="cpu",
        help="time the stages by the thread's CPU time (default) or the wall clock",
    )
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if args.requests < 2 or min(args.widths) < 1 or args.repeat < 1:
        parser.error("--requests must be >= 2, --repeat and every width >= 1")
    if args.clock == "cpu":
        cpu_clock()
    started = time.perf_counter()
    results = run(args.widths, args.requests, args.seed, args.repeat)
    print(table(results, args.requests))
    print(f"\n({time.perf_counter() - started:.0f} s)", file=sys.stderr)
    if args.json:
        args.json.write_text(json.dumps({str(w): r for w, r in results.items()}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
