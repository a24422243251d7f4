"""Job submission to a Ray cluster through the Ray Jobs API (the dashboard's job server).

Never imports ``ebm``: this layer only packages the working directory, checks it, and talks HTTP
to the cluster. The job itself runs ``ebm train|tune ...`` on the head node.

What is uploaded is decided by Ray's own packaging code (``ray._private.runtime_env.packaging``,
Ray 2.60): its default excludes, the ``excludes`` we pass (gitignore-style patterns) and every
``.gitignore`` (unless ``RAY_RUNTIME_ENV_IGNORE_GITIGNORE=1``) and ``.rayignore`` it meets on the way
down, each applying to its own folder. ``scan_working_dir`` walks the tree the way Ray does, with
Ray's matchers, so the checks below (size, secrets, symlinks) see exactly the files Ray will send.
"""
from __future__ import annotations

import logging
import os
import re
import shlex
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable
from urllib.parse import urlparse

# Never uploaded: environments, tracking stores, run outputs, caches and weights. Gitignore-style
# patterns (Ray's syntax); Ray's own defaults (.git, .venv, venv, __pycache__) are repeated here.
DEFAULT_EXCLUDES = (".venv", "venv", ".git", "mlruns", "mlruns.db", "mlruns-artifacts", "runs", "__pycache__",
                    ".pytest_cache", "*.egg-info", "*.pt", "*.pth", "ray_results")
# Likely secrets, left out by default (a file, or a whole folder, of that name at any depth);
# ``--allow-secrets PATTERN`` sends the matching ones anyway.
SECRET_EXCLUDES = (
    ".env*", "*.pem", "*.key", "*.p12", "*.pfx", "*.jks", "*.keystore", "*.keytab", "*.kdbx", "*.gpg", "*.asc",
    "id_rsa*", "id_dsa*", "id_ecdsa*", "id_ed25519*",
    ".netrc", "_netrc", ".git-credentials", ".pgpass", ".pypirc", ".npmrc", ".s3cfg", ".boto", ".vault-token",
    ".htpasswd", ".dockercfg", "**/.docker/config.json",
    ".aws", ".ssh", ".gnupg", ".kube", ".azure", "**/.config/gcloud",
    "credentials", "credentials.json", "credentials.csv", "*_credentials.csv", "*accessKeys.csv",
    "application_default_credentials.json", "client_secret*.json", "*service-account*.json",
    "kubeconfig", "*.kubeconfig", "*.tfstate", "*.tfstate.*", "*.tfvars", ".terraformrc", "terraform.rc",
)
# Content that marks a file as a secret wherever it is; only small text files are read.
SECRET_CONTENT = (
    ("a PEM private key", re.compile(rb"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----")),
    ("an AWS secret access key", re.compile(
        rb"aws_secret_access_key[\"']?\s*[:=]\s*[\"']?[A-Za-z0-9/+]{40}(?![A-Za-z0-9/+])", re.IGNORECASE)),
    ("an AWS access key id", re.compile(rb"(?<![A-Z0-9])(?:AKIA|ASIA)[A-Z0-9]{16}(?![A-Z0-9])")),
    ("a GitHub token", re.compile(rb"(?<![A-Za-z0-9_])(?:gh[pousr]_[A-Za-z0-9]{36}|github_pat_[A-Za-z0-9_]{60,})")),
    ("a Slack token", re.compile(rb"(?<![A-Za-z0-9])xox[baprs]-[A-Za-z0-9-]{10,}")),
)
SCAN_MAX_BYTES = 1 << 20          # files above this are not read (weights, datasets): the scan stays fast
# Ray refuses packages above its own limit at upload time; we refuse earlier with the culprits named.
DEFAULT_MAX_UPLOAD = 100 * 1024 * 1024
# Forwarded to the job when set on the submitting machine.
FORWARDED_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "EBM_STORAGE_PATH")
REMOTE_SCHEMES = ("s3://", "gs://", "gcs://", "abfs://", "az://", "hdfs://", "oss://")
# Ray's job server names the driver's log file after the id; "/" or a space in it leaves the job PENDING forever.
SUBMISSION_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
# Ray's client reads these and lets them override the address it is given; we resolve the address ourselves.
_ADDRESS_ENV = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")
_quiet = logging.getLogger(__name__ + ".walk")
_quiet.setLevel(logging.WARNING)
_quiet.propagate = False


