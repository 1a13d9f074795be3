"""A real guard served in-process on loopback, and what it recorded: for measurements.

A measurement must count what the guard *did* to each client, not what the
client was told: a guard may answer a detected client silently (status 200, no
verdict header, misleading scores). So :class:`InProcessGuard` runs the guard
with an audit log (``audit: {path: ...}``; one JSON line per finding, with the
request id and the client's name) and its own Prometheus registry, and
:class:`AuditTrail` reads the findings back per request id and per client.

:func:`measurement_policy` writes the policy a measurement runs: a policy file
(default: the built-in ``guard/policies/default.yaml``) with every ``budget``
stage's quotas raised so only detection decides, Blacklight hashing with a
fixed key (so a run repeats exactly), the audit log pointed at a file of the
run, and a keys file naming every client of the run (client ``name`` has key
``key-{name}``; see :func:`api_key`).
"""

from __future__ import annotations

import asyncio
import copy
import os
import threading
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
import yaml

if TYPE_CHECKING:
    from guard.config import Policy

DEFAULT_POLICY = Path(__file__).resolve().parents[1] / "policies" / "default.yaml"
UNLIMITED = 1_000_000_000  # quota that detection-only measurements raise budgets to
BLACKLIGHT_KEY_ENV = "GUARD_MEASURE_BLACKLIGHT_KEY"
PRIVACY_KEY_ENV = "GUARD_PRIVACY_SECRET"  # consistent privacy noise within the run
# Findings whose action changed what the client got. ``flag`` and ``shadow`` did not;
# any other action (deny, degrade, and any silent/misleading action a policy adds) did.
HARMLESS_ACTIONS = frozenset({"allow", "flag", "shadow"})
REFUSING_ACTIONS = frozenset({"deny"})


def api_key(name: str) -> str:
    """The API key of client ``name`` in a policy from :func:`measurement_policy`."""
    return f"key-{name}"


def measurement_policy(
    directory: Path,
    clients: Iterable[str],
    *,
    base: Path = DEFAULT_POLICY,
    raise_quotas: bool = True,
    models: Iterable[str] | None = None,
) -> Path:
    """Write ``directory/policy.yaml``: ``base`` with quotas raised (``raise_quotas``),
    an audit log at ``directory/audit.jsonl`` and a keys file for ``clients``; only
    ``models`` kept when given. Returns the policy's path."""
    from guard.clients import key_digest

    document: dict[str, Any] = copy.deepcopy(yaml.safe_load(base.read_text(encoding="utf-8")))
    if models is not None:
        keep = set(models)
        document["models"] = {k: v for k, v in document["models"].items() if k in keep}
    for model in document["models"].values():
        for stage in model.get("stages", []):
            if isinstance(stage.get("blacklight"), dict):
                # a fixed hash key (InProcessGuard sets it): the same run twice, the same hashes
                stage["blacklight"].setdefault("key_env", BLACKLIGHT_KEY_ENV)
            if raise_quotas and "budget" in stage:
                stage["budget"]["limits"] = [
                    {"queries": UNLIMITED, "per": limit["per"]}
                    for limit in stage["budget"]["limits"]
                ]
    names = list(dict.fromkeys(clients))
    keys = {"clients": {n: {"key_sha256": key_digest(api_key(n))} for n in names}}
    (directory / "keys.yaml").write_text(yaml.safe_dump(keys))
    clients_section = dict(document.get("clients") or {})
    clients_section["keys_file"] = str(directory / "keys.yaml")
    document["clients"] = clients_section
    document["audit"] = {"path": str(directory / "audit.jsonl")}
    path = directory / "policy.yaml"
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


