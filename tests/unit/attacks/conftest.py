"""Fixtures of the attack-suite tests: the undefended digits model and its held-out data."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest

from guard.attacks.targets import OnnxTarget
from guard.models import load_samples


@pytest.fixture(autouse=True)
def _one_blas_thread() -> Iterator[None]:
    """Small matrix products run faster on one BLAS thread on a shared machine."""
    threadpoolctl = pytest.importorskip("threadpoolctl")
    with threadpoolctl.threadpool_limits(1):
        yield


@pytest.fixture(scope="session")
def digits() -> tuple[np.ndarray, np.ndarray]:
    return load_samples("digits")


@pytest.fixture
def digits_target() -> OnnxTarget:
    return OnnxTarget.builtin("digits")
