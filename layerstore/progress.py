"""Docker-pull-style progress: one status line per layer, a live bar only on a terminal."""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Iterator
from typing import TextIO


def human(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1000
    return f"{n:.1f}TB"


class Progress:
    """Status lines go to `out`; the bar is drawn (and erased) only when `out` is a terminal."""

    def __init__(
        self, enabled: bool = True, out: TextIO | None = None, quiet: bool = False
    ) -> None:
        self.out = out or sys.stdout
        self.quiet = quiet or not enabled
        self.tty = not self.quiet and self.out.isatty()

    def line(self, msg: str) -> None:
        if not self.quiet:
            print(msg, file=self.out, flush=True)

    def warn(self, msg: str) -> None:
        print(f"layerfs: warning: {msg}", file=sys.stderr, flush=True)

    @contextlib.contextmanager
    def bar(self, label: str, total: int | None) -> Iterator[Callable[[int], None]]:
        if not self.tty:
            yield lambda _n: None
            return
        done = 0
        last = 0.0

        def tick(n: int) -> None:
            nonlocal done, last
            done += n
            t = time.monotonic()
            if t - last < 0.1:
                return
            last = t
            if total:
                width = 30
                filled = min(width, done * width // max(total, 1))
                bar = "=" * filled + (">" if filled < width else "") + " " * (width - filled - 1)
                text = f"{label}: Extracting [{bar}] {human(done)}/{human(total)}"
            else:
                text = f"{label}: Extracting {human(done)}"
            self.out.write("\r" + text + "\x1b[K")
            self.out.flush()

        try:
            yield tick
        finally:
            self.out.write("\r\x1b[K")
            self.out.flush()
