"""The one interface the pipeline, the server and certification call."""

from __future__ import annotations

from typing import Protocol

from guard.inference import InferRequest, InferResponse, ModelMetadata


class Backend(Protocol):
    """Runs inference for one model. Implementations raise :mod:`guard.errors` only."""

    async def infer(self, request: InferRequest, *, passthrough: bool = False) -> InferResponse:
        """Run inference. With ``passthrough`` the caller needs no decoded outputs and
        will answer in V2 JSON, so a backend may return the body as ``raw`` instead."""
        ...

    async def metadata(self) -> ModelMetadata: ...

    async def ready(self) -> bool: ...

    async def close(self) -> None: ...
