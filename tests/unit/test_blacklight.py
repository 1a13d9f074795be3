"""Blacklight: the fingerprint kernel against its twin, the fingerprints, the stage."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import numpy as np
import pytest

from guard import _native
from guard._py import fingerprint as twin
from guard.clients import Client
from guard.configreader import Section
from guard.defenses.blacklight import Fingerprinter, FingerprintKey
from guard.errors import PolicyError, RequestError
from guard.inference import InferRequest
from guard.models import load_samples
from guard.pipeline import Action, RequestContext, Verdict
from guard.stages.blacklight import Blacklight
from guard.stages.env import StageEnv
from guard.state.base import client_key
from guard.state.memory import MemoryStore

try:
    from guard._ext import fingerprint as ext
except ImportError:
    ext = None

needs_ext = pytest.mark.skipif(ext is None, reason="the Cython extension is not built")
IMPLS = [
    pytest.param(twin.fingerprint, id="twin"),
    pytest.param(ext.fingerprint if ext else None, id="kernel", marks=needs_ext),
]
KEY = FingerprintKey.derive(b"test secret")


def args_for(x: np.ndarray, **overrides: Any) -> dict[str, Any]:
    rng = np.random.default_rng(x.shape[1])
    defaults = {
        "offsets": rng.random(x.shape[1]) * 3.0,
        "step": 3.0,
        "window": 20,
        "stride": 1,
        "top": 50,
        "multiplier": KEY.multiplier,
        "k1": KEY.k1,
        "k2": KEY.k2,
    }
    return defaults | overrides


def reference(
    x: np.ndarray,
    offsets: np.ndarray,
    step: float,
    window: int,
    stride: int,
    top: int,
    multiplier: int,
    k1: int,
    k2: int,
) -> list[list[int]]:
    """The module docstring's rules in plain Python integers, one window at a time."""
    mask = 2**64 - 1

    def fmix(h: int) -> int:
        h ^= h >> 33
        h = (h * 0xFF51AFD7ED558CCD) & mask
        h ^= h >> 33
        h = (h * 0xC4CEB9FE1A85EC53) & mask
        return h ^ (h >> 33)

    out = []
    for row in np.asarray(x, dtype=np.float64):
        d = len(row)
        w = min(window, d)
        with np.errstate(invalid="ignore"):
            q = np.floor((row + offsets) / step)
        values = [0 if np.isnan(v) else int(np.clip(v, -(2.0**62), 2.0**62)) for v in q]
        e = [fmix((v + k1) & mask) for v in values]
        hashes = set()
        for start in range(0, d - w + 1, stride) if d else ():
            h = 0
            for j in range(w):
                h = (h * multiplier + e[start + j]) & mask
            hashes.add(fmix(h ^ k2))
        out.append(sorted(hashes, reverse=True)[:top])
    return out


def as_lists(result: tuple[np.ndarray, np.ndarray]) -> list[list[int]]:
    hashes, sizes = result
    return [row[:n].tolist() for row, n in zip(hashes, sizes, strict=True)]


# -- the kernel and its twin --------------------------------------------------------------


@pytest.mark.parametrize("fingerprint", IMPLS)
@pytest.mark.parametrize(
    ("d", "options"),
    [
        (64, {}),
        (64, {"window": 1}),
        (64, {"window": 64}),
        (10, {"window": 20}),  # shorter than a window: one window over the whole row
        (64, {"stride": 7}),
        (64, {"stride": 30, "window": 5}),  # stride longer than the window
        (64, {"top": 3}),
        (0, {}),
        (300, {"window": 50, "stride": 25}),  # the paper's ImageNet-sized setting, scaled
    ],
)
def test_fingerprints_follow_the_rules(fingerprint: Any, d: int, options: dict[str, Any]) -> None:
    x = np.random.default_rng(d).uniform(0, 16, (3, d)).astype(np.float32)
    args = args_for(x, **options)
    got = fingerprint(x, **args)
    assert got[0].dtype == np.uint64 and got[0].shape == (3, args["top"])
    assert as_lists(got) == reference(x, **args)
    assert not got[0][np.arange(args["top"]) >= got[1][:, None]].any()  # zero padded


