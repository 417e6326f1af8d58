"""Progress of a long loop as a person watches it: a bar on a terminal, a line at a fixed interval in a log file.

Used by distillation, sampling (graftc.diffusion) and data making alike, so it lives outside graftc.distill."""
from __future__ import annotations

import math
import os
import sys
import time

INTERVAL_ENV = "GRAFTC_PROGRESS_SECONDS"
DEFAULT_INTERVAL = 20.0


def progress_interval() -> float:
    """Seconds between progress lines in a log: $GRAFTC_PROGRESS_SECONDS, else 20 (0: every update)."""
    raw = os.environ.get(INTERVAL_ENV, "")
    try:
        value = float(raw) if raw.strip() else DEFAULT_INTERVAL
    except ValueError:
        value = DEFAULT_INTERVAL
    return value if math.isfinite(value) and value >= 0 else DEFAULT_INTERVAL


class Progress:
    """Progress of one long loop. On a terminal, a tqdm bar; anywhere else (a file, a pipe, a CI log), where a
    bar would stay silent, one line on stderr for the first update, then every `progress_interval()` seconds,
    and for the last: `stage 2: step 120/2000 (6%), loss 0.0123, 4.1 step/s, ETA 7m38s`.

    `update(done, **values)` takes the count done so far (absolute) and the values to show (floats print with
    4 significant digits). `enabled=False` (e.g. on ranks other than 0) shows nothing."""

    def __init__(self, desc: str, total: int, initial: int = 0, unit: str = "step", enabled: bool = True,
                 tty: bool | None = None):
        self.desc, self.total, self.unit, self.enabled = desc, int(total), unit, enabled
        self.done = self.start = int(initial)
        self.began = time.perf_counter()
        self.last_line: float | None = None
        self.printed = None  # the count the last line showed
        self.values: dict = {}
        self.bar = None
        self.interval = progress_interval()
        if tty is None:
            tty = getattr(sys.stderr, "isatty", lambda: False)()
        if enabled and tty:
            from tqdm import tqdm

            self.bar = tqdm(total=self.total, initial=self.done, desc=desc, unit=unit, dynamic_ncols=True, leave=True)

    def update(self, done: int, **values) -> None:
        if not self.enabled:
            return
        step, self.done = int(done) - self.done, int(done)
        self.values = values
        if self.bar is not None:
            if values:
                self.bar.set_postfix({k: _fmt(v) for k, v in values.items()}, refresh=False)
            self.bar.update(step)  # redraws (at most every tqdm mininterval) with the new values
            return
        now = time.perf_counter()
        if self.last_line is None or now - self.last_line >= self.interval or self.done >= self.total:
            self.line(now)

    def line(self, now: float | None = None) -> None:
        now = time.perf_counter() if now is None else now
        self.last_line, self.printed = now, self.done
        parts = [f"{self.unit} {self.done}/{self.total}" + (f" ({self.done / self.total:.0%})" if self.total else "")]
        parts += [f"{k} {_fmt(v)}" for k, v in self.values.items()]
        elapsed, ran = now - self.began, self.done - self.start
        if ran > 0 and elapsed > 0:
            rate = ran / elapsed
            parts.append(f"{rate:.3g} {self.unit}/s")
            parts.append(f"ETA {_duration(max(0, self.total - self.done) / rate)}")
        print(f"{self.desc}: " + ", ".join(parts), file=sys.stderr, flush=True)

    def close(self) -> None:
        """Ends the bar; in a log, a last line unless the last update already printed one."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
        elif self.done > self.start and self.printed != self.done:
            self.line()
        self.enabled = False


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s" if m else f"{s}s"
