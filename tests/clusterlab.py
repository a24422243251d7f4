"""Real services on this machine for a multi-node rehearsal: context managers a conftest wraps
into fixtures, plus two probes.

    s3_server(tmp)           moto in server mode on 127.0.0.1, holding the bucket ``BUCKET``
    ray_nodes(tmp, env)      a Ray head and a second Ray node, each with its own temp dir
    mlflow_server(tmp, s3)   an MLflow tracking server on 127.0.0.1, artifacts in that bucket
    s3_client(s3), s3_keys   a boto3 client for that moto; the keys in its bucket
    train_workers(cluster)   the live Ray Train workers: actor id, node id, pid

Each service is our own child, the leader of a new session, and is stopped by signalling that
process group -- never `ray stop` or a kill by name: other clusters may share this machine.
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
_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra: str) -> dict:
    """This process's environment plus ``extra``, with this interpreter's bin dir first on PATH."""
    return dict(os.environ, **extra, PATH=BIN + os.pathsep + os.environ.get("PATH", ""))


def _spawn(cmd: list[str], env: dict, log: Path) -> subprocess.Popen:
    """`cmd` as the leader of a new session, stdout and stderr into `log`."""
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

    Yields ``{"endpoint": "http://127.0.0.1:PORT", "bucket": BUCKET, "env": {...}}``; env is what a
    client process needs: fake credentials, AWS_DEFAULT_REGION=us-east-1, AWS_ENDPOINT_URL (read
    by boto3 and by pyarrow's S3FileSystem, hence by Ray Train's ``s3://`` storage) and
    MLFLOW_S3_ENDPOINT_URL (MLflow's S3 artifact store).
    """
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    log = Path(tmp) / "moto.log"
    proc = _spawn([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], _env(), log)
    try:
        _wait(lambda: bool(_get(f"{endpoint}/moto-api/data.json")), proc, log, "moto", 60)
        s3 = {"endpoint": endpoint, "bucket": BUCKET,
              "env": {**_CREDENTIALS, "AWS_ENDPOINT_URL": endpoint, "MLFLOW_S3_ENDPOINT_URL": endpoint}}
        s3_client(s3).create_bucket(Bucket=BUCKET)
        yield s3
    finally:
        _stop(proc)


def s3_client(s3: dict):
    """A boto3 S3 client for the moto of ``s3`` (as yielded by :func:`s3_server`)."""
    import boto3

    return boto3.client("s3", endpoint_url=s3["endpoint"], region_name=_CREDENTIALS["AWS_DEFAULT_REGION"],
                        aws_access_key_id=_CREDENTIALS["AWS_ACCESS_KEY_ID"],
                        aws_secret_access_key=_CREDENTIALS["AWS_SECRET_ACCESS_KEY"])


