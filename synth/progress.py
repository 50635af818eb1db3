"""Progress for long loops: a line to a log every few seconds, and a bar on a terminal."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from typing import Any


class Progress:
    """`update()` once per finished item; logs `desc: done/total (pct), rate/s, ETA`."""

    def __init__(
        self,
        total: int,
        desc: str,
        log: Callable[[str], None] | None = None,
        every_s: float = 10.0,
        bar: bool | None = None,
    ) -> None:
        self.total, self.desc, self.log, self.every_s = total, desc, log, every_s
        self.done = 0
        self.start = self._last = time.monotonic()
        if bar is None:
            bar = sys.stderr.isatty()
        self._bar = None
        if bar:
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=desc, unit="rec", leave=False)

    def line(self) -> str:
        elapsed = max(time.monotonic() - self.start, 1e-9)
        rate = self.done / elapsed
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        pct = 100.0 * self.done / self.total if self.total else 100.0
        eta_s = f"{eta:.0f}s" if eta != float("inf") else "?"
        return f"{self.desc}: {self.done}/{self.total} ({pct:.0f}%), {rate:.2f}/s, ETA {eta_s}"

    def update(self, n: int = 1) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
        now = time.monotonic()
        if self.log is not None and (now - self._last >= self.every_s or self.done == self.total):
            self._last = now
            self.log(self.line())

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def generate_logged(
    client: Any, requests: Sequence[Any], desc: str, log: Callable[[str], None] | None
) -> list[Any]:
    """`client.generate(requests)` with progress logged (and a bar on a terminal)."""
    progress = Progress(len(requests), desc, log)
    try:
        return client.generate(requests, on_done=lambda _: progress.update())
    finally:
        progress.close()
