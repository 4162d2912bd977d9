"""A live one-line display of a running scenario: elapsed time, step, generation, world size, faults fired.

On a terminal the line is rewritten in place; otherwise (CI logs) a line is printed at most every 5 s.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    def __init__(self, stream: TextIO | None = None, every_s: float = 5.0) -> None:
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.every_s = every_s
        self._last = 0.0
        self._width = 0

    def update(self, name: str, elapsed: float, step: int | None, gen: int | None, ws: int | None,
               fired: int, total: int) -> None:
        now = time.monotonic()
        if not self.tty and now - self._last < self.every_s:
            return
        if self.tty and now - self._last < 0.2:
            return
        self._last = now
        line = (f"[{name}] {elapsed:6.1f}s  step {'-' if step is None else step:>4}  gen {'-' if gen is None else gen}"
                f"  world {'-' if ws is None else ws}  faults {fired}/{total}")
        if self.tty:
            self.stream.write("\r" + line.ljust(self._width))
            self._width = len(line)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def done(self, text: str) -> None:
        if self.tty and self._width:
            self.stream.write("\r" + " " * self._width + "\r")
        self.stream.write(text + "\n")
        self.stream.flush()
        self._width = 0
        self._last = 0.0
