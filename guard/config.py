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
import re
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
from guard.stages.options import option, read_options
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


OFFLOAD_DECODE_BYTES = 1 << 20
IDLE_TIMEOUT = 75.0  # above the 60 s idle timeout of common load balancers
DAY = 86400


@dataclass(frozen=True, kw_only=True)
class Limits:
    """``limits:``: what one request, one client and the whole guard may take."""

    max_body_bytes: int = option(32 << 20, min=1024, doc="largest request body, else 413")
    max_in_flight: int = option(1024, min=1, doc="inference requests at once, else 503")
    body_timeout: float = option(
        30.0, gt=0, max=DAY, doc="seconds for a request body to arrive, else 408"
    )
    # nginx's client_body_timeout is 60 s; a model API needs less
    body_stall_timeout: float = option(
        10.0, gt=0, max=DAY, doc="seconds without a byte of the body arriving, else 408"
    )
    max_in_flight_per_client: int = option(
        64,
        min=1,
        doc="requests of one client in progress at once (headers read, not yet answered); "
        "past it 429 at once, before the body is read: one client cannot take every slot",
    )
    parse_bytes_per_second: int = option(
        16 << 20,
        min=1024,
        doc="body bytes one client may make the guard decode per second (a token bucket "
        "holding max_body_bytes or a second's worth, whichever is more); past it 429",
    )
    offload_decode_bytes: int = option(
        OFFLOAD_DECODE_BYTES,
        min=0,
        doc="bodies of at least this many bytes are decoded in a worker process, off the "
        "event loop; 0 decodes every body on the loop",
    )
    idle_timeout: float = option(
        IDLE_TIMEOUT,
        gt=0,
        max=DAY,
        doc="seconds a connection may sit idle between requests, or take over its first "
        "request's headers, before it is closed. Read at startup: a reload does not change it",
    )


METRICS_HOST = "127.0.0.1"
METRICS_PORT = 9180  # clear of Triton (8000-8002), MLServer (8080-8082), Prometheus (9090)


@dataclass(frozen=True, kw_only=True, slots=True)
class Listen:
    """``listen:``: where the operators' listener (``/metrics``, ``/admin/*``) binds.

    ``metrics_host`` (default ``127.0.0.1``) and ``metrics_port`` (default 9180; ``0``
    picks a free port; ``off`` serves no metrics and no admin). ``guard serve
    --metrics-host/--metrics-port`` override them. Read at startup: a reload does not
    move a listener. The public port never serves ``/metrics`` or ``/admin/*``.
    """

    metrics_host: str = METRICS_HOST
    metrics_port: int | None = METRICS_PORT  # None: off


@dataclass(frozen=True, kw_only=True, slots=True)
class Disclose:
    """``disclose:``: what a client is told about the guard's decisions.

    ``headers`` (default true): ``X-Guard-*`` response headers (the verdict, certified
    radius and label, privacy budget spent). ``reasons`` (default false): refusal bodies
    name the stage and its numbers (``request refused by policy (blacklight)``, ``query
    budget exhausted: 101 of 100 queries per 1m``); when false a deny answers 403
    ``request refused by policy`` and a quota 429 ``quota exhausted for this model; retry
    in N s`` with ``Retry-After``. Metrics and the audit log always keep everything.
    Validation errors (400 naming the field) are about the client's own input and are
    always told. ``headers: {expose: ...}``, the older spelling of ``disclose.headers``,
    is still read.
    """

    headers: bool = True
    reasons: bool = False


@dataclass(frozen=True, kw_only=True, slots=True)
class Policy:
    source: str
    version: int
    mode: str
    models: Mapping[str, ModelConfig]
    clients: ClientDirectory = field(default_factory=ClientDirectory)
    admin_token_sha256: str | None = None
    audit_path: str | None = None
    disclose: Disclose = field(default_factory=Disclose)
    listen: Listen = field(default_factory=Listen)
    limits: Limits = field(default_factory=Limits)
    state: StateConfig = field(default_factory=StateConfig)
    # Where stages look up their ``*_env`` secrets (never printed: repr=False).
    environ: Mapping[str, str] = field(default_factory=dict, repr=False, compare=False)

    @property
    def expose_headers(self) -> bool:
        """Whether responses carry ``X-Guard-*`` headers (``disclose.headers``)."""
        return self.disclose.headers

    @property
    def shadow(self) -> bool:
        return self.mode == "shadow"


