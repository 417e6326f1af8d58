"""What a person watches and keeps: TensorBoard scalars (when tensorboard is installed) and loss-curve PNGs."""
from __future__ import annotations

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


def plot_losses(history: dict, path: Path) -> bool:
    """Stage-1 curves (one line per node: train thin, validation dots) and the stage-2 curve, side by side."""
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
        if panel == "stage1":
            for i, (name, curves) in enumerate(nodes.items()):
                color = plt.cm.viridis(i / max(1, len(nodes) - 1))
                if curves["train"]:
                    steps, values = zip(*curves["train"])
                    ax.plot(steps, values, lw=0.8, alpha=0.6, color=color)
                if curves["val"]:
                    steps, values = zip(*curves["val"])
                    ax.plot(steps, values, "o-", ms=3, color=color, label=name)
            ax.set_title("stage 1: per-node activation loss (line: train, dots: validation)")
            if len(nodes) <= 14:
                ax.legend(fontsize=7)
        else:
            steps, values = zip(*stage2)
            ax.plot(steps, values, lw=0.8)
            ax.set_title("stage 2: end-to-end loss")
        ax.set_xlabel("step")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
