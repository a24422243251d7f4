"""``ebm results``: markdown tables of an experiment's finished runs, from the MLflow store or from a
compact export of it (``--export`` writes one, ``--runs`` reads one), and the results page rebuilt
from a template (``--template``, :mod:`pipelines.driver.results_page`).

Runs are grouped by the ``ebm.group`` tag that ``ebm train --local --group NAME`` sets; one table per
task, one row per group: the number of seeds and mean ± std (sample std, ddof = 1) of each test
metric and the training time, and, under the table, the exact command(s) recorded on the group's runs
(tag ``ebm.command``) and the epoch each run's test figures come from (``selected_epoch``).
"""
from __future__ import annotations

import json
import math
import statistics
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

GROUP_TAG = "ebm.group"
COMMAND_TAG = "ebm.command"
EXPORT_FORMAT = "ebm-runs/1"            # the first line of an export names its format
HISTORY_METRICS = ("val_nll",)           # per-epoch curves kept in an export (convergence figures)

# (column title, MLflow metric) in table order; a column is dropped when no group of the table has it
COLUMNS = (("test NLL", "test_nll"), ("IS NLL", "test_is_nll"), ("KL", "test_kl"),
           ("MAE mode", "test_mae_mode"), ("MAE mean", "test_mae_mean"), ("CRPS", "test_crps"),
           ("90% cover.", "test_coverage"), ("sel. epoch", "selected_epoch"),
           ("wall time (s)", "train_time_s"), ("CPU time (s)", "train_cpu_s"))
# params shown per group, so that a scaled-down protocol is visible in the table itself
PARAMS = (("method", "method.name"), ("K", "proposal.K"), ("epochs", "optim.epochs"), ("lr", "optim.lr"),
          ("M", "sampler.M_train"), ("select", "eval.select"))


@dataclass
class RunRecord:
    """What the tables need of one MLflow run; one line of a compact export."""
    run_id: str
    experiment: str
    status: str
    params: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)          # the last value of each metric
    tags: dict = field(default_factory=dict)             # mlflow.* system tags left out
    history: dict = field(default_factory=dict)          # metric -> [[step, value], ...]

    @classmethod
    def from_mlflow(cls, run, experiment: str, history: dict | None = None) -> "RunRecord":
        """The run's params are those it trained with: a resumed run's ``ebm.param.<key>`` tags (e.g.
        optim.epochs raised to continue it; MLflow params cannot change) over its logged params."""
        from pipelines.tracking import PARAM_TAG_PREFIX
        tags = dict(run.data.tags)
        params = {**run.data.params, **{k[len(PARAM_TAG_PREFIX):]: v for k, v in tags.items()
                                        if k.startswith(PARAM_TAG_PREFIX)}}
        return cls(run.info.run_id, experiment, run.info.status, params, dict(run.data.metrics),
                   {k: v for k, v in tags.items() if not k.startswith("mlflow.")}, history or {})


    def lr_steps(self) -> list[tuple[int | None, tuple]]:
        """The run's recorded learning-rate changes, oldest first: [(epochs trained before, (old, new))]."""
        from pipelines.driver.runs import config_history
        return [(at, tuple(ch["optim.lr"])) for at, ch in config_history(self.tags) if "optim.lr" in ch]

    def started_epochs(self) -> int | None:
        """The number of epochs the run was started with (its protocol's first phase), whatever later
        resumes raised it to: the old value of its first recorded ``optim.epochs`` change, else its
        ``optim.epochs``."""
        from pipelines.driver.runs import config_history
        first = next((ch["optim.epochs"][0] for _, ch in config_history(self.tags) if "optim.epochs" in ch),
                     self.params.get("optim.epochs"))
        return int(first) if first not in (None, "") else None


@dataclass
class Group:
    name: str
    task: str
    runs: list = field(default_factory=list)       # RunRecords, FINISHED only, at the group's protocol
    unfinished: int = 0
    other_protocol: list = field(default_factory=list)     # FINISHED runs at another one (group_runs)

    def values(self, metric: str) -> list[float]:
        return [r.metrics[metric] for r in self.runs if metric in r.metrics and math.isfinite(r.metrics[metric])]

    def param(self, key: str) -> str:
        vals = sorted({lr_schedule(r) if key == "optim.lr" else r.params.get(key, "") for r in self.runs})
        return vals[0] if len(vals) == 1 else "mixed: " + "/".join(vals)

    def seeds(self) -> list[str]:
        return by_seed(r.tags.get("seed", "?") for r in self.runs)

    def commands(self) -> list[str]:
        return sorted({r.tags.get(COMMAND_TAG, "(not recorded)") for r in self.runs})

    def selected_epochs(self) -> list[tuple[str, int]]:
        """(seed, selected epoch) of the runs that logged one, by seed."""
        out = [(r.tags.get("seed", "?"), int(r.metrics["selected_epoch"])) for r in self.runs
               if math.isfinite(r.metrics.get("selected_epoch", math.nan))]
        return sorted(out, key=lambda t: (len(t[0]), t[0]))


