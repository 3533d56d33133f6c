"""DaemonClient: the CacheClient API against a ``kvstore serve`` daemon.

    from controller import connect_daemon
    cache = connect_daemon("ipc:///run/user/1000/kvstore/kvstore.sock", namespace, engine.kv_pool)

Only page keys, slot numbers and lease ids cross the socket. The client
computes page keys itself, maps the daemon's shared-memory segment and moves
page bytes between it and the engine's device pool with the copy backends of
``kvstore.copy_ops`` on its own device (pinned with cudaHostRegister on CUDA).

Liveness and restarts:
- a heartbeat thread (its own socket) keeps the session alive; a client silent
  for ``lease_ttl_s`` keeps its leases and reservations while the daemon sees its
  process alive (paused), and loses them if the daemon cannot watch it (another pid
  namespace; see controller/daemon/sessions.py);
- every request has a deadline (``request_timeout_s``); after a timeout the socket
  is replaced, so a late reply or a queued request never reaches a new daemon;
- a reply from a new daemon instance, or "unknown session", drops the old
  mapping and leases (load of an old result raises LoadError: recompute), attaches
  again and retries once;
- fail open, fast (``controller.liveness``): the first request that times out marks
  the daemon down (one WARNING); until a background Ping on its own socket is
  answered (one INFO), every request fails at once, so lookups are misses, stores
  skipped pages and prefetches no-ops within milliseconds; then the session
  re-attaches by itself. ``DaemonClient.link_health()`` shows it;
- every copy is fenced (``kvstore.slot_fence``): a lease carries its slots'
  generations and the client checks them once the copy has completed, so a slot the
  daemon reused during the copy makes the load a LoadError (or the store unpublished),
  never a silent success; before copying it also makes sure the daemon heard from it
  within half the TTL.

Prefetch: the daemon never waits on L3 inside a request. A lookup that finds
pages only in L3 gets the L2 hit plus a running prefetch; the client applies its
own ``PrefetchConfig.policy`` by waiting on that prefetch (WaitPrefetch, answered
by the daemon when it is done or the budget ends, while it serves others) and
looking up again. ``sync`` behaves as ``wait_complete`` here; ``auto`` plans with
the client's own cost model (controller/client_choice.py).
"""

from controller.client.channel import Channel, Credentials
from controller.client.daemon_client import DaemonClient
from controller.client.lease import Lease, Reserved
from controller.client.link import DaemonLink
from controller.client.mapped_pool import MappedPool
from controller.client.prefetch_ticket import RemotePrefetch
from controller.client.session import Heartbeat, Session
from controller.liveness import DaemonDown, DaemonUnavailable, DaemonWatch, LinkHealth

__all__ = ["Channel", "Credentials", "DaemonClient", "DaemonDown", "DaemonLink", "DaemonUnavailable",
           "DaemonWatch", "Heartbeat", "Lease", "LinkHealth", "MappedPool", "RemotePrefetch",
           "Reserved", "Session"]
