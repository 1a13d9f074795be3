"""An ONNX model served in-process by onnxruntime.

The CUDA provider is used when it really loads (``get_available_providers()``
lists it even on machines where it cannot: we check the session's providers),
otherwise the CPU. Inference runs in a worker thread so the event loop keeps
serving (onnxruntime releases the GIL while it computes), except a run expected to
take less than ``INLINE_S``: the hop to a thread and back costs about as much as that
(a small model such as the digits MLP computes a row in some 20 µs), so such runs
run on the loop. The expectation is the recent mean time per input value of the
model's runs (its first run goes to a thread), times the request's values: values,
not rows, so that one huge row of a model with free dimensions goes to a thread.
"""

from __future__ import annotations

import asyncio
import ctypes
import hashlib
import logging
import math
import time
from collections.abc import Sequence
from concurrent.futures import Executor
from pathlib import Path
from typing import Any

import numpy as np

from guard.errors import PolicyError, RequestError
from guard.inference import DATATYPES, InferRequest, InferResponse, ModelMetadata, TensorSpec

log = logging.getLogger(__name__)
INLINE_S = 0.0005  # runs expected shorter than this run on the event loop
_LEARN = 0.05  # weight of each run in the mean time per value

_ONNX_TYPES = {
    "tensor(bool)": "BOOL",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(float16)": "FP16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(string)": "BYTES",
}
DEVICES = ("auto", "cpu", "cuda")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _cuda_driver_present() -> bool:
    """Whether an NVIDIA driver is installed; without one CUDA cannot load, so do not try.

    ``get_available_providers()`` lists CUDA for every onnxruntime-gpu build, and
    asking for it on a machine without a GPU prints loader errors before falling back.
    """
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    return True


def _providers(device: str) -> list[str]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" not in available or not _cuda_driver_present():
        if device == "cuda":
            raise PolicyError("device: cuda was asked for, but onnxruntime has no CUDA provider")
        return ["CPUExecutionProvider"]
    return ["CUDAExecutionProvider", "CPUExecutionProvider"]


def _spec(arg: Any) -> TensorSpec:
    datatype = _ONNX_TYPES.get(arg.type, arg.type)
    shape = tuple(d if isinstance(d, int) else -1 for d in arg.shape)
    return TensorSpec(arg.name, datatype, shape)


class OnnxBackend:
    """Serves one ONNX file. ``sha256`` pins the file: a mismatch refuses to load."""

    def __init__(
        self,
        path: Path,
        *,
        name: str,
        sha256: str | None = None,
        device: str = "auto",
        threads: int = 0,
        executor: Executor | None = None,
    ) -> None:
        import onnxruntime as ort

        if not path.is_file():
            raise PolicyError(f"model file {path} does not exist")
        if sha256 is not None:
            actual = file_sha256(path)
            if actual != sha256.lower():
                raise PolicyError(
                    f"model file {path} has sha256 {actual}, but the policy pins {sha256}; "
                    "refusing to serve a model that does not match"
                )
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.log_severity_level = 3
        wanted = _providers(device)
        try:
            self.session = ort.InferenceSession(str(path), options, providers=wanted)
        except Exception as exc:  # onnxruntime raises its own untyped errors
            raise PolicyError(f"model file {path} could not be loaded: {exc}") from exc
        self.providers: tuple[str, ...] = tuple(self.session.get_providers())
        if device == "cuda" and "CUDAExecutionProvider" not in self.providers:
            raise PolicyError(f"model {name}: device cuda asked for, but CUDA did not load")
        self.name = name
        self.path = path
        self.executor = executor
        self.inputs = tuple(_spec(a) for a in self.session.get_inputs())
        self.outputs = tuple(_spec(a) for a in self.session.get_outputs())
        self._input_dtypes = {s.name: DATATYPES[s.datatype] for s in self.inputs}
        self._output_names = [spec.name for spec in self.outputs]
        self._value_seconds = math.inf  # the recent mean run time per input value; unknown at first
        self.model_metadata = ModelMetadata(name, "onnxruntime_onnx", self.inputs, self.outputs)
        log.info("model %s: %s on %s", name, path.name, ", ".join(self.providers))

    @property
    def on_gpu(self) -> bool:
        return "CUDAExecutionProvider" in self.providers

    def run(
        self, inputs: dict[str, np.ndarray], outputs: Sequence[str] | None = None
    ) -> dict[str, np.ndarray]:
        """Synchronous inference (for certification and offline tools)."""
        names = list(outputs) if outputs else self._output_names
        results = self.session.run(names, inputs)
        return dict(zip(names, results, strict=True))

    async def infer(self, request: InferRequest, *, passthrough: bool = False) -> InferResponse:
        feeds = self._feeds(request.inputs)
        wanted = [o.name for o in request.outputs] or None
        if wanted:
            unknown = [n for n in wanted if n not in self._output_names]
            if unknown:
                raise RequestError(
                    f"outputs: model {self.name} has no output {unknown[0]!r}; "
                    f"it has {', '.join(self._output_names)}"
                )
        values = sum(a.size for a in feeds.values())
        try:
            if self._value_seconds * values < INLINE_S:
                results = self._timed_run(feeds, wanted, values)
            else:
                loop = asyncio.get_running_loop()
                results = await loop.run_in_executor(
                    self.executor, self._timed_run, feeds, wanted, values
                )
        except Exception as exc:
            # onnxruntime's messages describe shape/type problems; they hold no secrets.
            raise RequestError(f"model {self.name} rejected the input: {_short(exc)}") from exc
        return InferResponse(
            model_name=request.model_name,
            model_version=request.model_version,
            id=request.id,
            outputs=results,
        )

    def _timed_run(
        self, feeds: dict[str, np.ndarray], wanted: Sequence[str] | None, values: int
    ) -> dict[str, np.ndarray]:
        started = time.perf_counter()
        results = self.run(feeds, wanted)
        each = (time.perf_counter() - started) / max(values, 1)
        # Noise (a cold first run, preemption) only adds to a run's time: a faster run is
        # taken at once, a slower one moves the estimate a little.
        known = self._value_seconds
        self._value_seconds = each if each < known else known + _LEARN * (each - known)
        return results

    def _feeds(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        feeds: dict[str, np.ndarray] = {}
        for spec in self.inputs:
            array = inputs.get(spec.name)
            if array is None:
                raise RequestError(f"inputs: model {self.name} needs input {spec.name!r}")
            expected = self._input_dtypes[spec.name]
            if array.dtype != expected:
                if not np.can_cast(array.dtype, expected, casting="same_kind"):
                    raise RequestError(
                        f"inputs.{spec.name}: datatype {array.dtype} cannot be used as "
                        f"{spec.datatype}"
                    )
                array = array.astype(expected)
            feeds[spec.name] = array
        extra = set(inputs) - set(feeds)
        if extra:
            raise RequestError(f"inputs: model {self.name} has no input {sorted(extra)[0]!r}")
        return feeds

    async def metadata(self) -> ModelMetadata:
        return self.model_metadata

    async def ready(self) -> bool:
        return True

    async def close(self) -> None:
        self.session = None  # onnxruntime frees the session with its last reference


def _short(exc: Exception) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    # Strip onnxruntime's "[ONNXRuntimeError] : 2 : INVALID_ARGUMENT : " prefix.
    return text.rsplit(" : ", 1)[-1][:300]
