"""Hostile bodies and headers against real guard processes (hypothesis).

Two guards: an *upstream* serving the demo models with no stages, and a *front*
guard with the detection stages, a stage-less embedded model (the model itself
sees whatever decodes) and models forwarded to the upstream (JSON and binary).
Whatever arrives, the front answers within the client's timeout, with a 4xx in
the protocol's error format or a 200, never a 5xx (its upstream is healthy, so
no 502/503/504 either), and both guards are healthy and log no traceback after.

``GUARD_FUZZ_EXAMPLES`` sets the examples per property (default 60).
"""

from __future__ import annotations

import base64
import json
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from guard.inference import DATATYPES
from guard.models import load_samples
from tests.reliability.conftest import (
    GuardProcess,
    GuardSpawner,
    Reply,
    assert_healthy,
    digits_model,
    env_int,
    request,
    v2_body,
)

EXAMPLES = env_int("GUARD_FUZZ_EXAMPLES", 60)
TIMEOUT = 10.0  # seconds: a request unanswered by then is a hang
SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,  # the same examples on every run; raise GUARD_FUZZ_EXAMPLES to go wider
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
MODELS = ("digits", "raw", "cancer", "proxied", "proxied_binary")


@dataclass
class Fuzzed:
    front: GuardProcess
    upstream: GuardProcess

    def send(self, path: str, body: bytes, headers: dict[str, str] | None = None) -> Reply:
        reply = request("POST", self.front.url + path, body, headers, timeout=TIMEOUT)
        assert reply.status < 500, (path, body[:300], reply.status, reply.body[:300])
        if reply.status >= 400:
            assert reply.headers.get("content-type", "").startswith("application/json"), reply
            assert isinstance(orjson.loads(reply.body)["error"], str)
        return reply

    def check(self) -> None:
        assert_healthy(self.front)
        assert_healthy(self.upstream)
        assert "Traceback" not in self.front.log() + self.upstream.log()


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fuzzed]:
    spawner = GuardSpawner(tmp_path_factory.mktemp("fuzz"))
    try:
        upstream = spawner({
            "version": 1,
            "models": {
                "digits": {"model": "builtin:digits", "stages": []},
                "breast_cancer": {"model": "builtin:breast_cancer", "stages": []},
            },
        })  # fmt: skip
        forward = {"url": upstream.url, "model": "digits", "timeout": 5}
        front = spawner({
            "version": 1,
            "models": {
                "digits": digits_model(
                    {"budget": {"limits": [{"queries": 10**9, "per": "1m"}]}},
                    {"blacklight": {"action": "flag"}},
                    {"prada": {"action": "flag", "min_queries": 3, "every": 1}},
                ),
                "raw": {"model": "builtin:digits", "stages": []},
                "cancer": {"model": "builtin:breast_cancer",
                           "stages": [{"validate": {"min": 0.0, "max": 10000.0}}]},
                "proxied": {"upstream": forward, "stages": []},
                "proxied_binary": {"upstream": {**forward, "binary": True}, "stages": []},
            },
            "limits": {"max_body_bytes": 1 << 20},
        })  # fmt: skip
        yield Fuzzed(front, upstream)
    finally:
        spawner.stop_all()


def v2_path(model: str) -> str:
    return f"/v2/models/{model}/infer"


def tf_path(model: str) -> str:
    return f"/v1/models/{model}:predict"


PATHS = st.sampled_from(MODELS).flatmap(
    lambda m: st.sampled_from([v2_path(m), tf_path(m), f"/v2/models/{m}/versions/1/infer"])
)
NUMBERS = (
    st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.sampled_from([0, 1, 16, -1, 1e308, -1e308, 5e-324])
)
SCALARS = st.none() | st.booleans() | NUMBERS | st.text(max_size=20)
JSON = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=12), inner, max_size=6)
    ),
    max_leaves=40,
)
DIMENSIONS = (
    st.integers(-3, 70) | st.integers(-(2**64), 2**64) | st.sampled_from([2**31, 2**63 - 1])
)
PRINTABLE = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=30)
SHAPES = st.lists(DIMENSIONS, max_size=4) | st.just([1, 64]) | st.just([2, 30]) | JSON


def dumps(value: Any) -> bytes:
    """JSON as sloppy clients write it: NaN/Infinity literals and huge integers allowed."""
    return json.dumps(value, allow_nan=True).encode()


