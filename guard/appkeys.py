"""Typed application state: every key the app stores, in one place."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from aiohttp import web

from guard.backends.upstream import UpstreamClient

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from guard.live import Live
    from guard.metrics import GuardMetrics

LIVE: web.AppKey[Live] = web.AppKey("live")
METRICS: web.AppKey[GuardMetrics] = web.AppKey("metrics")
SESSION: web.AppKey[UpstreamClient] = web.AppKey("session")
POLICY_PATH: web.AppKey[Path | None] = web.AppKey("policy_path")
# The operators' app (metrics, admin) reads the public app it reports on through this key.
PUBLIC: web.AppKey[web.Application] = web.AppKey("public")
# Workers: the registry the operators' /metrics exposes (the sum over every worker), and
# what a successful /admin/reload does next (ask the master to reload the other workers).
EXPOSITION: web.AppKey[CollectorRegistry] = web.AppKey("exposition")
ON_RELOAD: web.AppKey[Callable[[], None]] = web.AppKey("on_reload")
