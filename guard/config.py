"""Policy files: YAML in, frozen and validated configuration out.

A bad policy stops startup (or a reload, which keeps the old policy) with a
message naming the file, the path, the constraint and the value. Stage options
are validated when the stages are built (:func:`guard.runtime.build_runtime`),
which ``guard check`` and every (re)load also do, so no bad option reaches a
request. The policy reference is in the README; an annotated example is
``guard/policies/default.yaml``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from guard.backends.http import UpstreamConfig
from guard.backends.onnx import DEVICES
from guard.clients import ClientDirectory, key_digest, load_keys, read_address_options
from guard.configreader import Section
from guard.errors import PolicyError
from guard.state import StateConfig, read_state_config

VERSION = 1
MODES = ("enforce", "shadow")
BUILTIN_PREFIX = "builtin:"


@dataclass(frozen=True, kw_only=True, slots=True)
class StageEntry:
    kind: str
    options: Mapping[str, Any]
    path: str  # e.g. models.digits.stages[2].certify


@dataclass(frozen=True, kw_only=True, slots=True)
class ModelConfig:
    name: str
    upstream: UpstreamConfig | None
    model_file: Path | None
    sha256: str | None
    device: str
    threads: int
    stages: tuple[StageEntry, ...]


MAX_BODY_BYTES = 32 << 20
MAX_IN_FLIGHT = 1024
BODY_TIMEOUT = 30.0
IDLE_TIMEOUT = 75.0  # above the 60 s idle timeout of common load balancers


@dataclass(frozen=True, kw_only=True, slots=True)
class Limits:
    max_body_bytes: int = MAX_BODY_BYTES
    max_in_flight: int = MAX_IN_FLIGHT  # concurrent inference requests before 503
    body_timeout: float = BODY_TIMEOUT  # seconds for a request body to arrive, then 408
    # Seconds a connection may sit idle between requests, or take over its first request's
    # headers, before it is closed. Read at startup: a reload does not change it.
    idle_timeout: float = IDLE_TIMEOUT


@dataclass(frozen=True, kw_only=True, slots=True)
class Policy:
    source: str
    version: int
    mode: str
    models: Mapping[str, ModelConfig]
    clients: ClientDirectory = field(default_factory=ClientDirectory)
    admin_token_sha256: str | None = None
    audit_path: str | None = None
    expose_headers: bool = True
    limits: Limits = field(default_factory=Limits)
    state: StateConfig = field(default_factory=StateConfig)

    @property
    def shadow(self) -> bool:
        return self.mode == "shadow"


def load_policy(path: str | Path) -> Policy:
    """Read and validate a policy file (stage options are checked at build time)."""
    path = Path(path)
    source = str(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise PolicyError(f"{source}: cannot read policy: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise PolicyError(f"{source}: not valid YAML: {exc}") from exc
    return parse_policy(data, source=source, base=path.parent)


def parse_policy(data: Any, *, source: str, base: Path) -> Policy:
    root = Section(data, source=source)
    version = root.int("version")
    if version != VERSION:
        raise root.error("version", f"must be {VERSION}; got {version}")
    mode = root.choice("mode", MODES, "enforce")
    models_section = root.child("models", required=True)
    names = models_section.names()
    if not names:
        raise models_section.error(None, "must name at least one model")
    models = {name: _model(models_section.child(name), name, base) for name in names}

    clients = _clients(root.child("clients"), base)
    admin = root.child("admin")
    admin_digest = _admin_token(admin)
    admin.finish()

    audit = root.child("audit")
    audit_path = audit.str("path", None)
    if audit_path not in (None, "-"):
        audit_path = str((base / audit_path).resolve())
    audit.finish()

    headers = root.child("headers")
    expose = headers.bool("expose", True)
    headers.finish()

    limits_section = root.child("limits")
    limits = Limits(
        max_body_bytes=limits_section.int("max_body_bytes", MAX_BODY_BYTES, min=1024),
        max_in_flight=limits_section.int("max_in_flight", MAX_IN_FLIGHT, min=1),
        body_timeout=limits_section.float("body_timeout", BODY_TIMEOUT, gt=0, max=86400),
        idle_timeout=limits_section.float("idle_timeout", IDLE_TIMEOUT, gt=0, max=86400),
    )
    limits_section.finish()
    state = read_state_config(root.child("state"))
    root.finish()
    return Policy(
        source=source,
        version=version,
        mode=mode,
        models=models,
        clients=clients,
        admin_token_sha256=admin_digest,
        audit_path=audit_path,
        expose_headers=expose,
        limits=limits,
        state=state,
    )


def _model(section: Section, name: str, base: Path) -> ModelConfig:
    upstream = _upstream(section)
    model_file = section.str("model", None)
    sha256 = section.str("sha256", None)
    if sha256 is not None and (len(sha256) != 64 or not _is_hex(sha256)):
        raise section.error("sha256", f"must be 64 hex digits; got {sha256!r}")
    resolved = _model_path(section, model_file, base) if model_file else None
    if upstream is None and resolved is None:
        raise section.error(None, "needs an upstream, a model file, or both")
    stages = []
    for index, entry in section.section_list("stages"):
        where = f"{section.where('stages')}[{index}]"
        if isinstance(entry, str):
            entry = {entry: {}}
        if not isinstance(entry, Mapping) or len(entry) != 1:
            raise PolicyError(
                f"{section.source}: {where} must be one stage, e.g. '- validate: {{...}}'; "
                f"got {entry!r}"
            )
        ((kind, options),) = entry.items()
        stages.append(StageEntry(kind=str(kind), options=options or {}, path=f"{where}.{kind}"))
    config = ModelConfig(
        name=name,
        upstream=upstream,
        model_file=resolved,
        sha256=sha256,
        device=section.choice("device", DEVICES, "auto"),
        threads=section.int("threads", 1, min=0),
        stages=tuple(stages),
    )
    section.finish()
    return config


def _upstream(model: Section) -> UpstreamConfig | None:
    raw = model.data.get("upstream")
    if raw is None:
        model.str("upstream", None)  # mark as read
        return None
    if isinstance(raw, str):
        model.str("upstream")
        return UpstreamConfig(url=_url(model, "upstream", raw))
    section = model.child("upstream")
    headers = section.child("headers")
    config = UpstreamConfig(
        url=_url(section, "url", section.str("url")),
        model=section.str("model", None),
        version=section.str("version", None),
        timeout=section.float("timeout", 30.0, gt=0),
        connect_timeout=section.float("connect_timeout", 2.0, gt=0),
        binary=section.bool("binary", False),
        retries=section.int("retries", 1, min=0, max=5),
        headers={k: _expand(headers, k) for k in headers.names()},
    )
    section.finish()
    return config


def _url(section: Section, key: str, url: str) -> str:
    if not url.startswith(("http://", "https://")):
        raise section.error(key, f"must be an http:// or https:// URL; got {url!r}")
    if "@" in urlsplit(url).netloc:  # the URL is shown in errors, logs and guard check
        raise section.error(
            key, "must not carry credentials (user:password@); send them in upstream.headers"
        )
    return url.rstrip("/")


def _expand(section: Section, key: str) -> str:
    """A header value, or the environment variable it names (``${UPSTREAM_TOKEN}``)."""
    value = section.str(key)
    if value.startswith("${") and value.endswith("}"):
        var = value[2:-1]
        if var not in os.environ:
            raise section.error(key, f"names environment variable {var}, which is not set")
        return os.environ[var]
    return value


def _model_path(section: Section, value: str, base: Path) -> Path:
    if value.startswith(BUILTIN_PREFIX):
        from guard.models import MODELS, model_path

        name = value[len(BUILTIN_PREFIX) :]
        if name not in MODELS:
            raise section.error("model", f"names no built-in model; built-ins: {', '.join(MODELS)}")
        return model_path(name)
    path = (base / value).resolve()
    if not path.is_file():
        raise section.error("model", f"file {path} does not exist")
    return path


def _clients(section: Section, base: Path) -> ClientDirectory:
    header = section.str("header", "X-API-Key")
    keys_file = section.str("keys_file", None)
    keys = load_keys((base / keys_file).resolve()) if keys_file else None
    directory = ClientDirectory(header=header, keys=keys, **read_address_options(section))
    section.finish()
    return directory


def _admin_token(section: Section) -> str | None:
    digest = section.str("token_sha256", None)
    env = section.str("token_env", None)
    if digest and env:
        raise section.error(None, "takes token_sha256 or token_env, not both")
    if env:
        token = os.environ.get(env)
        if not token:
            raise section.error("token_env", f"names environment variable {env}, which is not set")
        return key_digest(token)
    if digest is not None and (len(digest) != 64 or not _is_hex(digest)):
        raise section.error("token_sha256", "must be 64 hex digits (sha256 of the token)")
    return digest.lower() if digest else None


def _is_hex(text: str) -> bool:
    try:
        int(text, 16)
    except ValueError:
        return False
    return True
