"""A policy made live: backends opened, stages built, pipelines frozen.

The server holds one :class:`Runtime` at a time. A reload builds a new one
beside it (any error keeps the old), swaps the reference, and retires the old
one once the requests it is serving have finished: nothing in flight is dropped.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

from guard.audit import AuditLog
from guard.backends.base import Backend
from guard.backends.http import HttpBackend
from guard.backends.onnx import OnnxBackend
from guard.backends.upstream import UpstreamClient
from guard.config import ModelConfig, Policy
from guard.configreader import Section
from guard.errors import NotFound, PolicyError
from guard.inference import ModelMetadata
from guard.metrics import GuardMetrics
from guard.pipeline import Pipeline, Stage
from guard.stages import STAGES, StageEnv, stage_class
from guard.stages.scale import UNKNOWN, InputScale, declared_scale
from guard.state import StateStore, build_store

log = logging.getLogger(__name__)


EMBEDDED_VERSION = "1"


@dataclass(slots=True)
class ModelRuntime:
    name: str
    config: ModelConfig
    backend: Backend  # what serves requests: the upstream, else the local copy
    local: OnnxBackend | None  # the local copy, when the policy names a model file
    pipeline: Pipeline
    scale: InputScale = UNKNOWN  # the input's declared range and shape (StageEnv.scale)
    _metadata: ModelMetadata | None = None

    async def metadata(self) -> ModelMetadata:
        """The model's metadata: the local copy's, else the upstream's (asked once)."""
        if self.local is not None:
            return self.local.model_metadata
        if self._metadata is None:
            self._metadata = await self.backend.metadata()
        return self._metadata

    async def versions(self) -> tuple[str, ...]:
        """The versions clients may name: the upstream's (as its metadata lists them,
        and the one the policy pins), else ``"1"``, an embedded model's only version."""
        known: tuple[str, ...] = ()
        upstream = self.config.upstream
        if upstream is not None:
            known = (await self.metadata()).versions
            if upstream.version is not None and upstream.version not in known:
                known = (*known, upstream.version)
        return known or (EMBEDDED_VERSION,)

    async def require_version(self, version: str | None) -> None:
        """404 for a version the model does not have (``None``: the client named none)."""
        if version is not None and version not in await self.versions():
            raise NotFound(f"model {self.name} has no version {version!r}")

    def describe(self) -> dict[str, Any]:
        return {
            "backend": self.config.upstream.url if self.config.upstream else "embedded",
            "model_file": str(self.config.model_file) if self.config.model_file else None,
            "providers": list(self.local.providers) if self.local else None,
            "input_scale": {  # what the defaults in input units follow (docs/input-scale.md)
                "range": list(self.scale.range) if self.scale.range else None,
                "range_from": self.scale.source or None,
                "shape": list(self.scale.shape) if self.scale.shape else None,
            },
            "stages": [
                {"stage": s.name, "on_error": "open" if s.fail_open else "closed", **_describe(s)}
                for s in self.pipeline.stages
            ],
        }


class Runtime:
    def __init__(
        self,
        policy: Policy,
        models: dict[str, ModelRuntime],
        audit: AuditLog,
        *,
        state: StateStore,
        owns_state: bool = False,
    ) -> None:
        self.policy = policy
        self.models = models
        self.audit = audit
        self.state = state
        self._owns_state = owns_state  # False: the server's store, which outlives this runtime
        self._active = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def model(self, name: str) -> ModelRuntime:
        try:
            return self.models[name]
        except KeyError:
            raise NotFound(
                f"unknown model {name!r}; this guard serves {', '.join(self.models)}"
            ) from None

    def enter(self) -> None:
        self._active += 1
        self._idle.clear()

    def leave(self) -> None:
        self._active -= 1
        if self._active == 0:
            self._idle.set()

    async def retire(self, grace: float = 60.0) -> None:
        """Close once the requests in flight on this runtime have finished."""
        try:
            await asyncio.wait_for(self._idle.wait(), grace)
        except asyncio.TimeoutError:
            log.warning("retiring runtime with %d requests still in flight", self._active)
        await self.close()

    async def close(self) -> None:
        for model in self.models.values():
            await model.backend.close()
            if model.local is not None and model.local is not model.backend:
                await model.local.close()
        self.audit.close()
        if self._owns_state:
            await self.state.close()

    def describe(self) -> dict[str, Any]:
        return {
            "policy": self.policy.source,
            "mode": self.policy.mode,
            "state": self.state.backend,
            "models": {name: m.describe() for name, m in self.models.items()},
        }


