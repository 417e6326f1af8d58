"""What a person keeps from a distillation: TensorBoard scalars (when tensorboard is installed) and loss-curve PNGs
(progress while it runs: graftc.progress)."""
from __future__ import annotations

import math
from pathlib import Path


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
