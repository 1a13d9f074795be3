"""The tuner's parts that need no guard: search spaces, the choice, the YAML writer."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from guard.config import ModelConfig, parse_policy
from guard.errors import PolicyError
from guard.stages.blacklight import BlacklightOptions
from guard.stages.options import to_yaml
from guard.tuning.attackers import AttackOutcome, holdout_advantage
from guard.tuning.measure import (
    BLACKLIGHT_ENV,
    PRIVACY_ENV,
    Baseline,
    BenignOutcome,
    Measurement,
    evaluation_policy,
    honest_traffic,
)
from guard.tuning.policyfile import dump, fp_upper_bound, rebase_paths
from guard.tuning.search import Candidate, Constraints, pick, risk
from guard.tuning.space import Param, apply, budget_answers, search_space, typed_model
from guard.tuning.workload import WORKLOADS, TuneData, attacks_for

DEFAULT = Path(__file__).parents[2] / "guard" / "policies" / "default.yaml"


def policy(*stages: Any) -> dict[str, Any]:
    return {"version": 1, "models": {"digits": {"model": "builtin:digits", "stages": list(stages)}}}


def outcome(name: str, family: str, success: float, undetected: float) -> AttackOutcome:
    return AttackOutcome(
        attack=name,
        family=family,
        units=1,
        success=success,
        undetected=undetected,
        detected=None,
        first_detection=None,
        first_caught=None,
        queries=1,
        refused=0.0,
        seconds=0.0,
    )


def measurement(
    *,
    fp: int = 0,
    loss: float = 0.0,
    ms: float = 0.5,
    change: float = 0.0,
    attacks: tuple[AttackOutcome, ...] = (),
) -> Measurement:
    benign = BenignOutcome(
        queries=1000,
        false_positives=fp,
        refused=0,
        accuracy=0.97 - loss,
        accuracy_loss=loss,
        score_change=change,
        stage_ms={"validate": ms},
        round_trip_ms=1.0,
    )
    return Measurement(benign, attacks, None, 0.0)


def candidate(values: dict[str, Any], m: Measurement, risk_: float, k: Constraints) -> Candidate:
    return Candidate(values, {}, m, None, risk_, k.violations(m), k.excess(m), k.cost(m))


# -- search spaces --------------------------------------------------------------------


def typed(document: dict[str, Any], model: str = "digits") -> ModelConfig:
    return typed_model(parse_policy(document, source="p.yaml", base=DEFAULT.parent), model)


def test_the_default_policy_space_is_centred_on_its_values() -> None:
    document = yaml.safe_load(DEFAULT.read_text())
    params = search_space(typed(document), grid="small", n_classes=10)
    grids = {p.name: p.values for p in params}
    assert grids == {  # the default's privacy (bins) has no search space
        "blacklight.threshold": (20, 25, 30),
        "blacklight.quantize": (2.0, 3.0, 4.0),
        "prada.delta": (0.8, 0.86, 0.9, 0.94),  # further down: heavy honest clients
    }
    stages = typed(document).stages
    for p in params:
        written = document["models"]["digits"]["stages"][p.index][p.stage]
        in_use = getattr(stages[p.index].options, p.key)  # quantize: derived from the range
        assert p.base == written.get(p.key, in_use) == in_use and p.base in p.values
    full = search_space(typed(document), grid="full", n_classes=10)
    assert {p.name for p in full} > set(grids) | {"blacklight.matches"}
    assert all(len(p.values) >= len(grids.get(p.name, ())) for p in full)


@pytest.mark.parametrize(
    ("stage", "name", "base", "group"),
    [
        ({"blacklight": {}}, "blacklight.threshold", 25, "risk"),  # the stage's default
        ({"certify": {"sigma": 0.5}}, "certify.sigma", 0.5, "certified"),
        ({"privacy": {"mechanism": "round"}}, "privacy.decimals", 2, "risk"),
        ({"privacy": {"mechanism": "gaussian", "sigma": 1.0}}, "privacy.sigma", 1.0, "risk"),
        (
            {"squeeze_detect": {"threshold": 1, "range": [0, 16], "squeezers": [{"bits": 5}]}},
            "squeeze_detect.squeezers",
            [{"bits": 5}],
            "risk",
        ),
    ],
)
def test_each_stage_type_declares_its_space(
    stage: dict[str, Any], name: str, base: Any, group: str
) -> None:
    params = search_space(typed(policy(stage)), grid="small", n_classes=10)
    param = next(p for p in params if p.name == name)
    assert to_yaml(param.base) == base and param.base in param.values and len(param.values) >= 3
    assert param.group == group


def test_a_key_left_out_is_searched_around_the_stage_default() -> None:
    (matches,) = [
        p
        for p in search_space(typed(policy("blacklight")), grid="full", n_classes=10)
        if p.key == "matches"
    ]
    default = next(f.default for f in dataclasses.fields(BlacklightOptions) if f.name == "matches")
    assert matches.base == default and matches.values == tuple(range(default - 1, default + 3))


def test_stages_without_a_space_are_left_alone() -> None:
    stages = (
        {"validate": {"min": 0}},
        {"budget": {"limits": [{"queries": 10, "per": "1m"}]}},
        {"privacy": {"mechanism": "label_only"}},
    )
    assert search_space(typed(policy(*stages)), grid="full", n_classes=10) == []


def test_apply_replaces_options_and_keeps_the_base() -> None:
    config = typed(policy({"validate": {}}, "blacklight"))
    param = Param("blacklight", 1, "threshold", (20, 25), 25)
    tuned = apply(config, [param], {"blacklight.threshold": 20})
    assert tuned.stages[1].options == dataclasses.replace(config.stages[1].options, threshold=20)
    assert config.stages[1].options.threshold == 25 and tuned.stages[0] == config.stages[0]
    with pytest.raises(
        PolicyError, match=r"p\.yaml: models\.digits\.stages\[1\]\.blacklight\.threshold"
    ):
        apply(config, [param], {"blacklight.threshold": 50}, source="p.yaml")  # top is 50


@pytest.mark.parametrize(
    ("mechanism", "epsilon"), [("laplace", 8.0), ("laplace", 0.5), ("gaussian", 2.0)]
)
def test_a_privacy_budget_keeps_its_number_of_scored_answers(
    mechanism: str, epsilon: float
) -> None:
    options = {"mechanism": "laplace", "epsilon": 2.0, "budget": {"epsilon": 2000, "per": "1d"}}
    config = typed(policy({"privacy": options}))
    params = [
        Param("privacy", 0, "epsilon", (epsilon,), 2.0),
        Param("privacy", 0, "mechanism", (mechanism,), "laplace"),
    ]
    values = {"privacy.epsilon": epsilon, "privacy.mechanism": mechanism}
    tuned = apply(config, params, values).stages[0].options
    assert budget_answers(config.stages[0].options) == 1000.0
    assert budget_answers(tuned) == pytest.approx(1000.0, rel=1e-3)
    assert tuned.budget.per == 86400.0 and tuned.mechanism == mechanism
    if mechanism == "laplace":
        assert tuned.budget.epsilon == 1000 * epsilon


def test_a_mechanism_switch_leaves_the_gaussian_delta_behind() -> None:
    config = typed(policy({"privacy": {"mechanism": "gaussian", "epsilon": 2.0, "delta": 1e-5}}))
    param = Param("privacy", 0, "mechanism", ("laplace", "gaussian"), "gaussian")
    tuned = apply(config, [param], {"privacy.mechanism": "laplace"}).stages[0].options
    assert (tuned.mechanism, tuned.epsilon, tuned.delta) == ("laplace", 2.0, None)


def test_attacks_follow_the_tuned_stages_and_the_data() -> None:
    small = WORKLOADS["small"]
    digits, tabular = TuneData.builtin("digits"), TuneData.builtin("breast_cancer")
    assert attacks_for({"blacklight"}, small, digits) == (*small.evasion, "knockoff")
    assert attacks_for({"privacy"}, small, digits) == ("knockoff", "membership")
    assert attacks_for({"prada"}, small, tabular) == ("knockoff", "jbda")
    assert attacks_for({"certify"}, small, digits) == ()


def test_data_parts_are_disjoint_and_independent_of_any_seed() -> None:
    data = TuneData.builtin("digits")
    parts = [
        {row.tobytes() for row in part}
        for part in (data.calibration, data.benign_x, data.attacker_x)
    ]
    assert sum(len(p) for p in parts) == 899  # every held-out row, each in one part
    assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
    assert np.array_equal(TuneData.builtin("digits").benign_x, data.benign_x)


def test_honest_traffic_is_the_realistic_mix_over_the_benign_rows() -> None:
    data = TuneData.builtin("digits")
    small = WORKLOADS["small"]
    assert small.benign_clients >= 20  # many keyed clients, few queries each
    plan = honest_traffic(small).plan(
        small.benign_clients, data.benign_x, data.benign_y, data.spec, np.random.default_rng(0)
    )
    assert len(plan) == small.benign_clients * small.benign_queries
    categories = {r.category for r in plan}
    assert categories == {"popular", "retry", "jitter", "fresh"}
    popular = {r.source for r in plan if r.category == "popular"}
    senders = {s: {r.client for r in plan if r.source == s} for s in popular}
    assert max(len(c) for c in senders.values()) >= 5  # a popular input, many clients
    benign = {row.astype(np.float32).tobytes() for row in data.benign_x}
    others = {row.astype(np.float32).tobytes() for row in (*data.calibration, *data.attacker_x)}
    exact = [r.x.tobytes() for r in plan if r.jitter is None]  # popular, fresh, retried
    assert all(x in benign and x not in others for x in exact)  # drawn from the benign part


# -- measuring -------------------------------------------------------------------------


def test_the_measured_copy_differs_only_where_measuring_needs_it() -> None:
    document = yaml.safe_load(DEFAULT.read_text())
    document["audit"] = {"path": "audit.jsonl"}
    base = parse_policy(document, source="p.yaml", base=DEFAULT.parent, environ={"HOME": "/"})
    config = typed_model(base, "digits")
    served = evaluation_policy(base, config, clients=["benign-0", "attacker"], seed=3)
    assert set(served.models) == {"digits"} and served.clients.keys is not None
    assert sorted(c.name for c in served.clients.keys.values()) == ["attacker", "benign-0"]
    assert served.state.backend == "memory" and served.audit_path is None
    assert served.disclose.headers and base.audit_path is not None
    assert served.environ["HOME"] == "/" and served.environ[BLACKLIGHT_ENV].endswith("3")
    stages = {e.kind: e.options for e in served.models["digits"].stages}
    assert stages["blacklight"].key_env == BLACKLIGHT_ENV
    logged = evaluation_policy(base, config, clients=["b"], seed=3, audit=Path("/t/a.jsonl"))
    assert logged.audit_path == "/t/a.jsonl"  # the benign guard's findings, read per request
    assert stages["privacy"].secret_env == PRIVACY_ENV and PRIVACY_ENV in served.environ
    original = {e.kind: e.options for e in config.stages}
    assert original["blacklight"].key_env is None  # the candidate itself is untouched
    for name, options in original.items():
        fixed = {"key_env", "secret_env", "seed"}
        for f in dataclasses.fields(options):
            if f.name not in fixed:
                assert getattr(stages[name], f.name) == getattr(options, f.name)


def test_holdout_advantage_is_near_zero_without_signal_and_one_with_perfect_signal() -> None:
    rng = np.random.default_rng(0)
    member = rng.permutation(np.arange(800) < 400)
    noise = holdout_advantage(rng.normal(size=800), member, rng)
    assert abs(noise) < 0.05
    assert holdout_advantage(member.astype(float), member, rng) == pytest.approx(1.0)
    refused = np.where(member, 0.0, np.nan)  # refused rows rank below every other
    assert holdout_advantage(refused, member, rng) == pytest.approx(1.0)


def test_fp_upper_bound_matches_the_closed_form_at_zero() -> None:
    assert fp_upper_bound(0, 300) == pytest.approx(1 - 0.05 ** (1 / 300))
    assert fp_upper_bound(3, 300) > 3 / 300 and fp_upper_bound(5, 5) == 1.0


# -- the choice --------------------------------------------------------------------------


def test_risk_is_the_mean_share_of_the_bare_gain() -> None:
    baseline = Baseline(
        benign_accuracy=0.97,
        attacks={
            "simba": outcome("simba", "evasion", 1.0, 1.0),
            "knockoff": outcome("knockoff", "extraction", 0.9, 0.9),
            "jbda": outcome("jbda", "extraction", 0.01, 0.01),  # negligible: left out
        },
    )
    m = measurement(
        attacks=(
            outcome("simba", "evasion", 0.5, 0.25),
            outcome("knockoff", "extraction", 0.9, 0.45),
            outcome("jbda", "extraction", 0.01, 0.01),
        )
    )
    assert risk(m, baseline) == pytest.approx((0.25 + 0.5) / 2)


def test_constraints_name_each_violation() -> None:
    k = Constraints(max_false_positive=0.001, max_accuracy_loss=0.01, max_added_latency_ms=1.0)
    m = measurement(fp=3, loss=0.02, ms=0.5)
    assert k.violations(m) == ("false positives 0.003 > 0.001", "accuracy loss 0.02 > 0.01")
    assert k.excess(m) == pytest.approx(2.0 + 1.0)
    assert k.cost(measurement(ms=0.5, change=1.0)) == pytest.approx(0.5 + 0.5)
    assert Constraints(max_false_positive=0.0).cost(measurement(fp=1)) == math.inf


def test_pick_prefers_the_cheapest_within_the_risk_band_then_the_base() -> None:
    k = Constraints(max_false_positive=0.01, max_added_latency_ms=2.0)
    base = {"t": 25}
    safest = candidate({"t": 20}, measurement(fp=9, ms=0.5), 0.10, k)  # near the FP bound
    cheaper = candidate({"t": 30}, measurement(fp=0, ms=0.5), 0.13, k)
    kept = candidate({"t": 25}, measurement(fp=0, ms=0.6), 0.14, k)  # a cost tie with `cheaper`
    over = candidate({"t": 15}, measurement(fp=20, ms=0.5), 0.0, k)  # infeasible
    assert pick([safest, cheaper, kept, over], "risk", 0.05, base) is kept
    assert pick([safest, cheaper, kept, over], "risk", 0.01, base) is safest
    assert pick([safest, cheaper, over], "risk", 0.05, base) is cheaper
    # Equally safe and cheap, one change each: the one fewer grid steps from the base.
    near = candidate({"t": 30}, measurement(fp=0, ms=0.5), 0.14, k)
    far = candidate({"t": 35}, measurement(fp=0, ms=0.5), 0.13, k)
    assert pick([far, near], "risk", 0.05, base, grids={"t": (20, 25, 30, 35)}) is near


def test_pick_without_a_feasible_candidate_takes_the_least_excess() -> None:
    k = Constraints(max_false_positive=0.001)
    worse = candidate({"t": 1}, measurement(fp=5), 0.0, k)
    closer = candidate({"t": 2}, measurement(fp=2), 0.5, k)
    assert pick([worse, closer], "risk", 0.05) is closer
    # As close, and no safer beyond the tolerance: the base stays.
    kept = candidate({"t": 3}, measurement(fp=2), 0.53, k)
    assert pick([worse, closer, kept], "risk", 0.05, {"t": 3}) is kept


# -- the YAML writer -----------------------------------------------------------------------


def test_dump_round_trips_and_puts_comments_where_asked() -> None:
    document = yaml.safe_load(DEFAULT.read_text())
    document["models"]["digits"]["stages"].append("squeeze")  # a bare stage name
    document["odd"] = {"yes": "no", "colon": "a: b", "num": "1e3", "empty": [], "none": None}
    threshold = ("models", "digits", "stages", 3, "blacklight", "threshold")
    text = dump(
        document,
        {threshold: "tuned: FP 0/300"},
        above={threshold: ["threshold 20: FP 1/300"]},
        header=["made by a test", ""],
    )
    assert yaml.safe_load(text) == document
    lines = text.splitlines()
    assert lines[:2] == ["# made by a test", "#"]
    at = next(i for i, line in enumerate(lines) if "threshold: 25" in line)
    assert lines[at].endswith("# tuned: FP 0/300")
    assert lines[at - 1].strip() == "# threshold 20: FP 1/300"
    assert "- validate: {min: 0.0, max: 16.0, max_batch: 256}" in text


def test_typed_options_are_written_as_a_policy_writes_them() -> None:
    document = yaml.safe_load(DEFAULT.read_text())
    config = typed(document)
    blacklight = next(e.options for e in config.stages if e.kind == "blacklight")
    assert (
        to_yaml(blacklight, "degrade_for") == "1h" and to_yaml(blacklight, "action") == "misdirect"
    )
    squeeze = {"threshold": 1, "range": [0, 16], "squeezers": [{"bits": 5}]}
    squeezers = typed(policy({"squeeze_detect": squeeze}))
    assert to_yaml(squeezers.stages[0].options, "squeezers") == [{"bits": 5}]
    # Every stage's options, written out whole, read back as they were.
    written = policy(*({e.kind: to_yaml(e.options)} for e in config.stages))
    assert [e.options for e in typed(written).stages] == [e.options for e in config.stages]


def test_relative_paths_follow_the_written_file(tmp_path: Path) -> None:
    document = {
        "models": {"a": {"model": "m.onnx"}, "b": {"model": "builtin:digits"}},
        "clients": {"keys_file": "keys.yaml"},
        "audit": {"path": "-"},
    }
    (tmp_path / "base").mkdir()
    (tmp_path / "out").mkdir()
    moved = rebase_paths(document, tmp_path / "base", tmp_path / "out")
    assert moved["models"]["a"]["model"] == "../base/m.onnx"
    assert moved["models"]["b"]["model"] == "builtin:digits"
    assert moved["clients"]["keys_file"] == "../base/keys.yaml" and moved["audit"]["path"] == "-"
