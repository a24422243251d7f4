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


SOURCE_STYLE = {"prediction": ("IS prediction", "C0", "-"), "proposal": ("proposal q alone", "C1", "--"),
                "ebm_grid": ("EBM on the grid", "C2", "-.")}
MARKED_LEVELS = (0.5, 0.8, 0.9, 0.95)
CURVE_STYLE = {"EBM": ("C0", "-"), "proposal q": ("C1", "--"), "true density": ("C2", ":")}


def _calibration_axes(hist, cov, hist_ylabel: str, cov_ylabel: str, lo: float = 0.0) -> None:
    """The two panels of a calibration figure around their curves: the flat line of a calibrated PIT
    histogram, the diagonal of calibrated coverage (from ``lo``) and the marked levels."""
    hist.axhline(1.0, color="k", lw=1, ls=":")
    hist.set(xlim=(0, 1), xlabel="PIT  u = F(y | x) at the label", ylabel=hist_ylabel,
             title="PIT histogram: flat when calibrated\n(∪ = too narrow, ∩ = too wide, tilted = biased)")
    hist.set_ylim(0, max(2.0, hist.get_ylim()[1]))
    cov.plot([0, 1], [0, 1], color="k", lw=1, ls=":", label="nominal (calibrated)")
    for lv in MARKED_LEVELS:
        cov.axvline(lv, color="0.85", lw=0.8, zorder=0)
    cov.set(xlim=(lo, 1), ylim=(lo, 1), xlabel="nominal level of the central interval", ylabel=cov_ylabel,
            title="coverage of central intervals\n(below the diagonal = under-covers)")


