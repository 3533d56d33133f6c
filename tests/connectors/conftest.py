"""Fixtures for the connector suites: a factory of fresh connectors per backend.

Server-backed backends (redis, redis_cluster, mooncake) start real servers on
free loopback ports once per session (see servers.py); a backend whose server
binary is not installed is skipped with the reason.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import sys

import pytest

# The helpers live next to this file under unique names (l3_*); put this
# directory on sys.path so the test modules import them in any import mode.
# (No __init__.py here: a package tests/connectors could shadow `connectors`.)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import l3_servers as servers  # noqa: E402

from connectors import open_connector  # noqa: E402

ALL_BACKENDS = ["memory", "disk", "redis", "redis_cluster", "mooncake"]
_counter = itertools.count()


@pytest.fixture(scope="session")
def redis_server():
    with servers.redis_server_or_skip() as srv:
        yield srv


@pytest.fixture(scope="session")
def redis_cluster():
    with servers.redis_cluster_or_skip() as cluster:
        yield cluster


@pytest.fixture(scope="session")
def mooncake_store():
    with servers.mooncake_or_skip() as store:
        yield store


def backend_options(request, backend: str, tmp_path) -> dict:
    """Options that open an empty store of `backend` for one test."""
    if backend == "memory":
        return {"shared_name": f"test-{next(_counter)}"}
    if backend == "disk":
        return {"path": str(tmp_path / f"l3-{next(_counter)}"), "capacity_bytes": 1 << 30}
    # remote stores are shared by the session: a fresh key prefix isolates each test
    prefix = f"t{next(_counter)}:".encode()
    if backend == "redis":
        srv = request.getfixturevalue("redis_server")
        return {"host": "127.0.0.1", "port": srv.port, "key_prefix": prefix}
    if backend == "redis_cluster":
        cluster = request.getfixturevalue("redis_cluster")
        return {"startup_nodes": cluster.startup_nodes, "key_prefix": prefix}
    if backend == "mooncake":
        store = request.getfixturevalue("mooncake_store")
        return {**store.client_options(), "key_prefix": prefix}
    raise ValueError(backend)


@pytest.fixture(params=ALL_BACKENDS)
def backend(request) -> str:
    return request.param


@pytest.fixture
def make_conn(request, backend, tmp_path):
    """make_conn(**overrides) -> async context manager of a fresh connector.

    Connectors opened by one factory share one store (same path / prefix), so
    a test can reopen what it wrote; a new test gets an empty one.
    """
    base = backend_options(request, backend, tmp_path)

    @contextlib.asynccontextmanager
    async def make(**overrides):
        conn = open_connector(backend, **{**base, **overrides})
        try:
            yield conn
        finally:
            await conn.close()

    make.backend = backend
    make.options = base
    return make
