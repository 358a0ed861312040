"""Host-to-device copies for the Governor processor: one per step, from buffers allocated once.

A step's host data (the newest tokens' planes, or everything a batch change writes) is filled into
a persistent host buffer through numpy and sent in one non-blocking copy. On CUDA the buffers are
pinned (allocated pinned once, grown by doubling: no ``pin_memory()`` per step) and there are two,
used in turn, each with an event: a buffer is refilled only after the copy that last read it (two
steps ago, long finished in practice) has run, because a non-blocking copy reads the host memory
when the stream gets to it, not when it is issued. On CPU nothing is pinned and the copy is a
plain one.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

_MIN_SIZE = 1024


class Uploads:
    """Two host int64 buffers used in turn, and a device staging buffer for batch changes."""

    def __init__(self, device: torch.device, pin_memory: bool) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self.pin = pin_memory and self.cuda
        self._host = [torch.zeros(0, dtype=torch.int64) for _ in range(2)]
        self._arrays = [tensor.numpy() for tensor in self._host]
        self._events: list[Any] = [None, None]
        self._pending = [False, False]
        self._turn = 0
        self._staging = torch.zeros(0, dtype=torch.int64, device=device)
        self.count = 0  # copies issued (tests read it)

    def host(self, size: int) -> np.ndarray:
        """This step's host buffer: ``size`` int64 to fill, then send with ``copy_to`` or ``stage``."""
        self._turn ^= 1
        turn = self._turn
        if self._pending[turn]:
            self._events[turn].synchronize()
            self._pending[turn] = False
        if self._host[turn].shape[0] < size:
            grown = max(size, 2 * self._host[turn].shape[0], _MIN_SIZE)
            tensor = torch.empty(grown, dtype=torch.int64, pin_memory=self.pin)
            self._host[turn], self._arrays[turn] = tensor, tensor.numpy()
        return self._arrays[turn][:size]

    def copy_to(self, target: torch.Tensor) -> None:
        """Copy the host buffer's first ``target.numel()`` values into ``target`` (any strides)."""
        source = self._host[self._turn][: target.numel()].view(target.shape)
        target.copy_(source, non_blocking=True)
        self._sent()

    def stage(self, size: int) -> torch.Tensor:
        """The host buffer's first ``size`` values on the device (valid until the next ``stage``)."""
        if self._staging.shape[0] < size:
            grown = max(size, 2 * self._staging.shape[0], _MIN_SIZE)
            self._staging = torch.empty(grown, dtype=torch.int64, device=self.device)
        staged = self._staging[:size]
        staged.copy_(self._host[self._turn][:size], non_blocking=True)
        self._sent()
        return staged

    def _sent(self) -> None:
        self.count += 1
        if self.cuda:
            turn = self._turn
            if self._events[turn] is None:
                self._events[turn] = torch.cuda.Event()
            self._events[turn].record()
            self._pending[turn] = True