def by_seed(seeds) -> list[str]:
    """Seed strings in numeric order (2 before 10) without parsing them."""
    return sorted(seeds, key=lambda s: (len(s), s))


def lr_schedule(r: RunRecord) -> str:
    """The learning rates a run trained with: ``0.001``, or with a step decay recorded by a resume
    (``ebm train --resume ... --allow-config-change --set optim.lr=...``) ``0.001, 0.0001 after 30``
    (epochs)."""
    steps = r.lr_steps()
    if not steps:
        return _num(r.params.get("optim.lr", ""))
    return ", ".join([_num(steps[0][1][0])] + [f"{_num(new)} after {'?' if at is None else at}" for at, (_, new) in steps])


def _num(v) -> str:
    try:
        return f"{float(v):g}"
    except (TypeError, ValueError):
        return str(v)


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof = 1; 0 for a single value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def protocol(r: RunRecord) -> str:
    """How long and at what learning rates a run trained: ``45 epochs, lr 0.001, 0.0001 after 30``."""
    lr = lr_schedule(r)
    return f"{r.params.get('optim.epochs', '?')} epochs" + (f", lr {lr}" if lr else "")


def _epochs(r: RunRecord) -> int:
    try:
        return int(r.params.get("optim.epochs", ""))
    except ValueError:
        return -1


def group_runs(records: list[RunRecord]) -> list[Group]:
    """Records grouped by ``ebm.group`` (records without the tag are skipped), sorted by name.

    A group's statistics pool one protocol (:func:`protocol`): when its FINISHED runs differ in length
    or learning-rate schedule (a batch part-way: some seeds continued by the step decay, others not yet),
    ``runs`` keeps those at the longest protocol (the most runs among equals) and ``other_protocol``
    the rest, which the tables name instead of averaging them in."""
    groups: dict[str, Group] = {}
    for r in records:
        name = r.tags.get(GROUP_TAG)
        if not name:
            continue
        g = groups.setdefault(name, Group(name, r.tags.get("task", name.split("/")[0])))
        if r.status == "FINISHED":
            g.runs.append(r)
        else:
            g.unfinished += 1
    for g in groups.values():
        by: dict[str, list[RunRecord]] = {}
        for r in g.runs:
            by.setdefault(protocol(r), []).append(r)
        if len(by) > 1:
            keep = max(by, key=lambda k: (_epochs(by[k][0]), len(by[k])))
            g.runs = by.pop(keep)
            g.other_protocol = [r for runs in by.values() for r in runs]
    return [groups[k] for k in sorted(groups)]


