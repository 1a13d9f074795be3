"""The embedded onnxruntime backend: where a run happens (the loop or a thread)."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest

from guard.backends import onnx
from guard.backends.onnx import OnnxBackend
from guard.inference import InferRequest
from guard.models import model_path


class Counting(ThreadPoolExecutor):
    def __init__(self) -> None:
        super().__init__(1)
        self.submitted = 0

    def submit(self, *args: Any, **kwargs: Any) -> Any:
        self.submitted += 1
        return super().submit(*args, **kwargs)


def request(rows: int) -> InferRequest:
    x = np.random.default_rng(0).uniform(0, 16, (rows, 64)).astype(np.float32)
    return InferRequest(model_name="digits", inputs={"input": x})


async def test_a_small_model_runs_on_the_loop_once_its_speed_is_known() -> None:
    executor = Counting()
    backend = OnnxBackend(model_path("digits"), name="digits", threads=1, executor=executor)
    try:
        first = await backend.infer(request(1))
        assert executor.submitted == 1  # unknown speed: a thread
        for _ in range(5):  # a cold first run may be slow: the estimate falls with fast ones
            await backend.infer(request(1))
        known = executor.submitted
        answers = [await backend.infer(request(1)) for _ in range(5)]
        assert executor.submitted == known  # a digits row takes microseconds: the loop
        assert all(np.array_equal(a.outputs["label"], first.outputs["label"]) for a in answers)
        await backend.infer(request(100_000))  # expected to take long: a thread again
        assert executor.submitted == known + 1
    finally:
        executor.shutdown()


async def test_runs_expected_to_be_slow_go_to_a_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(onnx, "INLINE_S", 0.0)
    executor = Counting()
    backend = OnnxBackend(model_path("digits"), name="digits", threads=1, executor=executor)
    seen: list[str] = []
    original = backend.run

    def run(*args: Any) -> Any:
        seen.append(threading.current_thread().name)
        return original(*args)

    backend.run = run  # type: ignore[method-assign]
    try:
        for _ in range(3):
            await backend.infer(request(2))
        assert executor.submitted == 3
        assert threading.main_thread().name not in seen
    finally:
        executor.shutdown()