@st.composite
def v2_documents(draw: Callable[..., Any]) -> tuple[bytes, dict[str, str]]:
    """A V2 request, plausible enough to reach the decoders' corners."""
    n = draw(st.sampled_from([1, 2, 30, 64, 128, 0]))
    data = draw(
        st.lists(NUMBERS, min_size=0, max_size=2 * n + 2)
        | st.lists(st.lists(NUMBERS, max_size=n + 1), max_size=3)
        | st.lists(st.text(max_size=5), max_size=4)
        | JSON
    )
    tensor: dict[str, Any] = {
        "name": draw(st.sampled_from(["input", "x", ""]) | st.text(max_size=8)),
        "shape": draw(SHAPES),
        "datatype": draw(st.sampled_from([*DATATYPES, "BF16", "fp32", "", "STRING"]) | JSON),
    }
    binary = draw(st.booleans())
    if binary:
        tensor["parameters"] = {"binary_data_size": draw(DIMENSIONS)}
    elif draw(st.booleans()):
        tensor["data"] = data
    doc: dict[str, Any] = {
        "inputs": draw(st.just([tensor]) | st.lists(st.just(tensor), max_size=3) | JSON)
    }
    if draw(st.booleans()):
        doc["outputs"] = draw(
            st.lists(st.fixed_dictionaries({"name": st.sampled_from(["label", "probabilities", "nope"])},
                                           optional={"parameters": JSON}), max_size=3) | JSON
        )  # fmt: skip
    if draw(st.booleans()):
        doc["parameters"] = draw(
            st.fixed_dictionaries({}, optional={"binary_data_output": SCALARS, "certify": SCALARS})
            | JSON
        )
    if draw(st.booleans()):
        doc["id"] = draw(SCALARS)
    header = dumps(doc)
    tail = draw(st.binary(max_size=600)) if binary else b""
    headers = {
        "Content-Type": draw(
            st.sampled_from(["application/json", "application/octet-stream", "text/plain"])
        )
    }
    if binary or draw(st.booleans()):
        length = draw(
            st.integers(-5, len(header) + len(tail) + 5)
            | st.sampled_from([len(header), 0, 2**63, -(2**63)])
            | PRINTABLE
        )
        headers["Inference-Header-Content-Length"] = str(length)
    return header + tail, headers


@st.composite
def tf_documents(draw: Callable[..., Any]) -> bytes:
    row = st.lists(NUMBERS, min_size=0, max_size=70) | st.lists(
        st.lists(NUMBERS, max_size=3), max_size=3
    )
    b64 = st.binary(max_size=12).map(lambda b: {"b64": base64.b64encode(b).decode()})
    instance = (
        row | b64 | st.dictionaries(st.sampled_from(["input", "x"]), row | b64, max_size=2) | JSON
    )
    key = draw(st.sampled_from(["instances", "inputs"]))
    doc: dict[str, Any] = {key: draw(st.lists(instance, max_size=4) | instance)}
    if draw(st.booleans()):
        doc["signature_name"] = draw(SCALARS)
    if draw(st.booleans()):
        doc[draw(st.sampled_from(["instances", "inputs", "extra"]))] = draw(JSON)
    return dumps(doc)


def test_random_bytes_are_refused_cleanly(fuzzed: Fuzzed) -> None:
    @SETTINGS
    @given(path=PATHS, body=st.binary(max_size=2048), content_type=PRINTABLE)
    def prop(path: str, body: bytes, content_type: str) -> None:
        fuzzed.send(path, body, {"Content-Type": content_type.strip() or "x/y"})

    prop()
    fuzzed.check()


def test_arbitrary_json_is_refused_cleanly(fuzzed: Fuzzed) -> None:
    @SETTINGS
    @given(path=PATHS, doc=JSON)
    def prop(path: str, doc: Any) -> None:
        fuzzed.send(path, dumps(doc))

    prop()
    fuzzed.check()


def test_v2_requests_with_lying_shapes_types_and_lengths(fuzzed: Fuzzed) -> None:
    @SETTINGS
    @given(model=st.sampled_from(MODELS), document=v2_documents())
    def prop(model: str, document: tuple[bytes, dict[str, str]]) -> None:
        body, headers = document
        fuzzed.send(v2_path(model), body, headers)

    prop()
    fuzzed.check()


def test_tf_serving_bodies(fuzzed: Fuzzed) -> None:
    @SETTINGS
    @given(model=st.sampled_from(MODELS), body=tf_documents())
    def prop(model: str, body: bytes) -> None:
        fuzzed.send(tf_path(model), body)

    prop()
    fuzzed.check()


