"""deploy/ checked without Docker or a cluster: files parse, commands are real CLI
commands, ports and names agree across files, policies pass ``guard check``."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import urllib.parse
import zipfile
from pathlib import Path
from typing import Any

import pytest
import yaml

from guard.cli import _parser, check_warnings, main
from guard.config import load_policy
from guard.runtime import build_runtime
from tests.reliability.conftest import REPO
from tests.reliability.deployfiles import (
    DEPLOY,
    GUARD_IMAGE,
    K8S,
    MLSERVER_IMAGE,
    DockerIgnore,
    Variant,
    containers,
    copy_sources,
    dockerfile_stages,
    env_references,
    exec_form,
    image_name,
    kustomize,
    walk_files,
    yaml_documents,
)

DOCKERFILE = DEPLOY / "Dockerfile"
POLICY_FILES = [
    DEPLOY / "policies" / "compose.yaml",
    K8S / "proxy" / "policy.yaml",
    K8S / "sidecar" / "policy.yaml",
]
SECRET = yaml_documents(K8S / "common" / "secret.yaml")[0]
ENV = {  # what compose and the Secret provide
    "GUARD_ADMIN_TOKEN": "admin-token-for-tests",
    "GUARD_BLACKLIGHT_KEY": "blacklight-key-for-tests",
    "REDIS_URL": "redis://127.0.0.1:6379/0",
}


def entrypoint() -> list[str]:
    final = dockerfile_stages(DOCKERFILE)[-1]
    return exec_form(final.last("ENTRYPOINT") or "[]")


def parse_guard_args(args: list[str]) -> Any:
    """argparse's reading of ``guard ARGS`` (SystemExit on anything guard does not accept)."""
    command = [*entrypoint(), *args]
    assert command[0] == "guard"
    return _parser().parse_args(command[1:])


def test_every_yaml_and_json_file_parses() -> None:
    files = list(walk_files(DEPLOY, ".yaml", ".yml", ".json"))
    assert len(files) >= 20
    for path in files:
        if path.suffix == ".json":
            json.loads(path.read_text())
        else:
            assert yaml_documents(path), path


# -- images -----------------------------------------------------------------------


def test_guard_image_builds_in_stages_and_runs_unprivileged() -> None:
    builder, final = dockerfile_stages(DOCKERFILE)
    assert builder.name == "builder" and "gcc" in " ".join(builder.all("RUN"))
    assert "pip wheel" in " ".join(builder.all("RUN"))
    final_runs = " ".join(final.all("RUN"))
    assert "apt-get" not in final_runs and "gcc" not in final_runs  # no compiler shipped
    assert "--no-index" in final_runs and "from=builder" in final_runs
    assert "USING_EXTENSIONS" in final_runs  # the image refuses to build without the kernels
    user = final.last("USER")
    assert user is not None and user.split(":")[0] not in ("0", "root")

    args = parse_guard_args(exec_form(final.last("CMD") or "[]"))
    assert args.run.__name__ == "_serve" and args.host == "0.0.0.0"
    # The metrics listener binds the container's interface (127.0.0.1 would be unreachable
    # from Prometheus), on a port of its own, and both ports are declared.
    assert args.metrics_host == "0.0.0.0" and args.metrics_port not in (None, args.port)
    assert (final.last("EXPOSE") or "").split() == [str(args.port), str(args.metrics_port)]
    check = exec_form((final.last("HEALTHCHECK") or "").split("CMD", 1)[1])
    url = next(word for word in check[-1].split("'") if word.startswith("http"))
    assert urllib.parse.urlsplit(url).path == "/v2/health/ready"
    assert urllib.parse.urlsplit(url).port == args.port


