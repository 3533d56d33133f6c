"""Layer-by-layer load of host pages into the engine's device pool.

On CUDA every layer's copy is enqueued at once on a side stream with an event
after each layer; ``wait_layer(i)`` makes the engine's current stream wait on
event i, so layer i+1 moves while layer i's attention runs. Elsewhere (CPU, and
devices without streams here) a layer is copied when it is first waited on,
which keeps the same contract: a layer is in the pool once its wait returns.
"""

from __future__ import annotations

from typing import Callable

import torch

from controller.api import CacheError, LoadHandle

CopyLayer = Callable[[int, object], None]  # (layer, stream) -> enqueue that layer's copy


class ControllerLoad(LoadHandle):
    """A load the controller can end when its lease is released."""

    _is_finished = False

    def finish(self) -> None:
        """Return once nothing reads the source slots any more; later waits raise."""
        self._is_finished = True

    def _check_live(self) -> None:
        if self._is_finished:
            raise CacheError("this load's lease was released; lookup() and load() again")


class CompletedLoad(ControllerLoad):
    """A load with nothing to move (no hit pages)."""

    def wait_layer(self, layer: int) -> None:
        self._check_live()

    def wait_all(self) -> None:
        self._check_live()


class LazyLayerLoad(ControllerLoad):
    """Copies layers in order on the caller's thread as they are waited on."""

    def __init__(self, num_layers: int, copy_layer: CopyLayer) -> None:
        self._num_layers = num_layers
        self._copy_layer = copy_layer
        self._num_done = 0

    def wait_layer(self, layer: int) -> None:
        if not 0 <= layer < self._num_layers:
            raise ValueError(f"layer must be in [0, {self._num_layers}), got {layer}")
        self._check_live()  # after release the slots may hold another page
        while self._num_done <= layer:
            self._copy_layer(self._num_done, None)
            self._num_done += 1

    def wait_all(self) -> None:
        self.wait_layer(self._num_layers - 1)


class CudaStreamLoad(ControllerLoad):
    """All layers enqueued on a side stream, one event per layer."""

    def __init__(self, num_layers: int, copy_layer: CopyLayer, stream: torch.cuda.Stream) -> None:
        self._events: list[torch.cuda.Event] = []
        # The side stream must not start before the engine's writes to the pool
        # that precede this load (e.g. freed pages being reused) are done.
        stream.wait_stream(torch.cuda.current_stream(stream.device))
        for layer in range(num_layers):
            copy_layer(layer, stream)
            event = torch.cuda.Event()
            event.record(stream)
            self._events.append(event)

    def wait_layer(self, layer: int) -> None:
        self._check_live()
        torch.cuda.current_stream().wait_event(self._events[layer])

    def wait_all(self) -> None:
        self.wait_layer(len(self._events) - 1)

    def finish(self) -> None:
        self._events[-1].synchronize()
        super().finish()
