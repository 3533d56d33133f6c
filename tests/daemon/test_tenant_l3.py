"""Tenants share one L3 store through the daemon (issue 19): their keys are salted apart,
and a tenant's L3 quota refuses puts past its bytes (controller/daemon/l3_tenant.py)."""

import asyncio

from connectors import open_connector
from controller.daemon.l3_tenant import TenantL3, TenantL3Usage
from controller.daemon.pools import tenant_salt

PAGE = 1024


def test_salted_keys_keep_tenants_apart_and_the_quota_holds():
    async def run():
        store = open_connector("memory", fingerprint="fp")
        alice_usage = TenantL3Usage()
        alice = TenantL3(store, tenant_salt("alice"), alice_usage, quota_bytes=3 * PAGE)
        bob = TenantL3(store, tenant_salt("bob"), TenantL3Usage(), quota_bytes=None)
        keys = [bytes([i]) * 16 for i in range(5)]
        pages = [bytes([i]) * PAGE for i in range(5)]
        # Alice's quota takes 3 of her 5 pages; the rest are refused, counted.
        assert await alice.put(keys, pages) == [True, True, True, False, False]
        assert alice_usage.num_bytes == 3 * PAGE and alice_usage.num_refused == 2
        # Bob sends the very same keys: none of Alice's pages (they live under her salt).
        assert await bob.exists(keys) == 0
        views = [memoryview(bytearray(PAGE)) for _ in keys]
        assert await bob.get_into(keys, views) == [False] * 5
        # Nor are they under the plain keys (what a client would send).
        assert await store.exists(keys) == 0
        assert await alice.get_into(keys[:3], views[:3]) == [True] * 3
        assert bytes(views[2]) == pages[2]
        # Bob's pages under the same keys are his own; Alice still reads hers.
        assert await bob.put(keys[:1], [b"\xff" * PAGE]) == [True]
        assert await alice.get_into(keys[:1], views[:1]) == [True] and bytes(views[0]) == pages[0]
        # A page the store lost is no longer counted against the quota.
        assert await store.delete([alice._salted(keys[:1])[0]]) == 1
        assert await alice.get_into(keys[:1], views[:1]) == [False]
        assert alice_usage.num_bytes == 2 * PAGE
        assert await alice.put(keys[3:4], pages[3:4]) == [True]
        await store.close()

    asyncio.run(run())
