"""Benign clients: natural variation, several clients, paced like real traffic."""

from __future__ import annotations

import numpy as np
import pytest

from guard.attacks.benign import BenignTraffic
from guard.attacks.targets import Answers, OnnxTarget, Target
from tests.unit.attacks.scripted import ScriptedDefence


def clients(n: int) -> list[tuple[str, OnnxTarget]]:
    return [(f"c{i}", OnnxTarget.builtin("digits")) for i in range(n)]


def test_each_client_sends_its_queries_and_is_mostly_right(
    digits: tuple[np.ndarray, np.ndarray],
) -> None:
    x, y = digits
    group = clients(3)
    run = BenignTraffic(queries=40, noise=0.02).run(group, x, y, np.random.default_rng(0))
    summary = run.summary()
    assert [c.queries for c in run.clients] == [40, 40, 40] and summary["queries"] == 120
    assert all(target.queries == 40 for _, target in group)
    assert summary["false_positive_rate"] == 0.0 and summary["accuracy"] > 0.85


def test_false_positives_are_counted_per_query(digits: tuple[np.ndarray, np.ndarray]) -> None:
    x, y = digits
    flagged = ScriptedDefence(OnnxTarget.builtin("digits"), flag_from=31)
    group = [("quiet", OnnxTarget.builtin("digits")), ("flagged", flagged)]
    summary = BenignTraffic(queries=40).run(group, x, y, np.random.default_rng(0)).summary()
    assert summary["false_positive_rate"] == pytest.approx(10 / 80)
    assert [c["detected"] for c in summary["clients"]] == [0, 10]


def test_pacing_follows_a_poisson_process(digits: tuple[np.ndarray, np.ndarray]) -> None:
    x, y = digits
    waits: list[float] = []
    BenignTraffic(queries=100, rate=50.0).run(
        clients(2), x, y, np.random.default_rng(0), sleep=waits.append
    )
    assert len(waits) == 200
    # Each wait is measured from the start, so the last is the span of 100 arrivals at 50/s.
    assert 1.2 < max(waits) < 3.0


class Recording(ScriptedDefence):
    """Keeps every row it was sent."""

    def __init__(self, inner: Target) -> None:
        super().__init__(inner)
        self.sent: list[np.ndarray] = []

    def _send(self, x: np.ndarray) -> tuple[Answers, int, str | None]:
        self.sent.append(x.copy())
        return super()._send(x)


def test_the_same_seed_sends_the_same_varied_traffic(digits: tuple[np.ndarray, np.ndarray]) -> None:
    x, y = digits
    sent = []
    for _ in range(2):
        group = [(name, Recording(target)) for name, target in clients(2)]
        BenignTraffic(queries=10, shift=1).run(group, x, y, np.random.default_rng(5))
        sent.append(np.concatenate([np.concatenate(t.sent) for _, t in group]))
    assert np.array_equal(sent[0], sent[1])
    assert sent[0].min() >= 0 and sent[0].max() <= 16
    assert not any((row == x).all(axis=1).any() for row in sent[0])  # every replay varies


def test_clients_need_their_own_targets(digits: tuple[np.ndarray, np.ndarray]) -> None:
    x, y = digits
    shared = OnnxTarget.builtin("digits")
    with pytest.raises(ValueError, match="own target"):
        BenignTraffic(queries=2).run([("a", shared), ("b", shared)], x, y, np.random.default_rng(0))


def test_clients_replay_disjoint_shares(digits: tuple[np.ndarray, np.ndarray]) -> None:
    x, y = digits
    group = [(name, Recording(target)) for name, target in clients(3)]
    BenignTraffic(queries=50, noise=0.0).run(group, x, y, np.random.default_rng(0))
    seen = [{row.tobytes() for row in np.concatenate(t.sent)} for _, t in group]
    assert all(len(rows) == 50 for rows in seen)  # no repeats within a share's first pass
    assert not (seen[0] & seen[1] or seen[0] & seen[2] or seen[1] & seen[2])
