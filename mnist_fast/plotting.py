"""The figures of mnist_fast.train: loss/accuracy curves and the lesson's view_classify.

matplotlib's object API with the Agg canvas: no pyplot, no display, no global state. matplotlib is
imported on first use, so the library and the CLI without --plot/--show do not need it.
"""
import io
from pathlib import Path
from typing import List, Sequence

import torch

from .checkpoint import write_output

__all__ = ["plot_history", "show_predictions"]


def _save_figure(figure, path: Path) -> None:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    write_output(path, buffer.getvalue())


def plot_history(history: List[dict], path: Path, title: str) -> None:
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    epochs = [h["epoch"] for h in history]
    scored = [split for split in ("val", "test") if f"{split}_loss" in history[-1]]  # --val-split: val, maybe test
    figure = Figure(figsize=(10, 4), layout="constrained")
    loss_ax, acc_ax = figure.subplots(1, 2)
    loss_ax.plot(epochs, [h["train_loss"] for h in history], "o-", label="train")
    for split in scored:
        points = [(h["epoch"], h[f"{split}_loss"], h[f"{split}_accuracy"]) for h in history if f"{split}_loss" in h]
        loss_ax.plot([p[0] for p in points], [p[1] for p in points], "o-", label=split)
        acc_ax.plot([p[0] for p in points], [100 * p[2] for p in points], "o-", label=split)
    loss_ax.set(xlabel="epoch", ylabel="loss", title="Loss")
    loss_ax.legend()
    acc_ax.set(xlabel="epoch", ylabel="accuracy (%)", title="Accuracy")
    acc_ax.legend()
    for ax in (loss_ax, acc_ax):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    figure.suptitle(title)
    _save_figure(figure, path)


def show_predictions(images: torch.Tensor, labels: torch.Tensor, probabilities: torch.Tensor,
                     classes: Sequence[str], path: Path) -> None:
    """The lesson's view_classify for several images: each image beside its class probabilities."""
    from matplotlib.figure import Figure

    count = images.shape[0]
    figure = Figure(figsize=(7, 2.2 * count), layout="constrained")
    axes = figure.subplots(count, 2, squeeze=False, width_ratios=(1, 2))
    for (image_ax, bar_ax), image, label, probs in zip(axes, images.cpu(), labels.cpu(), probabilities.cpu()):
        image_ax.imshow(image.reshape(28, 28).numpy(), cmap="gray")
        image_ax.set_title(f"true: {classes[int(label)]}\npredicted: {classes[int(probs.argmax())]}", fontsize=9)
        image_ax.axis("off")
        bar_ax.barh(range(len(classes)), probs.numpy())
        bar_ax.set_yticks(range(len(classes)), classes, fontsize=8)
        bar_ax.set_xlim(0, 1.1)
        bar_ax.set_title("Class Probability", fontsize=9)
    _save_figure(figure, path)
