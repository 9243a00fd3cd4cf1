"""A dependency-free progress line on stderr.

    bar = Progress("tokenize", total=n_bytes, unit="B")
    bar.update(k, note="2.1M tok/s")   # redrawn at most every `interval` seconds
    bar.close()                         # final line with newline

On a terminal the line is redrawn in place; in a log (not a tty) a fresh line is printed at
most every `log_interval` seconds so logs stay short.
"""
import sys
import threading
import time


def human(n: float, unit: str = "") -> str:
    """1234567 -> '1.23M' (unit appended); bytes use MB/GB with powers of ten like the rates."""
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.2f}{suffix}{unit}"
    return f"{n:.0f}{unit}" if float(n).is_integer() else f"{n:.2f}{unit}"


class Progress:
    def __init__(self, label: str, total: float | None = None, unit: str = "", stream=None,
                 interval: float = 0.2, log_interval: float = 5.0, clock=time.monotonic):
        self.label, self.total, self.unit = label, total, unit
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.interval = interval if self.tty else log_interval
        self.clock = clock
        self.done = 0.0
        self.note = ""
        self.start = clock()
        self._last = -1e9
        # Downloads update from several threads.
        self._lock = threading.Lock()

    def elapsed(self) -> float:
        return max(self.clock() - self.start, 1e-9)

    def line(self) -> str:
        rate = self.done / self.elapsed()
        if self.total:
            pct = 100.0 * self.done / self.total
            head = f"{self.label}: {pct:5.1f}% {human(self.done, self.unit)}/{human(self.total, self.unit)}"
        else:
            head = f"{self.label}: {human(self.done, self.unit)}"
        tail = f" | {human(rate, self.unit)}/s" if self.unit else ""
        return head + tail + (f" | {self.note}" if self.note else "") + f" | {self.elapsed():.1f}s"

    def update(self, amount: float = 0, note: str | None = None) -> None:
        with self._lock:
            self.done += amount
            if note is not None:
                self.note = note
            now = self.clock()
            if now - self._last >= self.interval:
                self._last = now
                self._draw(final=False)

    def _draw(self, final: bool) -> None:
        text = self.line()
        if self.tty:
            self.stream.write("\r\x1b[2K" + text + ("\n" if final else ""))
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def close(self, note: str | None = None) -> None:
        with self._lock:
            if note is not None:
                self.note = note
            self._draw(final=True)
