"""A small progress display on stderr for things a person waits for (no dependency)."""
from __future__ import annotations

import sys
import time
from typing import Optional, TextIO


class Progress:
    """``with Progress("LLM", total=250, unit="tok") as p: p.update()`` — redraws at most 10×/s.

    Silent when ``enabled`` is false or stderr is not a terminal (unless ``force``). ``eta``: also
    show the estimated time left (from the mean time per item so far; needs ``total``);
    :meth:`set_postfix` adds a short note (e.g. the item in progress) after the bar.
    """

    def __init__(self, label: str, total: Optional[int] = None, unit: str = "", enabled: bool = True,
                 force: bool = False, stream: Optional[TextIO] = None, eta: bool = False) -> None:
        self.label, self.total, self.unit = label, total, unit
        self.eta, self.postfix = eta, ""
        self._width = 0
        self.stream = stream or sys.stderr
        self.enabled = enabled and (force or getattr(self.stream, "isatty", lambda: False)())
        self.n = 0
        self._t0 = time.perf_counter()
        self._last = 0.0

    def __enter__(self) -> "Progress":
        self._draw(force=True)
        return self

    def __exit__(self, *exc: object) -> None:
        self._draw(force=True)
        if self.enabled:
            self.stream.write("\n")
            self.stream.flush()

    def update(self, n: int = 1) -> None:
        self.n += n
        self._draw()

    def set_label(self, label: str) -> None:
        self.label = label
        self._draw(force=True)

    def set_postfix(self, text: str) -> None:
        self.postfix = text
        self._draw(force=True)

    def eta_seconds(self) -> Optional[float]:
        """Estimated seconds left, or None before the first item / without a total."""
        if not self.total or self.n <= 0:
            return None
        return (time.perf_counter() - self._t0) / self.n * max(self.total - self.n, 0)

    def _draw(self, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        if not force and now - self._last < 0.1:
            return
        self._last = now
        el = now - self._t0
        if self.total:
            frac = min(1.0, self.n / self.total)
            bar = "#" * int(frac * 24)
            text = f"\r{self.label:<10} [{bar:<24}] {self.n}/{self.total} {self.unit} {el:6.1f}s"
            if self.eta:
                left = self.eta_seconds()
                text += " eta " + ("?" if left is None else _fmt_seconds(left))
        else:
            text = f"\r{self.label:<10} {self.n} {self.unit} {el:6.1f}s"
        if self.postfix:
            text += f" {self.postfix}"
        # pad so that a shorter line fully covers the previous one
        self.stream.write(text.ljust(self._width))
        self._width = len(text)
        self.stream.flush()


def _fmt_seconds(s: float) -> str:
    s = int(round(s))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"