def load_policy(path: str | Path, *, environ: Mapping[str, str] | None = None) -> Policy:
    """Read and validate a policy file (stage options are checked at build time).

    ``environ`` is where the policy's ``${VAR}`` (in any string value, see
    :func:`expand_environment`) and ``*_env`` keys are looked up (default: a copy of
    this process's environment, taken now); the policy keeps it for its stages,
    which read nothing from ``os.environ`` themselves.
    """
    path = Path(path)
    source = str(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise PolicyError(f"{source}: cannot read policy: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise PolicyError(f"{source}: not valid YAML: {exc}") from exc
    return parse_policy(data, source=source, base=path.parent, environ=environ)


def parse_policy(
    data: Any, *, source: str, base: Path, environ: Mapping[str, str] | None = None
) -> Policy:
    environ = dict(os.environ if environ is None else environ)
    data = expand_environment(data, environ, source=source)
    root = Section(data, source=source)
    version = root.int("version")
    if version != VERSION:
        raise root.error("version", f"must be {VERSION}; got {version}")
    mode = root.choice("mode", MODES, "enforce")
    models_section = root.child("models", required=True)
    names = models_section.names()
    if not names:
        raise models_section.error(None, "must name at least one model")
    models = {name: _model(models_section.child(name), name, base, environ) for name in names}

    clients = _clients(root.child("clients"), base)
    admin = root.child("admin")
    admin_digest = _admin_token(admin, environ)
    admin.finish()

    audit = root.child("audit")
    audit_path = audit.str("path", None)
    if audit_path not in (None, "-"):
        audit_path = str((base / audit_path).resolve())
    audit.finish()

    disclose = _disclose(root)
    listen = _listen(root.child("listen"))

    limits = read_options(Limits, root.child("limits"))
    state = read_state_config(root.child("state"), environ)
    root.finish()
    return Policy(
        source=source,
        version=version,
        mode=mode,
        models=models,
        clients=clients,
        admin_token_sha256=admin_digest,
        audit_path=audit_path,
        disclose=disclose,
        listen=listen,
        limits=limits,
        state=state,
        environ=environ,
    )


def _disclose(root: Section) -> Disclose:
    legacy = root.child("headers")
    expose = legacy.bool("expose", None)
    legacy.finish()
    section = root.child("disclose")
    headers = section.bool("headers", None)
    if expose is not None and headers is not None:
        raise section.error(
            "headers", "is also set by headers.expose (its older spelling); keep one"
        )
    disclose = Disclose(
        headers=next((v for v in (headers, expose) if v is not None), True),
        reasons=section.bool("reasons", False),
    )
    section.finish()
    return disclose


def _listen(section: Section) -> Listen:
    host = section.str("metrics_host", METRICS_HOST)
    if not host.strip():
        raise section.error("metrics_host", f"must be an address to bind; got {host!r}")
    raw = section.data.get("metrics_port")
    port: int | None
    if raw is False:  # YAML reads a bare `off` as false
        section.bool("metrics_port")
        port = None
    elif raw == "off":
        section.str("metrics_port")
        port = None
    elif isinstance(raw, str):
        raise section.error(
            "metrics_port", f"must be a port number (0: any free port) or off; got {raw!r}"
        )
    else:
        port = section.int("metrics_port", METRICS_PORT, min=0, max=65535)
    listen = Listen(metrics_host=host, metrics_port=port)
    section.finish()
    return listen


def parse_metrics_port(text: str) -> int | None:
    """``--metrics-port``: a port number, ``0`` for any free port, or ``off``."""
    if text.strip().lower() == "off":
        return None
    port = int(text)  # argparse reports a ValueError as an invalid value
    if not 0 <= port <= 65535:
        raise ValueError(f"port out of range: {port}")
    return port


def _model(section: Section, name: str, base: Path, environ: Mapping[str, str]) -> ModelConfig:
    upstream = _upstream(section, environ)
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


def _upstream(model: Section, environ: Mapping[str, str]) -> UpstreamConfig | None:
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
        headers={k: headers.str(k) for k in headers.names()},
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


_VARIABLE = re.compile(r"\$(\$\{)|\$\{([^}]*)\}|\$\{")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def expand_environment(data: Any, environ: Mapping[str, str], *, source: str) -> Any:
    """The policy with ``${VAR}`` replaced in every string value, before validation.

    The one substitution rule of a policy: any string value (a header, a URL, a path,
    a stage option; not a key) may hold ``${NAME}`` anywhere in it, replaced by
    ``environ[NAME]`` (the environment the policy is loaded with). The result stays a
    string: numbers and booleans are written as they are. ``$${`` writes a literal
    ``${``. A variable that is unset or empty, or a ``${`` without a valid name and a
    closing brace, is a policy error naming the path. The ``*_env`` keys
    (``admin.token_env``, ``state.url_env``, ``blacklight.key_env`` ...) still name a
    variable, for secrets a stage reads itself.
    """

    def visit(value: Any, path: str) -> Any:
        if isinstance(value, str):
            return _substitute(value, path) if "${" in value else value
        if isinstance(value, Mapping):
            return {k: visit(v, f"{path}.{k}" if path else str(k)) for k, v in value.items()}
        if isinstance(value, list):
            return [visit(v, f"{path}[{i}]") for i, v in enumerate(value)]
        return value

    def _substitute(text: str, path: str) -> str:
        def replace(match: re.Match[str]) -> str:
            if match.group(1):  # $${: the escape
                return "${"
            name = match.group(2)
            if name is None or not _NAME.fullmatch(name):
                raise PolicyError(
                    f"{source}: {path} has a malformed ${{...}}: a variable is ${{NAME}} "
                    f"(letters, digits, _), a literal ${{ is $${{; got {text!r}"
                )
            resolved = environ.get(name)
            if not resolved:
                raise PolicyError(
                    f"{source}: {path} names environment variable {name}, which is not set"
                )
            return resolved

        return _VARIABLE.sub(replace, text)

    return visit(data, "")


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


def _admin_token(section: Section, environ: Mapping[str, str]) -> str | None:
    digest = section.str("token_sha256", None)
    env = section.str("token_env", None)
    if digest and env:
        raise section.error(None, "takes token_sha256 or token_env, not both")
    if env:
        return key_digest(section.variable("token_env", env, environ))
    if digest is not None and (len(digest) != 64 or not _is_hex(digest)):
        raise section.error("token_sha256", "must be 64 hex digits (sha256 of the token)")
    return digest.lower() if digest else None


def _is_hex(text: str) -> bool:
    try:
        int(text, 16)
    except ValueError:
        return False
    return True