class SubmitError(RuntimeError):
    """A submission or jobs command was refused or failed; the message says why and what to do."""


class NoSuchJob(SubmitError):
    """The job server does not know this submission id."""


@dataclass
class UploadSummary:
    total_bytes: int
    n_files: int
    largest: list[tuple[int, str]]
    files: list[str] = field(default_factory=list)        # relative paths Ray will send
    empty_dirs: list[str] = field(default_factory=list)   # sent as zip directory entries ("a/b/")
    left_out: list[str] = field(default_factory=list)     # likely secrets left out (files or folders)
    allowed: list[str] = field(default_factory=list)      # likely secrets sent because of --allow-secrets
    excludes: list[str] = field(default_factory=list)     # the exact ``excludes`` to give Ray


def _spec(patterns: Iterable[str]):
    from ray._private.thirdparty.pathspec import PathSpec
    return PathSpec.from_lines("gitwildmatch", list(patterns))


def _anchored(rel: str) -> str:
    """A gitignore pattern matching exactly ``rel`` (and, for a folder, what is under it)."""
    return "/" + re.sub(r"([*?\[\]\\])", r"\\\1", rel)


def _include_gitignore() -> bool:
    return os.environ.get("RAY_RUNTIME_ENV_IGNORE_GITIGNORE", "0") != "1"   # as Ray's job client reads it


def ray_default_excludes() -> list[str]:
    from ray._private import ray_constants
    return ray_constants.get_runtime_env_default_excludes()


def scan_working_dir(root: str | Path, excludes: Iterable[str] = DEFAULT_EXCLUDES, *,
                     secrets: Iterable[str] = (), allow: Iterable[str] = ()) -> UploadSummary:
    """What Ray would upload for ``working_dir=root, excludes=excludes``: Ray's default excludes, then
    ``excludes``, then each ``.gitignore``/``.rayignore`` on the way down, matched by Ray's own functions
    in Ray's order (``packaging._dir_travel``). Files matching ``secrets`` and not ``allow`` are left out
    too, and ``summary.excludes`` is the list that makes Ray leave out exactly those.

    Symlinks are followed as Ray follows them (a linked file's content is sent), but a link that points
    outside ``root``, or a folder link that points back at one of its own parents (Ray would walk it
    ~40 levels deep, copying the tree each time), is refused naming the links."""
    from ray._private.runtime_env import packaging as rp
    root = Path(root)
    if not root.exists():
        raise SubmitError(f"working dir {root} does not exist")
    if not root.is_dir():
        raise SubmitError(f"working dir {root} is not a directory")
    root = root.resolve()
    excludes = list(excludes)
    include_gitignore = _include_gitignore()
    matchers = [rp._get_excludes(root, ray_default_excludes() + excludes)]
    secret_spec, allow_spec = _spec(secrets), _spec(allow)
    check_secrets = bool(secret_spec.patterns)
    out = UploadSummary(0, 0, [])
    bad_links: list[str] = []

    real_dirs = [root]                      # the real folders being walked, root first: a link back to one is a loop

    def link_problem(path: Path) -> str:
        try:
            target = path.resolve(strict=True)
        except (OSError, RuntimeError):
            return ""                              # dangling or a loop of links: Ray skips it (neither file nor dir)
        if target != root and root not in target.parents:
            return f"points outside the working dir, to {target}"
        if target in real_dirs:
            return f"points back at the folder {target} that contains it (a loop)"
        return ""

    def travel(path: Path) -> None:
        new = rp.get_excludes_from_ignore_files(path, include_gitignore=include_gitignore, logger=_quiet)
        matchers.extend(new)
        try:
            if any(m(path) for m in matchers):
                return
            rel = path.relative_to(root).as_posix()
            if path != root:
                if check_secrets and secret_spec.match_file(rel):
                    if not allow_spec.match_file(rel):       # left out: Ray will not look where a link points
                        out.left_out.append(rel + ("/" if path.is_dir() else ""))
                        return
                    out.allowed.append(rel)
                if path.is_symlink():
                    problem = link_problem(path)
                    if problem:
                        bad_links.append(f"{rel} ({problem})")
                        return
            is_dir = path.is_dir()
            if is_dir and next(path.iterdir(), None) is None:
                if path != root:
                    out.empty_dirs.append(rel + "/")
            elif path.is_file():
                size = path.stat().st_size            # follows a link: Ray sends the content
                out.files.append(rel)
                out.total_bytes += size
                out.largest.append((size, rel))
                if len(out.largest) > 64:
                    out.largest = sorted(out.largest, reverse=True)[:5]
            if is_dir:
                real_dirs.append(path.resolve())
                for sub in path.iterdir():
                    travel(sub)
                real_dirs.pop()
        finally:
            del matchers[len(matchers) - len(new):]

    travel(root)
    if bad_links:
        raise SubmitError(
            f"working dir {root} has symlinks Ray would follow: {', '.join(sorted(bad_links))}. Ray uploads what a "
            f"link points to (a loop is copied again at every level). Leave them out (--exclude PATH) or replace "
            f"them with the files themselves.")
    out.n_files = len(out.files)
    out.largest = sorted(out.largest, reverse=True)[:5]
    out.excludes = excludes + [_anchored(rel.rstrip("/")) for rel in out.left_out]
    if out.left_out:                                   # the patterns must leave out exactly those paths
        spec = _spec(out.excludes[len(excludes):])
        odd = [r for r in out.left_out if not spec.match_file(r.rstrip("/"))] + \
              [r for r in out.files if spec.match_file(r)]
        if odd:
            raise SubmitError(f"cannot express these paths as exclude patterns for Ray: {odd}; rename them")
    return out