@needs_ext
@pytest.mark.parametrize("seed", range(40))
def test_kernel_matches_twin_bit_for_bit(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n, d = int(rng.integers(0, 5)), int(rng.integers(0, 200))
    dtype = rng.choice([np.float32, np.float64, np.int64, np.uint8])
    x = (
        rng.normal(8, 6, (n, d))
        if dtype in (np.float32, np.float64)
        else rng.integers(0, 255, (n, d))
    )
    x = x.astype(dtype)
    if x.size and dtype in (np.float32, np.float64):
        x.flat[rng.integers(x.size, size=3)] = [np.nan, np.inf, -np.inf]
    args = args_for(
        x,
        step=float(rng.choice([0.25, 3.0, 50.0])),
        window=int(rng.integers(1, 40)),
        stride=int(rng.integers(1, 30)),
        top=int(rng.integers(1, 80)),
    )
    want, got = twin.fingerprint(x, **args), ext.fingerprint(x, **args)
    assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1])


@needs_ext
def test_kernel_takes_unaligned_and_strided_input() -> None:
    x = np.random.default_rng(0).uniform(0, 16, (4, 64))
    raw = np.frombuffer(
        b"\x00" + x.astype(np.float32).tobytes(), dtype=np.float32, offset=1
    ).reshape(4, 64)
    for view in (raw, x[:, ::-1], np.asfortranarray(x)):
        args = args_for(view)
        assert as_lists(ext.fingerprint(view, **args)) == as_lists(twin.fingerprint(view, **args))


@pytest.mark.parametrize("fingerprint", IMPLS)
def test_nonfinite_values_saturate(fingerprint: Any) -> None:
    x = np.array([[np.nan, np.inf, -np.inf, 1e300, 5.0]])
    args = args_for(x, window=1, offsets=np.zeros(5))
    same_as = np.array([[0.0, 2.0**62 * 3, -(2.0**62) * 3, 2.0**62 * 3, 5.0]])
    assert as_lists(fingerprint(x, **args)) == as_lists(twin.fingerprint(same_as, **args))


@pytest.mark.parametrize("fingerprint", IMPLS)
@pytest.mark.parametrize(
    ("options", "error"),
    [
        ({"step": 0.0}, "step must be a positive"),
        ({"step": float("nan")}, "step must be a positive"),
        ({"window": 0}, "must be >= 1"),
        ({"multiplier": 2}, "multiplier must be an odd"),
        ({"offsets": np.zeros(3)}, "offsets must have shape"),
    ],
)
def test_bad_arguments_are_refused(fingerprint: Any, options: dict[str, Any], error: str) -> None:
    x = np.zeros((1, 8))
    with pytest.raises(ValueError, match=error):
        fingerprint(x, **args_for(x, **options))


def test_native_picks_the_kernel_when_built() -> None:
    forced_off = os.environ.get("GUARD_NO_EXTENSIONS", "") not in ("", "0")
    chosen = ext if (ext is not None and not forced_off) else twin
    assert _native.fingerprint is chosen.fingerprint
    code = "import guard._native as n; print(n.fingerprint.__module__)"
    env = {**os.environ, "GUARD_NO_EXTENSIONS": "1"}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "guard._py.fingerprint"


# -- fingerprints -------------------------------------------------------------------------


def test_key_derivation_is_deterministic_and_secret_dependent() -> None:
    assert FingerprintKey.derive(b"s") == FingerprintKey.derive(b"s")
    assert FingerprintKey.derive(b"s") != FingerprintKey.derive(b"t")
    assert FingerprintKey.derive(b"s").multiplier % 2 == 1
    assert FingerprintKey.random() != FingerprintKey.random()


def test_offsets_are_keyed_and_within_a_step() -> None:
    a = Fingerprinter(key=KEY, step=3.0).offsets(64)
    assert a.shape == (64,) and (a >= 0).all() and (a < 3.0).all()
    assert np.array_equal(a, Fingerprinter(key=KEY, step=3.0).offsets(64))
    assert not np.array_equal(
        a, Fingerprinter(key=FingerprintKey.derive(b"x"), step=3.0).offsets(64)
    )


def shared(a: list[int], b: list[int]) -> int:
    return len(set(a) & set(b))


def test_near_duplicates_share_most_hashes_and_different_inputs_few() -> None:
    x, _ = load_samples("digits")
    rng = np.random.default_rng(0)
    fp = Fingerprinter(key=KEY, step=3.0)
    base = fp(x[:50])
    nudged = fp(np.clip(x[:50] + rng.normal(0, 0.05, x[:50].shape), 0, 16))
    others = fp(x[50:100])
    near = [shared(a, b) for a, b in zip(base, nudged, strict=True)]
    far = [shared(a, b) for a, b in zip(base, others, strict=True)]
    assert np.median(near) > 25 >= np.median(far)
    assert all(len(f) == 45 for f in base)  # 64 - 20 + 1 windows; the top 50 keeps them all
    assert fp(x[:3]) == [fp(x[i : i + 1])[0] for i in range(3)]  # rows are independent


