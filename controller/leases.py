"""LeaseBook: the lookups a cache client holds and the loads reading their pages."""

from __future__ import annotations

from controller.api import CacheError, LookupResult
from controller.load_handle import ControllerLoad


class LeaseBook:
    """Lease id -> its LookupResult and loads. A released lease's loads are finished
    (no copy reads its slots any more) before its pages may be reused."""

    __slots__ = ("_results", "_loads")

    def __init__(self) -> None:
        self._results: dict[int, LookupResult] = {}
        self._loads: dict[int, list[ControllerLoad]] = {}

    def __len__(self) -> int:
        return len(self._results)

    def add(self, result: LookupResult) -> None:
        self._results[result.lease_id] = result

    def require(self, result: LookupResult, op: str) -> None:
        """CacheError unless ``result`` is a live lease of this client."""
        if self._results.get(result.lease_id) is not result:
            raise CacheError(f"lease {result.lease_id} has ended (or is not this client's): "
                             f"lookup() again before {op}()")

    def add_load(self, lease_id: int, handle: ControllerLoad) -> None:
        self._loads.setdefault(lease_id, []).append(handle)

    def take(self, result: LookupResult) -> LookupResult | None:
        """End the lease of ``result``: finish its loads and return it (None if it had
        ended already). Raises CacheError for a result of another client."""
        held = self._results.get(result.lease_id)
        if held is None:
            return None
        if held is not result and held != result:  # (equality compares every key)
            raise CacheError(f"release() got a result that is not lease {result.lease_id} of this cache")
        del self._results[result.lease_id]
        for handle in self._loads.pop(result.lease_id, ()):
            handle.finish()
        return held

    def results(self) -> list[LookupResult]:
        return list(self._results.values())