def check_upload(root: str | Path, excludes: Iterable[str], limit: int, *, secrets: Iterable[str] = (),
                 allow: Iterable[str] = ()) -> UploadSummary:
    s = scan_working_dir(root, excludes, secrets=secrets, allow=allow)
    if s.total_bytes > limit:
        top = ", ".join(f"{rel} ({size / 2**20:.1f} MiB)" for size, rel in s.largest)
        raise SubmitError(
            f"working dir {root} would upload {s.total_bytes / 2**20:.1f} MiB in {s.n_files} files, over the "
            f"{limit / 2**20:.0f} MiB limit. Largest: {top}. Exclude them (--exclude PATTERN), move data to "
            f"shared storage, or raise --max-upload-mb.")
    return s


def find_secret_content(root: str | Path, files: Iterable[str],
                        max_bytes: int = SCAN_MAX_BYTES) -> list[tuple[str, str]]:
    """(path, what) for each small text file among ``files`` whose content looks like a secret."""
    root = Path(root).resolve()
    found = []
    for rel in files:
        p = root / rel
        try:
            if p.stat().st_size > max_bytes:
                continue
            data = p.read_bytes()
        except OSError:
            continue
        if b"\0" in data[:8192]:
            continue                                   # binary
        for what, rx in SECRET_CONTENT:
            if rx.search(data):
                found.append((rel, what))
                break
    return found


def check_secrets(root: str | Path, summary: UploadSummary, allow: Iterable[str]) -> None:
    """Refuse likely secrets the name patterns did not catch (named, with what was found), unless
    ``--allow-secrets`` covers them; refuse an ``--allow-secrets`` pattern that allows nothing."""
    allow = list(allow)
    allow_spec = _spec(allow)
    root = Path(root).resolve()
    found = find_secret_content(root, summary.files)
    refused = [(rel, what) for rel, what in found if not allow_spec.match_file(rel)]
    if refused:
        names = ", ".join(f"{rel} ({what})" for rel, what in refused)
        raise SubmitError(
            f"working dir {root} would upload likely secrets: {names}. Leave them out (--exclude PATTERN) or, if the "
            f"job needs them, send them anyway with --allow-secrets PATTERN (gitignore syntax, relative to the "
            f"working dir). Nothing was sent.")
    summary.allowed += [rel for rel, _ in found if rel not in summary.allowed]
    unused = [a for a in allow if not any(_spec([a]).match_file(r) for r in summary.allowed)]
    if unused:
        raise SubmitError(
            f"--allow-secrets {' '.join(unused)} matches no likely secret in {root} (patterns are gitignore-style, "
            f"relative to the working dir); nothing was sent.")


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


