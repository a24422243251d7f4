"""Data-path benchmark: decoded-batch throughput and streaming memory (issue 3 acceptance 2).

Prints, in one run:
1. rows/s of decoded, normalised 64x64 RGB batches of 32 from the Ray Data stream and from the
   plain pyarrow stream (:func:`measure_stream_rate`, also importable for comparing against a
   training step's consumption rate), and their ratio;
2. examples/s a training step of the image config consumes (ResNet-18 64x64 RGB, M = 1024, batch 32,
   all of this machine's threads) and the ratio of each stream's rate to it (goal >= 10x);
3. peak RSS (getrusage maxrss of a fresh subprocess) of one full pass of the plain streaming reader
   over ~0.1 GB and ~2 GB of Parquet (``--quick``: ~10 MB and ~100 MB), and their ratio (goal:
   within 1.2).

With ``--s3``, instead: a real S3 API (moto's server on 127.0.0.1, as in the tests) holding copies
of the datasets; rows/s of the plain stream reading the same Parquet from the bucket vs from local
disk, and the peak RSS of a full pass over ~0.1 GB vs ~1 GB in the bucket (``--quick``: ~10 MB vs
~100 MB) — flat memory means the reader streams row groups, never downloads the dataset.

Datasets are generated once into --dir (default /tmp/ebm-bench-data) and reused. Images are
PNG-encoded random 64x64 RGB drawn from a pool (distinct ids and labels per row), ~12 KB a row.
"""
from __future__ import annotations

import argparse
import io
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipelines.data.ingest import image_input, task_meta  # noqa: E402
from pipelines.data.layout import DatasetError, read_metadata, write_atomic  # noqa: E402

POOL = 512


def _pool(seed: int = 0) -> list[bytes]:
    """POOL PNGs of 64x64 RGB: a smooth random field plus noise (photo-like PNG sizes)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(POOL):
        base = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        img = np.asarray(Image.fromarray(base).resize((64, 64), Image.BILINEAR), dtype=np.int16)
        img = np.clip(img + rng.integers(-24, 25, img.shape), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def make_dataset(out: Path, target_bytes: float, shard_rows: int = 4096) -> Path:
    """A steering-like 64x64 RGB dataset of about target_bytes of image data (reused if present)."""
    try:
        read_metadata(out)
        return out
    except DatasetError:
        pass
    pool = _pool()
    per_row = float(np.mean([len(p) for p in pool]))
    n = max(300, int(target_bytes / per_row))
    sizes = {"train": n - 200, "val": 100, "test": 100}
    rng = np.random.default_rng(1)
    meta = task_meta("steering", image_input(3, 64, 64, "png"), source={"format": "bench"}, split_rule="bench")

    def chunks():
        k = 0
        for split, m in sizes.items():
            for s in range(0, m, 1024):
                b = min(1024, m - s)
                idx = rng.integers(0, POOL, b)
                yield split, ([f"bench:{k + i:08d}" for i in range(b)], rng.uniform(-90, 90, (b, 1)).astype(np.float32),
                              [pool[i] for i in idx], {})
                k += b
    write_atomic(out, meta, chunks(), n, shard_rows=shard_rows, overwrite=True, progress=True)
    return out


def _ensure_ray():
    import ray
    if not ray.is_initialized():
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        ray.init(num_cpus=2, _node_ip_address="127.0.0.1", log_to_driver=False, include_dashboard=False,
                 object_store_memory=400 * 1024 ** 2)
        ray.data.DataContext.get_current().enable_progress_bars = False
    return ray


def measure_stream_rate(path: str | os.PathLike, batch_size: int = 32, n_batches: int = 100,
                        reader: str = "ray") -> float:
    """rows/s of decoded, normalised train batches from creating the stream (so a Ray Data
    execution's per-epoch start-up counts) to the n_batches-th batch; the stream restarts (a new
    epoch) if the split runs out. Ray's one-time worker start-up is excluded by a warm-up pass."""
    from pipelines.data.readers import ParquetStream, RayStream, ray_dataset
    if reader == "ray":
        _ensure_ray()
        make = lambda: RayStream(ray_dataset(path, "train"), batch_size, drop_last=True)  # noqa: E731
    elif reader == "pyarrow":
        make = lambda: ParquetStream(path, "train", batch_size, drop_last=True)  # noqa: E731
    else:
        raise ValueError(f"reader must be 'ray' or 'pyarrow', got {reader!r}")
    if reader not in _WARM:
        for _ in zip(range(3), make()):
            pass
        _WARM.add(reader)
    rows, t0 = 0, time.perf_counter()
    while True:
        for x, y in make():
            rows += len(y)
            if rows >= n_batches * batch_size:
                return rows / (time.perf_counter() - t0)


