"""Figures people look at instead of reading numbers (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_training_curves(history: list[dict[str, float]], path: Path) -> Path:
    """Loss and AUROC per epoch, train vs validation, side by side."""
    epochs = [row["epoch"] for row in history]
    fig, (ax_loss, ax_auc) = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    for ax, metric, title in ((ax_loss, "loss", "Loss (class-weighted BCE)"), (ax_auc, "auroc", "AUROC")):
        for split, style in (("train", "o-"), ("val", "s--")):
            values = [row.get(f"{split}_{metric}") for row in history]
            points = [(e, v) for e, v in zip(epochs, values) if v is not None]
            if points:
                ax.plot(*zip(*points), style, label="validation" if split == "val" else split)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend()
    ax_auc.set_ylim(top=1.0)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
