"""Job submission to a Ray cluster through the Ray Jobs API (the dashboard's job server).

Never imports ``ebm``: this layer only packages the working directory, checks it, and talks HTTP
to the cluster. The job itself runs ``ebm train|tune ...`` on the head node.
"""
from __future__ import annotations

import fnmatch
import os
import shlex
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

# Never uploaded: environments, tracking stores, run outputs, caches and weights.
DEFAULT_EXCLUDES = (".venv", ".git", "mlruns", "mlruns.db", "runs", "__pycache__", ".pytest_cache",
                    "*.egg-info", "*.pt", "*.pth", "ray_results")
# Ray refuses packages above its own limit at upload time; we refuse earlier with the culprits named.
DEFAULT_MAX_UPLOAD = 100 * 1024 * 1024
# Forwarded to the job when set on the submitting machine.
FORWARDED_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "EBM_STORAGE_PATH")
REMOTE_SCHEMES = ("s3://", "gs://", "gcs://", "abfs://", "az://", "hdfs://", "oss://")


class SubmitError(RuntimeError):
    """A submission was refused before anything was sent; the message says why and what to do."""


@dataclass
class UploadSummary:
    total_bytes: int
    n_files: int
    largest: list[tuple[int, str]]


def _excluded(rel: str, patterns: Iterable[str]) -> bool:
    parts = rel.split("/")
    for pat in patterns:
        pat = pat.rstrip("/")
        if "/" in pat:
            if fnmatch.fnmatch(rel, pat) or rel.startswith(pat + "/"):
                return True
        elif any(fnmatch.fnmatch(p, pat) for p in parts):
            return True
    return False


def scan_working_dir(root: str | Path, excludes: Iterable[str] = DEFAULT_EXCLUDES) -> UploadSummary:
    """What would be uploaded: total size, file count and the five largest files."""
    root = Path(root)
    if not root.is_dir():
        raise SubmitError(f"working dir {root} does not exist or is not a directory")
    excludes = list(excludes)
    total = n = 0
    largest: list[tuple[int, str]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        rel_dir = "" if rel_dir == "." else rel_dir.replace(os.sep, "/") + "/"
        dirnames[:] = [d for d in dirnames if not _excluded(rel_dir + d, excludes)]
        for f in filenames:
            rel = rel_dir + f
            if _excluded(rel, excludes):
                continue
            try:
                size = os.lstat(os.path.join(dirpath, f)).st_size
            except OSError:
                continue
            total += size
            n += 1
            largest.append((size, rel))
            if len(largest) > 64:
                largest = sorted(largest, reverse=True)[:5]
    return UploadSummary(total, n, sorted(largest, reverse=True)[:5])


def check_upload(root: str | Path, excludes: Iterable[str], limit: int) -> UploadSummary:
    s = scan_working_dir(root, excludes)
    if s.total_bytes > limit:
        top = ", ".join(f"{rel} ({size / 2**20:.1f} MiB)" for size, rel in s.largest)
        raise SubmitError(
            f"working dir {root} would upload {s.total_bytes / 2**20:.1f} MiB in {s.n_files} files, over the "
            f"{limit / 2**20:.0f} MiB limit. Largest: {top}. Exclude them (--exclude PATTERN), move data to "
            f"shared storage, or raise --max-upload-mb.")
    return s


def is_remote_storage(path: str) -> bool:
    return path.startswith(REMOTE_SCHEMES)


def check_storage(storage_path: str, n_nodes: int, shared_fs: bool) -> None:
    """Refuse a multi-node job whose checkpoint storage is a node-local path."""
    if not storage_path or n_nodes <= 1 or is_remote_storage(storage_path) or shared_fs:
        return
    raise SubmitError(
        f"checkpoint storage {storage_path!r} is a local path, but the cluster has {n_nodes} nodes: workers on "
        f"other nodes would write checkpoints the driver cannot read, and a restarted job could not resume. "
        f"Use shared storage (e.g. --storage s3://bucket/ebm) or, if this path is a shared mount (NFS) on "
        f"every node, pass --shared-fs.")


def build_runtime_env(root: str | Path, excludes: Iterable[str], env: dict[str, str]) -> dict:
    env_vars = {k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)}
    env_vars.update(env)
    env_vars.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    return {"working_dir": str(root), "excludes": list(excludes), "env_vars": env_vars}


def client(address: str):
    from ray.job_submission import JobSubmissionClient
    try:
        return JobSubmissionClient(address)
    except Exception as e:  # connection refused, auth, version mismatch: one clear message
        raise SubmitError(f"cannot reach the Ray job server at {address}: {e}") from e


def count_nodes(address: str) -> int:
    """Alive nodes of the cluster, through the dashboard's state API."""
    from ray.util.state import list_nodes
    nodes = list_nodes(address=address, filters=[("state", "=", "ALIVE")], raise_on_missing_output=False)
    return len(nodes)


def submit(address: str, entrypoint: list[str], *, working_dir: str | Path = ".",
           excludes: Iterable[str] = DEFAULT_EXCLUDES, max_upload: int = DEFAULT_MAX_UPLOAD,
           storage: str = "", shared_fs: bool = False, env: dict[str, str] | None = None,
           submission_id: str | None = None, entrypoint_num_cpus: float | None = None) -> str:
    """Check, package and submit; returns the submission id. Nothing is sent if a check fails."""
    if not entrypoint:
        raise SubmitError("nothing to run: give the command after --, e.g. ebm submit -- ebm train toy2")
    excludes = list(excludes)
    check_upload(working_dir, excludes, max_upload)
    env = dict(env or {})
    if storage:
        env["EBM_STORAGE_PATH"] = storage
    c = client(address)
    check_storage(storage or os.environ.get("EBM_STORAGE_PATH", ""), count_nodes(address), shared_fs)
    return c.submit_job(entrypoint=shlex.join(entrypoint), submission_id=submission_id,
                        runtime_env=build_runtime_env(Path(working_dir).resolve(), excludes, env),
                        entrypoint_num_cpus=entrypoint_num_cpus)


TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


def follow(address: str, submission_id: str, timeout: float = 0, poll: float = 1.0, out=print) -> str:
    """Print the job's logs as they come until it ends; returns the final status name."""
    c = client(address)
    seen = 0
    start = time.monotonic()
    while True:
        status = str(c.get_job_status(submission_id).value)
        logs = c.get_job_logs(submission_id)
        if len(logs) > seen:
            out(logs[seen:].rstrip("\n"))
            seen = len(logs)
        if status in TERMINAL:
            return status
        if timeout and time.monotonic() - start > timeout:
            raise TimeoutError(f"job {submission_id} still {status} after {timeout:.0f} s")
        time.sleep(poll)