def test_broken_utf8_and_deep_nesting(fuzzed: Fuzzed) -> None:
    valid = dumps(
        {"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": [1.0] * 64}]}
    )

    @SETTINGS
    @given(
        path=PATHS,
        at=st.integers(0, len(valid)),
        junk=st.binary(min_size=1, max_size=8).filter(lambda b: not _utf8(b)),
        depth=st.integers(1, 200_000),
        shape=st.sampled_from(["list", "dict", "mixed"]),
    )
    def prop(path: str, at: int, junk: bytes, depth: int, shape: str) -> None:
        fuzzed.send(path, valid[:at] + junk + valid[at:])
        if shape == "list":
            nested = b"[" * depth + b"1" + b"]" * depth
        elif shape == "dict":
            nested = b'{"a":' * depth + b"1" + b"}" * depth
        else:
            nested = b'[{"a":' * (depth // 2) + b"1" + b"}]" * (depth // 2)
        data = (
            b'{"inputs":[{"name":"input","shape":[1,64],"datatype":"FP32","data":' + nested + b"}]}"
        )
        fuzzed.send(path, data)
        fuzzed.send(path, b'{"instances":' + nested + b"}")

    prop()
    fuzzed.check()


def test_hostile_headers(fuzzed: Fuzzed) -> None:
    body = dumps(
        {"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": [1.0] * 64}]}
    )

    @SETTINGS
    @given(
        path=PATHS,
        request_id=st.text(st.characters(min_codepoint=32, max_codepoint=255), max_size=400),
        api_key=st.text(st.characters(min_codepoint=32, max_codepoint=255), max_size=100),
        forwarded=st.text(st.characters(min_codepoint=32, max_codepoint=255), max_size=100),
    )
    def prop(path: str, request_id: str, api_key: str, forwarded: str) -> None:
        headers = {
            "X-Request-Id": request_id.strip() or "x",
            "X-API-Key": api_key.strip() or "x",
            "X-Forwarded-For": forwarded.strip() or "x",
            "X-Guard-Certify": "1",
        }
        reply = request("POST", fuzzed.front.url + path, body, headers, timeout=TIMEOUT)
        assert reply.status < 500, (headers, reply.status, reply.body[:300])

    prop()
    oversized = request("POST", fuzzed.front.url + v2_path("digits"), body, {"X-Pad": "a" * 20000})
    assert 400 <= oversized.status < 500
    fuzzed.check()


def _utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def raw_exchange(guard: GuardProcess, headers: list[tuple[bytes, bytes]], body: bytes) -> int:
    """POST with header bytes as given (not necessarily UTF-8); the status."""
    head = b"POST /v2/models/digits/infer HTTP/1.1\r\nHost: guard\r\nContent-Length: %d\r\n" % len(
        body
    )
    head += b"".join(name + b": " + value + b"\r\n" for name, value in headers)
    with socket.create_connection(("127.0.0.1", guard.port), timeout=TIMEOUT) as sock:
        sock.sendall(head + b"\r\n" + body)
        answer = b""
        while b"\r\n" not in answer:
            chunk = sock.recv(4096)
            if not chunk:
                break
            answer += chunk
    return int(answer.split(b" ", 2)[1])


@pytest.mark.parametrize("header", ["X-API-Key", "X-Forwarded-For"])
def test_identity_headers_that_are_not_utf8_are_refused(
    spawn_guard: GuardSpawner, header: str
) -> None:
    from guard.clients import key_digest

    body = v2_body(load_samples("digits")[0][:1])
    if header == "X-API-Key":
        guard = spawn_guard(
            {
                "version": 1,
                "models": {"digits": digits_model()},
                "clients": {"keys_file": "keys.yaml"},
            },
            files={"keys.yaml": f"clients:\n  alice:\n    key_sha256: {key_digest('k')}\n"},
        )
    else:  # a finding to audit: blacklight flags the third identical query
        guard = spawn_guard({
            "version": 1,
            "models": {"digits": digits_model({"blacklight": {"action": "flag"}})},
            "clients": {"trust_forwarded_for": True},
            "audit": {"path": "audit.jsonl"},
        })  # fmt: skip
    statuses = [raw_exchange(guard, [(header.encode(), b"\xff\xfe")], body) for _ in range(4)]
    assert all(status < 500 for status in statuses), statuses
    assert_healthy(guard, headers={"X-API-Key": "k"} if header == "X-API-Key" else None)


@pytest.mark.parametrize("field", ["id", "parameters"])
def test_lone_surrogate_escapes_are_refused(spawn_guard: GuardSpawner, field: str) -> None:
    upstream = spawn_guard({"version": 1, "models": {"digits": {"model": "builtin:digits"}}})
    guard = spawn_guard({
        "version": 1,
        "models": {"digits": {"upstream": upstream.url, "model": "builtin:digits", "stages": []}},
    })  # fmt: skip
    x = load_samples("digits")[0][:1]
    tensor = b'{"name":"input","shape":[1,64],"datatype":"FP32","data":%s}' % orjson.dumps(
        x.ravel().tolist()
    )
    extra = b'"id":"\\ud800"' if field == "id" else b'"parameters":{"note":"\\udfff"}'
    reply = request("POST", guard.url + v2_path("digits"), b'{"inputs":[%s],%s}' % (tensor, extra))
    assert reply.status < 500, reply.body
