"""Progress reporting: callbacks receive (done, total); the CLI draws a text bar on stderr."""

from __future__ import annotations

import sys
import time

from .errors import Cancelled, interrupted


def report(progress, done, total) -> None:
    """Call a (done, total) progress callback; its answer False stops the work with Cancelled."""
    if progress is not None and progress(done, total) is False:
        raise Cancelled("cancelled by the progress callback")


class ProgressBar:
    """Callable (done, total) that draws `label [#####.....] done/total eta` on a terminal.

    When stderr is not a terminal (logs, CI) it prints a line at every 10% instead.
    """

    def __init__(self, total: int | None = None, label: str = "", stream=None, width: int = 30):
        self.total = total
        self.label = label
        self.stream = stream or sys.stderr
        self.width = width
        self.t0 = time.time()
        self._last_decile = -1
        self._tty = hasattr(self.stream, "isatty") and self.stream.isatty()

    def __call__(self, done: int, total: int | None = None) -> None:
        if interrupted():  # a Ctrl-C a library swallowed: the command stops at its next step
            raise KeyboardInterrupt
        total = total or self.total or 1
        frac = min(max(done / total, 0.0), 1.0)
        elapsed = time.time() - self.t0
        eta = elapsed / frac * (1 - frac) if frac > 0 else float("nan")
        text = f"{self.label} {done}/{total} ({frac:.0%}) {elapsed:.0f}s elapsed" + (f", ~{eta:.0f}s left" if frac < 1 and frac > 0 else "")
        if self._tty:
            filled = int(round(frac * self.width))
            bar = "#" * filled + "." * (self.width - filled)
            self.stream.write(f"\r{self.label} [{bar}] {done}/{total} {elapsed:.0f}s" + (f" ~{eta:.0f}s left " if 0 < frac < 1 else "   "))
            if done >= total:
                self.stream.write("\n")
        else:
            decile = int(frac * 10)
            if decile != self._last_decile:
                self._last_decile = decile
                self.stream.write(text + "\n")
        self.stream.flush()