def s3_keys(s3: dict, prefix: str = "") -> list[str]:
    """Every key in the bucket of ``s3`` (as yielded by :func:`s3_server`) under ``prefix``."""
    pages = s3_client(s3).get_paginator("list_objects_v2").paginate(Bucket=s3["bucket"], Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


@contextmanager
def _no_ray_address_env() -> Iterator[None]:
    """Ray's state client prefers $RAY_API_SERVER_ADDRESS / $RAY_ADDRESS to the address it is given;
    an earlier Ray in this process may have left them pointing elsewhere."""
    saved = {k: os.environ.pop(k) for k in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS") if k in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def _alive_nodes(dashboard: str) -> list:
    from ray.util.state import list_nodes

    with _no_ray_address_env():
        return [n for n in list_nodes(address=dashboard, raise_on_missing_output=False) if n.state == "ALIVE"]


@contextmanager
def ray_nodes(tmp: Path, env: dict) -> Iterator[dict]:
    """A Ray head and a second Ray node on this machine, both `ray start --block` children of ours.

    Both nodes run with this process's environment plus ``env`` (e.g. the S3 env: every process
    Ray starts on a node, job entrypoints included, inherits it), plus RAY_ADDRESS (so Ray's own
    address auto-detection inside the cluster never picks another cluster on this machine), token
    auth disabled, and no drain on SIGTERM. Each node has 2 CPUs, a 200 MB object store and its
    own short temp dir under /tmp (AF_UNIX socket paths in it must fit in 107 bytes), with a
    ``tmp`` dir inside as the node's TMPDIR: files a node's processes put in tempfile's dir stay
    on that node, as on separate machines, and go when the cluster stops. The head carries the
    custom resource ``head_slot``, the other node ``worker_slot`` (1 each), to pin work to either.
    Every port is a free one, none of Ray's defaults (another cluster may hold those).

    Node IPs: Ray turns ``--node-ip-address=127.0.0.1`` into the host's primary IP, which the
    head then advertises; the second node advertises 127.0.0.2 (loopback), so Ray -- and Ray
    Train's node_rank and local_rank, which group workers by node IP -- sees two hosts. GCS,
    raylets and agents listen on all interfaces whatever the flags; the dashboard (with the job
    and state APIs) listens on 127.0.0.1 only.

    Yields ``{"address": "127.0.0.1:GCS_PORT", "dashboard": "http://127.0.0.1:PORT",
    "head_node_id": hex, "worker_node_id": hex, "env": the nodes' environment (without TMPDIR),
    "temp_dirs": (head's, worker's)}`` once both nodes are ALIVE. Logs: ``tmp/head.log``,
    ``tmp/worker.log`` and each node's ``TEMP_DIR/session_latest/logs``. The worker node is
    stopped first; the temp dirs are removed.
    """
    port, dash = free_port(), free_port()
    address, dashboard = f"127.0.0.1:{port}", f"http://127.0.0.1:{dash}"
    # no drain: a head that still hosts Ray Train's detached actors would wait out the 30 s default
    # none of this process's RAY_* variables: an earlier local Ray in the test process may have left
    # RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (a loopback-only head no node can join) or a dead dashboard's
    # RAY_API_SERVER_ADDRESS behind
    env = {k: v for k, v in _env(**env).items() if not k.startswith("RAY_") or k in env}
    env.update(RAY_ADDRESS=address, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0",
               RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0")
    head_tmp = tempfile.mkdtemp(prefix="ebmh", dir="/tmp")
    worker_tmp = tempfile.mkdtemp(prefix="ebmw", dir="/tmp")
    for temp_dir in (head_tmp, worker_tmp):
        os.mkdir(os.path.join(temp_dir, "tmp"))

    def start(temp_dir: str, *args: str) -> list[str]:
        return [os.path.join(BIN, "ray"), "start", "--block", "--num-cpus=2", "--object-store-memory=200000000",
                "--disable-usage-stats", f"--dashboard-agent-listen-port={free_port()}", f"--temp-dir={temp_dir}",
                *args]

    head = _spawn(start(head_tmp, "--head", "--node-ip-address=127.0.0.1", f"--port={port}",
                        "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
                        f"--ray-client-server-port={free_port()}", "--resources=" + json.dumps({"head_slot": 1})),
                  dict(env, TMPDIR=os.path.join(head_tmp, "tmp")), Path(tmp) / "head.log")
    worker = None
    try:
        _wait(lambda: bool(_get(f"{dashboard}/api/version")), head, Path(tmp) / "head.log", "ray head", 120)
        worker = _spawn(start(worker_tmp, f"--address={address}", "--node-ip-address=127.0.0.2",
                              "--resources=" + json.dumps({"worker_slot": 1})),
                        dict(env, TMPDIR=os.path.join(worker_tmp, "tmp")), Path(tmp) / "worker.log")
        _wait(lambda: len(_alive_nodes(dashboard)) == 2, worker, Path(tmp) / "worker.log", "second ray node", 120)
        ids = {n.is_head_node: n.node_id for n in _alive_nodes(dashboard)}
        yield {"address": address, "dashboard": dashboard, "head_node_id": ids[True], "worker_node_id": ids[False],
               "env": env, "temp_dirs": (head_tmp, worker_tmp)}
    finally:
        if worker is not None:
            _stop(worker)
        _stop(head)
        shutil.rmtree(head_tmp, ignore_errors=True)
        shutil.rmtree(worker_tmp, ignore_errors=True)


@contextmanager
def loopback_head(tmp: Path, object_store_bytes: int = 200_000_000, inherit_env: bool = True) -> Iterator[dict]:
    """A single Ray head (`ray start --head --block`, our own child, stopped by its pid — never `ray
    stop`) whose every server binds 127.0.0.1: RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 keeps Ray from
    replacing 127.0.0.1 with the host's IP. Token auth is disabled for this loopback-only head; the
    agent and Ray Client ports are free ones (another Ray may hold the defaults 52365 and 10001, and a
    head whose agent cannot bind refuses every job). ``inherit_env``: start from this process's
    environment (else without its RAY_* and MLFLOW_* variables). Log: ``tmp/head.log``.

    Yields ``{"address": dashboard URL (the job server), "gcs": HOST:PORT for ``ray.init`` /
    ``ebm train --ray-address``, "env": the head's environment, "tmp": tmp, "pid": the head's pid}``."""
    ray_tmp = tempfile.mkdtemp(prefix="ebmh", dir="/tmp")      # short: AF_UNIX paths must fit in 107 bytes
    port, dash = free_port(), free_port()
    base = os.environ if inherit_env else {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_"))}
    env = dict(base, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
               RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0", PATH=BIN + os.pathsep + os.environ.get("PATH", ""))
    log = Path(tmp) / "head.log"
    proc = _spawn([os.path.join(BIN, "ray"), "start", "--head", "--block", f"--port={port}", "--num-cpus=2",
                   "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
                   f"--dashboard-agent-listen-port={free_port()}", f"--ray-client-server-port={free_port()}",
                   "--include-dashboard=true", f"--object-store-memory={object_store_bytes}", "--disable-usage-stats",
                   f"--temp-dir={ray_tmp}"], env, log)
    address = f"http://127.0.0.1:{dash}"
    try:
        _wait(lambda: bool(_get(f"{address}/api/version")), proc, log, "ray head", 120)
        yield {"address": address, "gcs": f"127.0.0.1:{port}", "env": env, "tmp": Path(tmp), "pid": proc.pid}
    finally:
        _stop(proc)
        shutil.rmtree(ray_tmp, ignore_errors=True)


def train_workers(cluster: dict, node_id: str | None = None) -> list:
    """The ALIVE Ray Train worker actors (class ``RayTrainWorker``) of ``cluster`` (as yielded by
    :func:`ray_nodes`), on ``node_id`` if given: ``ray.util.state`` ActorState records, each
    with ``actor_id``, ``node_id`` and ``pid`` (the process to kill to fail that worker)."""
    from ray.util.state import list_actors

    filters = [("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")]
    if node_id is not None:
        filters.append(("node_id", "=", node_id))
    with _no_ray_address_env():
        return list_actors(address=cluster["dashboard"], filters=filters, raise_on_missing_output=False)


@contextmanager
def mlflow_server(tmp: Path, s3: dict) -> Iterator[dict]:
    """An MLflow tracking server on 127.0.0.1: runs in ``tmp/mlflow.db`` (SQLite), artifacts
    proxied by the server (``mlflow-artifacts:`` URIs) into ``s3://BUCKET/mlflow`` on the moto of
    ``s3`` (as yielded by :func:`s3_server`); one uvicorn worker and no job runner (MLflow 3.17
    would start 4 workers and 7 huey consumers); log in ``tmp/mlflow.log``.

    Yields ``{"tracking_uri": "http://127.0.0.1:PORT", "artifacts": "s3://BUCKET/mlflow"}``.
    Clients need only the tracking URI: uploads go through the server. Downloads of artifacts do
    not: this server hands clients presigned URLs of the S3 endpoint, unless the client sets
    MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD=false.
    """
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    artifacts = f"s3://{s3['bucket']}/mlflow"
    log = Path(tmp) / "mlflow.log"
    proc = _spawn([os.path.join(BIN, "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
                   "--workers", "1", "--backend-store-uri", f"sqlite:///{tmp}/mlflow.db",
                   "--artifacts-destination", artifacts],
                  _env(**s3["env"], MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false"), log)
    try:
        _wait(lambda: _get(f"{uri}/health") == b"OK", proc, log, "mlflow server", 180)
        yield {"tracking_uri": uri, "artifacts": artifacts}
    finally:
        _stop(proc)
