"""The results page rebuilt from runs: a hand-written markdown template whose directive lines become
tables (``ebm results EXPERIMENT --template T --out PAGE``; ``make results``).

A directive is a whole line ``{{KIND ARGS}}``; an inline value ``{{=STAT ARGS}}`` may stand anywhere in
a line of prose; everything else is copied as it is:

    {{table GLOB...}}                   the groups' table(s), one per task (pipelines.driver.results.table)
    {{convergence GLOB...}}             from the val_nll curves: best epoch, best and last value per group
    {{calibration GLOB...}}             coverage of the 50/80/90/95 % central intervals per group and source
    {{pit GLOB...}}                     the PIT histogram (10 bins, mean over seeds) per group and source
    {{claims METRIC A vs B; C vs D}}    each claim decided by Welch's t on METRIC (lower is better)
    {{floor TASK METRIC GLOB...}}       the floor (Bayes-optimal value) and each group's gap to it
    {{calfigure FILE SOURCES GLOB...}}  a calibration figure (PIT histogram, coverage vs nominal level) of
                                        the groups, written to FILE beside the page; SOURCES is a comma list
                                        (e.g. prediction,ebm_grid): per group the first one it logged
    {{curves FILE METRIC GLOB...}}      the groups' validation curves of METRIC (an exported history, e.g.
                                        val_nll): mean over seeds per epoch, lowest–highest seed band, the
                                        lr changes and the selected epochs, written to FILE beside the page
    {{diagnosis GLOB...}}               per run that results/diagnose_coverage.py logged (``diag_*``
                                        metrics): coverage per source, the prediction at each M with its ESS

Inline values, so the prose quotes the tables instead of copying them (``STAT:SPEC`` picks the format,
e.g. ``{{=mean:.0f selected_epoch G}}``; negative numbers print with a minus sign, −; inside a markdown
code span they are left as written):

    {{=n|mean|sd|se|cell|min|max|range METRIC GROUP}}      over the seeds of one group (exact name):
                                        n, mean, std, standard error, "mean ± std", lowest, highest,
                                        "lowest to highest"; a ``diag_*`` metric only from runs whose
                                        diagnosis is of their selected epoch (as the diagnosis table)
    {{=diff|lo|hi|interval|t|bound|decision METRIC A vs B}}  of the claim "A vs B" (as the claims table)

Statistics (docs/RESULTS.md states them): per cell mean, sample std (ddof = 1) and standard error
std/√n; a claim "A vs B" takes d = mean_A − mean_B, Welch's se = √(s_A²/n_A + s_B²/n_B), t = d/se and
the Welch–Satterthwaite degrees of freedom ν, and the 95 % interval d ± t_{0.975, ν}·se (Student's t
quantile from scipy). Lower is better: A **beats** B if the whole interval is below 0, is **worse** if it
is above 0, and otherwise **matches (difference < X at 95 %)** with X = |d| + t_{0.975, ν}·se, the
interval's bound on |difference|.
"""
from __future__ import annotations

import math
import statistics
import re
from dataclasses import dataclass
from pathlib import Path

from ebm.evaluate import PIT_BINS, pit_key
from pipelines.driver.results import Group, mean_std, protocol, select, table

LEVELS = (50, 80, 90, 95)
# metric names per source of a predictive distribution (ebm.calibration's sources): coverage of the
# central interval at level L % is test_coverage_<L> for the IS prediction, test_coverage_<source>_<L>
# for the others
CALIBRATION_SOURCES = (("prediction", "test_coverage_{level}"), ("proposal", "test_coverage_proposal_{level}"),
                       ("ebm_grid", "test_coverage_ebm_grid_{level}"))
DIRECTIVE = re.compile(r"^\{\{(\w+)\s*(.*?)\}\}\s*$")
CONFIDENCE = 0.95


