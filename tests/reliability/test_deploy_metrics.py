"""The alerts and the dashboard query only metrics, labels and label values the guard
really exports; with ``promtool`` on the PATH, the queries parse and the alerts fire
on the series they are meant for (and stay quiet on healthy traffic)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import aiohttp
import numpy as np
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

import guard.errors
from guard.appkeys import METRICS
from guard.models import load_samples
from guard.pipeline import ACTIONS
from guard.stages import STAGES
from tests.integration.conftest import StartGuard
from tests.reliability.conftest import v2_body
from tests.reliability.deployfiles import DEPLOY

ALERTS = DEPLOY / "prometheus" / "alerts.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "guard.json"
SELECTOR = re.compile(r"\b(guard_[a-z0-9_]+)\s*(?:\{([^}]*)\})?")
MATCHER = re.compile(r'(\w+)\s*(=~|!~|!=|=)\s*"([^"]*)"')
BY = re.compile(r"\bby\s*\(([^)]*)\)")
SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
    "summary": ("_count", "_sum", "_created"),
    "gauge": ("",),
    "info": ("_info",),
}
# Grafana's variables, as a query would see them
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__range": "1h", "$model": ".*"}


def alert_expressions() -> dict[str, str]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return {rule["alert"]: rule["expr"] for group in groups for rule in group["rules"]}


def dashboard_expressions() -> dict[str, str]:
    dashboard = json.loads(DASHBOARD.read_text())
    found = {}
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            found[f"{panel['title']} [{target['refId']}]"] = target["expr"]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            found[f"variable {variable['name']}"] = variable["query"]["query"]
    return found


def referenced() -> dict[str, str]:
    return {**{f"alert {k}": v for k, v in alert_expressions().items()}, **dashboard_expressions()}


@pytest.fixture(scope="module")
def exported_labels() -> dict[str, set[str]]:
    """Sample name -> label names, for every metric the guard's registry holds."""
    from prometheus_client import CollectorRegistry
    from prometheus_client.metrics import MetricWrapperBase

    from guard.metrics import GuardMetrics

    metrics = GuardMetrics(CollectorRegistry())
    labels: dict[str, set[str]] = {}
    for value in vars(metrics).values():
        if not isinstance(value, MetricWrapperBase):
            continue
        for family in value.describe():
            for suffix in SUFFIXES[family.type]:
                names = set(value._labelnames)
                if suffix == "_bucket":
                    names.add("le")
                labels[family.name + suffix] = names
    metrics.info.info({"version": "0"})  # as the server sets it: an info's labels are its keys
    for family in metrics.registry.collect():
        for sample in family.samples:
            labels.setdefault(sample.name, set()).update(sample.labels)
    return labels


