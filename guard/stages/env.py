"""What a stage may use while it is built: its model, the local copy, shared resources."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from guard.inference import ModelMetadata
from guard.stages.scale import UNKNOWN, InputScale

if TYPE_CHECKING:
    from guard.backends.base import Backend
    from guard.backends.onnx import OnnxBackend
    from guard.metrics import GuardMetrics
    from guard.state import StateStore


@dataclass(frozen=True, kw_only=True, slots=True)
class StageEnv:
    model: str
    backend: Backend | None  # what serves this model's requests (upstream or local copy)
    local: OnnxBackend | None  # the policy's local copy of the model, when it has one
    metadata: ModelMetadata | None  # known without asking the upstream (from the local copy)
    # The input's declared range and shape (guard.stages.scale.declared_scale), which the
    # defaults in input units follow; unknown where a stage is built on its own.
    scale: InputScale = UNKNOWN
    # The model version the backend serves, from the policy (upstream.version); "" when the
    # model has one version. Never the version a client writes in its URL.
    version: str = ""
    # Shared per-client state (budgets, histories, fingerprints); one store per app, kept
    # across reloads. None only where a stage is built on its own (tests, tools).
    state: StateStore | None = None
    metrics: GuardMetrics | None = None  # the app's metrics, for stages that count their own
    # Where ``*_env`` keys (secrets) are looked up: the environment ``load_policy`` was given.
    # Empty where a stage is built on its own: a key it needs is then reported as unset.
    environ: Mapping[str, str] = field(default_factory=dict)

    def secret(self, variable: str) -> str | None:
        """The value of environment variable ``variable``; None when unset or empty."""
        return self.environ.get(variable) or None

    @property
    def store(self) -> StateStore:
        """The runtime's state store; a private in-memory one for a stage built on its own."""
        if self.state is not None:
            return self.state
        from guard.state.memory import MemoryStore

        store = MemoryStore()
        object.__setattr__(self, "state", store)  # one private store per env, not per call
        return store