@dataclass
class Comparison:
    """Welch's comparison of two cells on one metric (lower is better)."""
    n_a: int
    n_b: int
    mean_a: float
    mean_b: float
    sd_a: float
    sd_b: float
    diff: float          # mean_a − mean_b
    se: float
    t: float
    df: float
    lo: float            # the 95 % interval of the difference
    hi: float
    bound: float         # X: |difference| < X at 95 %
    decision: str        # "beats", "worse", "matches (difference < X at 95%)", or why undecided


def welch(a: list[float], b: list[float], confidence: float = CONFIDENCE) -> Comparison:
    """Welch's t comparison of samples a and b and the decision for "a vs b" (docstring of this module)."""
    from scipy import stats
    (ma, sa), (mb, sb) = mean_std(a), mean_std(b)
    na, nb = len(a), len(b)
    d = ma - mb
    if na < 2 or nb < 2:
        nan = math.nan
        return Comparison(na, nb, ma, mb, sa, sb, d, nan, nan, nan, nan, nan, nan,
                          f"undecided (needs ≥ 2 seeds per cell, has {na} and {nb})")
    va, vb = sa * sa / na, sb * sb / nb
    se = math.sqrt(va + vb)
    if se == 0.0:      # both cells constant: the difference is known exactly
        t, df, q = (math.copysign(math.inf, d) if d else 0.0), math.inf, 0.0
    else:
        t = d / se
        df = (va + vb) ** 2 / (va * va / (na - 1) + vb * vb / (nb - 1))
        q = float(stats.t.ppf(0.5 + confidence / 2, df))
    lo, hi = d - q * se, d + q * se
    bound = abs(d) + q * se
    pct = f"{100 * confidence:g}%"
    decision = "beats" if hi < 0 else "worse" if lo > 0 else f"matches (difference < {bound:.3f} at {pct})"
    return Comparison(na, nb, ma, mb, sa, sb, d, se, t, df, lo, hi, bound, decision)


def standard_error(values: list[float]) -> float:
    return mean_std(values)[1] / math.sqrt(len(values)) if len(values) > 1 else math.nan


def _cell(values: list[float]) -> str:
    if not values:
        return "—"
    m, s = mean_std(values)
    return f"{m:.3f} ± {s:.3f}"


def _one(groups: list[Group], name: str) -> Group | None:
    return next((g for g in groups if g.name == name and g.runs), None)


def compare(groups: list[Group], metric: str, a: str, b: str) -> Comparison | str:
    """Welch's comparison of groups ``a`` and ``b`` on ``metric``, or why there is none (a group without
    finished runs; the two at different protocols)."""
    ga, gb = _one(groups, a), _one(groups, b)
    if ga is None or gb is None:
        return "no finished runs in " + " and ".join(f"`{n}`" for n, g in ((a, ga), (b, gb)) if g is None)
    pa, pb = ({protocol(r) for r in g.runs} for g in (ga, gb))
    if pa != pb:            # one protocol per group (group_runs); a batch part-way may not have decayed both yet
        return f"not compared: A at {' / '.join(sorted(pa))}, B at {' / '.join(sorted(pb))}"
    return welch(ga.values(metric), gb.values(metric))


