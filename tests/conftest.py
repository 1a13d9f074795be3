"""Fixtures every test directory shares: one Redis Cluster per session, whoever asks first."""

from tests.integration.redis_server import (  # noqa: F401  (fixtures)
    redis_cluster,
    redis_cluster_session,
)
