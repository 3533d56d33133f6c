"""A KV-event subscriber that rebuilds one daemon's contents, per tier, from its events alone.

    sub = EventSubscriber("tcp://node-a:5557", replay_address="tcp://node-a:5558")
    while True:
        sub.poll(timeout_s=0.1)
        sub.view.tiers["CPU"]               # the page keys node A holds in host memory
        sub.view.num_leading(keys, "CPU")   # how much of a prompt's chain it holds

Sequence and incarnation rules (controller/events/wire.py has the format):

- a batch of a new incarnation (the daemon restarted, or this is the first batch
  seen) starts the view over; its batches are numbered from 0, and batch 0 is
  AllBlocksCleared;
- a batch whose number is past the next one expected means batches were lost
  (PUB drops at its high-water mark; a late join misses the start): the
  missing ones are asked of the replay socket; what the replay no longer holds
  is gone, and the view says so (``is_complete`` False: it lacks those changes
  until the daemon restarts);
- a batch already applied (a replay overlapping the live stream) is skipped.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Sequence

import zmq

from controller.events import wire
from kvstore.page_keys import PageKey

log = logging.getLogger("kvstore.events")
_MAX_MESSAGES_PER_POLL = 10_000


@dataclass
class NodeView:
    """One daemon's contents as its events tell them."""

    incarnation: str | None = None
    """The daemon's instance id (``kvstore status`` shows it as ``instance``)."""
    last_seq: int | None = None
    """The last batch applied (None: none yet in this incarnation)."""
    tiers: dict[str, set[PageKey]] = field(default_factory=lambda: {m: set() for m in wire.MEDIA})
    """medium ("CPU": L2, "STORAGE": L3) -> page keys held there."""
    is_complete: bool = True
    """False when batches of this incarnation were lost beyond what replay could give."""
    num_batches: int = 0
    num_incarnations: int = 0

    def reset(self, incarnation: str) -> None:
        self.incarnation, self.last_seq, self.is_complete = incarnation, None, True
        self.num_incarnations += 1
        for keys in self.tiers.values():
            keys.clear()

    def apply(self, seq: int, batch: wire.EventBatch) -> None:
        for event in batch.events:
            if type(event) is wire.BlockStored:
                self.tiers.setdefault(event.medium, set()).update(event.block_hashes)
            elif type(event) is wire.BlockRemoved:
                self.tiers.setdefault(event.medium, set()).difference_update(event.block_hashes)
            else:
                for keys in self.tiers.values():
                    keys.clear()
        self.last_seq = seq
        self.num_batches += 1

    def num_leading(self, keys: Sequence[PageKey], medium: str = wire.MEDIUM_L2) -> int:
        """How many leading keys of a chain the tier holds (as the daemon's lookup counts)."""
        held = self.tiers.get(medium, set())
        for i, key in enumerate(keys):
            if key not in held:
                return i
        return len(keys)


