"""``ebm results EXPERIMENT --out FILE.md``: markdown tables of an experiment's finished MLflow runs.

Runs are grouped by the ``ebm.group`` tag that ``ebm train --local --group NAME`` sets; one table per
task, one row per group: the number of seeds and mean ± std (population std, ddof = 0, as the
training summary prints) of each test metric and the training time, and, under the table, the exact
command(s) recorded on the group's runs (tag ``ebm.command``).
"""
from __future__ import annotations

import math
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

GROUP_TAG = "ebm.group"
COMMAND_TAG = "ebm.command"

# (column title, MLflow metric) in table order; a column is dropped when no group of the table has it
COLUMNS = (("test NLL", "test_nll"), ("IS NLL", "test_is_nll"), ("KL", "test_kl"),
           ("MAE mode", "test_mae_mode"), ("MAE mean", "test_mae_mean"), ("CRPS", "test_crps"),
           ("90% cover.", "test_coverage"), ("wall time (s)", "train_time_s"), ("CPU time (s)", "train_cpu_s"))
# params shown per group, so that a scaled-down protocol is visible in the table itself
PARAMS = (("method", "method.name"), ("K", "proposal.K"), ("epochs", "optim.epochs"), ("M", "sampler.M_train"))


@dataclass
class Group:
    name: str
    task: str
    runs: list = field(default_factory=list)       # mlflow Run objects, FINISHED only
    unfinished: int = 0

    def values(self, metric: str) -> list[float]:
        return [r.data.metrics[metric] for r in self.runs
                if metric in r.data.metrics and math.isfinite(r.data.metrics[metric])]

    def param(self, key: str) -> str:
        vals = sorted({r.data.params.get(key, "") for r in self.runs})
        return vals[0] if len(vals) == 1 else "mixed: " + "/".join(vals)

    def seeds(self) -> list[str]:
        return sorted((r.data.tags.get("seed", "?") for r in self.runs), key=lambda s: (len(s), s))

    def commands(self) -> list[str]:
        return sorted({r.data.tags.get(COMMAND_TAG, "(not recorded)") for r in self.runs})


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.pstdev(values)


def collect(uri: str, experiment: str) -> list[Group]:
    """The experiment's runs grouped by ``ebm.group`` (runs without the tag are skipped), sorted by name."""
    from pipelines.tracking import open_client
    client = open_client(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise SystemExit(f"ebm results: no experiment {experiment!r} in {uri}")
    groups: dict[str, Group] = {}
    token = None
    while True:
        page = client.search_runs([exp.experiment_id], max_results=1000, page_token=token)
        for r in page:
            name = r.data.tags.get(GROUP_TAG)
            if not name:
                continue
            g = groups.setdefault(name, Group(name, r.data.tags.get("task", name.split("/")[0])))
            if r.info.status == "FINISHED":
                g.runs.append(r)
            else:
                g.unfinished += 1
        token = page.token
        if not token:
            break
    return [groups[k] for k in sorted(groups)]


def _fmt(values: list[float], digits: int = 3) -> str:
    if not values:
        return "—"
    m, s = mean_std(values)
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def table(groups: list[Group]) -> str:
    """One markdown table (the groups of one task) followed by each group's commands."""
    cols = [(t, k) for t, k in COLUMNS if any(g.values(k) for g in groups)]
    head = ["group", "seeds"] + [t for t, _ in PARAMS] + [t for t, _ in cols]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for g in groups:
        row = [f"`{g.name}`", str(len(g.runs))] + [g.param(k) for _, k in PARAMS] + [_fmt(g.values(k), 1 if k.startswith("train_") else 3)
                                                                                 for _, k in cols]
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    for g in groups:
        note = f"; {g.unfinished} unfinished run(s) left out" if g.unfinished else ""
        lines.append(f"- `{g.name}` (seeds {', '.join(g.seeds())}{note}):")
        lines += [f"  `{c}`" for c in g.commands()]
    return "\n".join(lines) + "\n"


def render(groups: list[Group], experiment: str, uri: str, command: str = "") -> str:
    out = [f"<!-- written by: {command or 'ebm results ' + experiment} (tracking URI {uri}) -->\n"]
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
        run = min(g.runs, key=lambda r: int(r.data.tags.get("seed", "0")))
        plots = sorted(a.path for a in client.list_artifacts(run.info.run_id, "plots") if a.path.endswith(".png"))
        # runs made before per-epoch plots logged one final plots/density.png
        name = "plots/density.png" if "plots/density.png" in plots else (plots[-1] if plots else None)
        if name is None:
            print(f"ebm results: {g.name}: run {run.info.run_id} has no density plot", file=sys.stderr)
            continue
        with tempfile.TemporaryDirectory() as d:
            local = client.download_artifacts(run.info.run_id, name, d)
            dest = Path(out_dir) / (g.name.replace("/", "_") + ".png")
            shutil.copyfile(local, dest)
            written.append(dest)
    return written
