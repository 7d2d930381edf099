"""A dependency-free progress bar for ``attnlab bench`` (stderr).

On a terminal it redraws one line (``\\r``); otherwise (CI logs, pipes) it prints one line
per finished item, so logs stay readable.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    def __init__(self, total: int, title: str, stream: TextIO | None = None, width: int = 28) -> None:
        self.total, self.title, self.width = max(0, total), title, width
        self.stream = stream if stream is not None else sys.stderr
        self.done = 0
        self.start = time.perf_counter()
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())

    def _eta(self) -> str:
        if not self.done or self.done >= self.total:
            return ""
        left = (time.perf_counter() - self.start) / self.done * (self.total - self.done)
        return f" eta {left:4.0f}s"

    def advance(self, label: str) -> None:
        """One more item done; ``label`` says which."""
        self.done += 1
        frac = self.done / self.total if self.total else 1.0
        filled = int(round(frac * self.width))
        bar = "#" * filled + "." * (self.width - filled)
        elapsed = time.perf_counter() - self.start
        line = f"{self.title} [{bar}] {self.done}/{self.total} {elapsed:5.0f}s{self._eta()}  {label}"
        if self.tty:
            self.stream.write("\r" + line[:160].ljust(160))
            if self.done >= self.total:
                self.stream.write("\n")
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.tty and 0 < self.done < self.total:
            self.stream.write("\n")
            self.stream.flush()