def test_guard_image_copies_sources_that_exist_and_are_not_ignored() -> None:
    ignore = DockerIgnore(DEPLOY / "Dockerfile.dockerignore")
    copied = []
    for stage in dockerfile_stages(DOCKERFILE):
        for arguments in stage.all("COPY"):
            sources, _, flags = copy_sources(arguments)
            if "from" in flags:
                continue
            for source in sources:
                path = REPO / source
                assert path.exists(), source
                sent = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
                assert any(ignore.included(str(p.relative_to(REPO))) for p in sent), (
                    f"{source} is excluded from the build context"
                )
                copied.append(source.rstrip("/"))
    # What the wheel is built from reaches the builder; local build output does not.
    needed = [
        "pyproject.toml", "setup.py", "MANIFEST.in", "README.md", "ext/check.pyx",
        "guard/server.py", "guard/models/digits.onnx", "guard/policies/default.yaml",
        "guard/_ext/check.pyi", "guard/py.typed",
    ]  # fmt: skip
    for path in needed:
        assert (REPO / path).exists(), path
        assert ignore.included(path), path
        assert any(path == c or path.startswith(c + "/") for c in copied), path
    for path in (".venv/bin/python", ".mlserver-venv/bin/python", "build/lib", "tests/__init__.py",
                 "guard/_ext/check.cpython-311-x86_64-linux-gnu.so", "guard/__pycache__/cli.pyc"):  # fmt: skip
        assert not ignore.included(path), path


def test_mlserver_image_copies_what_exists() -> None:
    context = DEPLOY / "mlserver"
    (stage,) = dockerfile_stages(context / "Dockerfile")
    for arguments in stage.all("COPY"):
        sources, _, _ = copy_sources(arguments)
        assert all((context / s).exists() for s in sources), sources
    settings = json.loads(
        (context / "models" / "breast_cancer" / "model-settings.json").read_text()
    )
    assert settings["name"] == "breast_cancer"
    assert settings["implementation"] == "mlserver_sklearn.SKLearnModel"
    # Declared inputs: the guard needs them to decode TF Serving requests for an upstream.
    assert [i["name"] for i in settings["inputs"]] == ["input"]
    server = json.loads((context / "models" / "settings.json").read_text())
    # settings.json would override MLSERVER_HOST/_HTTP_PORT, which the sidecar sets.
    assert not {"host", "http_port", "grpc_port", "metrics_port"} & set(server)
    # Worker processes crash at start with MLServer 1.7 and current uvloop: infer in-process.
    assert server["parallel_workers"] == 0
    assert exec_form(stage.last("CMD") or "")[:3] == ["mlserver", "start", "/models"]
    assert (stage.last("USER") or "root").split(":")[0] not in ("0", "root")


# -- compose ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def test_compose_guard_service_is_consistent(compose: dict[str, Any]) -> None:
    services = compose["services"]
    guard = services["guard"]
    context = (DEPLOY / guard["build"]["context"]).resolve()
    assert context == REPO and (context / guard["build"]["dockerfile"]) == DOCKERFILE
    args = parse_guard_args(guard["command"])
    mounts = {v.split(":")[1]: DEPLOY / v.split(":")[0] for v in guard["volumes"]}
    policy_file = mounts[str(args.policy)]
    assert policy_file in POLICY_FILES and policy_file.is_file()
    # Clients reach the public port from anywhere; metrics and admin only from this host.
    published = {p.rsplit(":", 1)[1]: p.rsplit(":", 1)[0] for p in guard["ports"]}
    assert published == {
        str(args.port): str(args.port),
        str(args.metrics_port): (f"127.0.0.1:{args.metrics_port}"),
    }
    assert args.metrics_host == "0.0.0.0"  # inside the container: Prometheus must reach it
    policy = yaml.safe_load(policy_file.read_text())
    assert env_references(policy) <= set(guard["environment"])
    assert guard["read_only"] is True and "/tmp" in guard["tmpfs"]

    upstream = urllib.parse.urlsplit(policy["models"]["breast_cancer"]["upstream"]["url"])
    assert upstream.hostname in services and upstream.port == 8080  # MLServer's default port
    assert "ports" not in services[upstream.hostname], (
        "the model must be reachable only via the guard"
    )
    assert (DEPLOY / services[upstream.hostname]["build"] / "Dockerfile").is_file()
    redis = urllib.parse.urlsplit(guard["environment"]["REDIS_URL"])
    assert redis.hostname in services and "ports" not in services[redis.hostname]