def check_storage_path(storage_path: str) -> None:
    """A relative path would be taken inside the job's working dir on the cluster: Ray's package cache,
    shared by every job uploaded from the same files and deleted when Ray needs the space."""
    if storage_path and "://" not in storage_path and not os.path.isabs(storage_path):
        raise SubmitError(
            f"checkpoint storage {storage_path!r} is a relative path: on the cluster it would land in the job's "
            f"unpacked working dir (Ray's package cache, shared by jobs uploaded from the same files and deleted "
            f"when Ray needs the space). Give an absolute path or a URI (s3://bucket/ebm).")


def check_address(address: str, source: str = "--address") -> str:
    """The job server's URL (http[s]://host:port). Without a scheme Ray would take it for a GCS
    address and wait on it for a minute before failing."""
    u = urlparse(address)
    if u.scheme not in ("http", "https") or not u.hostname:
        raise SubmitError(
            f"{source} {address!r} is not a job server URL: give http://HOST:PORT (the head's dashboard port, "
            f"8265 by default, e.g. http://127.0.0.1:8265), not the GCS address (port 6379).")
    try:
        u.port
    except ValueError as e:
        raise SubmitError(f"{source} {address!r} is not a job server URL: {e}") from e
    return address.rstrip("/")


def check_entrypoint(entrypoint: list[str]) -> None:
    if not entrypoint or not entrypoint[0].strip() or entrypoint[0] == "--":
        raise SubmitError("nothing to run: give the command after --, e.g. ebm submit -- ebm train toy2")


def check_submission_id(submission_id: str | None) -> None:
    if submission_id is not None and not SUBMISSION_ID.fullmatch(submission_id):
        raise SubmitError(
            f"submission id {submission_id!r} is not allowed: use letters, digits, '_', '.' and '-' (at most 128, "
            f"starting with a letter or digit); Ray's job server cannot run or address others.")


def build_runtime_env(root: str | Path, excludes: Iterable[str], env: dict[str, str]) -> dict:
    env_vars = {k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)}
    env_vars.update(env)
    env_vars.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    return {"working_dir": str(root), "excludes": list(excludes), "env_vars": env_vars}


@contextmanager
def _this_address_only():
    """Ray's clients let $RAY_API_SERVER_ADDRESS / $RAY_ADDRESS override the address they are given;
    hide them while one is made, so that --address means what it says."""
    saved = {k: os.environ.pop(k) for k in _ADDRESS_ENV if k in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def _ray_error(e: BaseException) -> str:
    """One line from an exception of Ray's job client (its messages may embed a server traceback)."""
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip() and ln.strip() != "."]
    return lines[-1] if lines else type(e).__name__


def client(address: str):
    from ray.job_submission import JobSubmissionClient
    address = check_address(address)
    try:
        with _this_address_only():
            return JobSubmissionClient(address)
    except Exception as e:  # connection refused, auth, version mismatch: one clear message
        raise SubmitError(f"cannot reach the Ray job server at {address}: {_ray_error(e)}") from e


def _call(address: str, submission_id: str, fn, /, *args, **kwargs):
    """A job-server call; an unknown id, a refused request or a lost connection become one SubmitError."""
    try:
        return fn(*args, **kwargs)
    except Exception as e:
        msg = str(e)
        if "status code 404" in msg:
            raise NoSuchJob(f"no job {submission_id!r} on the Ray job server at {address} "
                              f"(ebm jobs list --address {address} lists them)") from e
        if isinstance(e, (ConnectionError, OSError)) or type(e).__module__.startswith(("requests", "urllib3")):
            raise SubmitError(f"lost the Ray job server at {address}: {_ray_error(e)}") from e
        raise SubmitError(f"the Ray job server at {address} refused: {_ray_error(e)}") from e


def count_nodes(address: str) -> int:
    """Alive nodes of the cluster, through the dashboard's state API."""
    from ray.util.state import list_nodes
    with _this_address_only():
        nodes = list_nodes(address=address, filters=[("state", "=", "ALIVE")], raise_on_missing_output=False)
    return len(nodes)


