"""The compose overlays for a Redis Cluster and for Sentinel: their policies are the compose
policy but for ``state``, load as the overlay wires them, and name services that exist."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from guard.config import load_policy
from tests.reliability.deployfiles import DEPLOY
from tests.reliability.test_deploy import ENV

POLICY_TARGET = "/etc/guard/policy/policy.yaml"


def overlay(name: str) -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / f"compose.{name}.yaml").read_text())


def mounted_policy(document: dict[str, Any]) -> Path:
    (mount,) = [
        v for v in document["services"]["guard"]["volumes"] if v.endswith(POLICY_TARGET + ":ro")
    ]
    return DEPLOY / mount.split(":")[0]


@pytest.mark.parametrize("name", ["cluster", "sentinel"])
def test_an_overlay_policy_is_the_compose_policy_but_for_its_state(name: str) -> None:
    path = mounted_policy(overlay(name))
    assert path.name == f"compose-{name}.yaml"
    base = yaml.safe_load((DEPLOY / "policies" / "compose.yaml").read_text())
    mine = yaml.safe_load(path.read_text())
    assert {k: v for k, v in mine.items() if k != "state"} == {
        k: v for k, v in base.items() if k != "state"
    }
    assert mine["state"] != base["state"]


def test_the_cluster_overlay_joins_the_nodes_the_policy_reaches(tmp_path: Path) -> None:
    document = overlay("cluster")
    services = document["services"]
    nodes = [n for n, s in services.items() if "--cluster-enabled" in s.get("command", [])]
    assert sorted(nodes) == ["redis", "redis-1", "redis-2"]
    script = " ".join(services["redis-cluster-init"]["entrypoint"])
    assert all(f"getent hosts {n} " in script for n in nodes) and "--cluster create" in script
    assert set(services["redis-cluster-init"]["depends_on"]) == set(nodes)
    url = services["guard"]["environment"]["REDIS_URL"]
    assert url.split("//")[1].split(":")[0] in nodes
    policy = load_policy(mounted_policy(document), environ=ENV | {"REDIS_URL": url})
    assert policy.state.cluster and policy.state.fingerprint_shards == len(nodes)


def test_the_sentinel_overlay_names_its_sentinels_and_master() -> None:
    document = overlay("sentinel")
    services = document["services"]
    policy = load_policy(mounted_policy(document), environ=ENV)
    sentinel = policy.state.sentinel
    assert sentinel is not None and policy.state.url is None
    assert [host for host, _ in sentinel.addresses] == sorted(
        n for n in services if n.startswith("redis-sentinel-")
    )
    assert {port for _, port in sentinel.addresses} == {26379}
    for host, _ in sentinel.addresses:
        script = " ".join(services[host]["entrypoint"])
        assert f"sentinel monitor {sentinel.master} redis 6379 2" in script
    command = services["redis-replica"]["command"]
    assert command[command.index("--replicaof") + 1 :][:2] == ["redis", "6379"]
