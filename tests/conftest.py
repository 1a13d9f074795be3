"""Fixtures every test directory shares: one Redis Cluster and one Sentinel set per session,
started when a test first asks."""

from tests.integration.redis_server import (  # noqa: F401  (fixtures)
    redis_cluster,
    redis_cluster_session,
    redis_sentinel,
    redis_sentinel_session,
    redis_tls,
)