def claims_table(groups: list[Group], metric: str, pairs: list[tuple[str, str]]) -> str:
    head = ["claim (A vs B)", "n A", "n B", f"A `{metric}`", f"B `{metric}`", "A − B", "se", "Welch t", "ν",
            "95% interval", "decision"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for a, b in pairs:
        c = compare(groups, metric, a, b)
        ga, gb = _one(groups, a), _one(groups, b)
        if isinstance(c, str):     # no finished runs in one (no counts), or not compared (both have runs)
            n = [str(len(g.runs)) if ga and gb else "" for g in (ga, gb)]
            lines.append(f"| `{a}` vs `{b}` | {n[0]} | {n[1]} | | | | | | | | {c} |")
            continue
        va, vb = ga.values(metric), gb.values(metric)
        ci = "—" if math.isnan(c.lo) else f"[{c.lo:+.3f}, {c.hi:+.3f}]"
        num = lambda v, f: "—" if math.isnan(v) else format(v, f)
        lines.append("| " + " | ".join([f"`{a}` vs `{b}`", str(c.n_a), str(c.n_b), _cell(va), _cell(vb),
                                         f"{c.diff:+.3f}", num(c.se, ".3f"), num(c.t, ".2f"), num(c.df, ".1f"),
                                         ci, f"**{c.decision}**"]) + " |")
    return "\n".join(lines) + "\n"


def floor_value(task: str, metric: str, seed: int = 0) -> float:
    """The best value any model can have in expectation: KL to the true density is 0 exactly; the
    test NLL's floor is the Bayes-optimal NLL of the generated test split (ebm.tasks.bayes_nll)."""
    from ebm import tasks
    if metric == "test_kl" and task in ("toy1", "star"):
        return 0.0
    if metric == "test_nll" and task in ("toy1", "toy2"):
        return tasks.bayes_nll(task, "test", seed)
    raise ValueError(f"no floor for {metric} on task {task!r} (known: test_kl on toy1/star, test_nll on toy1/toy2)")


def floor_table(groups: list[Group], task: str, metric: str) -> str:
    seeds = {r.params.get("task.seed", "0") for g in groups for r in g.runs}
    if task == "toy1" and metric == "test_nll" and len(seeds) > 1:
        raise ValueError(f"toy1 floor: the groups were trained on different data seeds {sorted(seeds)}")
    floor = floor_value(task, metric, int(next(iter(seeds), "0") or 0))
    how = "KL to the true density: 0 exactly" if metric == "test_kl" else \
        "Bayes-optimal test NLL, −mean log p_true(y \\| x) over the test split, computed from the generator"
    lines = [f"| group | seeds | `{metric}` | gap to the floor | se |", "|---|---|---|---|---|",
             f"| **floor** ({how}) | — | {floor:.3f} | 0 | — |"]
    for g in groups:
        v = g.values(metric)
        if not v:
            continue
        se = standard_error(v)
        lines.append(f"| `{g.name}` | {len(v)} | {_cell(v)} | {mean_std(v)[0] - floor:+.3f} | "
                     f"{'—' if math.isnan(se) else format(se, '.3f')} |")
    return "\n".join(lines) + "\n"


def _coverage_values(g: Group, template: str, level: int) -> list[float]:
    vals = g.values(template.format(level=level))
    if not vals and template == "test_coverage_{level}" and level == 90:
        # runs made before per-level coverage was logged: test_coverage is the eval.interval_level interval
        vals = [r.metrics["test_coverage"] for r in g.runs
                if "test_coverage" in r.metrics and r.params.get("eval.interval_level", "0.9") == "0.9"]
    return vals


def calibration_table(groups: list[Group]) -> str:
    head = ["group", "source", "seeds"] + [f"{lv}% cover." for lv in LEVELS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head),
             "| nominal | | | " + " | ".join(f"{lv / 100:.2f}" for lv in LEVELS) + " |"]
    for g in groups:
        for source, template in CALIBRATION_SOURCES:
            cols = [_coverage_values(g, template, lv) for lv in LEVELS]
            if any(cols):
                lines.append(f"| `{g.name}` | {source} | {max(len(c) for c in cols)} | "
                             + " | ".join(_cell(c) for c in cols) + " |")
    return "\n".join(lines) + "\n"


BARS = "▁▂▃▄▅▆▇█"


def _bar(fraction: float) -> str:
    """One bin of a PIT histogram as a block: ▄ is the calibrated 1/PIT_BINS, each block up or down
    a third of that (▁ below 0.017, █ from 0.233)."""
    return BARS[max(0, min(len(BARS) - 1, round(fraction * PIT_BINS * 3)))]