_WARM: set[str] = set()


def measure_step_rate(reps: int = 5) -> float:
    """Examples/s a training step consumes on the image config (the median of ``reps`` steps)."""
    sys.path.insert(0, str(Path(__file__).parent))
    from bench_step import IMAGE, ours_step, time_step

    import torch
    from ebm.config import Config
    from ebm.nets import build_model
    cfg = Config.from_dict(IMAGE)
    torch.manual_seed(0)
    model = build_model(cfg, (3, 64, 64), 1, (False,))
    B = cfg.optim.batch_size
    batch = (torch.randn(B, 3, 64, 64), torch.rand(B, 1) * 2 - 1)
    return B / time_step(ours_step, model, batch, cfg, reps)


def _peak_rss_mib() -> float:
    """Peak RSS of this process in MiB: VmHWM, the high-water mark of this process's own address
    space. getrusage's ru_maxrss is not used alone: Linux carries the parent's high-water mark
    over fork+exec into the child's maxrss, so a child of a 1 GB parent reports >= 1 GB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _rss_pass(path: str) -> None:
    """Child process: one full pass over every split; prints rows, bytes, peak RSS and maxrss (MiB)."""
    from pipelines import storage
    from pipelines.data.readers import ParquetStream
    rows = 0
    for split in ("train", "val", "test"):
        for x, y in ParquetStream(path, split, 32):
            rows += len(y)
    size = sum(i.size for i in storage.list_dir(path, recursive=True) if i.path.endswith(".parquet"))
    print(rows, size, _peak_rss_mib(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def measure_pass_rss(path: Path | str) -> tuple[int, int, float, float, float]:
    """(rows, parquet bytes, peak RSS MiB, ru_maxrss MiB, seconds) of a full streaming pass in a
    fresh process."""
    t = time.perf_counter()
    out = subprocess.run([sys.executable, __file__, "--rss-pass", str(path)], check=True,
                         capture_output=True, text=True).stdout.split()
    return int(out[0]), int(out[1]), float(out[2]), float(out[3]), time.perf_counter() - t


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small datasets (~10 MB vs ~100 MB, fewer batches)")
    ap.add_argument("--dir", default="/tmp/ebm-bench-data", help="where generated datasets are kept")
    ap.add_argument("--s3", action="store_true", help="stream from a local S3 endpoint vs local disk (see above)")
    ap.add_argument("--rss-pass", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.rss_pass:
        _rss_pass(args.rss_pass)
        return 0
    root = Path(args.dir)
    if args.s3:
        return bench_s3(root, args.quick)
    small_b, large_b = (10e6, 100e6) if args.quick else (0.1e9, 2e9)
    n_batches = 250 if args.quick else 1000
    small = make_dataset(root / f"rgb64-{small_b / 1e6:g}MB", small_b)
    large = make_dataset(root / f"rgb64-{large_b / 1e6:g}MB", large_b)

    print(f"# bench_data ({'quick' if args.quick else 'full'}): 64x64 RGB PNG, batch 32, {os.cpu_count()} CPUs")
    # The larger dataset, so that neither stream restarts within the measurement.
    rate_pa = measure_stream_rate(large, 32, n_batches, "pyarrow")
    rate_ray = measure_stream_rate(large, 32, n_batches, "ray")
    print(f"stream pyarrow  {rate_pa:10.0f} rows/s  ({rate_pa / 32:.1f} batches/s)")
    print(f"stream ray      {rate_ray:10.0f} rows/s  ({rate_ray / 32:.1f} batches/s)")
    print(f"ratio pyarrow/ray {rate_pa / rate_ray:.2f}")
    step_rate = measure_step_rate(reps=3 if args.quick else 5)
    print(f"train step      {step_rate:10.1f} rows/s  (the image config: ResNet-18 64x64 RGB, K=4, M=1024, batch 32, "
          f"{__import__('torch').get_num_threads()} torch threads)")
    print(f"ratio ray stream / train step {rate_ray / step_rate:.1f}x, pyarrow stream / train step "
          f"{rate_pa / step_rate:.1f}x  (goal >= 10x)")
    import ray
    ray.shutdown()
    res = {}
    for name, path in (("small", small), ("large", large)):
        rows, size, rss, maxrss, sec = measure_pass_rss(path)
        res[name] = rss
        print(f"rss full pass {name:5s} {size / 1e9:7.3f} GB  {rows:8d} rows  peak RSS (VmHWM) {rss:7.1f} MiB  "
              f"[ru_maxrss {maxrss:.0f} MiB, includes the parent's]  ({sec:.1f} s, {rows / sec:.0f} rows/s incl. start-up)")
    print(f"rss ratio large/small {res['large'] / res['small']:.3f}  (goal <= 1.2)")
    return 0


def _rss_row(label: str, path) -> float:
    rows, size, rss, maxrss, sec = measure_pass_rss(path)
    print(f"rss full pass {label:8s} {size / 1e9:7.3f} GB  {rows:8d} rows  peak RSS (VmHWM) {rss:7.1f} MiB  "
          f"({sec:.1f} s, {rows / sec:.0f} rows/s incl. start-up)")
    return rss


def bench_s3(root: Path, quick: bool) -> int:
    """The object-storage rows: the same Parquet streamed from moto's S3 server and from local disk."""
    import tempfile
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    import clusterlab
    from pipelines import storage
    small_b, large_b = (10e6, 100e6) if quick else (0.1e9, 1e9)
    local = {name: make_dataset(root / f"rgb64-{b / 1e6:g}MB", b) for name, b in (("small", small_b), ("large", large_b))}
    with tempfile.TemporaryDirectory() as tmp, clusterlab.s3_server(Path(tmp)) as s3:
        os.environ.update(s3["env"])            # the rss child processes inherit the endpoint
        remote = {}
        for name, path in local.items():
            t = time.perf_counter()
            remote[name] = f"s3://{s3['bucket']}/{path.name}"
            storage.upload_dir(path, remote[name])
            print(f"# uploaded {path.name} to {remote[name]} in {time.perf_counter() - t:.1f} s")
        print(f"# bench_data --s3 ({'quick' if quick else 'full'}): 64x64 RGB PNG, batch 32, plain pyarrow stream, "
              f"S3 API = moto server on 127.0.0.1")
        n_batches = 250 if quick else 1000
        rate_disk = measure_stream_rate(local["large"], 32, n_batches, "pyarrow")
        rate_s3 = measure_stream_rate(remote["large"], 32, n_batches, "pyarrow")
        print(f"stream local disk {rate_disk:10.0f} rows/s")
        print(f"stream s3         {rate_s3:10.0f} rows/s")
        print(f"ratio s3/disk {rate_s3 / rate_disk:.2f}")
        rss = {name: _rss_row(f"s3 {name}", remote[name]) for name in ("small", "large")}
        print(f"rss ratio s3 large/small {rss['large'] / rss['small']:.3f}  (goal: flat, <= 1.2)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
