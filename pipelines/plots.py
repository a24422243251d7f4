"""Density plots for a few fixed validation examples: EBM, proposal, label, the truth if known, and the
input image for image tasks."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from ebm import metrics as M  # noqa: E402
from ebm.evaluate import true_log_density  # noqa: E402


def _display_image(x: torch.Tensor, task) -> np.ndarray:
    """A normalised (C, H, W) input back in [0, 1] for display, (H, W) or (H, W, 3)."""
    mean, std = task.norm_mean, task.norm_std
    img = x.cpu().float() * torch.tensor(std).view(-1, 1, 1) + torch.tensor(mean).view(-1, 1, 1)
    img = img.clamp(0, 1).numpy()
    return img[0] if img.shape[0] == 1 else img.transpose(1, 2, 0)


@torch.no_grad()
def density_figure(model, task, split, path: str | Path, n: int = 3, title: str = "") -> Path:
    """One panel per example (the first ``n`` of the split, so the same ones every epoch)."""
    model.eval()
    n = min(n, len(split))
    grid = torch.as_tensor(task.grid()[0], dtype=torch.float32)
    dx = task.cell_volume()
    x, y = split.x[:n], split.y[:n]
    dev = next(model.parameters()).device
    aux = {k: np.asarray(v)[:n] for k, v in split.aux.items()}
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 3.2), squeeze=False)
    g1 = grid.unsqueeze(1).to(dev)
    curves = {}
    if model.has_energy:
        f = M.model_log_density_on_grid(model, x.to(dev), g1, use_energy=True).cpu()
        curves["EBM"] = torch.softmax(f, dim=1) / dx
    if model.has_proposal:
        lq = M.model_log_density_on_grid(model, x.to(dev), g1, use_energy=False).cpu()
        curves["proposal q"] = torch.softmax(lq, dim=1) / dx
    lp = true_log_density(task, x.cpu(), aux, grid)
    if lp is not None:
        curves["true"] = torch.softmax(lp, dim=1) / dx
    image = x.dim() == 4
    inset_box = (0.78, 0.62, 0.2, 0.35)    # axes fraction: x, y, width, height
    for i in range(n):
        ax = axes[0, i]
        for (label, dens), style in zip(curves.items(), ("-", "--", ":")):
            ax.plot(grid.numpy(), dens[i].numpy(), style, label=label)
        ax.axvline(float(y[i, 0]), color="k", lw=0.8, label="label")
        if image:  # show the input in the panel's top-right corner, in headroom above the curves
            top = max(float(d[i].max()) for d in curves.values())
            ax.set_ylim(0, top / (inset_box[1] - 0.02))
            inset = ax.inset_axes(inset_box)
            inset.imshow(_display_image(x[i], task), cmap="gray" if x.shape[1] == 1 else None, vmin=0, vmax=1)
            inset.set_axis_off()
        ax.set_xlabel(f"{task.target_names[0]} ({task.units[0]})" if task.units[0] else task.target_names[0])
        if i == 0:
            ax.legend(fontsize=7, loc="upper left" if image else "best")
    fig.suptitle(f"{task.name} {title}".strip())
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return Path(path)
