"""A stand-in defence with a fixed script, to test how attacks and reports read verdicts."""

from __future__ import annotations

import numpy as np

from guard.attacks.targets import Answers, Target


class ScriptedDefence(Target):
    """Wraps a target; from query ``flag_from`` on answers with verdict ``flag``,
    from ``deny_from`` on refuses with 403 ``deny`` (1-based query numbers)."""

    def __init__(
        self, inner: Target, *, flag_from: int | None = None, deny_from: int | None = None
    ) -> None:
        super().__init__(inner.spec, batch_size=1)
        self.inner = inner
        self.flag_from = flag_from
        self.deny_from = deny_from

    def _send(self, x: np.ndarray) -> tuple[Answers, int, str | None]:
        number = self.queries + 1
        if self.deny_from is not None and number >= self.deny_from:
            return Answers.refused(len(x), self.spec.n_classes), 403, "deny"
        verdict = "flag" if self.flag_from is not None and number >= self.flag_from else "allow"
        return self.inner.query(x), 200, verdict
