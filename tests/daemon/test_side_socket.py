"""The daemon's side socket under slow or many peers: a peer that connects and trickles
(or sends nothing) holds only its own connection, for at most the request deadline."""

from __future__ import annotations

import os
import socket

from controller.daemon.fd_broker import FdBroker
from controller.tenant_link import fetch_ticket


def test_a_stalled_peer_does_not_block_tickets(tmp_path):
    path = tmp_path / "kvstore.sock.fd"
    broker = FdBroker(path, {os.getuid()})
    stalled = []
    try:
        for _ in range(6):   # connected, silent: each holds one request thread, no more
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(str(path))
            stalled.append(s)
        # served while they stall (one at a time, 6 peers would hold it 6 s)
        ticket = fetch_ticket(f"ipc://{tmp_path / 'kvstore.sock'}", timeout_s=3.0)
        assert len(ticket) == 16
        assert broker.redeem_ticket(ticket) == os.getuid()
        # the silent peers are dropped at the request deadline
        stalled[0].settimeout(5.0)
        assert stalled[0].recv(1) == b""
    finally:
        for s in stalled:
            s.close()
        broker.close()
