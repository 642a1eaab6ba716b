"""Debug taps: named intermediate tensors a stage can expose to a capture.

Model code calls ``tap(name, tensor)`` at interesting points.  When no capture is
active this is a single ``None`` check, so the hooks cost nothing in normal runs.
A capture (see :func:`capture`) records detached CPU copies under
``"<stage>.tap.<name>"`` keys, the naming used by the reference dumps.
"""
from __future__ import annotations

import contextlib
import fnmatch
from typing import Callable, Dict, Iterator, Optional, Sequence

import torch

__all__ = ["TapRecorder", "tap", "capture", "paused", "active", "enabled"]


class TapRecorder:
    """Collects tapped tensors for one stage call.

    ``include`` is a list of glob patterns over tap names (without the stage prefix);
    ``None`` records everything.  ``on_tap`` (optional) is called for every tap that is
    seen, recorded or not — used by the flow debug log.
    """

    def __init__(self, stage: str, include: Optional[Sequence[str]] = None,
                 on_tap: Optional[Callable[[str, torch.Tensor], None]] = None) -> None:
        self.stage = stage
        self.include = list(include) if include is not None else None
        self.on_tap = on_tap
        self.tensors: Dict[str, torch.Tensor] = {}
        self.order: list[str] = []

    def wants(self, name: str) -> bool:
        if self.include is None:
            return True
        return any(fnmatch.fnmatchcase(name, p) for p in self.include)

    def record(self, name: str, tensor: torch.Tensor) -> None:
        if self.on_tap is not None:
            self.on_tap(name, tensor)
        if not self.wants(name):
            return
        key = f"{self.stage}.tap.{name}"
        if key not in self.tensors:
            self.order.append(key)
        self.tensors[key] = tensor.detach().to("cpu", copy=True)


_active: Optional[TapRecorder] = None


def active() -> Optional[TapRecorder]:
    """The recorder of the capture in progress, or ``None``."""
    return _active


def enabled() -> bool:
    return _active is not None


def tap(name: str, tensor: torch.Tensor) -> None:
    """Offer ``tensor`` under ``name`` to the active capture (no-op when none is active)."""
    if _active is not None:
        _active.record(name, tensor)


@contextlib.contextmanager
def capture(stage: str, include: Optional[Sequence[str]] = None,
            on_tap: Optional[Callable[[str, torch.Tensor], None]] = None) -> Iterator[TapRecorder]:
    """Record the taps of everything run inside the ``with`` block."""
    global _active
    previous = _active
    rec = TapRecorder(stage, include, on_tap)
    _active = rec
    try:
        yield rec
    finally:
        _active = previous


@contextlib.contextmanager
def paused() -> Iterator[None]:
    """Hide the active capture inside the block (e.g. per-token LLM steps after a prefill)."""
    global _active
    previous = _active
    _active = None
    try:
        yield
    finally:
        _active = previous
