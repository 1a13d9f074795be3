"""Readers for the files under ``deploy/``: Dockerfiles, .dockerignore, compose, manifests.

No Docker engine or cluster is needed: these parse the files the way the tools
would, closely enough to check what the deployment tests check (paths, ports,
commands, names), and no further.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tests.reliability.conftest import REPO

DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
GUARD_IMAGE = "inference-guard"
MLSERVER_IMAGE = "inference-guard-mlserver"


# -- Dockerfiles ------------------------------------------------------------------


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [rest for kw, rest in self.instructions if kw == keyword]

    def last(self, keyword: str) -> str | None:
        found = self.all(keyword)
        return found[-1] if found else None


def dockerfile_stages(path: Path) -> list[Stage]:
    """The build stages of a Dockerfile, each a list of (INSTRUCTION, arguments)."""
    text = re.sub(r"\\\n", " ", path.read_text())  # line continuations
    stages: list[Stage] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, rest = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            words = rest.split()
            name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else None
            stages.append(Stage(words[0], name))
        elif stages:
            stages[-1].instructions.append((keyword, rest.strip()))
    return stages


def exec_form(arguments: str) -> list[str]:
    """A CMD/ENTRYPOINT/HEALTHCHECK CMD argument list (JSON exec form or shell words)."""
    arguments = arguments.strip()
    if arguments.startswith("["):
        return list(yaml.safe_load(arguments))
    return shlex.split(arguments)


def copy_sources(arguments: str) -> tuple[list[str], str, dict[str, str]]:
    """``(sources, destination, flags)`` of a COPY or ADD."""
    words = shlex.split(arguments)
    flags = {}
    while words and words[0].startswith("--"):
        key, _, value = words.pop(0)[2:].partition("=")
        flags[key] = value
    return words[:-1], words[-1], flags


def _glob_regex(pattern: str) -> re.Pattern[str]:
    out = ""
    i = 0
    while i < len(pattern):
        if pattern.startswith("**", i):
            out += ".*"
            i += 2
        elif pattern[i] == "*":
            out += "[^/]*"
            i += 1
        elif pattern[i] == "?":
            out += "[^/]"
            i += 1
        else:
            out += re.escape(pattern[i])
            i += 1
    return re.compile(out + r"\Z")


class DockerIgnore:
    """.dockerignore semantics: the last matching pattern wins; a pattern that matches a
    parent directory matches everything under it; ``!`` re-includes."""

    def __init__(self, path: Path) -> None:
        self.rules: list[tuple[bool, re.Pattern[str]]] = []
        for raw in path.read_text().splitlines():
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            include = line.startswith("!")
            pattern = line.lstrip("!").strip().strip("/")
            self.rules.append((include, _glob_regex(pattern)))

    def included(self, relative: str) -> bool:
        parts = relative.strip("/").split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        verdict = True
        for include, regex in self.rules:
            if any(regex.match(p) for p in prefixes):
                verdict = include
        return verdict


# -- YAML manifests -----------------------------------------------------------------


def yaml_documents(path: Path) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


@dataclass(frozen=True)
class Variant:
    """One kustomization (``deploy/k8s/<name>``) resolved: its objects and generated ConfigMaps."""

    root: Path
    objects: list[dict[str, Any]]
    config_maps: dict[str, dict[str, Path]]  # generator name -> {file name: path}

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [o for o in self.objects if o["kind"] == kind]

    def named(self, kind: str, name: str) -> dict[str, Any]:
        for obj in self.of_kind(kind):
            if obj["metadata"]["name"] == name:
                return obj
        raise KeyError(f"{self.root.name}: no {kind} named {name}")


def kustomize(root: Path) -> Variant:
    """Resources and configMapGenerators of ``root``'s kustomization.yaml, recursively."""
    spec = yaml.safe_load((root / "kustomization.yaml").read_text())
    objects: list[dict[str, Any]] = []
    config_maps: dict[str, dict[str, Path]] = {}
    for resource in spec.get("resources", []):
        path = (root / resource).resolve()
        if path.is_dir():
            child = kustomize(path)
            objects += child.objects
            config_maps |= child.config_maps
        else:
            objects += yaml_documents(path)
    for generator in spec.get("configMapGenerator", []):
        files = {}
        for entry in generator.get("files", []):
            key, _, source = entry.rpartition("=")
            files[key or Path(source).name] = root / source
        config_maps[generator["name"]] = files
    return Variant(root, objects, config_maps)


def containers(deployment: dict[str, Any]) -> list[dict[str, Any]]:
    return list(deployment["spec"]["template"]["spec"]["containers"])


def image_name(container: dict[str, Any]) -> str:
    """The image's repository name without registry or tag."""
    image = container["image"].rsplit("/", 1)[-1]
    return image.split(":", 1)[0].split("@", 1)[0]


def walk_files(root: Path, *suffixes: str) -> Iterator[Path]:
    for path in sorted(root.rglob("*")):
        if path.is_file() and path.name.endswith(suffixes):
            yield path


def env_references(policy: dict[str, Any]) -> set[str]:
    """Environment variables a policy reads: token_env, url_env, key_env, ${VAR} headers."""
    found: set[str] = set()

    def visit(value: Any) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                if key in ("token_env", "url_env", "key_env") and isinstance(item, str):
                    found.add(item)
                visit(item)
        elif isinstance(value, list):
            for item in value:
                visit(item)
        elif isinstance(value, str):
            found.update(re.findall(r"(?<!\$)\$\{([A-Za-z_][A-Za-z0-9_]*)\}", value))

    visit(policy)
    return found