@pytest.mark.parametrize("dtype", ["float32", "float64", "uint8"])
def test_digests_are_the_keyed_sha256_of_dtype_width_and_bytes(dtype: str) -> None:
    import hashlib

    fp = Fingerprinter(key=KEY, step=3.0)
    x = np.random.default_rng(5).uniform(0, 16, (4, 2, 3)).astype(dtype)
    rows = x.reshape(4, 6)
    want = [
        hashlib.sha256(KEY.mac + f"{rows.dtype.str}:6:".encode() + row.tobytes()).digest()[:16]
        for row in rows
    ]
    assert fp.digests(x) == want and fp.digests(x[1:2]) == want[1:2]  # reused for each call
    assert fp.digests(x.astype("float16"))[0] != want[0]  # another dtype, another digest


def test_another_key_gives_unrelated_fingerprints() -> None:
    x, _ = load_samples("digits")
    a = Fingerprinter(key=KEY, step=3.0)(x[:5])
    b = Fingerprinter(key=FingerprintKey.derive(b"other"), step=3.0)(x[:5])
    assert all(shared(p, q) == 0 for p, q in zip(a, b, strict=True))


# -- the stage ----------------------------------------------------------------------------


# The key shifts the quantization grid: fixed, so the stage tests are deterministic.
ENVIRON = {"GUARD_TEST_BL_KEY": "stage tests", "BL_KEY": "hunter2"}


def build(store: MemoryStore | None = None, **options: Any) -> Blacklight:
    env = StageEnv(
        model="digits",
        backend=None,
        local=None,
        metadata=None,
        state=store or MemoryStore(),
        environ=ENVIRON,
    )
    options = {"key_env": "GUARD_TEST_BL_KEY"} | options
    return Blacklight.from_config(Section(options, source="p.yaml", path="blacklight"), env)


def context(x: np.ndarray, client: str = "alice", shadow: bool = False) -> RequestContext:
    request = InferRequest(
        model_name="digits", inputs={"input": np.atleast_2d(x).astype(np.float32)}
    )
    return RequestContext(
        request_id="r", model="digits", client=Client(client), request=request, shadow_mode=shadow
    )


def probes(n: int, seed: int = 0) -> np.ndarray:
    """A boundary walk: one digit nudged a little at a time."""
    x, _ = load_samples("digits")
    rng = np.random.default_rng(seed)
    return np.clip(x[seed] + rng.normal(0, 0.02, (n, 64)), 0, 16)


async def test_repeated_near_duplicates_are_denied() -> None:
    stage = build()
    verdicts = [await stage.on_request(context(q)) for q in probes(5)]
    assert verdicts[:3] == [Verdict.CONTINUE] * 3  # 0, 1, 2 own near-duplicates: allowed
    assert verdicts[3:] == [Verdict.DENY] * 2


async def test_one_retry_is_not_an_attack_and_unrelated_queries_pass() -> None:
    x, _ = load_samples("digits")
    stage = build()
    for row in x[:100]:
        assert await stage.on_request(context(row)) is Verdict.CONTINUE
    assert await stage.on_request(context(x[0])) is Verdict.CONTINUE  # a retry of the first
    jittered = np.clip(x[1] + np.random.default_rng(1).normal(0, 0.3, 64), 0, 16)
    assert await stage.on_request(context(jittered)) is Verdict.CONTINUE  # a re-encoded retry


async def test_exact_repeats_are_never_evidence() -> None:
    """Today's failures: one client sending an input 3 times, 6 clients sending it once."""
    x, _ = load_samples("digits")
    stage = build()
    for _ in range(20):
        ctx = context(x[3])
        assert await stage.on_request(ctx) is Verdict.CONTINUE and not ctx.findings
    for i in range(40):
        ctx = context(x[3], client=f"user-{i}")
        assert await stage.on_request(ctx) is Verdict.CONTINUE and not ctx.findings


