"""What a stage may use while it is built: its model, the local copy, shared resources."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from guard.configreader import Section
from guard.inference import ModelMetadata
from guard.pipeline import ACTIONS, Action

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
    # The model version the backend serves, from the policy (upstream.version); "" when the
    # model has one version. Never the version a client writes in its URL.
    version: str = ""
    # Shared per-client state (budgets, histories, fingerprints); one store per app, kept
    # across reloads. None only where a stage is built on its own (tests, tools).
    state: StateStore | None = None
    metrics: GuardMetrics | None = None  # the app's metrics, for stages that count their own


def read_action(section: Section, default: Action, *, misdirect: bool = False) -> Action:
    """The ``action`` key every detector takes (``misdirect`` only where the stage can)."""
    choices = ACTIONS if misdirect else tuple(a for a in ACTIONS if a != Action.MISDIRECT.value)
    return Action(section.choice("action", choices, default.value))


def read_fail_open(section: Section) -> bool:
    """The ``on_error`` key: ``closed`` (default) refuses; ``open`` serves the request, flagged."""
    return section.choice("on_error", ("closed", "open"), "closed") == "open"
