"""The stage registry: the one table from a policy's stage name to its builder.

A stage module holds one class whose name matches its YAML key
(``stages/validate.py``, ``class Validate``, ``validate:``).
"""

from __future__ import annotations

from collections.abc import Callable

from guard.configreader import Section
from guard.pipeline import Stage
from guard.stages.env import StageEnv
from guard.stages.validate import Validate

StageBuilder = Callable[[Section, StageEnv], Stage]

STAGES: dict[str, StageBuilder] = {
    "validate": Validate.from_config,
}

__all__ = ["STAGES", "StageBuilder", "StageEnv"]