def calibration_figure(cal: dict, path: str | Path, title: str = "") -> Path:
    """PIT histograms (left) and coverage of central intervals against their nominal level (right)
    for each source of :func:`pipelines.serve.model_eval.calibration`; the dims are pooled. The grey
    band is where a calibrated model's histogram bars fall 95% of the time with this many labels."""
    levels = np.asarray(cal["levels"])
    fig, (hist, cov) = plt.subplots(1, 2, figsize=(11, 5.0), layout="constrained",
                                    gridspec_kw={"width_ratios": [1.35, 1]})
    n_dims = len(cal.get("target_names") or [None])
    n = max((np.asarray(src["pit"]).size for src in cal["sources"].values()), default=0)
    bins = int(np.clip(n // 25, 5, 20))         # ~25 labels per bin at least: bars a reader can trust
    if n:
        half = 1.96 * np.sqrt((1 / bins) * (1 - 1 / bins) / n) * bins
        hist.axhspan(1 - half, 1 + half, color="0.88", zorder=0, label="95% band if calibrated")
    for k, src in cal["sources"].items():
        label, colour, style = SOURCE_STYLE.get(k, (k, None, "-"))
        if k == "prediction":
            label += f" (M = {cal['M']})"
        pit = np.asarray(src["pit"]).reshape(-1)
        hist.hist(pit, bins=bins, range=(0, 1), density=True, histtype="step", lw=1.8, color=colour, ls=style)
        c = np.asarray(src["pooled"])
        at = ", ".join(f"{lv:.0%}: {c[j]:.2f}" for lv in MARKED_LEVELS for j in np.flatnonzero(np.isclose(levels, lv)))
        cov.plot(levels, c, style, color=colour, marker="o", ms=4, lw=1.6, label=f"{label} — {at}")
    _calibration_axes(hist, cov, "density", "observed coverage")
    hist.legend(fontsize=8, loc="upper center", frameon=False)
    fig.legend(*cov.get_legend_handles_labels(), loc="outside lower center", ncol=2, fontsize=8, frameon=False)
    suffix = f", {n_dims} target dims pooled" if n_dims > 1 else ""
    fig.suptitle(f"calibration: {title}{suffix}".strip(), fontsize=11)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def cells_calibration_figure(cells: list[dict], path: str | Path, title: str = "") -> Path:
    """A results page's calibration figure for several cells (groups of seeds) of one source: the PIT
    histogram, mean over seeds (left), and the coverage of the central intervals against their nominal
    level with the 95 % interval of the mean over seeds (right). Each cell is a dict with ``name``,
    ``pit`` (the bin fractions, or None when its runs did not log them) and ``coverage``
    ({level in (0, 1): (mean, half-width)})."""
    fig, (hist, cov) = plt.subplots(1, 2, figsize=(11, 4.8), layout="constrained",
                                    gridspec_kw={"width_ratios": [1.35, 1]})
    for i, c in enumerate(cells):
        colour = f"C{i % 10}"
        if c.get("pit") is not None:
            pit = np.asarray(c["pit"], dtype=float)
            edges = np.linspace(0, 1, len(pit) + 1)
            # a cell with no coverage figures is named by its PIT line (the legend is drawn from both panels)
            hist.stairs(pit * len(pit), edges, lw=1.8, color=colour, label=None if c["coverage"] else c["name"])
        levels = sorted(c["coverage"])
        if levels:
            m = np.array([c["coverage"][lv][0] for lv in levels])
            h = np.array([c["coverage"][lv][1] for lv in levels])
            # one seed has no interval (NaN): no error bar rather than a zero-width one that looks exact
            cov.errorbar(levels, m, yerr=None if np.isnan(h).all() else np.nan_to_num(h), color=colour, marker="o",
                         ms=4, lw=1.4, capsize=3,
                         label=f"{c['name']} (90%: {c['coverage'][0.9][0]:.3f})" if 0.9 in c["coverage"] else c["name"])
    lo = min([0.45] + [c["coverage"][lv][0] - np.nan_to_num(c["coverage"][lv][1]) - 0.03
                       for c in cells for lv in c["coverage"]])
    _calibration_axes(hist, cov, "density (mean over seeds)", "observed coverage (mean ± 95% over seeds)",
                      max(0.0, lo))
    handles, labels = cov.get_legend_handles_labels()
    more = hist.get_legend_handles_labels()
    fig.legend(handles + more[0], labels + more[1], loc="outside lower center", ncol=3, fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=11)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def cells_curves_figure(cells: list[dict], path: str | Path, metric: str, title: str = "") -> Path:
    """A results page's learning-curve figure: per cell (a group of seeds) the mean over seeds of a
    validation metric at each epoch with the band from its lowest to its highest seed, a dotted line at
    each learning-rate change, and a dot at the epochs the seeds selected. Each cell is a dict with
    ``name``, ``epochs`` (E,), ``mean``, ``lo``, ``hi`` (E,), ``seeds`` (how many runs have each epoch,
    (E,)), ``lr_changes`` (epochs at which the rate changed) and ``selected`` ([(epoch, value)])."""
    fig, ax = plt.subplots(figsize=(10, 5), layout="constrained")
    changes = sorted({e for c in cells for e in c["lr_changes"]})
    for e in changes:
        ax.axvline(e - 0.5, color="0.5", ls=":", lw=1)
    tops = []
    for i, c in enumerate(cells):
        colour = f"C{i % 10}"
        ep, m = np.asarray(c["epochs"]), np.asarray(c["mean"], dtype=float)
        n = np.asarray(c["seeds"])
        ax.fill_between(ep, c["lo"], c["hi"], color=colour, alpha=0.15, lw=0)
        ax.plot(ep, m, color=colour, lw=1.6, label=f"{c['name']} ({n.max()} seeds)")
        if c["selected"]:
            sx, sy = zip(*c["selected"])
            ax.plot(sx, sy, "o", color=colour, ms=3.5, alpha=0.8)
        tops.append(np.nanmax(m[len(m) // 5:]) if len(m) >= 5 else np.nanmax(m))
    lows = [np.nanmin(c["lo"]) for c in cells]
    if tops and lows:        # the first fifth's steep fall is cut off: the plateau and the decay are the point
        lo, hi = min(lows), max(tops)
        ax.set_ylim(lo - 0.05 * (hi - lo), hi + 0.15 * (hi - lo))
    ax.set_xlabel("epoch (counted from 0; dotted: learning-rate change; dots: the seeds' selected epochs)")
    ax.set_ylabel(f"{metric} (mean over seeds; band: lowest to highest seed)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2, frameon=False)
    ax.set_title(title, fontsize=11)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def _x_text(x: torch.Tensor, names: list[str] | None) -> str:
    vals = x.reshape(-1).tolist()
    names = names or (["x"] if len(vals) == 1 else [f"x{j}" for j in range(len(vals))])
    parts = [f"{n} = {v:.3g}" for n, v in zip(names, vals)][:4]
    return ", ".join(parts) + (", …" if len(vals) > 4 else "")


def _circular_axis(ax) -> None:
    ax.set_xlim(0, 2 * np.pi)
    ax.set_xticks(np.arange(5) * np.pi / 2)
    ax.set_xticklabels(["0", "π/2", "π", "3π/2", "2π"])


def _support(grid: np.ndarray, curves: list[np.ndarray], label: float) -> tuple[float, float]:
    """The part of a linear grid where some curve is above 1% of its peak, with the label, padded:
    a wide task grid (steering: ±100°) would squeeze a narrow density into a spike."""
    inside = np.zeros(len(grid), dtype=bool)
    for c in curves:
        c = np.nan_to_num(np.asarray(c, dtype=np.float64))
        inside |= c > 1e-2 * c.max() if c.max() > 0 else False
    lo, hi = (grid[inside].min(), grid[inside].max()) if inside.any() else (grid[0], grid[-1])
    lo, hi = min(lo, label), max(hi, label)
    pad = 0.08 * (hi - lo) or 1e-3 * (grid[-1] - grid[0])
    return max(grid[0], lo - pad), min(grid[-1], hi + pad)


@torch.no_grad()
def prediction_figure(p, x: torch.Tensor, y: torch.Tensor, aux: dict, path: str | Path, *, M: int,
                      interval_level: float, seed: int = 0, title: str = "", x_names: list[str] | None = None) -> Path:
    """A row per example: its input image (image tasks) beside the predicted density of each target
    dim (the marginal when D > 1): the EBM's on the task grid, the proposal's, the true one where the
    task knows it, the prediction's central interval shaded and the label marked. Vector inputs are
    named in the row's title. ``p``: a serving Predictor; x (n, ...), y (n, D)."""
    from ebm.predict import predict
    from ebm.metrics import marginal_density     # the one marginal-on-the-grid code (also the Python API's density)
    task, model = p.task, p.model
    n, D = x.shape[0], task.D
    image = x.dim() == 4
    pr = predict(model, x, task.circular, M=M, interval_level=interval_level,
                 generator=torch.Generator().manual_seed(seed)) if model.has_proposal else None
    grids = task.grid()
    lead = 1 if image else 0
    widths = ([1.0] if image else []) + [3.0] * D
    fig, axes = plt.subplots(n, lead + D, figsize=(1.8 * lead + 4.6 * D, 2.2 * n + 1.0), squeeze=False,
                             gridspec_kw={"width_ratios": widths}, layout="constrained")
    for i in range(n):
        xi = x[i:i + 1]
        if image:
            ax = axes[i, 0]
            ax.imshow(_display_image(x[i], task), cmap="gray" if x.shape[1] == 1 else None, vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"example {i + 1}", fontsize=8)
        for d in range(D):
            ax = axes[i, lead + d]
            g = grids[d]
            curves = {}
            if model.has_energy:
                curves["EBM"] = marginal_density(p.model, p.task, xi, None, d, True)
            if model.has_proposal:
                curves["proposal q"] = marginal_density(p.model, p.task, xi, None, d, False)
            if D == 1:
                lp = true_log_density(task, xi.cpu(), {k: v[i:i + 1] for k, v in aux.items()},
                                      torch.as_tensor(g, dtype=torch.float32))
                if lp is not None:
                    curves["true density"] = (torch.softmax(lp.double(), dim=1)[0] / task.cell_volume()).numpy()
            for label, dens in curves.items():          # one style per curve whichever the model has
                colour, style = CURVE_STYLE[label]
                ax.plot(g, dens, style, color=colour, lw=1.3, label=label)
            if pr is not None:
                lo, hi = float(pr.interval[i, 0, d]), float(pr.interval[i, 1, d])
                spans = [(lo, hi)] if not task.circular[d] or lo <= hi else [(lo, 2 * np.pi), (0.0, hi)]
                for j, (a, b) in enumerate(spans):
                    ax.axvspan(a, b, color="0.6", alpha=0.25, lw=0,
                               label=f"{interval_level:.0%} interval (IS prediction)" if j == 0 else None)
            ax.axvline(float(y[i, d]), color="C3", lw=1.5, label="label")
            ax.set_ylim(bottom=0)
            if task.circular[d]:
                _circular_axis(ax)
            else:
                ax.set_xlim(*_support(g, list(curves.values()), float(y[i, d])))
            name, unit = task.target_names[d], task.units[d]
            if i == n - 1:
                ax.set_xlabel(f"{name} ({unit})" if unit else name)
            if d == 0:
                ax.set_ylabel(f"p({name} | x)" if D == 1 else "marginal density", fontsize=8)
            if not image and d == 0:
                ax.set_title(_x_text(xi[0], x_names), fontsize=8, loc="left")
            elif D > 1 and i == 0:
                ax.set_title(f"p({name} | x), marginal", fontsize=8)
            ax.tick_params(labelsize=7)
    handles = {}
    for ax in axes[0, lead:]:
        handles.update({lb: h for h, lb in zip(*ax.get_legend_handles_labels())})
    wide = fig.get_figwidth() > 7
    fig.legend(handles.values(), handles.keys(), loc="outside lower center", ncol=len(handles) if wide else 3, fontsize=8,
               frameon=False)
    fig.suptitle(f"predicted densities: {title}".strip(), fontsize=11)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)
