"""SlotFence: did the host slots a copy used keep their owner until the copy was over?

A reader learns each leased slot's generation when the lease is granted (from the
daemon's reply, or the pool itself in-process); a writer learns the generations of
the slots reserved for it. A slot's generation changes only when the slot is handed
to a new writer (``HostPool.try_reserve``), so once a copy has *completed*::

    generation unchanged  ->  nobody else could have written the slot during the copy:
                              the bytes read are the committed writer's (reader), or
                              the bytes written landed in a slot still ours (writer)
    generation changed    ->  the slot was reused meanwhile: the copy's bytes for that
                              page cannot be trusted (a LoadError, or a store not committed)

The check must run after the copy, never before: a copy that starts before the
reuse and ends after it would pass a check made at its start.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


class SlotFence:
    """The generations one copy expects its slots to keep (cheap: one vectorised compare)."""

    __slots__ = ("_generations", "_slots", "_expected")

    def __init__(self, generations: np.ndarray, slots: Sequence[int], expected: Sequence[int] | np.ndarray) -> None:
        """``generations``: the pool's live generation array (shared memory);
        ``expected[i]``: the generation of ``slots[i]`` when it was leased or reserved."""
        self._generations = generations
        self._slots = np.asarray(slots, dtype=np.int64)
        self._expected = np.asarray(expected, dtype=np.uint32)
        if self._slots.shape != self._expected.shape:
            raise ValueError(f"{len(self._slots)} slots but {len(self._expected)} generations")

    @classmethod
    def current(cls, generations: np.ndarray, slots: Sequence[int]) -> "SlotFence":
        """A fence on the generations ``slots`` have now (their owner must hold them)."""
        slots = np.asarray(slots, dtype=np.int64)
        return cls(generations, slots, generations[slots].copy())

    def bad_positions(self) -> list[int]:
        """Positions (into ``slots``) whose slot changed owner since the fence was made."""
        if not len(self._slots):
            return []
        return np.flatnonzero(self._generations[self._slots] != self._expected).tolist()
