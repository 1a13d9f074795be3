"""The certify stage's released radius: rounded down to the policy's step, written alike."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from guard.defenses.smoothing import Certificate
from guard.stages.certify import CertifyOptions, RadiusGrid
from guard.stages.options import OptionError


def certificate(radius: float, label: int | None = 3) -> Certificate:
    return Certificate(label, radius, label is None, cAHat=3, nA=990, n=1000, pABar=0.98)


@pytest.mark.parametrize(
    ("step", "radius", "released", "text"),
    [
        (0.125, 1.3509164790, 1.25, "1.250"),
        (0.125, 0.0743, 0.0, "0.000"),
        (0.05, 0.3, 0.3, "0.30"),  # 0.3 / 0.05 is 5.999... in floats
        (0.1, 0.30000000000000004, 0.3, "0.3"),
        (0.25, 2.0, 2.0, "2.00"),
        (1.0, 0.99, 0.0, "0"),
    ],
)
def test_the_radius_is_rounded_down_to_the_step(
    step: float, radius: float, released: float, text: str
) -> None:
    r = RadiusGrid(step).release(certificate(radius))
    assert r.label == 3 and not r.abstained
    assert (r.radius, r.text) == (released, text)
    assert r.radius <= radius


def test_released_radii_are_on_the_grid_never_above_the_certificate() -> None:
    rng = np.random.default_rng(0)
    for step in (0.125, 0.05, 0.075, 0.333333):
        grid = RadiusGrid(step)
        for radius in rng.uniform(0, 4, 500):
            r = grid.release(certificate(float(radius)))
            assert r.radius <= radius + 1e-9 and radius - r.radius < step + 1e-9
            assert abs(r.radius / step - round(r.radius / step)) < 1e-6
            assert len(repr(r.radius).split(".")[1]) <= 6 and float(r.text) == r.radius


def test_certified_only_releases_one_step_or_abstains() -> None:
    grid = RadiusGrid(0.125)
    assert grid.release(certificate(1.35), certified_only=True).radius == 0.125
    assert grid.release(certificate(0.125), certified_only=True).text == "0.125"
    low = grid.release(certificate(0.1), certified_only=True)
    assert low.abstained and low.label == -1 and low.radius == 0.0 and low.text == "abstain"
    assert grid.release(certificate(0.0, None)).text == "abstain"


def test_the_default_step_is_a_quarter_sigma_on_six_decimals() -> None:
    assert CertifyOptions(sigma=0.5, source="local").step == 0.125
    assert CertifyOptions(sigma=1 / 3, source="local").step == 0.083333
    assert CertifyOptions(sigma=0.5, source="local", radius_step=0.05).step == 0.05


@pytest.mark.parametrize(
    ("changes", "key", "message"),
    [
        ({"radius_step": 0.0000001}, "radius_step", "at most 6 decimals"),
        ({"max_concurrent": 2, "client_max_concurrent": 3}, "client_max_concurrent", "<= max_"),
        (
            {"max_samples_per_second": 100.0, "client_samples_per_second": 200.0},
            "client_samples_per_second",
            "must be <= max_samples_per_second (100); got 200",
        ),
    ],
)
def test_options_that_cannot_hold_are_refused(
    changes: dict[str, object], key: str, message: str
) -> None:
    base = CertifyOptions(sigma=0.5, source="local")
    with pytest.raises(OptionError) as caught:
        dataclasses.replace(base, **changes)
    assert caught.value.key == key and message in str(caught.value)


def test_client_shares_default_to_part_of_the_totals() -> None:
    o = CertifyOptions(sigma=0.5, source="local", max_concurrent=4, max_samples_per_second=1e5)
    assert (o.client_concurrent, o.client_rate) == (3, 5e4)
    one = CertifyOptions(sigma=0.5, source="local", max_concurrent=1)
    assert (one.client_concurrent, one.client_rate) == (1, None)
