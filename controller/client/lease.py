"""What DaemonClient keeps per lease and per store reservation."""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

from controller.api import LookupResult
from controller.load_handle import ControllerLoad
from kvstore.slot_fence import SlotFence


class Reserved(NamedTuple):
    """A daemon reservation being written (what ``_publish`` needs)."""

    reservation_id: int
    fence: SlotFence
    num_skipped: int


@dataclasses.dataclass
class Lease:
    result: LookupResult
    slots: list[int]
    generations: bytes
    """Of ``slots`` as leased (LookupReply.generations): the fence of every load."""
    epoch: int
    loads: list[ControllerLoad]
    daemon_lease_id: int
