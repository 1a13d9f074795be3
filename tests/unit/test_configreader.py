from __future__ import annotations

import pytest

from guard.configreader import Section
from guard.errors import PolicyError


def section(data: object) -> Section:
    return Section(data, source="p.yaml", path="models.m.stages[0].x")


@pytest.mark.parametrize(
    ("data", "read", "message"),
    [
        (
            {"sigma": -0.5},
            lambda s: s.float("sigma", gt=0),
            "p.yaml: models.m.stages[0].x.sigma must be > 0; got -0.5",
        ),
        ({"n": 1.5}, lambda s: s.int("n"), "x.n must be an integer; got 1.5"),
        ({"n": True}, lambda s: s.int("n"), "x.n must be an integer; got True"),
        ({"n": 0}, lambda s: s.int("n", min=1), "x.n must be >= 1; got 0"),
        (
            {"a": "maybe"},
            lambda s: s.choice("a", ["deny", "flag"]),
            "x.a must be one of deny, flag; got 'maybe'",
        ),
        ({"on": "yes"}, lambda s: s.bool("on"), "x.on must be true or false; got 'yes'"),
        ({"shape": [8, "a"]}, lambda s: s.shape("shape"), "x.shape must be a list of sizes"),
        ({"shape": [-2]}, lambda s: s.shape("shape"), "x.shape must be a list of sizes"),
        ({}, lambda s: s.str("url"), "x.url is required"),
        ({"v": float("nan")}, lambda s: s.float("v"), "x.v must be a number; got nan"),
    ],
)
def test_bad_values_name_file_path_constraint_and_value(data, read, message) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(PolicyError) as info:
        read(section(data))
    assert message in str(info.value)


def test_unknown_keys_are_rejected_with_the_known_ones() -> None:
    s = section({"sigma": 0.25, "sigam": 1})
    assert s.float("sigma") == 0.25
    with pytest.raises(PolicyError, match=r"unknown key\(s\) sigam; known here: sigma"):
        s.finish()


def test_defaults_apply_when_absent_or_null() -> None:
    s = section({"n": None})
    assert s.int("n", 7) == 7
    assert s.float("m", None) is None
    s.finish()


def test_non_mapping_is_refused() -> None:
    with pytest.raises(PolicyError, match="must be a mapping; got"):
        section([1, 2])
