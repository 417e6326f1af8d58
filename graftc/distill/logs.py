"""What a person watches and keeps: progress while a long loop runs (a bar on a terminal, a line at a fixed
interval in a log file), TensorBoard scalars (when tensorboard is installed) and loss-curve PNGs."""
from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path

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


class Scalars:
    """TensorBoard event files under `folder`; a no-op without the optional tensorboard package."""

    def __init__(self, folder: Path | None):
        self.writer = None
        if folder is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                return
            self.writer = SummaryWriter(str(folder))

    def add(self, tag: str, value: float, step: int) -> None:
        if self.writer is not None:
            self.writer.add_scalar(tag, value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def ema(values, span: float) -> list[float]:
    """Exponential moving average with weight 2 / (span + 1) on each new value, bias-corrected so that the
    first points are not pulled toward zero."""
    beta = 1 - 2 / (span + 1)
    out, acc, weight = [], 0.0, 0.0
    for v in values:
        acc, weight = beta * acc + (1 - beta) * v, beta * weight + (1 - beta)
        out.append(acc / weight)
    return out


def needs_log_scale(values, ratio: float = 30.0) -> bool:
    """A log axis only where the values are positive and span more than `ratio` (about a decade and a half)."""
    finite = [v for v in values if math.isfinite(v)]
    return bool(finite) and min(finite) > 0 and max(finite) / min(finite) > ratio


def plot_losses(history: dict, path: Path) -> bool:
    """Stage-1 curves (per node: smoothed train line, validation markers) and the stage-2 curve (faint raw points
    under an EMA line), side by side; each axis logarithmic only where its values span a wide range."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    nodes, stage2 = history.get("stage1", {}), history.get("stage2", [])
    panels = [p for p in ("stage1", "stage2") if (nodes if p == "stage1" else stage2)]
    if not panels:
        return False
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.2), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        shown = []
        if panel == "stage1":
            for i, (name, curves) in enumerate(nodes.items()):
                color = plt.cm.viridis(i / max(1, len(nodes) - 1))
                if curves["train"]:
                    steps, values = zip(*curves["train"])
                    ax.plot(steps, ema(values, max(3, len(values) / 30)), lw=1.0, alpha=0.7, color=color)
                    shown += values
                if curves["val"]:
                    steps, values = zip(*curves["val"])
                    ax.plot(steps, values, "o", ms=4, mec="black", mew=0.5, color=color, label=name)
                    shown += values
            ax.set_title("stage 1: per-node activation loss\n(line: train, EMA; markers: validation)", fontsize=10)
            if len(nodes) <= 14:
                ax.legend(fontsize=7)
        else:
            steps, values = zip(*stage2)
            span = max(5, len(values) / 25)
            ax.plot(steps, values, ".", ms=2.5, alpha=0.25, color="tab:blue", label="each step")
            ax.plot(steps, ema(values, span), lw=1.8, color="tab:blue", label=f"EMA (span {span:.0f} steps)")
            shown += values
            ax.set_title("stage 2: end-to-end loss", fontsize=10)
            ax.legend(fontsize=8)
        ax.set_xlabel("step")
        if needs_log_scale(shown):
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
