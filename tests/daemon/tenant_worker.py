"""A client of a tenant daemon, run as another OS user by test_tenants.py.

    tenant_worker.py ADDRESS store SEED CHAINS    store CHAINS chains of 8 pages of seeded data
    tenant_worker.py ADDRESS load SEED            load chain 0, compare with the seeded data
    tenant_worker.py ADDRESS probe DAEMON_PID     try every way at another tenant's pages,
                                                  store 3 chains (over an 8-page quota)
    tenant_worker.py ADDRESS attach               just attach (a user the daemon does not admit)
Prints one JSON line of findings. Started as root with ``--as UID:GID`` first, it becomes
that user (all of uid, gid, groups) once its modules are loaded: the interpreter may live
where only root can read (a pyenv under /root), and nothing of the test needs root after.
"""

from __future__ import annotations

import glob
import json
import os
import sys

from controller.api import CacheError
from controller.tenant_link import fetch_ticket

PAGES = 8
if "attach" not in sys.argv:   # torch takes seconds to import; `attach` needs none of it
    import torch

    from controller.client import DaemonClient
    from kvstore.layout import KVLayout
    from kvstore.page_keys import KeyNamespace

    LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=8, page_size=4, dtype="float32")
    NAMESPACE = KeyNamespace("shared-model", LAYOUT)   # both tenants run the same model


def tokens(chain: int) -> list[int]:
    return [chain * 1000 + i for i in range(PAGES * LAYOUT.page_size)]


def data(seed: int) -> torch.Tensor:
    return torch.randn(LAYOUT.pool_shape(PAGES), generator=torch.Generator().manual_seed(seed))


def become(spec: str) -> None:
    import controller.daemon.protocol  # noqa: F401 - loaded while the interpreter's files are readable
    uid, gid = (int(v) for v in spec.split(":"))
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)   # as root: real, effective and saved uid, for good


def main() -> dict:
    argv = sys.argv[1:]
    if argv[0] == "--as":
        become(argv[1])
        argv = argv[2:]
    address, action, *args = argv
    out = {"uid": os.getuid()}
    if action == "attach":   # what DaemonClient does first (fetch_ticket), and is refused
        try:
            fetch_ticket(address)
            out["attached"] = True
        except CacheError as exc:
            out["attached"], out["error"] = False, str(exc)
        return out
    if action == "store":
        client = DaemonClient(address, NAMESPACE, data(int(args[0])))
        out["tenant"] = client._link.session.hello.tenant
        out["stored"] = [client.store(tokens(c), range(PAGES)).num_new_pages for c in range(int(args[1]))]
        client.close()
        return out
    if action == "load":
        dst = torch.zeros(LAYOUT.pool_shape(PAGES))
        client = DaemonClient(address, NAMESPACE, dst)
        hit = client.lookup(tokens(0))
        out["hit"] = hit.num_hit_pages
        if hit.num_hit_pages == PAGES:
            client.load(hit, range(PAGES)).wait_all()
            client.release(hit)
        out["exact"] = dst.numpy().tobytes() == data(int(args[0])).numpy().tobytes()
        client.close()
        return out
    # probe: the other tenant stored chain 0 of this very model; try to get at it.
    client = DaemonClient(address, NAMESPACE, data(99))
    out["tenant"] = client._link.session.hello.tenant
    out["lookup_hit"] = client.lookup(tokens(0)).num_hit_pages      # the same keys: a miss
    daemon_pid = int(args[0])
    out["shm_names"] = [n for n in os.listdir("/dev/shm") if n.startswith(f"kvstore-{daemon_pid}-")]
    opened = []
    for path in glob.glob(f"/proc/{daemon_pid}/fd/*") + glob.glob(f"/proc/{daemon_pid}/map_files/*"):
        try:
            with open(path, "rb") as f:
                f.read(1)
            opened.append(path)
        except OSError:
            pass
    out["daemon_fds_listed"] = len(glob.glob(f"/proc/{daemon_pid}/fd/*"))
    out["opened_daemon_files"] = opened
    try:
        with open(f"/proc/{daemon_pid}/mem", "rb") as f:
            f.read(1)
        out["read_daemon_mem"] = True
    except OSError:
        out["read_daemon_mem"] = False
    # Store the same chain with other bytes and two more (past a quota of 8 pages: its
    # own pages go), then scribble over the whole mapped segment.
    out["stored"] = [client.store(tokens(c), range(PAGES)).num_new_pages for c in range(3)]
    pool = client._link.pool
    pool._bytes[:] = 0xFF
    pool.generations[:] = 7
    out["scribbled_bytes"] = int(pool._bytes.size)
    # Leave without close()'s checks of the pool it just wrecked: Goodbye, then exit.
    client._link._heartbeat.stop_event.set()
    client._link._heartbeat.join(5)
    client._link.session.close()
    return out


if __name__ == "__main__":
    print(json.dumps(main()), flush=True)
    os._exit(0)   # a wrecked client's finalisers have nothing left to do