class InProcessGuard:
    """A guard on 127.0.0.1 (a free port) in a thread of its own, so synchronous
    attack clients can query it. ``with InProcessGuard(path) as guard: guard.url``.

    A policy file is loaded with ``environ`` (default: this process's environment) plus
    fixed measurement secrets where it sets none: ``GUARD_MEASURE_BLACKLIGHT_KEY`` and
    ``GUARD_PRIVACY_SECRET``, so the same run twice hashes and perturbs alike. A policy
    already parsed (``guard tune``'s candidates) is served as it is, with its own."""

    def __init__(self, policy: Path | Policy, *, environ: Mapping[str, str] | None = None) -> None:
        from prometheus_client import CollectorRegistry

        self.policy = Path(policy) if isinstance(policy, str) else policy
        self.environ = {
            BLACKLIGHT_KEY_ENV: "measurement-blacklight-key",
            PRIVACY_KEY_ENV: "measurement-privacy-key",
            **(os.environ if environ is None else environ),
        }
        self.registry = CollectorRegistry()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.runner: Any = None
        self.port = 0
        self.audit_path: Path | None = None
        self.app: Any = None

    def __enter__(self) -> InProcessGuard:
        self.thread.start()
        try:
            asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(120)
        except BaseException:
            self._stop_loop()
            raise
        return self

    async def _start(self) -> None:
        from aiohttp import web

        from guard.config import load_policy
        from guard.server import create_app, make_runner

        policy = self.policy
        if isinstance(policy, Path):
            policy = load_policy(policy, environ=self.environ)
        self.audit_path = Path(policy.audit_path) if policy.audit_path not in (None, "-") else None
        app = self.app = create_app(policy, registry=self.registry)
        self.runner = make_runner(app)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", 0).start()
        self.port = self.runner.addresses[0][1]

    def __exit__(self, *exc: object) -> None:
        if self.runner is not None:
            asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(120)
            self.runner = None
        self._stop_loop()

    def _stop_loop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()
        self.loop.close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def audit(self) -> AuditTrail:
        """The findings recorded so far (none when the policy has no audit file)."""
        if self.app is not None:  # a thread writes the log: wait for what it was given
            from guard.appkeys import LIVE

            self.app[LIVE].current().audit.flush()
        if self.audit_path is None or not self.audit_path.exists():
            return AuditTrail([])
        return AuditTrail.read(self.audit_path)

    def stage_seconds(self) -> dict[str, float]:
        """Mean seconds per observation of each stage (``guard_stage_duration_seconds``)."""
        sums: dict[str, float] = defaultdict(float)
        counts: dict[str, float] = defaultdict(float)
        for family in self.registry.collect():
            for sample in family.samples:
                stage = sample.labels.get("stage")
                if sample.name == "guard_stage_duration_seconds_sum" and stage:
                    sums[stage] += sample.value
                elif sample.name == "guard_stage_duration_seconds_count" and stage:
                    counts[stage] += sample.value
        return {s: sums[s] / counts[s] for s in sums if counts.get(s)}

    def metric(self, name: str, labels: Mapping[str, str] | None = None) -> float:
        """Sum of the registry's samples called ``name`` whose labels include ``labels``."""
        total = 0.0
        for family in self.registry.collect():
            for sample in family.samples:
                if sample.name == name and all(
                    sample.labels.get(k) == v for k, v in (labels or {}).items()
                ):
                    total += sample.value
        return total


@dataclass(frozen=True, slots=True)
class AuditFinding:
    request_id: str
    client: str
    stage: str
    action: str  # what was done
    intended: str = ""  # what the stage's action would do in enforce mode

    @property
    def harmful(self) -> bool:
        """The client got less than a plain answer (refused, degraded, misled...)."""
        return self.action not in HARMLESS_ACTIONS

    @property
    def refusing(self) -> bool:
        """Refused: a ``deny``, or a harmful action standing in for one (a silent deny
        that answers with a misleading 200 still denies the client)."""
        return self.action in REFUSING_ACTIONS or (
            self.harmful and self.intended in REFUSING_ACTIONS
        )


@dataclass(slots=True)
class AuditTrail:
    """An audit log's findings, indexed by request id and by client name."""

    findings: list[AuditFinding]
    by_request: dict[str, list[AuditFinding]] = field(default_factory=dict)
    by_client: dict[str, list[AuditFinding]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        requests: dict[str, list[AuditFinding]] = defaultdict(list)
        clients: dict[str, list[AuditFinding]] = defaultdict(list)
        for f in self.findings:
            requests[f.request_id].append(f)
            clients[f.client].append(f)
        self.by_request, self.by_client = dict(requests), dict(clients)

    @classmethod
    def read(cls, path: Path) -> AuditTrail:
        findings = []
        for line in path.read_bytes().splitlines():
            if not line.strip():
                continue
            record = orjson.loads(line)
            findings.append(
                AuditFinding(
                    str(record.get("request_id")),
                    str(record.get("client")),
                    str(record.get("stage")),
                    str(record.get("action")),
                    str(record.get("intended", "")),
                )
            )
        return cls(findings)

    def of_request(self, request_id: str | None) -> list[AuditFinding]:
        return self.by_request.get(request_id or "", [])

    def of_client(self, name: str) -> list[AuditFinding]:
        return self.by_client.get(name, [])

    def first_caught(
        self, request_ids: Iterable[str | None], *, harmful: bool = False
    ) -> int | None:
        """1-based index of the first of ``request_ids`` with a finding (a harmful one
        if ``harmful``); None if none has."""
        for i, rid in enumerate(request_ids, 1):
            found = self.of_request(rid)
            if any(f.harmful for f in found) if harmful else found:
                return i
        return None
