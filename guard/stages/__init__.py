"""The stage registry: the one table from a policy's stage name to its builder.

A stage module holds one class whose name matches its YAML key
(``stages/validate.py``, ``class Validate``, ``validate:``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from guard.configreader import Section
from guard.pipeline import Stage
from guard.stages.blacklight import Blacklight
from guard.stages.budget import Budget
from guard.stages.certify import Certify
from guard.stages.coverage import Coverage
from guard.stages.env import StageEnv
from guard.stages.prada import Prada
from guard.stages.privacy import Privacy
from guard.stages.provenance import Provenance
from guard.stages.squeeze import Squeeze
from guard.stages.squeeze_detect import SqueezeDetect
from guard.stages.validate import Validate

StageBuilder = Callable[[Section, StageEnv], Stage]

STAGES: dict[str, StageBuilder] = {
    "blacklight": Blacklight.from_config,
    "budget": Budget.from_config,
    "certify": Certify.from_config,
    "coverage": Coverage.from_config,
    "prada": Prada.from_config,
    "privacy": Privacy.from_config,
    "provenance": Provenance.from_config,
    "validate": Validate.from_config,
    "squeeze": Squeeze.from_config,
    "squeeze_detect": SqueezeDetect.from_config,
}


def stage_class(kind: str) -> Any:
    """The class of stage ``kind`` (None: no such stage); its ``Options`` where declared."""
    return getattr(STAGES.get(kind), "__self__", None)


__all__ = ["STAGES", "StageBuilder", "StageEnv", "stage_class"]
