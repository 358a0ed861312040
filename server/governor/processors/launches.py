"""The one place the Governor processor launches its fused kernels: each launch is counted here.

The kernels (``fused_kernel``, which needs Triton) are imported at the first launch, so the processor
imports on installs without Triton and tests can count launches with a fake that runs nothing.
"""

from __future__ import annotations

from typing import Any


class Launcher:
    """Launches ``fused_kernel.<name>`` on a 1-D grid and counts the launches."""

    def __init__(self) -> None:
        self.count = 0
        self._kernels: Any = None

    def __call__(self, name: str, grid: int, *args: Any, **constants: Any) -> None:
        self.count += 1
        self.run(name, grid, args, constants)

    def run(self, name: str, grid: int, args: tuple[Any, ...], constants: dict[str, Any]) -> None:
        if self._kernels is None:
            from governor.processors import fused_kernel

            self._kernels = fused_kernel
        getattr(self._kernels, name)[(grid,)](*args, **constants)