async def test_popular_inputs_jittered_by_many_clients_are_not_evidence() -> None:
    x, _ = load_samples("digits")
    rng = np.random.default_rng(2)
    stage = build()
    for i in range(60):  # each client sends its own jittered copy of the same popular digit
        q = np.clip(x[4] + rng.normal(0, 0.2, 64), 0, 16)
        ctx = context(q, client=f"user-{i}")
        assert await stage.on_request(ctx) is Verdict.CONTINUE and not ctx.findings


async def test_priming_by_other_accounts_never_refuses_an_honest_client() -> None:
    """Five accounts send twenty inputs once each (exactly and jittered), then honest
    clients send them: none is refused."""
    x, _ = load_samples("digits")
    rng = np.random.default_rng(3)
    stage = build()
    guessed = x[200:220]
    for account in range(5):
        for row in guessed:
            jitter = rng.normal(0, 0.2, 64) if account % 2 else 0.0
            await stage.on_request(context(np.clip(row + jitter, 0, 16), client=f"p{account}"))
    for i, row in enumerate(guessed):
        for sent in (row, np.clip(row + rng.normal(0, 0.2, 64), 0, 16)):
            ctx = context(sent, client=f"honest-{i}")
            assert await stage.on_request(ctx) is Verdict.CONTINUE and not ctx.findings


async def test_finding_names_both_counts_and_the_technique() -> None:
    stage = build(action="flag")
    for q in probes(4):
        ctx = context(q)
        await stage.on_request(ctx)
    (finding,) = ctx.findings
    assert (finding.stage, finding.action, finding.technique) == (
        "blacklight",
        Action.FLAG,
        "AML.T0043",
    )
    assert (finding.score, finding.threshold) == (3.0, 3.0)
    assert "3 recent queries of this client and 3 of all clients" in finding.message


async def test_many_accounts_each_sending_a_few_probes_are_each_caught() -> None:
    """A Sybil attacker rotating over 10 keys: every key is caught by its own probes."""
    stage = build(action="flag")
    flagged: dict[str, int] = {}
    for i, q in enumerate(probes(60)):
        client = f"sybil-{i % 10}"
        ctx = context(q, client=client)
        await stage.on_request(ctx)
        if ctx.findings and client not in flagged:
            flagged[client] = i
    assert len(flagged) == 10 and max(flagged.values()) < 40


async def test_a_batch_is_compared_row_by_row() -> None:
    ctx = context(probes(4))
    assert await build().on_request(ctx) is Verdict.DENY


async def test_degrade_marks_the_client_for_later_requests() -> None:
    store = MemoryStore()
    stage = build(store, action="degrade", degrade_for="1m")
    for q in probes(4):
        ctx = context(q)
        await stage.on_request(ctx)
    assert ctx.degraded and ctx.findings[-1].action is Action.DEGRADE
    assert await store.marked(client_key("alice", "degrade", "digits"))
    x, _ = load_samples("digits")
    later = context(x[500])
    await stage.on_request(later)
    assert later.degraded and not later.findings
    other = context(x[501], client="bob")
    await stage.on_request(other)
    assert not other.degraded


async def test_misdirect_answers_from_the_first_query_silently_and_persistently() -> None:
    store = MemoryStore()
    stage = build(store, action="misdirect", degrade_for="1m")
    walk = probes(4)
    contexts = []
    for q in walk:
        ctx = context(q)
        assert await stage.on_request(ctx) is Verdict.CONTINUE
        contexts.append(ctx)
    assert [c.substitute is None for c in contexts] == [True, True, True, False]
    assert contexts[-1].findings[0].action is Action.MISDIRECT
    assert not contexts[-1].degraded  # nothing a client could see changes
    anchor = contexts[-1].substitute["input"]
    np.testing.assert_array_equal(anchor, walk[:1].astype(np.float32))
    # Later queries, however transformed, stay misdirected: the mark is the client's.
    x, _ = load_samples("digits")
    later = context(np.clip(walk[0] * 0.5 + 3.0, 0, 16))
    await stage.on_request(later)
    np.testing.assert_array_equal(later.substitute["input"], walk[:1].astype(np.float32))
    other = context(x[501], client="bob")
    await stage.on_request(other)
    assert other.substitute is None


async def test_misdirect_radius_keeps_far_queries_truthful() -> None:
    stage = build(action="misdirect", radius=5.0)
    for q in probes(4):
        await stage.on_request(context(q))
    x, _ = load_samples("digits")
    far = context(x[700])
    await stage.on_request(far)
    assert far.substitute is None and not far.findings  # answered truthfully, nothing to record
    near = context(probes(6)[5])
    await stage.on_request(near)
    np.testing.assert_array_equal(near.substitute["input"], probes(1).astype(np.float32))
    assert {f.action for f in near.findings} == {Action.MISDIRECT}