class EventSubscriber:
    """SUB (and replay DEALER) sockets on one daemon's events, and the view they build."""

    def __init__(self, address: str, replay_address: str | None = None, topic: str = "", *,
                 context: zmq.Context | None = None, replay_timeout_s: float = 2.0) -> None:
        self.address, self.replay_address = address, replay_address
        self.view = NodeView()
        self.num_bad_messages = 0
        self.num_replays = 0
        self._replay_timeout_s = replay_timeout_s
        self._own_context = context is None
        self._context = context or zmq.Context()
        self.socket = self._context.socket(zmq.SUB)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.RCVHWM, 100_000)
        self.socket.setsockopt(zmq.MAXMSGSIZE, wire.MAX_PAYLOAD_BYTES + 4096)
        self.socket.setsockopt(zmq.SUBSCRIBE, topic.encode())
        self.socket.connect(address)
        self._replay: zmq.Socket | None = None

    # ---- receiving ------------------------------------------------------------------------
    def poll(self, timeout_s: float = 0.0) -> int:
        """Apply every message that has arrived, waiting up to ``timeout_s`` for the first;
        the number of batches applied."""
        applied = 0
        if not self.socket.poll(int(timeout_s * 1000)):
            return 0
        for _ in range(_MAX_MESSAGES_PER_POLL):   # a fast stream must not hold the caller forever
            try:
                frames = self.socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            applied += self._receive(frames)
        return applied

    def _receive(self, frames: list[bytes]) -> int:
        parsed = self._parse(frames)
        return 0 if parsed is None else self._accept(*parsed, can_replay=True)

    def _accept(self, seq: int, batch: wire.EventBatch, can_replay: bool) -> int:
        """Apply one batch (and, before it, what replay has of the ones missed); the
        number of batches applied."""
        view = self.view
        if batch.incarnation != view.incarnation:
            if view.incarnation is not None:
                log.info("%s: new daemon incarnation %s (was %s)", self.address,
                         batch.incarnation[:8], view.incarnation[:8])
            view.reset(batch.incarnation)
        if seq < self._next_seq():
            return 0   # applied already (from a replay)
        applied = 0
        if seq > self._next_seq() and can_replay:
            applied += self._replay_range(self._next_seq(), seq)
        if seq > self._next_seq():
            view.is_complete = False
            log.warning("%s: KV-event batches %d..%d are lost (replay %s); this view lacks "
                        "their changes", self.address, self._next_seq(), seq - 1,
                        "no longer holds them" if self.replay_address else "is not configured")
        view.apply(seq, batch)
        return applied + 1

    def _next_seq(self) -> int:
        return 0 if self.view.last_seq is None else self.view.last_seq + 1

    def catch_up(self) -> int:
        """Ask the replay socket for every batch after the last one applied (from the start
        when none was): how a subscriber that joins an idle daemon learns its contents
        without waiting for its next change. The number of batches applied."""
        return self._replay_range(self._next_seq(), None) if self.replay_address else 0

    def _parse(self, frames: list[bytes]) -> tuple[int, wire.EventBatch] | None:
        try:
            if len(frames) != 3:
                raise wire.EventFormatError(f"a message has 3 frames, got {len(frames)}")
            return wire.parse_seq(frames[1]), wire.decode_batch(frames[2])
        except wire.EventFormatError as exc:
            self.num_bad_messages += 1
            log.warning("%s: ignored a KV-event message: %s", self.address, exc)
            return None

    # ---- replay -------------------------------------------------------------------------------
    def _replay_range(self, start: int, stop: int | None) -> int:
        """Ask the replay socket for the batches from ``start`` (before ``stop``) and apply
        them in order; the number applied."""
        self.num_replays += 1
        sock = self._replay_socket()
        sock.send_multipart((b"", wire.seq_frame(start)))
        applied, deadline = 0, time.monotonic() + self._replay_timeout_s
        while True:
            left_ms = int((deadline - time.monotonic()) * 1000)
            if left_ms <= 0 or not sock.poll(left_ms):
                log.warning("%s: no end of replay within %.1f s", self.replay_address,
                            self._replay_timeout_s)
                self._drop_replay_socket()   # late answers must not mix with the next replay
                return applied
            frames = sock.recv_multipart()
            if len(frames) == 4 and frames[2] == wire.END_SEQ:
                return applied
            parsed = self._parse(frames[1:]) if len(frames) == 4 and not frames[0] else None
            if parsed is None:
                continue
            seq, batch = parsed
            # A live batch of the current incarnation asked for this replay: a batch of
            # another one (a restart meanwhile) waits for the live stream.
            is_ours = self.view.incarnation in (None, batch.incarnation)
            if is_ours and (stop is None or seq < stop):
                applied += self._accept(seq, batch, can_replay=False)

    def _replay_socket(self) -> zmq.Socket:
        if self._replay is None:
            self._replay = self._context.socket(zmq.DEALER)
            self._replay.setsockopt(zmq.LINGER, 0)
            self._replay.setsockopt(zmq.MAXMSGSIZE, wire.MAX_PAYLOAD_BYTES + 4096)
            self._replay.connect(self.replay_address)
        return self._replay

    def _drop_replay_socket(self) -> None:
        if self._replay is not None:
            self._replay.close(linger=0)
            self._replay = None

    def close(self) -> None:
        self._drop_replay_socket()
        self.socket.close(linger=0)
        if self._own_context:
            self._context.term()
