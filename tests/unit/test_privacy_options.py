"""The privacy stage's options built in code (as the tuner will), and its key from the env."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import numpy as np
import pytest

from guard.clients import Client
from guard.defenses.accountant import zcdp_rho
from guard.defenses.privacy import ConfidenceBins, Gaussian, Laplace, Rounding, gaussian_sigma
from guard.inference import InferRequest, InferResponse
from guard.pipeline import RequestContext
from guard.stages.env import StageEnv
from guard.stages.options import OptionError
from guard.stages.privacy import (
    DEFAULT_SECRET_ENV,
    BudgetOptions,
    MechanismOptions,
    Privacy,
    PrivacyOptions,
)

LAPLACE = PrivacyOptions(mechanism="laplace", epsilon=1.0)


def env(**environ: str) -> StageEnv:
    return StageEnv(model="m", backend=None, local=None, metadata=None, environ=environ)


def refused(build: Any) -> OptionError:
    with pytest.raises(OptionError) as caught:
        build()
    return caught.value


def test_a_mechanism_takes_its_defaults_and_refuses_other_mechanisms_keys() -> None:
    rounding = MechanismOptions(mechanism="round")
    assert rounding.build(None) == Rounding(decimals=2, keep_argmax=True)
    error = refused(lambda: MechanismOptions(mechanism="round", k=3))
    assert (error.key, error.message) == (
        "k",
        "does not apply to mechanism round (it takes decimals, keep_argmax)",
    )
    assert refused(lambda: MechanismOptions(mechanism="label_only", epsilon=1.0)).message.endswith(
        "(it takes no options)"
    )
    assert refused(lambda: MechanismOptions(mechanism="laplace")).key == "epsilon"
    assert "one of them" in refused(lambda: MechanismOptions(mechanism="gaussian")).message


def test_bins_take_cuts_and_confidences_and_refuse_noise_options() -> None:
    one = MechanismOptions(mechanism="bins", confidences=(0.97,))
    assert one.build(None) == ConfidenceBins(cuts=(), confidences=(0.97,))
    assert refused(lambda: MechanismOptions(mechanism="bins")).key == "confidences"
    error = refused(lambda: MechanismOptions(mechanism="bins", cuts=(0.5,), confidences=(0.9,)))
    assert (error.key, error.message) == (
        "confidences",
        "needs one level more than cuts (2); got 1",
    )
    error = refused(
        lambda: MechanismOptions(mechanism="bins", cuts=(0.9, 0.5), confidences=(1, 1, 1))
    )
    assert error.key == "cuts" and "rise strictly" in error.message
    assert refused(
        lambda: MechanismOptions(mechanism="bins", confidences=(0.9,), epsilon=1.0)
    ).message == ("does not apply to mechanism bins (it takes cuts, confidences, ranked)")
    assert (
        refused(
            lambda: PrivacyOptions(
                mechanism="bins", confidences=(0.9,), budget=BudgetOptions(epsilon=5.0)
            )
        ).key
        == "budget"
    )


def test_a_gaussian_from_epsilon_gets_sigma_at_delta() -> None:
    options = PrivacyOptions(mechanism="gaussian", epsilon=1.0, delta=1e-5)
    expected = gaussian_sigma(zcdp_rho(1.0, 1e-5))
    assert options.build(options.delta) == Gaussian(sigma=expected)
    assert options.build(None).sigma > expected  # the default delta, 1e-6, needs more noise
    assert refused(lambda: dataclasses.replace(LAPLACE, delta=1e-5)).key == "delta"


def test_rules_across_keys_hold_for_replaced_options() -> None:
    noisier = MechanismOptions(mechanism="laplace", epsilon=0.25)
    options = dataclasses.replace(LAPLACE, degraded=noisier)
    assert options.degraded.build(None) == Laplace(epsilon=0.25)
    error = refused(lambda: dataclasses.replace(options, epsilon=0.1))  # degraded now weaker
    assert error.key == "degraded"
    assert "at least as much noise" in error.message
    budget = BudgetOptions(epsilon=10.0)
    assert dataclasses.replace(LAPLACE, budget=budget).budget == budget
    error = refused(
        lambda: dataclasses.replace(LAPLACE, mechanism="round", epsilon=None, budget=budget)
    )
    assert error.key == "budget"
    assert error.message.startswith("needs a noisy mechanism")


def context(x: np.ndarray, scores: np.ndarray) -> RequestContext:
    ctx = RequestContext(
        request_id="r", model="m", client=Client("alice"), request=InferRequest("m", {"x": x})
    )
    ctx.response = InferResponse("m", {"probabilities": scores.copy()})
    return ctx


async def released(stage: Privacy, x: np.ndarray, scores: np.ndarray) -> np.ndarray:
    ctx = context(x, scores)
    await stage.on_response(ctx)
    assert ctx.response is not None
    return np.asarray(ctx.response.outputs["probabilities"])


async def test_the_noise_key_comes_from_the_environment_the_stage_was_given() -> None:
    rng = np.random.default_rng(7)
    x = rng.normal(size=(4, 3)).astype(np.float32)
    scores = rng.dirichlet(np.ones(5), size=4)
    options = dataclasses.replace(LAPLACE, secret_env="KEY")
    one = Privacy(options, env(KEY="a-replica-secret-0123"))
    same = Privacy(options, env(KEY="a-replica-secret-0123"))
    other = Privacy(options, env(KEY="another-secret-45678"))
    assert one.secret == b"a-replica-secret-0123"
    first = await released(one, x, scores)
    assert not np.allclose(first, scores)
    np.testing.assert_array_equal(await released(same, x, scores), first)  # replicas agree
    assert not np.allclose(await released(other, x, scores), first)


def test_a_named_key_must_be_set_and_long_enough() -> None:
    options = dataclasses.replace(LAPLACE, secret_env="KEY")
    unset = refused(lambda: Privacy(options, env()))
    assert (unset.key, unset.message) == (
        "secret_env",
        "names environment variable KEY, which is not set",
    )
    assert "needs at least 16" in refused(lambda: Privacy(options, env(KEY="short"))).message
    assert Privacy(dataclasses.replace(options, consistent=False), env()).secret is None


def test_without_the_default_key_a_random_one_is_drawn_with_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger="guard.stages.privacy"):
        first, second = Privacy(LAPLACE, env()), Privacy(LAPLACE, env())
    assert first.secret is not None and len(first.secret) == 32
    assert first.secret != second.secret
    assert f"{DEFAULT_SECRET_ENV} is not set" in caplog.text
    given = Privacy(LAPLACE, env(**{DEFAULT_SECRET_ENV: "the-default-key-0123"}))
    assert given.secret == b"the-default-key-0123"