def job_exists(c, address: str, submission_id: str) -> bool:
    try:
        _call(address, submission_id, c.get_job_info, submission_id)
        return True
    except NoSuchJob:
        return False


def prepare(entrypoint: list[str], *, working_dir: str | Path = ".", excludes: Iterable[str] = DEFAULT_EXCLUDES,
            allow_secrets: Iterable[str] = (), max_upload: int = DEFAULT_MAX_UPLOAD, storage: str = "",
            submission_id: str | None = None) -> UploadSummary:
    """Every check that needs no cluster: the command, the id, the storage path, and what would be
    uploaded (size, secrets by name and by content, symlinks). Raises SubmitError; nothing is sent."""
    check_entrypoint(entrypoint)
    check_submission_id(submission_id)
    check_storage_path(storage or os.environ.get("EBM_STORAGE_PATH", ""))
    allow_secrets = list(allow_secrets)
    s = check_upload(working_dir, list(excludes), max_upload, secrets=SECRET_EXCLUDES, allow=allow_secrets)
    check_secrets(working_dir, s, allow_secrets)
    return s


def submit(address: str, entrypoint: list[str], *, working_dir: str | Path = ".",
           excludes: Iterable[str] = DEFAULT_EXCLUDES, max_upload: int = DEFAULT_MAX_UPLOAD,
           storage: str = "", shared_fs: bool = False, env: dict[str, str] | None = None,
           submission_id: str | None = None, entrypoint_num_cpus: float | None = None,
           allow_secrets: Iterable[str] = (), report=None) -> str:
    """Check, package and submit; returns the submission id. Nothing is sent if a check fails.
    ``report(summary)`` is called with what will be uploaded before anything is sent."""
    address = check_address(address)
    s = prepare(entrypoint, working_dir=working_dir, excludes=excludes, allow_secrets=allow_secrets,
                max_upload=max_upload, storage=storage, submission_id=submission_id)
    env = dict(env or {})
    if storage:
        env["EBM_STORAGE_PATH"] = storage
    c = client(address)
    if submission_id and job_exists(c, address, submission_id):
        raise SubmitError(f"a job with submission id {submission_id!r} already exists on {address}; "
                          f"choose another id (or none: Ray makes one). Nothing was sent.")
    try:
        n_nodes = count_nodes(address)
    except Exception as e:
        raise SubmitError(f"cannot list the nodes of the cluster at {address}: {_ray_error(e)}") from e
    check_storage(storage or os.environ.get("EBM_STORAGE_PATH", ""), n_nodes, shared_fs)
    if report:
        report(s)
    return _call(address, submission_id or "", c.submit_job, entrypoint=shlex.join(entrypoint),
                 submission_id=submission_id,
                 runtime_env=build_runtime_env(Path(working_dir).resolve(), s.excludes, env),
                 entrypoint_num_cpus=entrypoint_num_cpus)


TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


def status(address: str, submission_id: str):
    return _call(address, submission_id, client(address).get_job_info, submission_id)


def logs(address: str, submission_id: str) -> str:
    return _call(address, submission_id, client(address).get_job_logs, submission_id)


def stop(address: str, submission_id: str) -> tuple[bool, str]:
    """(stopped, status): a job that already ended is not an error, but says so."""
    c = client(address)
    info = _call(address, submission_id, c.get_job_info, submission_id)
    if str(info.status.value) in TERMINAL:
        return False, str(info.status.value)
    return bool(_call(address, submission_id, c.stop_job, submission_id)), str(info.status.value)


def list_jobs(address: str):
    return _call(address, "", client(address).list_jobs)


def follow(address: str, submission_id: str, timeout: float = 0, poll: float = 1.0, out=print) -> str:
    """Print the job's logs as they come until it ends; returns the final status name."""
    c = client(address)
    seen = 0
    start = time.monotonic()
    while True:
        status_ = str(_call(address, submission_id, c.get_job_status, submission_id).value)
        text = _call(address, submission_id, c.get_job_logs, submission_id)
        if len(text) > seen:
            out(text[seen:].rstrip("\n"))
            seen = len(text)
        if status_ in TERMINAL:
            return status_
        if timeout and time.monotonic() - start > timeout:
            raise TimeoutError(f"job {submission_id} still {status_} after {timeout:.0f} s")
        time.sleep(poll)
