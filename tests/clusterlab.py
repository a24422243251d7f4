"""Real services on 127.0.0.1 for a multi-node rehearsal on one machine.

Context managers a conftest wraps into fixtures; each starts its component as our own child
process in a new session and stops it by that pid's process group (never `ray stop` or a
kill by name: other clusters may share this machine).

    s3_server(tmp)           moto in server mode holding one bucket
    ray_nodes(tmp, env)      a Ray head plus a second Ray node on the same machine
    mlflow_server(tmp, s3)   an MLflow tracking server whose artifacts live in that bucket
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

BIN = os.path.dirname(sys.executable)
BUCKET = "ebm-rehearsal"        # moto refuses bucket names shorter than 3 characters


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(cmd: list[str], env: dict, log: Path) -> subprocess.Popen:
    """`cmd` as the leader of its own session, stdout and stderr into `log`."""
    with open(log, "w") as out:
        return subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def _stop(proc: subprocess.Popen, timeout: float = 60) -> None:
    """SIGTERM to the process group `proc` leads; SIGKILL to what is left of it once `proc` has
    exited or `timeout` s have passed."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=timeout)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def _wait(ready: Callable[[], bool], proc: subprocess.Popen, log: Path, what: str, timeout: float) -> None:
    """Poll `ready()` until true; raise with the tail of `log` if `proc` exits or `timeout` s pass."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if ready():
                return
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not come up (exit code {proc.poll()}):\n{log.read_text()[-3000:]}")
        time.sleep(0.5)


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=5) as r:
        return r.read()


@contextmanager
def s3_server(tmp: Path) -> Iterator[dict]:
    """moto's S3 on 127.0.0.1 with the bucket ``BUCKET`` created; log in ``tmp/moto.log``.

    Yields ``{"endpoint": "http://127.0.0.1:PORT", "bucket": BUCKET, "env": {...}}`` where env holds
    what a client process needs: fake credentials, AWS_DEFAULT_REGION=us-east-1, AWS_ENDPOINT_URL
    (boto3 and pyarrow.fs.S3FileSystem) and MLFLOW_S3_ENDPOINT_URL (MLflow's S3 artifact store).
    """
    import boto3

    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    log = Path(tmp) / "moto.log"
    proc = _spawn([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], dict(os.environ), log)
    try:
        _wait(lambda: bool(_get(f"{endpoint}/moto-api/data.json")), proc, log, "moto", 60)
        env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
               "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint,
               "MLFLOW_S3_ENDPOINT_URL": endpoint}
        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="testing",
                     aws_secret_access_key="testing").create_bucket(Bucket=BUCKET)
        yield {"endpoint": endpoint, "bucket": BUCKET, "env": env}
    finally:
        _stop(proc)


def s3_keys(s3: dict, prefix: str = "") -> list[str]:
    """Every key in the bucket of ``s3`` (as yielded by :func:`s3_server`) under ``prefix``."""
    import boto3

    client = boto3.client("s3", endpoint_url=s3["endpoint"], region_name="us-east-1",
                          aws_access_key_id="testing", aws_secret_access_key="testing")
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=s3["bucket"], Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def _alive_nodes(dashboard: str) -> list:
    from ray.util.state import list_nodes

    return [n for n in list_nodes(address=dashboard, raise_on_missing_output=False) if n.state == "ALIVE"]


@contextmanager
def ray_nodes(tmp: Path, env: dict) -> Iterator[dict]:
    """A Ray head and a second Ray node on this machine, both `ray start --block` children of ours.

    ``env`` is added to this process's environment for both nodes (e.g. the S3 env; processes
    Ray starts on a node inherit it), with token auth disabled for this loopback-only cluster.
    Each node has 2 CPUs, a 200 MB object store and its own short temp dir under /tmp (Ray's
    AF_UNIX socket paths there must fit in 107 bytes); the head carries the custom resource
    ``head_slot``, the other node ``worker_slot`` (1 each), so work can be pinned to either.
    Every port is a free one (none of Ray's defaults, which another cluster may hold).

    Node IPs: Ray rewrites ``--node-ip-address=127.0.0.1`` to the host's primary IP, so the head
    advertises that; the second node advertises 127.0.0.2 (loopback), so Ray -- and Ray Train's
    node_rank/local_rank, which group workers by node IP -- sees two hosts. Ray's own servers
    (GCS, raylets, agents) listen on all interfaces whatever the flags; the dashboard and the
    job API listen on 127.0.0.1 only.

    Yields ``{"address": "127.0.0.1:GCS_PORT", "dashboard": "http://127.0.0.1:PORT",
    "head_node_id": hex, "worker_node_id": hex, "env": the nodes' environment,
    "temp_dirs": (head's, worker's)}`` once both nodes are ALIVE in the dashboard's state API.
    Logs: ``tmp/head.log``, ``tmp/worker.log``, and each node's ``TEMP_DIR/session_latest/logs``.
    Stopped worker node first; each `ray start` gets SIGTERM alone, so it drains its node while
    the GCS is still up (SIGTERM to the head's whole group costs a 30 s drain timeout).
    """
    tmp = Path(tmp)
    port, dash = free_port(), free_port()
    address, dashboard = f"127.0.0.1:{port}", f"http://127.0.0.1:{dash}"
    env = dict(os.environ, **env, RAY_ADDRESS=address, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0",
               RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0", PATH=BIN + os.pathsep + os.environ.get("PATH", ""))
    head_tmp = tempfile.mkdtemp(prefix="ebmh", dir="/tmp")
    worker_tmp = tempfile.mkdtemp(prefix="ebmw", dir="/tmp")
    for d in (head_tmp, worker_tmp):
        os.mkdir(os.path.join(d, "tmp"))

    def start(*args: str) -> list[str]:
        return [os.path.join(BIN, "ray"), "start", "--block", "--num-cpus=2", "--object-store-memory=200000000",
                "--disable-usage-stats", f"--dashboard-agent-listen-port={free_port()}", *args]

    head = _spawn(start("--head", "--node-ip-address=127.0.0.1", f"--port={port}", "--include-dashboard=true",
                        "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
                        f"--ray-client-server-port={free_port()}", f"--temp-dir={head_tmp}",
                        "--resources=" + json.dumps({"head_slot": 1})), dict(env, TMPDIR=f"{head_tmp}/tmp"), tmp / "head.log")
    worker = None
    try:
        _wait(lambda: bool(_get(f"{dashboard}/api/version")), head, tmp / "head.log", "ray head", 120)
        worker = _spawn(start(f"--address={address}", "--node-ip-address=127.0.0.2", f"--temp-dir={worker_tmp}",
                              "--resources=" + json.dumps({"worker_slot": 1})),
                        dict(env, TMPDIR=f"{worker_tmp}/tmp"), tmp / "worker.log")
        _wait(lambda: len(_alive_nodes(dashboard)) == 2, worker, tmp / "worker.log", "second ray node", 120)
        nodes = {("head" if n.is_head_node else "worker"): n.node_id for n in _alive_nodes(dashboard)}
        yield {"address": address, "dashboard": dashboard, "head_node_id": nodes["head"],
               "worker_node_id": nodes["worker"], "env": env, "temp_dirs": (head_tmp, worker_tmp)}
    finally:
        if worker is not None:
            _stop(worker)
        _stop(head)
        shutil.rmtree(head_tmp, ignore_errors=True)
        shutil.rmtree(worker_tmp, ignore_errors=True)


@contextmanager
def mlflow_server(tmp: Path, s3: dict) -> Iterator[dict]:
    """An MLflow tracking server on 127.0.0.1: runs in ``tmp/mlflow.db`` (SQLite), artifacts
    proxied by the server (``mlflow-artifacts:`` URIs) into ``s3://BUCKET/mlflow`` on the moto
    of ``s3`` (as yielded by :func:`s3_server`); log in ``tmp/mlflow.log``.

    Yields ``{"tracking_uri": "http://127.0.0.1:PORT", "artifacts": "s3://BUCKET/mlflow"}``.
    Clients need only the tracking URI, no S3 credentials.
    """
    tmp = Path(tmp)
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    artifacts = f"s3://{s3['bucket']}/mlflow"
    log = tmp / "mlflow.log"
    proc = _spawn([os.path.join(BIN, "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
                   "--workers", "1", "--backend-store-uri", f"sqlite:///{tmp}/mlflow.db",
                   "--artifacts-destination", artifacts],
                  dict(os.environ, **s3["env"], MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false",
                       PATH=BIN + os.pathsep + os.environ.get("PATH", "")), log)
    try:
        _wait(lambda: _get(f"{uri}/health") == b"OK", proc, log, "mlflow server", 180)
        yield {"tracking_uri": uri, "artifacts": artifacts}
    finally:
        _stop(proc)
