"""Fixtures shared by the unit tests."""

from tests.integration.redis_server import redis_module, redis_server  # noqa: F401  (fixtures)