async def test_shadow_mode_records_without_acting() -> None:
    store = MemoryStore()
    stage = build(store, action="degrade")
    verdicts = []
    for q in probes(4):
        ctx = context(q, shadow=True)
        verdicts.append(await stage.on_request(ctx))
    assert verdicts == [Verdict.CONTINUE] * 4
    assert ctx.findings[-1].action is Action.SHADOW and ctx.findings[-1].intended is Action.DEGRADE
    assert not ctx.degraded
    assert not await store.marked(client_key("alice", "degrade", "digits"))


async def test_a_client_flooding_its_own_history_loses_only_its_own() -> None:
    stage = build(max_per_client=3, action="flag")
    x, _ = load_samples("digits")
    walk = probes(5)
    for q in walk[:2]:
        await stage.on_request(context(q))
    for row in x[300:303]:  # alice pushes her own first queries out of her share
        await stage.on_request(context(row))
    ctx = context(walk[2])
    await stage.on_request(ctx)
    assert not ctx.findings


async def test_another_clients_flood_cannot_flush_a_history() -> None:
    """Today's failure: 10,000 random rows from one client flushed the table."""
    stage = build(max_queries=50, max_per_client=20, action="flag")
    walk = probes(4)
    for q in walk[:3]:
        await stage.on_request(context(q))
    rng = np.random.default_rng(4)
    for i in range(180):  # junk from one key, then from 30 more keys: the table overflows
        junk = context(rng.uniform(0, 16, (1, 64)), client="flood" if i < 150 else f"f{i}")
        await stage.on_request(junk)
    ctx = context(walk[3])
    await stage.on_request(ctx)
    assert ctx.findings and ctx.findings[0].score == 3.0


async def test_a_multi_input_request_needs_the_input_named() -> None:
    ctx = context(probes(1))
    ctx.request.inputs["mask"] = np.zeros((1, 4), np.float32)
    with pytest.raises(RequestError, match="name it with the stage's input key"):
        await build().on_request(ctx)
    assert await build(input="input").on_request(ctx) is Verdict.CONTINUE


def test_describe_never_shows_the_key() -> None:
    described = build(key_env="BL_KEY").describe()
    assert described["key"] == "from $BL_KEY"
    assert "hunter2" not in repr(described)
    assert (
        described["quantize"],
        described["window"],
        described["top"],
        described["threshold"],
    ) == (3.0, 20, 50, 25)


class SharedStore(MemoryStore):  # stands for a store shared with other replicas
    shared = True
    same_master = False


@pytest.mark.parametrize(
    ("options", "store", "message"),
    [
        ({"key_env": None}, SharedStore(), "needs key_env with a shared state store"),
        ({"key_env": "GUARD_TEST_UNSET_KEY"}, None, "GUARD_TEST_UNSET_KEY, which is not set"),
        ({"quantize": 0}, None, "quantize must be > 0"),
        ({"top": 10, "threshold": 10}, None, "threshold must be <= 9"),
        ({"window": 0}, None, "window must be >= 1"),
        ({"ttl": "forever"}, None, "ttl must be a duration"),
        ({"action": "explode"}, None, "action must be one of"),
        ({"scope": "global"}, None, "unknown key"),
    ],
)
def test_bad_options_stop_the_load(
    options: dict[str, Any], store: MemoryStore | None, message: str
) -> None:
    with pytest.raises(PolicyError, match=message):
        build(store, **options)


def test_a_shared_store_with_a_key_builds() -> None:
    a, b = build(SharedStore(), key_env="BL_KEY"), build(SharedStore(), key_env="BL_KEY")
    x, _ = load_samples("digits")
    assert a.fingerprinter(x[:2]) == b.fingerprinter(x[:2])  # replicas hash alike
    c, d = build(key_env=None), build(key_env=None)
    assert c.fingerprinter(x[:2]) == d.fingerprinter(x[:2])  # one process: one key, across reloads
    assert c.describe()["key"] == "random per process"


def test_the_removed_global_matches_key_is_refused_with_its_reason() -> None:
    from guard.errors import PolicyError

    with pytest.raises(PolicyError, match="global_matches was removed: other clients"):
        build(global_matches=5)