def pit_table(groups: list[Group]) -> str:
    """Per group and source: the mean over seeds of each PIT-histogram bin (``test_pit_<source>_<b>``),
    drawn as a row of blocks and written out, and the largest departure from the flat 1/PIT_BINS.
    Too many examples in the outer bins: intervals too narrow (under-coverage); a hump in the middle:
    too wide; a slope: biased."""
    head = ["group", "source", "seeds", "histogram (bins 0–1)", "fraction per bin", "max |bin − 0.1|"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for g in groups:
        for source, _ in CALIBRATION_SOURCES:
            cols = [g.values(f"test_{pit_key(source, b)}") for b in range(PIT_BINS)]
            if not all(cols):
                continue
            means = [mean_std(c)[0] for c in cols]
            lines.append(f"| `{g.name}` | {source} | {min(len(c) for c in cols)} | `{''.join(_bar(m) for m in means)}` | "
                         + " ".join(f"{m:.3f}" for m in means) + f" | {max(abs(m - 1 / PIT_BINS) for m in means):.3f} |")
    if len(lines) == 2:
        return "*(no run of these groups logged a PIT histogram: runs made before it was logged)*\n"
    return "\n".join(lines) + "\n"


def calibration_cells(groups: list[Group], sources: list[str]) -> list[dict]:
    """Per group, of the first of ``sources`` it logged (coverage or PIT), what the calibration figure
    draws: the PIT bins' means over seeds (None if a bin is missing) and {level: (mean coverage,
    half-width of its 95 % interval: t quantile × se, NaN with one seed)}. A group drawn from another
    source than the first is named with it."""
    from scipy import stats
    templates = dict(CALIBRATION_SOURCES)
    cells = []
    for g in groups:
        for source in sources:
            covs = {lv / 100: v for lv in LEVELS if (v := _coverage_values(g, templates[source], lv))}
            cols = [g.values(f"test_{pit_key(source, b)}") for b in range(PIT_BINS)]
            if not (covs or all(cols)):
                continue
            coverage = {lv: (mean_std(v)[0], float(stats.t.ppf(0.5 + CONFIDENCE / 2, len(v) - 1)) * standard_error(v)
                             if len(v) > 1 else math.nan) for lv, v in covs.items()}
            cells.append({"name": g.name if source == sources[0] else f"{g.name} ({source})",
                          "pit": [mean_std(c)[0] for c in cols] if all(cols) else None, "coverage": coverage,
                          "seeds": max(len(c) for c in [*cols, *covs.values()])})
            break
    return cells


def _figure_path(kind: str, out_dir: Path | None, file: str) -> Path:
    """Where a ``{{kind FILE ...}}`` directive writes its figure: FILE under the page's folder (created)."""
    if out_dir is None:
        raise ValueError(f"{{{{{kind}}}}} writes a figure beside the page: give --out a file, not -")
    path = out_dir / file
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def calibration_figure(groups: list[Group], sources: str, file: str, out_dir: Path | None) -> str:
    """Draw :func:`pipelines.plots.cells_calibration_figure` for the groups (each from the first of the
    comma-listed ``sources`` it logged) into ``out_dir / file`` and return the markdown that shows it."""
    names = [s for s in sources.split(",") if s]
    unknown = [s for s in names if s not in dict(CALIBRATION_SOURCES)]
    if unknown or not names:
        raise ValueError(f"{{{{calfigure}}}}: unknown source {', '.join(map(repr, unknown)) or repr(sources)} "
                         f"(sources: {', '.join(dict(CALIBRATION_SOURCES))})")
    path = _figure_path("calfigure", out_dir, file)
    cells = calibration_cells(groups, names)
    if not cells:
        return f"*(no run of these groups logged the coverage of {' or '.join(f'`{s}`' for s in names)}: no figure)*\n"
    from pipelines import plots
    seeds = sorted({c["seeds"] for c in cells})        # of the runs behind each drawn cell
    plots.cells_calibration_figure(cells, path, f"{' or '.join(names)}, test split, "
                                                f"{'/'.join(map(str, seeds))} seeds per cell")
    return f"![calibration of {' or '.join(f'`{s}`' for s in names)}: {', '.join(c['name'] for c in cells)}]({file})\n"


def curve_cells(groups: list[Group], metric: str) -> list[dict]:
    """Per group with ``metric`` curves in its runs' history, what the curves figure draws
    (:func:`pipelines.plots.cells_curves_figure`): per epoch the mean, lowest and highest value over the
    runs that reached it, the epochs at which the runs' learning rate changed, and each run's selected
    epoch with its value."""
    cells = []
    for g in groups:
        runs = [r for r in g.runs if r.history.get(metric)]
        if not runs:
            continue
        by_epoch: dict[int, list[float]] = {}
        selected = []
        for r in runs:
            curve = {int(s): v for s, v in r.history[metric]}
            for s, v in curve.items():
                by_epoch.setdefault(s, []).append(v)
            e = r.metrics.get("selected_epoch", math.nan)
            if math.isfinite(e) and int(e) in curve:
                selected.append((int(e), curve[int(e)]))
        epochs = sorted(by_epoch)
        cells.append({"name": g.name, "epochs": epochs, "mean": [statistics.fmean(by_epoch[e]) for e in epochs],
                      "lo": [min(by_epoch[e]) for e in epochs], "hi": [max(by_epoch[e]) for e in epochs],
                      "seeds": [len(by_epoch[e]) for e in epochs], "selected": selected,
                      "lr_changes": sorted({at for r in runs for at, _ in r.lr_steps() if at is not None})})
    return cells


def curves_figure(groups: list[Group], metric: str, file: str, out_dir: Path | None) -> str:
    """Draw the groups' ``metric`` curves (:func:`curve_cells`) into ``out_dir / file`` and return the
    markdown that shows it."""
    path = _figure_path("curves", out_dir, file)
    cells = curve_cells(groups, metric)
    if not cells:
        return f"*(no run of these groups has a `{metric}` curve in the export: no figure)*\n"
    from pipelines import plots
    plots.cells_curves_figure(cells, path, metric, f"validation curves: {', '.join(sorted({g.task for g in groups}))}")
    return f"![`{metric}` per epoch: {', '.join(c['name'] for c in cells)}]({file})\n"


def _trend(curve: list) -> float | None:
    """Mean of the last fifth of a validation curve's points minus the mean of the fifth before: below 0
    by more than the curve's noise, the metric was still falling (on a noisy plateau the lowest point
    falls in the last fifth one time in five, so "best in the last fifth" alone over-calls it)."""
    k = len(curve) // 5
    if k < 1:
        return None
    vals = [v for _, v in curve]
    return statistics.fmean(vals[-k:]) - statistics.fmean(vals[-2 * k:-k])


def _final_lr_phase(r, curve: list) -> list:
    """The points of a run's curve trained at its final learning rate: after its last recorded lr
    change (a step decay), else all of them. A trend across the change would read the decay's drop as
    the run still improving."""
    steps = [at for at, _ in r.lr_steps() if at is not None]
    return [sv for sv in curve if sv[0] >= steps[-1]] if steps else curve


def convergence_table(groups: list[Group], metric: str = "val_nll") -> str:
    """From each run's validation curve (an export's ``history``): the epoch of its lowest value, that
    value, the value at the last epoch, how many runs had their best in the last fifth of the epochs,
    and the trend over the last two fifths of the epochs at the final learning rate (:func:`_trend`,
    :func:`_final_lr_phase`; clearly below 0: still improving, train longer)."""
    head = ["group", "seeds", "epochs", "best epoch: median [min–max]", f"best `{metric}`", f"last `{metric}`",
            "best in the last fifth", "trend: last fifth − the fifth before (at the final lr)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for g in groups:
        runs = [r for r in g.runs if r.history.get(metric)]
        curves = [sorted(r.history[metric]) for r in runs]
        if not curves:
            lines.append(f"| `{g.name}` | {len(g.runs)} | {g.param('optim.epochs')} | no `{metric}` curve logged |"
                         " | | | |")
            continue
        best = [min(c, key=lambda sv: sv[1]) for c in curves]
        at = sorted(int(b[0]) for b in best)
        last_step = [int(c[-1][0]) for c in curves]
        late = sum(b[0] >= min(ls, 0.8 * (ls + 1)) for b, ls in zip(best, last_step))     # the last epoch always counts
        trends = [t for t in (_trend(_final_lr_phase(r, c)) for r, c in zip(runs, curves)) if t is not None]
        lines.append(f"| `{g.name}` | {len(curves)} | {g.param('optim.epochs')} | {at[len(at) // 2]} [{at[0]}–{at[-1]}] | "
                     f"{_cell([b[1] for b in best])} | {_cell([c[-1][1] for c in curves])} | {late} of {len(curves)} | "
                     f"{_cell(trends) if trends else '—'} |")
    return "\n".join(lines) + "\n"


DIAG_EPOCH = "diag_epoch"        # the selected epoch of the checkpoint results/diagnose_coverage.py evaluated


# diag_coverage_<source>[_M<M>]_<level>: written by diag_metrics, read back by _diagnosed
DIAG_COVERAGE = re.compile(r"^diag_coverage_([a-z_]+?)(?:_M(\d+))?_(\d+)$")
DIAG_ORDER = {"ebm_grid": 0, "prediction": 1, "proposal": 2}     # the diagnosis table's rows per run


def diag_metrics(source: str, coverages: list[float], M: int | None = None, ess: float | None = None) -> dict:
    """The ``diag_*`` metrics of one source (``prediction`` with its M and mean ESS / M), coverages at LEVELS."""
    key = f"diag_coverage_{source}" + (f"_M{M}" if M else "")
    out = {f"{key}_{lv}": float(v) for lv, v in zip(LEVELS, coverages)}
    if M and ess is not None:
        out[f"diag_ess_M{M}"] = float(ess)
    return out


def diagnosis_current(metrics: dict) -> bool:
    """Whether a run's ``diag_*`` figures are of its selected epoch's model: it was diagnosed, and not
    continued to another selected epoch since (extend_runs)."""
    return DIAG_EPOCH in metrics and int(metrics[DIAG_EPOCH]) == int(metrics.get("selected_epoch", metrics[DIAG_EPOCH]))


def _diagnosed(metrics: dict) -> dict[tuple[str, int | None], dict[int, float]]:
    """A run's ``diag_coverage_*`` metrics (:func:`diag_metrics`) as {(source, M or None): {level: coverage}}."""
    out: dict[tuple[str, int | None], dict[int, float]] = {}
    for k, v in metrics.items():
        if m := DIAG_COVERAGE.match(k):
            out.setdefault((m.group(1), int(m.group(2)) if m.group(2) else None), {})[int(m.group(3))] = v
    return out


def diagnosis_table(groups: list[Group]) -> str:
    """One block of rows per diagnosed run: the EBM on its grid, the proposal alone, the IS prediction at
    each M (with its mean ESS / M). A run whose selected epoch moved since it was diagnosed (continued
    by extend_runs) is listed as stale instead: its figures are another model's."""
    head = ["run", "source", "M", "ESS/M"] + [f"{lv}%" for lv in LEVELS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    stale = []
    for g in groups:
        for r in sorted(g.runs, key=lambda r: int(r.tags.get("seed", "0"))):
            m = r.metrics
            if DIAG_EPOCH not in m:
                continue
            name = f"`{g.name}` seed {r.tags.get('seed', '?')}"
            if not diagnosis_current(m):
                stale.append(f"{name} (diagnosed at epoch {int(m[DIAG_EPOCH])}, now selects {int(m['selected_epoch'])})")
                continue
            rows = []
            found = _diagnosed(m)
            for source, M in sorted(found, key=lambda sm: (DIAG_ORDER.get(sm[0], 3), sm[0], sm[1] or 0)):
                cov = found[(source, M)]
                if all(lv in cov for lv in LEVELS):
                    ess = f"{m[f'diag_ess_M{M}']:.3f}" if M and f"diag_ess_M{M}" in m else ""
                    rows.append(f"{source} | {M or ''} | {ess} | " + " | ".join(f"{cov[lv]:.3f}" for lv in LEVELS))
            of = f"; {r.params['optim.epochs']} epochs" if r.params.get("optim.epochs") else ""
            for i, row in enumerate(rows):
                lines.append(f"| {f'{name} (selected epoch {int(m[DIAG_EPOCH])}{of})' if i == 0 else ''} | {row} |")
    if len(lines) == 2 and not stale:
        return "*(no run of these groups was diagnosed: results/diagnose_coverage.py logs its figures to the runs)*\n"
    text = "\n".join(lines) + "\n" if len(lines) > 2 else ""
    if stale:
        text += ("\nDiagnosed before their selected epoch changed (re-run results/diagnose_coverage.py on them): "
                 + "; ".join(stale) + ".\n")
    return text


def _none(patterns: list[str]) -> str:
    return f"*(no finished runs yet in groups matching {', '.join(f'`{p}`' for p in patterns)})*\n"


def directive(kind: str, args: str, groups: list[Group], out_dir: Path | None = None) -> str:
    """The markdown that replaces one ``{{kind args}}`` line (figures go under ``out_dir``, the page's
    folder); ValueError for a malformed one."""
    words = args.split()
    figures = {"calfigure": (calibration_figure, "SOURCE"), "curves": (curves_figure, "METRIC")}
    if kind in figures:             # {{KIND FILE WHAT GLOB...}}
        draw, what = figures[kind]
        if len(words) < 3:
            raise ValueError(f"{{{{{kind} {args}}}}}: expected FILE {what} GLOB...")
        chosen = [g for g in select(groups, words[2:]) if g.runs]
        return draw(chosen, words[1], words[0], out_dir) if chosen else _none(words[2:])
    if kind in ("table", "calibration", "convergence", "pit", "diagnosis"):
        if not words:
            raise ValueError(f"{{{{{kind}}}}} needs group patterns")
        chosen = [g for g in select(groups, words) if g.runs]
        if not chosen:
            return _none(words)
        if kind == "calibration":
            return calibration_table(chosen)
        if kind == "pit":
            return pit_table(chosen)
        if kind == "diagnosis":
            return diagnosis_table(chosen)
        if kind == "convergence":
            return convergence_table(chosen)
        return "\n".join(table([g for g in chosen if g.task == t]) for t in sorted({g.task for g in chosen}))
    if kind == "claims":
        metric, _, rest = args.partition(" ")
        pairs = [tuple(p.strip() for p in item.split(" vs ")) for item in rest.split(";") if item.strip()]
        if not metric or not pairs or any(len(p) != 2 or not all(p) for p in pairs):
            raise ValueError(f"{{{{claims {args}}}}}: expected METRIC A vs B; C vs D")
        return claims_table(groups, metric, pairs)
    if kind == "floor":
        if len(words) < 3:
            raise ValueError(f"{{{{floor {args}}}}}: expected TASK METRIC GLOB...")
        chosen = [g for g in select(groups, words[2:]) if g.runs]
        return floor_table(chosen, words[0], words[1])
    raise ValueError(f"unknown directive {{{{{kind}}}}} (known: table, convergence, curves, calibration, pit, "
                     "calfigure, diagnosis, claims, floor)")


INLINE = re.compile(r"\{\{=(\w+)(?::([^\s{}]+))?\s+([^{}]*?)\}\}")
CELL_STATS = ("n", "mean", "sd", "se", "cell", "min", "max", "range")
CLAIM_STATS = ("diff", "lo", "hi", "interval", "t", "bound", "decision")


def _prose(value: float, spec: str) -> str:
    return "—" if math.isnan(value) else format(value, spec).replace("-", "−")


def cell_values(g: Group, metric: str) -> list[float]:
    """The group's values of ``metric``; of a ``diag_*`` metric only those of runs diagnosed at their
    selected epoch (the others are another model's: :func:`diagnosis_table` lists them as stale)."""
    if not metric.startswith("diag_"):
        return g.values(metric)
    return [r.metrics[metric] for r in g.runs if metric in r.metrics and diagnosis_current(r.metrics)]


def inline_value(stat: str, spec: str | None, args: str, groups: list[Group]) -> str:
    """The text of one ``{{=STAT:SPEC ARGS}}`` (module docstring); ValueError for a malformed one or a
    group the runs do not have (a typo must not print a dash)."""
    metric, _, rest = args.strip().partition(" ")
    names = [n.strip() for n in rest.split(" vs ")] if stat in CLAIM_STATS else [rest.strip()]
    if stat not in CELL_STATS + CLAIM_STATS:
        raise ValueError(f"unknown inline value {{{{={stat}}}}} (known: {', '.join(CELL_STATS + CLAIM_STATS)})")
    if not metric or not all(names) or len(names) != (2 if stat in CLAIM_STATS else 1) or any(" " in n for n in names):
        raise ValueError(f"{{{{={stat} {args}}}}}: expected METRIC " + ("A vs B" if stat in CLAIM_STATS else "GROUP"))
    known = {g.name for g in groups}
    if unknown := [n for n in names if n not in known]:
        raise ValueError(f"{{{{={stat} {args}}}}}: no group named {', '.join(f'`{n}`' for n in unknown)} in the runs")
    if stat in CELL_STATS:
        values = cell_values(_one(groups, names[0]) or Group(names[0], ""), metric)
        if stat == "n":
            return format(len(values), spec or "d")
        if not values:
            return "—"
        spec = spec or ".3f"
        m, s = mean_std(values)
        v = {"mean": m, "sd": s, "se": standard_error(values), "min": min(values), "max": max(values)}
        if stat == "cell":
            return f"{_prose(m, spec)} ± {_prose(s, spec)}"
        if stat == "range":
            return f"{_prose(v['min'], spec)} to {_prose(v['max'], spec)}"
        return _prose(v[stat], spec)
    c = compare(groups, metric, *names)
    if isinstance(c, str):
        return f"({c})"
    if stat == "decision":
        return c.decision
    if stat == "interval":
        return f"[{_prose(c.lo, spec or '+.3f')}, {_prose(c.hi, spec or '+.3f')}]"
    default = {"diff": "+.3f", "lo": "+.3f", "hi": "+.3f", "t": ".2f", "bound": ".3f"}[stat]
    return _prose({"diff": c.diff, "lo": c.lo, "hi": c.hi, "t": c.t, "bound": c.bound}[stat], spec or default)


def render_line(line: str, groups: list[Group]) -> str:
    """A line of prose with its inline values filled in; a code span (`...`) is copied as it is, so the
    prose can show the syntax."""
    parts = re.split(r"(`[^`]*`)", line)
    for i in range(0, len(parts), 2):
        parts[i] = INLINE.sub(lambda m: inline_value(m.group(1), m.group(2), m.group(3), groups), parts[i])
        if "{{=" in parts[i]:
            raise ValueError(f"an inline value not of the form {{{{=STAT[:SPEC] ARGS}}}}: {line.strip()}")
    return "".join(parts)


def render_page(template: str, groups: list[Group], note: str, out_dir: Path | None = None) -> str:
    """The template with every directive line replaced and every inline value filled in; ``note`` (how
    the page was made) goes first; figures are written under ``out_dir`` (the page's folder)."""
    out = [f"<!-- {note} -->"]
    for i, line in enumerate(template.splitlines(), start=1):
        m = DIRECTIVE.match(line.strip())
        try:
            out.append(directive(m.group(1), m.group(2), groups, out_dir).rstrip("\n") if m else render_line(line, groups))
        except ValueError as e:
            raise ValueError(f"template line {i}: {e}") from None
    return "\n".join(out) + "\n"