def fetch_records(uri: str, experiment: str, history: tuple[str, ...] = (),
                  missing_ok: bool = False) -> list[RunRecord]:
    """Every run of the experiment in the store, with the per-step values of ``history`` metrics; none
    with ``missing_ok`` when the store (a new machine's) has no such experiment yet."""
    from pipelines.tracking import open_client
    client = open_client(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None and missing_ok:
        return []
    if exp is None:
        raise SystemExit(f"ebm results: no experiment {experiment!r} in {uri}")
    out, token = [], None
    while True:
        page = client.search_runs([exp.experiment_id], max_results=1000, page_token=token)
        for r in page:
            curves = {m: [[h.step, h.value] for h in client.get_metric_history(r.info.run_id, m)]
                      for m in history if m in r.data.metrics}
            out.append(RunRecord.from_mlflow(r, experiment, curves))
        token = page.token
        if not token:
            return out


def collect(uri: str, experiment: str, history: tuple[str, ...] = ()) -> list[Group]:
    """The experiment's runs in the store grouped by ``ebm.group``, sorted by name."""
    return group_runs(fetch_records(uri, experiment, history))


def write_export(records: list[RunRecord], path: str | Path) -> None:
    """The compact export: a header line, then one JSON object per run (sorted by group, seed, id), so
    that it diffs line by line in git and the next session needs no store."""
    key = lambda r: (r.tags.get(GROUP_TAG, ""), len(r.tags.get("seed", "")), r.tags.get("seed", ""), r.run_id)
    lines = [json.dumps({"format": EXPORT_FORMAT})]
    lines += [json.dumps(asdict(r), sort_keys=True, allow_nan=True) for r in sorted(records, key=key)]
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(str(path) + ".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(path)


def merge_export(records: list[RunRecord], path: str | Path) -> list[RunRecord]:
    """The export's records with ``records`` replacing those of the same run id (one batch of runs added
    to a committed export keeps the earlier batches' runs, whose store may be gone)."""
    old = read_export(path) if Path(path).exists() else []
    new = {r.run_id: r for r in records}
    return [r for r in old if r.run_id not in new] + list(new.values())


def read_export(path: str | Path, experiment: str | None = None) -> list[RunRecord]:
    """Records of a compact export (of ``experiment`` only, when given); ValueError naming the line
    that is not one."""
    lines = Path(path).read_text().splitlines()
    try:
        head = json.loads(lines[0]) if lines else {}
    except json.JSONDecodeError:
        head = {}
    if head.get("format") != EXPORT_FORMAT:
        raise ValueError(f"{path}: not a run export (its first line must be {{\"format\": \"{EXPORT_FORMAT}\"}})")
    out = []
    for i, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        try:
            rec = RunRecord(**json.loads(line))
        except (json.JSONDecodeError, TypeError) as e:
            raise ValueError(f"{path}:{i}: not a run record ({e})") from None
        if experiment is None or rec.experiment == experiment:
            out.append(rec)
    return out


def _fmt(values: list[float], digits: int = 3) -> str:
    if not values:
        return "—"
    m, s = mean_std(values)
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def _digits(metric: str) -> int:
    return 1 if metric.startswith("train_") or metric == "selected_epoch" else 3


def table(groups: list[Group]) -> str:
    """One markdown table (the groups of one task) followed by each group's commands and selected epochs."""
    cols = [(t, k) for t, k in COLUMNS if any(g.values(k) for g in groups)]
    params = [(t, k) for t, k in PARAMS if any(k in r.params for g in groups for r in g.runs)]
    head = ["group", "seeds"] + [t for t, _ in params] + [t for t, _ in cols]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for g in groups:
        row = [f"`{g.name}`", str(len(g.runs))] + [g.param(k) for _, k in params] + [_fmt(g.values(k), _digits(k))
                                                                                 for _, k in cols]
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    for g in groups:
        note = f"; {g.unfinished} unfinished run(s) left out" if g.unfinished else ""
        if g.other_protocol:
            by_protocol: dict[str, list[str]] = {}
            for r in g.other_protocol:
                by_protocol.setdefault(protocol(r), []).append(r.tags.get("seed", "?"))
            note += "; left out, at another protocol than the row's: " + "; ".join(
                f"seed(s) {', '.join(by_seed(seeds))} at {p}" for p, seeds in sorted(by_protocol.items()))
        lines.append(f"- `{g.name}` (seeds {', '.join(g.seeds())}{note}):")
        lines += [f"  `{c}`" for c in g.commands()]
        if g.selected_epochs():
            lines.append("  selected epoch by seed: " + ", ".join(f"{s}: {e}" for s, e in g.selected_epochs()))
    return "\n".join(lines) + "\n"


def render(groups: list[Group], experiment: str, uri: str, command: str = "") -> str:
    out = [f"<!-- written by: {command or 'ebm results ' + experiment} (runs from {uri}) -->\n"]
    for task in sorted({g.task for g in groups}):
        out.append(f"### {task}\n\n" + table([g for g in groups if g.task == task and g.runs]))
    return "\n".join(out)


def select(groups: list[Group], patterns: list[str] | None) -> list[Group]:
    """The groups whose name matches one of ``patterns`` (fnmatch); all of them without patterns."""
    import fnmatch
    return [g for g in groups if not patterns or any(fnmatch.fnmatchcase(g.name, p) for p in patterns)]


def download_figures(uri: str, groups: list[Group], out_dir: str) -> list[Path]:
    """The density plot of each group's lowest-seed run -> ``out_dir/<group with / as _>.png``."""
    import shutil
    import tempfile

    from pipelines.tracking import open_client
    client = open_client(uri)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    written = []
    for g in groups:
        if not g.runs:
            continue
        run = min(g.runs, key=lambda r: int(r.tags.get("seed", "0")))
        plots = sorted(a.path for a in client.list_artifacts(run.run_id, "plots") if a.path.endswith(".png"))
        # runs made before per-epoch plots logged one final plots/density.png
        name = "plots/density.png" if "plots/density.png" in plots else (plots[-1] if plots else None)
        if name is None:
            print(f"ebm results: {g.name}: run {run.run_id} has no density plot", file=sys.stderr)
            continue
        with tempfile.TemporaryDirectory() as d:
            local = client.download_artifacts(run.run_id, name, d)
            dest = Path(out_dir) / (g.name.replace("/", "_") + ".png")
            shutil.copyfile(local, dest)
            written.append(dest)
    return written
