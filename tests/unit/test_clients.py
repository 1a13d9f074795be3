from __future__ import annotations

from pathlib import Path

import pytest

from guard.clients import Client, ClientDirectory, key_digest, load_keys, new_key, token_matches
from guard.errors import Forbidden, PolicyError, Unauthorized


def write_keys(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "keys.yaml"
    path.write_text(text)
    return path


def test_keys_file_maps_hashed_keys_to_clients(tmp_path: Path) -> None:
    alice, bob = new_key(), new_key()
    path = write_keys(
        tmp_path,
        f"clients:\n  alice:\n    key_sha256: {key_digest(alice)}\n    models: [digits]\n"
        f"  bob:\n    key_sha256: {key_digest(bob).upper()}\n",
    )
    directory = ClientDirectory(keys=load_keys(path))
    a = directory.identify({"X-API-Key": alice}, "10.0.0.1")
    assert a.name == "alice"
    directory.authorize(a, "digits")
    with pytest.raises(Forbidden, match="alice may not call model breast_cancer"):
        directory.authorize(a, "breast_cancer")
    b = directory.identify({"X-API-Key": bob}, None)
    directory.authorize(b, "breast_cancer")  # no models listed: every model


@pytest.mark.parametrize("headers", [{}, {"X-API-Key": ""}, {"X-API-Key": "gk_wrong"}])
def test_missing_or_unknown_key_is_401(tmp_path: Path, headers: dict[str, str]) -> None:
    path = write_keys(tmp_path, f"clients:\n  alice:\n    key_sha256: {key_digest('k')}\n")
    with pytest.raises(Unauthorized, match="X-API-Key") as info:
        ClientDirectory(keys=load_keys(path)).identify(headers, "10.0.0.1")
    assert "gk_wrong" not in str(info.value)  # never echo a presented key


def test_address_identity_and_forwarded_for() -> None:
    assert ClientDirectory().identify({}, "10.1.2.3").name == "addr:10.1.2.3"
    headers = {"X-Forwarded-For": "203.0.113.7, 10.0.0.1"}
    assert ClientDirectory().identify(headers, "10.0.0.1").name == "addr:10.0.0.1"
    trusting = ClientDirectory(trust_forwarded_for=True)
    assert trusting.identify(headers, "10.0.0.1").name == "addr:203.0.113.7"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("clients:\n  a:\n    key_sha256: abc\n", "clients.a.key_sha256 must be 64 hex digits"),
        ("clients:\n  a:\n    key: plain\n", "clients.a.key_sha256 is required"),
        (
            f"clients:\n  a:\n    key_sha256: {'a' * 64}\n  b:\n    key_sha256: {'a' * 64}\n",
            "is also the key of a",
        ),
        ("users: {}\n", "clients is required"),
    ],
)
def test_bad_keys_files(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(PolicyError, match=message):
        load_keys(write_keys(tmp_path, text))


def test_admin_token_check() -> None:
    digest = key_digest("s3cret")
    assert token_matches("s3cret", digest)
    assert not token_matches("s3cret ", digest)
    assert not token_matches(None, digest)


def test_forwarded_for_that_is_not_an_address_falls_back_to_the_peer() -> None:
    trusting = ClientDirectory(trust_forwarded_for=True)
    assert trusting.identify({"X-Forwarded-For": "<script>, 10.0.0.1"}, "10.0.0.9").name == "addr:10.0.0.9"
    assert trusting.identify({"X-Forwarded-For": "2001:db8::1"}, "10.0.0.9").name == "addr:2001:db8::1"


def test_key_that_was_not_utf8_hashes_to_no_known_key() -> None:
    directory = ClientDirectory(keys={key_digest("k"): Client("alice")})
    with pytest.raises(Unauthorized):
        directory.identify({"X-API-Key": "\udcff\udcfe"}, None)
