"""One client saturating certification leaves the others' certification latency within 2x
(issue 21), against a real ``guard serve`` process over 127.0.0.1.

Mallory asks for a certificate on every request from 8 threads at once, back to back;
Alice certifies one digit at a time. The stage's per-client shares (one certification
running per client, a sample rate per client; requests over the share wait their turn
up to ``max_wait`` instead of coming back at once) keep Mallory to her share, so Alice's median
latency stays within 2x of its value without Mallory. Medians over many requests, the
ratio printed (``-s``) for the record.
"""

from __future__ import annotations

import contextlib
import statistics
import threading
import time
from collections import Counter
from typing import Any

import numpy as np

from guard.clients import key_digest
from guard.models import load_samples
from tests.reliability.conftest import GuardSpawner, assert_healthy, digits_model, request, v2_body

INFER = "/v2/models/digits/infer"
KEYS = "clients:\n" + "".join(
    f"  {name}:\n    key_sha256: {key_digest(name + '-key')}\n" for name in ("mallory", "alice")
)
N, N0 = 10_000, 100
CERTIFY = {
    "sigma": 0.5,
    "n": N,
    "n0": N0,
    "batch": 2_500,
    "max_concurrent": 2,  # each client may hold one (client_max_concurrent: max_concurrent - 1)
    "client_samples_per_second": 4 * (N + N0),  # four certifications per second and client
    "max_wait": 2.0,  # over her share, a request waits its turn (then 503)
}
HAMMERS = 8
SAMPLES = 40


def headers(client: str) -> dict[str, str]:
    return {"X-API-Key": f"{client}-key", "X-Guard-Certify": "1"}


def test_a_client_saturating_certification_leaves_others_p50_within_2x(
    spawn_guard: GuardSpawner,
) -> None:
    policy: dict[str, Any] = {
        "version": 1,
        "models": {"digits": digits_model({"certify": CERTIFY})},
        "clients": {"keys_file": "keys.yaml"},
    }
    guard = spawn_guard(
        policy, files={"keys.yaml": KEYS}, env={"GUARD_CERTIFY_SECRET": "a key for the test run"}
    )
    x = load_samples("digits")[0]
    bodies = [v2_body(x[i : i + 1]) for i in range(10)]

    def alice(n: int) -> list[float]:
        seconds = []
        for i in range(n):
            started = time.perf_counter()
            reply = request("POST", guard.url + INFER, bodies[i % 10], headers("alice"), 30)
            seconds.append(time.perf_counter() - started)
            assert reply.status == 200 and reply.json()["parameters"]["certified"] is True
            time.sleep(0.3)  # within her own share: 4 certifications per second
        return seconds

    alice(5)  # warm up
    quiet = statistics.median(alice(SAMPLES))
    stop = threading.Event()
    answered: Counter[int] = Counter()
    rng = np.random.default_rng(0)
    hammer_bodies = [v2_body(np.clip(x[i : i + 1] + rng.normal(0, 1, 64), 0, 16)) for i in range(8)]

    def hammer(k: int) -> None:
        while not stop.is_set():
            with contextlib.suppress(OSError):
                body = hammer_bodies[k % len(hammer_bodies)]
                reply = request("POST", guard.url + INFER, body, headers("mallory"), 30)
                answered[reply.status] += 1

    threads = [threading.Thread(target=hammer, args=(k,)) for k in range(HAMMERS)]
    began = time.perf_counter()
    for thread in threads:
        thread.start()
    try:
        time.sleep(1.0)
        loud = statistics.median(alice(SAMPLES))
    finally:
        stop.set()
        for thread in threads:
            thread.join(60)
    hammered = time.perf_counter() - began
    ratio = loud / quiet
    print(
        f"\nalice's certification p50: {quiet * 1e3:.1f} ms alone, {loud * 1e3:.1f} ms while "
        f"mallory hammers ({ratio:.2f}x); mallory's answers {dict(answered)}"
    )
    assert set(answered) <= {200, 503}, answered
    # She got her share and no more: four per second, plus the bucket's one second's worth.
    assert 0 < answered[200] <= 4 * hammered + 4 + 1, (answered, hammered)
    assert ratio <= 2.0, f"p50 {quiet:.4f} s alone, {loud:.4f} s loaded ({ratio:.2f}x)"
    assert_healthy(guard, headers={"X-API-Key": "alice-key"})
