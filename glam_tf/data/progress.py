"""A small progress bar with rate and ETA for long data jobs (conversion, generation).

On a terminal it redraws one line on stderr; in a log file (not a tty) it writes an absl log
line at most every `log_every_s` seconds, so batch jobs leave a readable trace.
"""

import sys
import time

from absl import logging


def format_seconds(seconds: float) -> str:
    """Seconds as H:MM:SS (for ETAs and elapsed times)."""
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours:d}:{minutes:02d}:{secs:02d}"


class ProgressBar:
    """Counts finished units of work and shows done/total, units per second and the ETA.

    Args:
      total: number of units expected (> 0; 0 makes `update` a no-op display-wise).
      unit: word shown after the counts, e.g. "images".
      description: prefix of every line.
      stream: where the terminal bar is drawn; defaults to sys.stderr.
      log_every_s: minimum seconds between log lines when `stream` is not a tty.
      enabled: False silences it (the counts are still kept).
    """

    def __init__(self, total, *, unit="items", description="", stream=None,
                 log_every_s=30.0, enabled=True):
        if total < 0:
            raise ValueError(f"ProgressBar total must be >= 0, got {total}")
        self.total = int(total)
        self.unit = unit
        self.description = description
        self.stream = stream if stream is not None else sys.stderr
        self.log_every_s = float(log_every_s)
        self.enabled = enabled
        self.done = 0
        self._start = time.monotonic()
        self._last_log = -float("inf")
        self._tty = bool(getattr(self.stream, "isatty", lambda: False)())

    def line(self) -> str:
        """The status line: `<description> [=====     ] 50/100 images 12.3 images/s ETA 0:00:04`."""
        elapsed = max(time.monotonic() - self._start, 1e-9)
        rate = self.done / elapsed
        width = 30
        frac = self.done / self.total if self.total else 1.0
        filled = min(width, int(width * frac))
        bar = "=" * filled + " " * (width - filled)
        eta = (self.total - self.done) / rate if rate > 0 else float("nan")
        eta_text = format_seconds(eta) if eta == eta else "?"
        prefix = f"{self.description} " if self.description else ""
        return (f"{prefix}[{bar}] {self.done}/{self.total} {self.unit} "
                f"{rate:.1f} {self.unit}/s ETA {eta_text}")

    def update(self, done: int) -> None:
        """Sets the number of finished units (absolute, not an increment) and redraws."""
        self.done = int(done)
        if not self.enabled:
            return
        if self._tty:
            self.stream.write("\r" + self.line())
            self.stream.flush()
        else:
            now = time.monotonic()
            if now - self._last_log >= self.log_every_s:
                self._last_log = now
                logging.info("%s", self.line())

    def close(self) -> None:
        """Draws the final state and ends the line."""
        if not self.enabled:
            return
        elapsed = time.monotonic() - self._start
        if self._tty:
            self.stream.write("\r" + self.line() + "\n")
            self.stream.flush()
        logging.info("%s (done in %s)", self.line(), format_seconds(elapsed))
