"""Figures people look at instead of reading numbers (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.ticker import MaxNLocator


def plot_training_curves(history: list[dict[str, float]], path: Path) -> Path:
    """Loss and AUROC per epoch, train vs validation, side by side."""
    epochs = [int(row["epoch"]) + 1 for row in history]
    fig, (ax_loss, ax_auc) = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    for ax, metric, title in ((ax_loss, "loss", "Loss (class-weighted BCE)"), (ax_auc, "auroc", "AUROC")):
        for split, style in (("train", "o-"), ("val", "s--")):
            values = [row.get(f"{split}_{metric}") for row in history]
            points = [(e, v) for e, v in zip(epochs, values) if v is not None]
            if points:
                ax.plot(*zip(*points), style, label="validation" if split == "val" else split)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend()
    ax_auc.set_ylim(top=1.0)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _save(fig: plt.Figure, path: Path) -> Path:
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _operating_label(metrics: dict) -> str:
    return f"threshold {metrics['threshold']:.3f} ({metrics['operating_point']})"


def plot_roc(labels, probabilities, metrics: dict, path: Path) -> Path:
    """ROC curve with the model's operating point marked."""
    from sklearn.metrics import roc_curve

    fpr, tpr, _ = roc_curve(labels, probabilities)
    fig, ax = plt.subplots(figsize=(5, 5), constrained_layout=True)
    low, high = metrics["auroc_ci"]
    ax.plot(fpr, tpr, lw=2, label=f"AUROC {metrics['auroc']:.3f} (95% CI {low:.3f}–{high:.3f})")
    ax.plot([0, 1], [0, 1], ":", color="gray")
    ax.plot(1 - metrics["specificity"], metrics["sensitivity"], "o", ms=9, color="crimson", label=_operating_label(metrics))
    ax.set(xlabel="1 − specificity (false-alarm rate)", ylabel="sensitivity (recall)", title=f"ROC — {metrics['split']} (n={metrics['n']})")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path)


def plot_roc_pair(labels, curves: list[tuple[str, object, dict]], title: str, path: Path) -> Path:
    """Two (or more) models' ROC curves on the same studies, each with its operating point marked."""
    from sklearn.metrics import roc_curve

    fig, ax = plt.subplots(figsize=(5, 5), constrained_layout=True)
    for (name, probabilities, figures), colour in zip(curves, ("tab:blue", "tab:orange", "tab:green")):
        fpr, tpr, _ = roc_curve(labels, probabilities)
        low, high = figures["auroc_ci"]
        ax.plot(fpr, tpr, lw=2, color=colour, label=f"{name}: AUROC {figures['auroc']:.3f} ({low:.3f}–{high:.3f})")
        ax.plot(1 - figures["specificity"], figures["sensitivity"], "o", ms=9, color=colour, markeredgecolor="black",
                label=f"  site point: threshold {figures['threshold']:.3f}")  # fmt: skip
    ax.plot([0, 1], [0, 1], ":", color="gray")
    ax.set(xlabel="1 − specificity (false-alarm rate)", ylabel="sensitivity (recall)", title=title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=7)
    return _save(fig, path)


def plot_pr(labels, probabilities, metrics: dict, path: Path) -> Path:
    """Precision–recall curve with the operating point marked."""
    from sklearn.metrics import precision_recall_curve

    precision, recall, _ = precision_recall_curve(labels, probabilities)
    fig, ax = plt.subplots(figsize=(5, 5), constrained_layout=True)
    ax.plot(recall, precision, lw=2, label=f"average precision {metrics['average_precision']:.3f}")
    ax.plot(metrics["sensitivity"], metrics["precision"], "o", ms=9, color="crimson", label=_operating_label(metrics))
    ax.set(xlabel="recall (sensitivity)", ylabel="precision", title=f"Precision–recall — {metrics['split']}", ylim=(0, 1.02))
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left", fontsize=8)
    return _save(fig, path)


def plot_confusion_matrix(metrics: dict, path: Path) -> Path:
    """Counts at the operating point, with the costly cell (missed pneumonia) named."""
    cm = metrics["confusion_matrix"]
    grid = [[cm["tn"], cm["fp"]], [cm["fn"], cm["tp"]]]
    fig, ax = plt.subplots(figsize=(4.6, 4.2), constrained_layout=True)
    ax.imshow(grid, cmap="Blues")
    names = [["true normal", "false alarm"], ["missed pneumonia", "found pneumonia"]]
    for i in range(2):
        for j in range(2):
            ax.text(j, i, f"{grid[i][j]}\n{names[i][j]}", ha="center", va="center", fontsize=10,
                    color="white" if grid[i][j] > max(map(max, grid)) / 2 else "black")
    ax.set_xticks([0, 1], ["NORMAL", "PNEUMONIA"])
    ax.set_yticks([0, 1], ["NORMAL", "PNEUMONIA"])
    ax.set(xlabel="predicted", ylabel="true", title=f"{metrics['split']} at threshold {metrics['threshold']:.3f}")
    return _save(fig, path)


def plot_reliability(before: list[dict], after: list[dict], ece_before: float, ece_after: float, path: Path) -> Path:
    """Reliability diagram: observed pneumonia rate vs mean probability, per bin."""
    fig, ax = plt.subplots(figsize=(5, 5), constrained_layout=True)
    ax.plot([0, 1], [0, 1], ":", color="gray", label="perfect calibration")
    for curve, label, style in ((before, f"uncalibrated (ECE {ece_before:.3f})", "s--"), (after, f"temperature-scaled (ECE {ece_after:.3f})", "o-")):
        ax.plot([b["mean_probability"] for b in curve], [b["observed_rate"] for b in curve], style, label=label)
    ax.set(xlabel="mean predicted probability of pneumonia", ylabel="observed share with pneumonia", xlim=(0, 1), ylim=(0, 1), title="Reliability (15 bins)")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    return _save(fig, path)
