"""The daemon's side socket under slow or many peers: a peer that connects and trickles
(or sends nothing) holds only its own connection, for at most the request deadline."""

from __future__ import annotations

import os
import socket

import pytest

from controller.api import CacheError
from controller.daemon.fd_broker import FdBroker
from controller.tenant_link import fetch_ticket, receive_segment


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


def test_a_flood_of_grants_expires_only_its_own_segments(tmp_path):
    path = tmp_path / "kvstore.sock.fd"
    broker = FdBroker(path, {os.getuid()})
    fds = [os.memfd_create(f"segment-{i}") for i in range(2)]
    try:
        for fd in fds:
            os.ftruncate(fd, 4096)
        me = os.getuid()
        quiet = broker.grant(me, fds[0], 4096)
        flood = [broker.grant(me, fds[1], 4096) for _ in range(5000)]
        receive_segment(str(path), quiet, 4096).close()     # the other pool's grant stays
        receive_segment(str(path), flood[-1], 4096).close()
        with pytest.raises(CacheError, match="unknown or expired"):
            receive_segment(str(path), flood[0], 4096)
    finally:
        broker.close()
        for fd in fds:
            os.close(fd)