def build_runtime(
    policy: Policy,
    *,
    session: UpstreamClient | None,
    state: StateStore | None = None,
    metrics: GuardMetrics | None = None,
) -> Runtime:
    """Open every backend and build every pipeline; raise PolicyError on any problem.

    Stages keep their state in ``state`` (the server's store, shared across
    reloads); without one the runtime opens its own from ``policy.state`` and
    closes it with itself.
    """
    owns_state = state is None
    store = build_store(policy.state) if state is None else state
    models = {
        name: _build_model(config, policy, session, store, metrics)
        for name, config in policy.models.items()
    }
    audit = AuditLog(
        policy.audit_path, on_drop=metrics.audit_dropped.inc if metrics is not None else None
    )
    return Runtime(policy, models, audit, state=store, owns_state=owns_state)


def _build_model(
    config: ModelConfig,
    policy: Policy,
    session: UpstreamClient | None,
    state: StateStore,
    metrics: GuardMetrics | None,
) -> ModelRuntime:
    local = None
    if config.model_file is not None:
        try:
            local = OnnxBackend(
                config.model_file,
                name=config.name,
                sha256=config.sha256,
                device=config.device,
                threads=config.threads,
            )
        except PolicyError as exc:
            raise PolicyError(f"{policy.source}: models.{config.name}: {exc}") from exc
    backend: Backend
    if config.upstream is not None:
        backend = HttpBackend(config.upstream, name=config.name, session=session)
    elif local is not None:
        backend = local
    else:
        raise PolicyError(
            f"{policy.source}: models.{config.name} needs an upstream or a model file"
        )
    metadata = local.model_metadata if local else None
    scale = declared_scale(config.stages, config.model_file, metadata)
    env = StageEnv(
        model=config.name,
        backend=backend,
        local=local,
        metadata=metadata,
        scale=scale,
        version=(config.upstream.version or "") if config.upstream else "",
        state=state,
        metrics=metrics,
        environ=policy.environ,
    )
    stages = [
        _build_stage(entry.kind, entry.options, entry.path, policy.source, env)
        for entry in config.stages
    ]
    names = [s.name for s in stages]
    duplicates = {n for n in names if names.count(n) > 1}
    if duplicates:
        raise PolicyError(
            f"{policy.source}: models.{config.name}.stages lists "
            f"{', '.join(sorted(duplicates))} twice"
        )
    for stage in stages:  # a stage whose answer depends on the others' (certify on privacy)
        bind = getattr(stage, "bind", None)
        if bind is not None:
            bind(stages)
    pipeline = Pipeline(stages, concurrent=state.shared)
    return ModelRuntime(config.name, config, backend, local, pipeline, scale)


def _build_stage(kind: str, options: Any, path: str, source: str, env: StageEnv) -> Stage:
    builder = STAGES.get(kind)
    if builder is None:
        raise PolicyError(
            f"{source}: {path.rsplit('.', 1)[0]} names unknown stage {kind!r}; "
            f"valid stages: {', '.join(sorted(STAGES))}"
        )
    cls = stage_class(kind)
    if isinstance(options, cls.Options):  # already read (a tuner's candidate): built as they are
        return cls.from_options(options, env, Section({}, source=source, path=path))
    return builder(Section(options, source=source, path=path), env)


def _describe(stage: Stage) -> dict[str, Any]:
    describe = getattr(stage, "describe", None)
    return describe() if callable(describe) else {}
