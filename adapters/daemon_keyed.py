"""DaemonKeyedCache: ``KeyedCache`` against a ``kvstore serve`` daemon -- TO WIRE.

The daemon and its client library live on branch ``daemon`` (not merged). Its wire
protocol is already key-level, so this class is a thin layer over that client's
``Session`` (heartbeat, deadlines, reattach) and its mapping of the daemon's segment::

    lookup_keys       -> p.Lookup(join_keys(keys))        LookupReply(lease_id, num_l2, num_l3, slots)
    release_keys      -> p.Release(lease_id)
    begin_store_keys  -> p.BeginStore(join_keys(keys))    StorePlanReply(reservation_id, positions, slots, num_skipped)
    commit_store_keys -> p.CommitStore(reservation_id)    CommitReply(num_published)
    abort_store_keys  -> p.AbortStore(reservation_id)
    host_tensor       =  the client's _MappedPool tensor (page_first slots)
    check_fresh       =  DaemonClient._require_fresh (leases of a silent client are reclaimed)
    stats             =  p.GetStats

Until then, opening a cache with a daemon url raises ImportError naming this.
"""

from __future__ import annotations

try:
    from controller.client import Session  # noqa: F401  (branch daemon)
except ImportError as exc:
    raise ImportError("kvstore_url names a daemon, but this install has no daemon client "
                      "(controller.client, branch daemon, not merged yet); use "
                      "\"kvstore_url\": \"embedded\" until it is") from exc

raise ImportError("adapters.daemon_keyed: the daemon client is present but DaemonKeyedCache "
                  "is not wired yet (see this module's docstring)")
