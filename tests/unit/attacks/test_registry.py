"""guard.attacks.registry is the one table of attacks: the CLI, the suite, the tuner and the
demo offer, run and budget exactly its entries."""

from __future__ import annotations

import argparse
import dataclasses
import re

import numpy as np
import pytest

from guard import demo
from guard.attacks import registry
from guard.attacks.registry import ALIASES, ATTACK, ATTACKS, TUNABLE
from guard.attacks.suite import SuiteConfig, resolve, run_suite
from guard.attacks.targets import OnnxTarget, TargetSpec
from guard.commands import attack
from guard.tuning.attackers import run_attack
from guard.tuning.measure import STREAMS
from guard.tuning.workload import WORKLOADS, TuneData, attacks_for


def offered_by_cli() -> list[str]:
    """The names listed in the help of ``guard attack --attack``."""
    parser = argparse.ArgumentParser()
    commands = parser.add_subparsers()
    attack.add_parser(commands)
    (option,) = [a for a in commands.choices["attack"]._actions if a.dest == "attack"]
    assert option.help
    return [
        n.strip() for group in re.findall(r"\(([^)]*)\)", option.help) for n in group.split(",")
    ]


def test_every_name_the_cli_offers_is_an_entry_or_a_group_of_entries() -> None:
    offered = offered_by_cli()
    assert sorted(offered) == sorted([*ATTACKS, *ALIASES])
    assert len(ATTACKS) == len(set(ATTACKS)) == len(registry.SPECS)
    for group, names in ALIASES.items():
        assert names and set(names) <= set(ATTACK), group
    assert resolve(["all"], TargetSpec.builtin("digits")) == list(ATTACKS)


def test_every_attack_the_tuner_measures_is_an_entry_and_numbered_in_its_order() -> None:
    assert STREAMS[0] == "benign" and STREAMS[-1] == "certify"
    assert all(ATTACK[name].tunes for name in STREAMS[1:-1])  # a stream per tunable attack
    stages = {stage for spec in registry.SPECS for stage in spec.tunes}
    digits, cancer = TuneData.builtin("digits"), TuneData.builtin("breast_cancer")
    for workload in WORKLOADS.values():
        assert set(workload.evasion) <= set(ALIASES["evasion"])
        assert attacks_for(stages, workload, digits) == (
            *workload.evasion,
            "knockoff",
            "jbda",
            "membership",
        )
        assert attacks_for(stages, workload, cancer) == ("knockoff", "jbda", "membership")
    target = OnnxTarget.builtin("digits")
    with pytest.raises(ValueError, match="unknown attack 'inversion'"):  # not tunable
        run_attack("inversion", target, target, digits, WORKLOADS["small"], np.random.default_rng())


def test_every_demo_attacker_is_a_tunable_entry() -> None:
    assert demo.ATTACKERS
    for attacker in demo.ATTACKERS.values():
        assert attacker.attack in TUNABLE


def test_evasion_radii_and_budgets_come_from_the_entries(monkeypatch: pytest.MonkeyPatch) -> None:
    attack_, radii = ATTACK["oars-square-linf"].evasion_attack(16.0)
    assert attack_.epsilon == pytest.approx(registry.LINF_SHARE * 16.0) and radii[0] is None
    _, radii = ATTACK["hopskipjump"].evasion_attack(16.0, l2=3.0)
    assert radii == (3.0, None)
    assert ATTACK["simba"].evasion_attack(16.0)[1] == (None, None)

    monkeypatch.setitem(ATTACK, "benign", dataclasses.replace(ATTACK["benign"], budget=7))
    config = SuiteConfig(model="digits", benign_clients=2)
    report = run_suite(["benign"], config, lambda _: OnnxTarget.builtin("digits"))
    assert report.entries[0]["queries"] == 2 * 7