async def test_referenced_metrics_are_exported_after_real_traffic(
    start_guard: StartGuard,
    http: aiohttp.ClientSession,
    exported_labels: dict[str, set[str]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    stages = [
        {"validate": {"min": 0.0, "max": 16.0}},
        {"budget": {"limits": [{"queries": 6, "per": "1m"}]}},
        # a fixed key: with a fresh random one per guard, the walk below matched in about
        # three runs of four (each key draws its own hashes), which made this test flaky
        {"blacklight": {"action": "deny", "matches": 2, "key_env": "GUARD_TEST_METRICS_KEY"}},
    ]
    monkeypatch.setenv("GUARD_TEST_METRICS_KEY", "a fixed deployment secret")
    guard = await start_guard(
        {"version": 1, "models": {"digits": {"model": "builtin:digits", "stages": stages}}}
    )
    url = guard.make_url("/v2/models/digits/infer")
    x = load_samples("digits")[0]
    statuses = []
    walk = [np.clip(x[:1] + d, 0, 16) for d in (0.0, 0.01, 0.02)]  # near duplicates (exact
    for row in [*walk, x[1:2], x[2:3], x[3:4], x[4:5]]:  # repeats are free), then over budget
        async with http.post(url, data=v2_body(row)) as reply:
            statuses.append(reply.status)
    assert 403 in statuses and 429 in statuses, statuses
    async with http.get(guard.ops_url("/metrics")) as reply:
        scraped = {
            sample.name
            for family in text_string_to_metric_families(await reply.text())
            for sample in family.samples
        }
    registry = {
        family.name + suffix
        for family in guard.app[METRICS].registry.collect()
        for suffix in SUFFIXES[family.type]
    }
    assert set(exported_labels) <= registry
    # What the detection alerts and panels read carries data once detections happened.
    for name in ("guard_findings_total", "guard_requests_total", "guard_errors_total",
                 "guard_request_duration_seconds_bucket", "guard_upstream_duration_seconds_bucket",
                 "guard_stage_duration_seconds_bucket", "guard_requests_in_flight", "guard_build_info"):  # fmt: skip
        assert name in scraped, name
    for where, expr in referenced().items():
        for name, _ in SELECTOR.findall(expr):
            assert name in scraped or name in registry, f"{where}: {name} is not exported"


def test_selectors_use_real_labels_and_values(exported_labels: dict[str, set[str]]) -> None:
    kinds = {
        name for name, value in vars(guard.errors).items()
        if isinstance(value, type) and issubclass(value, guard.errors.GuardError)
    } | {"internal"}  # fmt: skip
    allowed_values = {"stage": set(STAGES), "action": set(ACTIONS), "kind": kinds}
    for where, expr in referenced().items():
        names = set()
        for name, matchers in SELECTOR.findall(expr):
            names.add(name)
            for label, op, value in MATCHER.findall(matchers):
                assert label in exported_labels[name], f"{where}: {name} has no label {label}"
                if label in allowed_values and op in ("=", "=~", "!=", "!~") and "$" not in value:
                    for alternative in value.split("|"):
                        assert alternative in allowed_values[label], (
                            f"{where}: {label}={alternative!r}"
                        )
        for group in BY.findall(expr):
            for label in (g.strip() for g in group.split(",")):
                assert any(label in exported_labels[n] for n in names), f"{where}: by ({label})"


# -- promtool ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        pytest.skip("promtool not on PATH (apt-get install prometheus)")
    return found


def run_promtool(promtool: str, *args: str) -> str:
    result = subprocess.run([promtool, *args], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_alert_rules_and_dashboard_queries_parse(promtool: str, tmp_path: Path) -> None:
    run_promtool(promtool, "check", "rules", str(ALERTS))
    rules = []
    for index, expr in enumerate(dashboard_expressions().values()):
        for variable, value in GRAFANA_VARIABLES.items():
            expr = expr.replace(variable, value)
        if expr.startswith("label_values("):  # Grafana's own function; its argument is a metric
            expr = expr[len("label_values(") :].split(",")[0]
        rules.append({"record": f"dashboard:query_{index}", "expr": expr})
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    run_promtool(promtool, "check", "rules", str(path))


def _series(name: str, labels: dict[str, str], values: str) -> dict[str, str]:
    inner = ",".join(f'{k}="{v}"' for k, v in labels.items())
    return {"series": f"{name}{{{inner}}}", "values": values}


def _latency(model: str, slow: bool) -> list[dict[str, str]]:
    # 100 requests a minute; slow: 20 of them above 1 s (p99 about 2 s), else all under 50 ms.
    under = 80 if slow else 100
    buckets = {"0.05": under, "1.0": under, "2.5": 100, "+Inf": 100}
    return [
        _series("guard_request_duration_seconds_bucket", {"model": model, "le": le}, f"0+{n}x20")
        for le, n in buckets.items()
    ]


def test_alerts_fire_on_attacks_and_faults_and_not_on_healthy_traffic(
    promtool: str, tmp_path: Path
) -> None:
    # The rules as deployed, annotations left out (promtool compares them verbatim).
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    for group in groups:
        for rule in group["rules"]:
            rule.pop("annotations", None)
    rules = tmp_path / "alerts.yml"
    rules.write_text(yaml.safe_dump({"groups": groups}))
    healthy = [
        _series("up", {"job": "inference-guard", "instance": "guard:8000"}, "1x20"),
        _series("guard_requests_total", {"model": "digits", "protocol": "v2", "verdict": "allow", "code": "200"}, "0+600x20"),
        _series("guard_findings_total", {"model": "digits", "stage": "budget", "action": "allow"}, "0+5x20"),
        *_latency("digits", slow=False),
    ]  # fmt: skip
    faulty = [
        _series("up", {"job": "inference-guard", "instance": "guard:8000"}, "0x20"),
        _series("guard_requests_total", {"model": "digits", "protocol": "v2", "verdict": "allow", "code": "200"}, "0+600x20"),
        _series("guard_findings_total", {"model": "digits", "stage": "blacklight", "action": "deny"}, "0+3x20"),
        _series("guard_findings_total", {"model": "digits", "stage": "budget", "action": "deny"}, "0+30x20"),
        _series("guard_errors_total", {"kind": "UpstreamUnavailable"}, "0+120x20"),
        _series("guard_state_errors_total", {"backend": "redis", "op": "incr"}, "0+10x20"),
        _series("guard_certifications_total", {"model": "digits", "outcome": "overloaded"}, "0+5x20"),
        *_latency("digits", slow=True),
    ]  # fmt: skip
    names = [rule["alert"] for group in groups for rule in group["rules"]]
    fired = {
        "GuardDown": [{"job": "inference-guard", "instance": "guard:8000"}],
        "GuardAttackDetected": [{"model": "digits", "stage": "blacklight", "action": "deny"}],
        "GuardBudgetExhaustion": [{"model": "digits", "stage": "budget"}],
        "GuardUpstreamErrors": [{}],
        "GuardHighLatency": [{"model": "digits"}],
        "GuardStateStoreErrors": [{"backend": "redis", "op": "incr"}],
        "GuardCertificationOverloaded": [{"model": "digits"}],
    }
    severities = {rule["alert"]: rule["labels"]["severity"] for g in groups for rule in g["rules"]}
    tests = {
        "rule_files": [str(rules)],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": healthy,
                "alert_rule_test": [
                    {"eval_time": "15m", "alertname": n, "exp_alerts": []} for n in names
                ],
            },
            {
                "interval": "1m",
                "input_series": faulty,
                "alert_rule_test": [
                    {
                        "eval_time": "15m",
                        "alertname": name,
                        "exp_alerts": [
                            {"exp_labels": {**labels, "severity": severities[name]}}
                            for labels in expected
                        ],
                    }
                    for name, expected in fired.items()
                ],
            },
        ],
    }
    path = tmp_path / "alerts-test.yml"
    path.write_text(yaml.safe_dump(tests))
    run_promtool(promtool, "test", "rules", str(path))
