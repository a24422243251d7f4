"""``ebm predict`` over ~20k images: the Ray Data path (``--workers 2``) vs the single-process path,
side by side in one run — rows/s and the peak RSS of the whole process tree.

    python bench/bench_predict.py                      # 20 000 star images of 32x32, a tiny model, M = 64
    python bench/bench_predict.py --rows 5000 --M 256 --work /tmp/bench-predict

Made once under --work (reused by later runs): the dataset (``ebm data ingest synthetic star --size 32
--n-test ROWS``) and a tiny star model trained for one epoch (the debug config with a slim ResNet).
Each path runs as its own ``ebm predict`` process (``-q``, Parquet out, ``--overwrite``); a sampler
reads /proc every 0.1 s and sums the RSS of the command's process and all its descendants (for the Ray
path: the driver, the local Ray's GCS, raylet, dashboard and the actors and read/write workers), so
the peak is what the machine held. Wall time includes start-up (model load; for Ray, starting the
local Ray, ~10-20 s). The two outputs are compared (largest difference; the same draws per row).
Timings on a shared 2-core box are noisy: compare the ratios printed in the same run.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EBM = str(Path(sys.executable).parent / "ebm")
PAGE = os.sysconf("SC_PAGE_SIZE")


def tree_rss(pid: int) -> int:
    """Bytes resident in ``pid`` and every descendant, from /proc."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(d))
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/statm") as f:
                total += int(f.read().split()[1]) * PAGE
        except (OSError, IndexError, ValueError):
            pass
        todo += children.get(p, [])
    return total


def run(cmd: list[str], env: dict) -> tuple[float, int, str]:
    """(wall seconds, peak tree RSS bytes, stderr) of one command."""
    peak, done = [0], threading.Event()
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], tree_rss(proc.pid))
            done.wait(0.1)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    out, err = proc.communicate()
    wall = time.perf_counter() - t0
    done.set()
    th.join()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} exited {proc.returncode}:\n{err[-3000:]}")
    return wall, peak[0], err


def prepare(work: Path, rows: int, env: dict) -> tuple[str, str]:
    """(checkpoint directory, dataset directory), made once."""
    data = work / f"star32-{rows}"
    if not (data / "_dataset.json").exists():
        subprocess.run([EBM, "-q", "data", "ingest", "synthetic", "star", "--out", str(data), "--size", "32",
                        "--n-train", "64", "--n-val", "16", "--n-test", str(rows), "--overwrite"],
                       check=True, env=env, cwd=ROOT)
    runs = work / "runs"
    ckpts = sorted((runs / "bench-predict").glob("checkpoint_*")) if runs.exists() else []
    if not ckpts:
        code = ("import torch; torch.set_num_threads(1)\n"
                "from pipelines import api\n"
                "api.train('debug', overrides={'task.name': 'star', 'task.image_size': 32, 'task.n_train': 128, "
                "'task.n_val': 32, 'task.n_test': 32, 'features.kind': 'resnet_slim', 'features.width': 8, "
                "'optim.epochs': 1, 'eval.batch_size': 32, 'sampler.M_eval': 64, 'sampler.refine_steps': 0}, "
                f"name='bench-predict', storage={str(runs)!r}, tracking_uri='sqlite:///{work}/mlflow.db')\n")
        subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=ROOT, stdout=subprocess.DEVNULL)
        ckpts = sorted((runs / "bench-predict").glob("checkpoint_*"))
    return str(ckpts[-1]), str(data)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=20_000)
    ap.add_argument("--M", type=int, default=64, help="proposal samples per row")
    ap.add_argument("--workers", type=int, default=2, help="Ray Data actors (1 CPU each)")
    ap.add_argument("--work", default="/tmp/ebm-bench-predict", help="where the dataset and model are kept")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_USAGE_STATS_ENABLED": "0"}
    ckpt, data = prepare(work, args.rows, env)
    common = [EBM, "-q", "predict", ckpt, "--input", data, "--M", str(args.M), "--seed", "1", "--overwrite"]
    results = {}
    for name, extra in (("single process", []), (f"Ray Data, {args.workers} actors", ["--workers", str(args.workers)])):
        out = work / f"pred-{'ray' if extra else 'one'}.parquet"
        wall, peak, _ = run([*common, "--out", str(out), *extra], env)
        results[name] = (wall, peak, out)
        print(f"{name:>22}: {args.rows / wall:7.1f} rows/s ({wall:6.1f} s wall, start-up included), "
              f"peak RSS of the process tree {peak / 2**20:7.0f} MB", flush=True)
    (w1, p1, o1), (w2, p2, o2) = results.values()
    print(f"Ray Data / single process: {w1 / w2:.2f}x the rows/s, {p2 / p1:.2f}x the peak RSS")
    import numpy as np
    import pandas as pd
    a, b = pd.read_parquet(o1), pd.read_parquet(o2)
    assert list(a["id"]) == list(b["id"]), "the two outputs hold different rows"
    num = [c for c in a.columns if c != "id"]
    diff = max(float(np.max(np.abs(a[c].to_numpy() - b[c].to_numpy()))) for c in num)
    print(f"same {len(a)} rows in the same order; largest difference over {len(num)} columns: {diff:.2g}")


if __name__ == "__main__":
    main()
