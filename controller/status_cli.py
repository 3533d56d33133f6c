"""``kvstore status``: a short summary fetched from a running daemon.

    kvstore status                         # the default ipc:// address
    kvstore status --address tcp://10.0.0.5:7600 --token-file ~/.kvstore-token
    kvstore status --json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--address", help="daemon address (default: KVSTORE_ADDRESS or the per-user ipc socket)")
    parser.add_argument("--token-file", help="file holding the shared token (tcp)")
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for the daemon")
    parser.add_argument("--json", action="store_true", help="print the raw counters as JSON")


def fetch_stats(address: str, token: bytes = b"", timeout_s: float = 3.0) -> dict:
    from controller.client import Credentials, Session

    session = Session(address, credentials=Credentials(token=token), request_timeout_s=timeout_s,
                      client_name="kvstore-status")
    try:
        from controller.daemon import protocol as p

        reply = session.call(p.GetStats())
        if type(reply) is not p.StatsReply:
            raise RuntimeError(f"{reply.code}: {reply.message}")
        return reply.stats
    finally:
        session.close()


def run(args: argparse.Namespace) -> int:
    import os

    from controller.api import CacheError
    from controller.config import ConfigError
    from controller.daemon.config import default_address

    address = args.address or os.environ.get("KVSTORE_ADDRESS") or default_address()
    token = Path(args.token_file).read_bytes().strip() if args.token_file else \
        os.environ.get("KVSTORE_AUTH_TOKEN", "").encode()
    try:
        stats = fetch_stats(address, token, args.timeout)
    except (CacheError, ConfigError, RuntimeError) as exc:
        print(f"kvstore status: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(stats, indent=1, sort_keys=True))
        return 0
    print(format_stats(stats))
    return 0


def format_stats(s: dict) -> str:
    used = s["num_slots"] - s["num_free_slots"]
    lookups = max(int(s.get("num_lookup_pages", 0)), 1)
    hit = s.get("num_l2_hit_pages", 0) + s.get("num_l3_hit_pages", 0)
    if s.get("multi_layout"):
        l2 = _pool_lines(s)
    else:
        l2 = [f"  layout   {s['layout']}, L3 {s['l3']}",
              f"  L2       {used}/{s['num_slots']} slots used ({s['num_cached_pages']} pages cached, "
              f"{s['num_reserved_slots']} being written), {s['num_slots'] * s['slot_bytes'] / 2**20:.1f} "
              f"MiB in {s['segment']}"]
    return "\n".join([
        f"kvstore daemon pid {s['pid']} on {s['address']} (instance {s['instance'][:8]})",
        *l2,
        f"  clients  {s['num_clients']} attached, {s['num_leases']} leases, "
        f"{s['num_reservations']} reservations, {s['num_reaped_clients']} reaped",
        f"  fencing  {s.get('num_suspended_clients', 0)} clients suspended (silent, process alive), "
        f"{s.get('num_quarantined_slots', 0)} slots quarantined",
        f"  lookups  {s.get('num_lookups', 0)}, page hit rate {hit / lookups:.1%} "
        f"(L2 {s.get('num_l2_hit_pages', 0)}, L3 {s.get('num_l3_hit_pages', 0)} of "
        f"{s.get('num_lookup_pages', 0)})",
        f"  stored   {s.get('num_stored_pages', 0)} pages, evicted {s.get('num_evicted_pages', 0)}"
        + (f"; written to L3 {s.get('num_l3_written_pages', 0)}, {s.get('num_due_pages', 0)} not yet"
           if s.get("l3_status", "none") != "none" else ""),
        f"  refused  {s['num_refused']} requests, {s['num_bad_messages']} bad messages",
        *_l3_lines(s),
    ])


def _pool_lines(s: dict) -> list[str]:
    """A daemon of every layout: its budget, each (tenant, layout) pool, each tenant's quotas."""
    mib = 2 ** 20
    lines = [f"  L2       {s['used_bytes'] / mib:.1f} of {s['budget_bytes'] / mib:.1f} MiB used by "
             f"{s['num_pools']} pools ({s['num_cached_pages']} pages cached, {s['num_reserved_slots']} "
             f"being written), L3 {s['l3']}"]
    for pool in json.loads(s.get("pools", "[]")):
        lines.append(f"  pool     {pool['tenant']} {pool['layout']}: {pool['used_slots']} pages of "
                     f"{pool['slot_bytes']} B, evicted {pool['evicted_budget']} (budget) "
                     f"{pool['evicted_quota']} (quota)")
    for t in json.loads(s.get("tenants", "[]")):
        l2q = t["l2_quota_pages"] or "none"
        l3q = t["l3_quota_bytes"] or "none"
        lines.append(f"  tenant   {t['tenant']}: L2 {t['l2_pages']} pages (quota {l2q}), L3 "
                     f"{t['l3_bytes']} B (quota {l3q}, {t['l3_refused_pages']} pages refused)")
    return lines


def _l3_lines(s: dict) -> list[str]:
    """The L3 store's health: ok, or failing since when, its error counts and last error."""
    status = s.get("l3_status", "none")
    if status == "none":
        return []
    counts = (f"{s.get('l3_write_errors', 0)} write errors, {s.get('l3_read_errors', 0)} read "
              f"errors, {s.get('num_l3_dropped_pages', 0)} pages dropped")
    if status == "ok":
        return [f"  L3       ok ({counts} since start)"]
    since = s.get("l3_failing_since", 0.0)
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(since))
    return [f"  L3       {status.upper()} since {when} ({time.time() - since:.0f} s ago); {counts}",
            f"           last error: {s.get('l3_last_error', '')}"]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m controller.status_cli")
    add_arguments(parser)
    sys.exit(run(parser.parse_args()))