def test_compose_prometheus_and_grafana_are_wired(compose: dict[str, Any]) -> None:
    services = compose["services"]
    args = parse_guard_args(services["guard"]["command"])
    prometheus = services["prometheus"]
    mounts = {v.split(":")[1]: DEPLOY / v.split(":")[0] for v in prometheus["volumes"]}
    config = yaml.safe_load(mounts["/etc/prometheus/prometheus.yml"].read_text())
    for rule_file in config["rule_files"]:
        assert mounts[rule_file].is_file()
    (job,) = config["scrape_configs"]
    assert job["job_name"] == "inference-guard"  # the job the GuardDown alert watches
    assert job["metrics_path"] == "/metrics"
    (sd,) = job["dns_sd_configs"]
    assert sd["names"] == ["guard"] and sd["port"] == args.metrics_port != args.port

    grafana = services["grafana"]
    mounts = {v.split(":")[1]: DEPLOY / v.split(":")[0] for v in grafana["volumes"]}
    provisioning = mounts["/etc/grafana/provisioning"]
    (source,) = yaml.safe_load((provisioning / "datasources" / "prometheus.yaml").read_text())[
        "datasources"
    ]
    assert urllib.parse.urlsplit(source["url"]).hostname == "prometheus"
    (provider,) = yaml.safe_load((provisioning / "dashboards" / "guard.yaml").read_text())[
        "providers"
    ]
    dashboards = mounts[provider["options"]["path"]]
    assert (dashboards / "guard.json").is_file()
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home.startswith(provider["options"]["path"])


def test_dashboard_variables_resolve() -> None:
    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "guard.json").read_text())
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert variables == {"datasource", "model"}
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            assert target["datasource"]["uid"] == "${datasource}"
            used = {
                word[1:]
                for word in target["expr"].replace('"', " ").split()
                if word.startswith("$")
            }
            assert {u.strip("(){}[]") for u in used if not u.startswith("__")} <= variables


# -- Kubernetes -------------------------------------------------------------------

VARIANTS = ["proxy", "sidecar"]


@pytest.fixture(scope="module", params=VARIANTS)
def variant(request: pytest.FixtureRequest) -> Variant:
    return kustomize(K8S / request.param)


def guard_container(variant: Variant) -> tuple[dict[str, Any], dict[str, Any]]:
    for deployment in variant.of_kind("Deployment"):
        for container in containers(deployment):
            if image_name(container) == GUARD_IMAGE:
                return deployment, container
    raise AssertionError(f"{variant.root}: no container runs the {GUARD_IMAGE} image")


