"""A prefetch running in the daemon, seen through the client's link."""

from __future__ import annotations

import dataclasses

from controller.api import PrefetchTicket
from controller.client.link import DaemonLink
from controller.daemon import protocol as p
from controller.liveness import DaemonUnavailable


class RemotePrefetch(PrefetchTicket):
    """A prefetch running in the daemon; progress is asked for when read, until done."""

    def __init__(self, link: DaemonLink, reply: p.PrefetchReply | None) -> None:
        self._link = link
        self._last = reply or p.PrefetchReply(0, 0, 0, 0, 0, True)

    def _refresh(self, wait_s: float = 0.0) -> p.PrefetchReply:
        if not self._last.is_done:
            try:
                reply = self._link.call_prefetch(p.WaitPrefetch(self._last.prefetch_id, wait_s), wait_s)
            except DaemonUnavailable:
                reply = None
            # A daemon that forgot it (restart, reaped) has nothing more coming.
            self._last = reply if type(reply) is p.PrefetchReply else \
                dataclasses.replace(self._last, num_pending=0, is_done=True)
        return self._last

    @property
    def num_pages(self) -> int:
        return self._refresh().num_pages

    @property
    def num_ready(self) -> int:
        return self._refresh().num_ready

    @property
    def num_failed(self) -> int:
        return self._refresh().num_failed

    @property
    def num_pending(self) -> int:
        return self._refresh().num_pending

    @property
    def is_done(self) -> bool:
        return self._refresh().is_done

    def wait(self, timeout_s: float | None = None) -> bool:
        wait_s = self._link.session.request_timeout_s * 6 if timeout_s is None else timeout_s
        return self._refresh(wait_s).is_done

    def cancel(self) -> None:
        if not self._last.is_done:
            try:
                self._link.call_prefetch(p.CancelPrefetch(self._last.prefetch_id))
            except DaemonUnavailable:
                pass
            self._last = dataclasses.replace(self._last, is_done=True)
