"""A dependency-free progress bar on stderr for long benchmark runs; silent when not a TTY or when quiet.

with Progress(total=len(requests), desc="rate 3.5") as bar:
    for ... in ...:
        bar.update()
"""

from __future__ import annotations

import sys
import time
from typing import IO


class Progress:
    """Redraws ``desc [#####.....] done/total  elapsed`` in place, at most every ``min_interval`` seconds."""

    def __init__(
        self,
        total: int,
        desc: str = "",
        *,
        quiet: bool = False,
        stream: IO[str] | None = None,
        width: int = 30,
        min_interval: float = 0.1,
    ) -> None:
        self.total = max(int(total), 0)
        self.desc = desc
        self.done = 0
        self.stream = stream if stream is not None else sys.stderr
        self.width = width
        self.min_interval = min_interval
        isatty = getattr(self.stream, "isatty", None)
        self.enabled = not quiet and callable(isatty) and bool(isatty())
        self._start = time.monotonic()
        self._last_draw = -float("inf")
        self._closed = False

    def update(self, n: int = 1) -> None:
        """Advance by ``n``; redraws if enough time passed or the bar is complete."""
        self.done = min(self.done + n, self.total) if self.total else self.done + n
        now = time.monotonic()
        if self.enabled and (now - self._last_draw >= self.min_interval or self.done >= self.total):
            self._draw(now)

    def render(self, now: float | None = None) -> str:
        """The bar's current text (without the carriage return)."""
        elapsed = (time.monotonic() if now is None else now) - self._start
        frac = self.done / self.total if self.total else 1.0
        filled = int(round(frac * self.width))
        bar = "#" * filled + "." * (self.width - filled)
        prefix = f"{self.desc} " if self.desc else ""
        return f"{prefix}[{bar}] {self.done}/{self.total} {elapsed:6.1f}s"

    def _draw(self, now: float) -> None:
        self._last_draw = now
        self.stream.write("\r" + self.render(now))
        self.stream.flush()

    def close(self) -> None:
        """Draw the final state and end the line (no-op when disabled or already closed)."""
        if self._closed:
            return
        self._closed = True
        if self.enabled:
            self._draw(time.monotonic())
            self.stream.write("\n")
            self.stream.flush()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