def labels_match(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def test_every_kustomization_resolves_to_valid_objects(variant: Variant) -> None:
    kinds = {o["kind"] for o in variant.objects}
    assert {"Deployment", "Service", "Secret", "HorizontalPodAutoscaler",
            "PodDisruptionBudget", "ServiceMonitor", "PrometheusRule"} <= kinds  # fmt: skip
    for obj in variant.objects:
        assert obj.get("apiVersion") and obj["metadata"].get("name"), obj
    for files in variant.config_maps.values():
        assert all(path.is_file() for path in files.values())


def test_guard_container_runs_a_real_command_with_probes_and_limits(variant: Variant) -> None:
    deployment, container = guard_container(variant)
    args = parse_guard_args(container["args"])
    assert args.run.__name__ == "_serve" and args.host == "0.0.0.0"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": args.port, "metrics": args.metrics_port}
    assert args.metrics_host == "0.0.0.0" and args.metrics_port != args.port
    assert container["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": "http"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": "http"}
    assert container["resources"]["requests"]["cpu"] and container["resources"]["limits"]["memory"]

    pod = deployment["spec"]["template"]["spec"]
    assert (
        pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    )
    assert pod["automountServiceAccountToken"] is False
    for each in containers(deployment):
        security = each["securityContext"]
        assert security["readOnlyRootFilesystem"] is True, each["name"]
        assert security["allowPrivilegeEscalation"] is False, each["name"]
        assert security["capabilities"]["drop"] == ["ALL"], each["name"]
        assert "/tmp" in {m["mountPath"] for m in each["volumeMounts"]}, each["name"]
        assert each["readinessProbe"] and each["livenessProbe"], each["name"]


def test_policy_secret_and_env_are_where_the_guard_looks(variant: Variant) -> None:
    deployment, container = guard_container(variant)
    args = parse_guard_args(container["args"])
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    mounts = {m["mountPath"]: volumes[m["name"]] for m in container["volumeMounts"]}

    policy_volume = mounts[str(args.policy.parent)]
    files = variant.config_maps[policy_volume["configMap"]["name"]]
    policy_file = files[args.policy.name]
    assert policy_file in POLICY_FILES
    policy = yaml.safe_load(policy_file.read_text())

    keys_file = Path(policy["clients"]["keys_file"])
    secret_volume = mounts[str(keys_file.parent)]["secret"]
    secret = variant.named("Secret", secret_volume["secretName"])
    assert keys_file.name in {item["path"] for item in secret_volume["items"]}
    assert {item["key"] for item in secret_volume["items"]} <= set(secret["stringData"])

    env = {e["name"]: e for e in container["env"]}
    assert env_references(policy) <= set(env)
    for entry in env.values():
        ref = entry.get("valueFrom", {}).get("secretKeyRef")
        if ref:
            assert ref["key"] in variant.named("Secret", ref["name"])["stringData"]
    redis = urllib.parse.urlsplit(env["REDIS_URL"]["value"])
    service = variant.named("Service", redis.hostname)
    assert redis.port in {p["port"] for p in service["spec"]["ports"]}


def test_services_monitors_autoscalers_and_budgets_select_the_guard(variant: Variant) -> None:
    deployment, container = guard_container(variant)
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert labels_match(deployment["spec"]["selector"]["matchLabels"], pod_labels)
    service = variant.named("Service", "inference-guard")  # what clients call
    assert labels_match(service["spec"]["selector"], pod_labels)
    port_names = {p["name"] for p in container["ports"]}
    # The public Service carries the inference port only, never metrics or admin.
    assert [p["targetPort"] for p in service["spec"]["ports"]] == ["http"]

    ops = variant.named("Service", "inference-guard-metrics")
    assert labels_match(ops["spec"]["selector"], pod_labels)
    assert [p["targetPort"] for p in ops["spec"]["ports"]] == ["metrics"]
    assert {p["targetPort"] for p in ops["spec"]["ports"]} <= port_names

    monitor = variant.named("ServiceMonitor", "inference-guard")
    selected = [
        s
        for s in variant.of_kind("Service")
        if labels_match(monitor["spec"]["selector"]["matchLabels"], s["metadata"]["labels"])
    ]
    assert selected == [ops]
    assert {e["port"] for e in monitor["spec"]["endpoints"]} == {"metrics"}
    assert all(e["path"] == "/metrics" for e in monitor["spec"]["endpoints"])
    # The job label the alerts use (up{job="inference-guard"}) comes from the Service's label.
    assert ops["metadata"]["labels"][monitor["spec"]["jobLabel"]] == "inference-guard"

    (hpa,) = variant.of_kind("HorizontalPodAutoscaler")
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    assert hpa["spec"]["minReplicas"] >= 2
    for pdb in variant.of_kind("PodDisruptionBudget"):
        assert labels_match(pdb["spec"]["selector"]["matchLabels"], pod_labels)


def test_the_model_is_reachable_only_through_the_guard(variant: Variant) -> None:
    deployment, container = guard_container(variant)
    args = parse_guard_args(container["args"])
    policy = yaml.safe_load(
        variant.config_maps[_policy_map(deployment)][args.policy.name].read_text()
    )
    upstream = urllib.parse.urlsplit(policy["models"]["breast_cancer"]["upstream"]["url"])
    if variant.root.name == "sidecar":
        (model,) = [c for c in containers(deployment) if image_name(c) == MLSERVER_IMAGE]
        env = {e["name"]: e.get("value") for e in model["env"]}
        assert upstream.hostname == env["MLSERVER_HOST"] == "127.0.0.1"
        assert str(upstream.port) == env["MLSERVER_HTTP_PORT"]
        assert "ports" not in model  # nothing exposed beyond the pod's loopback
    else:
        service = variant.named("Service", upstream.hostname)
        assert upstream.port in {p["port"] for p in service["spec"]["ports"]}
        policies = [
            p
            for p in variant.of_kind("NetworkPolicy")
            if p["metadata"]["name"] == upstream.hostname
        ]
        (network,) = policies
        pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
        (rule,) = network["spec"]["ingress"]
        assert all(labels_match(f["podSelector"]["matchLabels"], pod_labels) for f in rule["from"])


def _policy_map(deployment: dict[str, Any]) -> str:
    for volume in deployment["spec"]["template"]["spec"]["volumes"]:
        if "configMap" in volume:
            return str(volume["configMap"]["name"])
    raise AssertionError("no policy ConfigMap")


def test_prometheus_rule_carries_the_same_alerts_as_compose() -> None:
    (rule,) = yaml_documents(K8S / "monitoring" / "prometheusrule.yaml")
    alerts = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    assert rule["spec"]["groups"] == alerts["groups"]


# -- policies ---------------------------------------------------------------------


@pytest.mark.parametrize("path", POLICY_FILES, ids=lambda p: str(p.relative_to(DEPLOY)))
def test_deploy_policies_pass_guard_check(
    path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name, value in ENV.items():
        monkeypatch.setenv(name, value)
    policy = yaml.safe_load(path.read_text())
    if keys_file := policy["clients"].get(
        "keys_file"
    ):  # absolute, inside the pod: use the Secret's
        (tmp_path / "keys.yaml").write_text(SECRET["stringData"][Path(keys_file).name])
        policy["clients"]["keys_file"] = str(tmp_path / "keys.yaml")
    checked = tmp_path / path.name
    checked.write_text(yaml.safe_dump(policy))
    assert main(["check", str(checked)]) == 0
    out = capsys.readouterr().out
    assert "OK (version 1, mode enforce)" in out
    runtime = build_runtime(load_policy(checked), session=None)
    warnings = check_warnings(runtime)
    assert all("identified by address" in w for w in warnings), warnings
    assert runtime.policy.state.backend == "redis"  # replicas share detection state
    assert runtime.policy.limits.body_timeout <= 60 and runtime.policy.limits.idle_timeout > 60


@pytest.mark.skipif(
    os.environ.get("GUARD_BUILD_TESTS", "") in ("", "0"),
    reason="compiles the kernels (~30 s): set GUARD_BUILD_TESTS=1",
)
def test_the_build_context_makes_a_wheel_with_compiled_kernels(tmp_path: Path) -> None:
    """What deploy/Dockerfile's builder does, on exactly the files its context sends."""
    ignore = DockerIgnore(DEPLOY / "Dockerfile.dockerignore")
    context = tmp_path / "context"
    skip = (".git/", ".venv/", ".mlserver-venv/", "build/")
    for path in REPO.rglob("*"):
        relative = str(path.relative_to(REPO))
        if path.is_file() and not relative.startswith(skip) and ignore.included(relative):
            (context / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, context / relative)
    wheels = tmp_path / "wheels"
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
               "--wheel-dir", str(wheels), str(context)]  # fmt: skip
    subprocess.run(command, check=True, capture_output=True, timeout=600)
    (wheel,) = wheels.glob("inference_guard-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {
        n.split("/")[-1].split(".")[0]
        for n in names
        if n.startswith("guard/_ext/") and n.endswith(".so")
    } == {p.stem for p in (REPO / "ext").glob("*.pyx")}
    assert "guard/models/digits.onnx" in names and "guard/policies/default.yaml" in names
