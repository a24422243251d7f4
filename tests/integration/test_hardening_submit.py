"""Hardening of `ebm submit` / `ebm jobs`: what is uploaded is exactly what Ray packages, secrets stay
home, symlinks Ray would follow out of (or round) the working dir are refused, and every refusal or
unknown job is one line on stderr with exit code 2. The filesystem tests run Ray's own packaging
code (no cluster); the rest use a real `ray start --head` on 127.0.0.1, loopback only.

Secret-looking strings are assembled at run time, so this file itself never looks like a secret."""
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import zipfile
from pathlib import Path

import pytest

from cluster import jobs

pytestmark = pytest.mark.integration
ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
BIN = os.path.dirname(sys.executable)
PEM = "-----BEGIN " + "RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA7\n-----END RSA PRIVATE KEY-----\n"
AWS = "aws_secret_access_key" + " = " + "wJalrXUtnFEMI/K7MDENG/bPxRfiCY" + "EXAMPLEKEY\n"


def _write(root: Path, files: dict) -> None:
    for rel, content in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            p.write_bytes(content)
        else:
            p.write_text(content)


def _ray_zip(root: Path, excludes: list, tmp: Path) -> list:
    """What Ray's job client would upload for working_dir=root, excludes=excludes: Ray's own
    working_dir upload path (its default excludes, .gitignore/.rayignore handling) into a local zip."""
    from ray._private.runtime_env import packaging as rp
    from ray._private.runtime_env.working_dir import upload_working_dir_if_needed
    out = tmp / f"pkg{len(list(tmp.glob('pkg*.zip')))}.zip"
    include_gitignore = os.environ.get("RAY_RUNTIME_ENV_IGNORE_GITIGNORE", "0") != "1"

    def upload(working_dir, excludes, is_file=False):
        rp.create_package(working_dir, out, include_gitignore=include_gitignore, excludes=excludes)

    upload_working_dir_if_needed({"working_dir": str(root), "excludes": list(excludes)},
                                 include_gitignore=include_gitignore, upload_fn=upload)
    with zipfile.ZipFile(out) as z:
        return sorted(z.namelist())


def _scan_list(s) -> list:
    return sorted(s.files + s.empty_dirs)


# ----------------------------------------------------------------------------------------- pure filesystem

def _ignore_tree(root: Path) -> None:
    _write(root, {
        "src/model.py": "x = 1\n", "src/notes.log": "ignored by the root .gitignore\n",
        "keep.log": "re-included by !keep.log\n", "build/out.txt": "ignored folder\n",
        "sub/.gitignore": "local_*.csv\n/only_here.txt\n", "sub/local_1.csv": "a\n", "sub/kept.csv": "b\n",
        "sub/only_here.txt": "ignored by sub/.gitignore\n", "sub/deeper/only_here.txt": "anchored: kept\n",
        "sub/deeper/local_2.csv": "nested rule applies below\n", "local_3.csv": "sub's rule does not apply here\n",
        "ray/.rayignore": "*.tmp\n", "ray/x.tmp": "ignored by .rayignore\n", "ray/y.txt": "kept\n",
        ".venv/lib/site.py": "default exclude\n", "runs/r1/ckpt.bin": "default exclude\n", "w/model.pt": "weights\n",
        "data/a.bin": "user exclude data/*.bin\n", "data/deep/b.bin": "not matched by data/*.bin\n",
        "top_only.txt": "user exclude /top_only.txt\n", "nested/top_only.txt": "kept\n",
        "odd name [1].txt": "kept\n", "we*ird[1].pem": "a secret with glob characters in its name\n",
        ".env.local": "A=1\n", "cfg/.aws/credentials": "[default]\n",
    })
    (root / ".gitignore").write_text("*.log\n!keep.log\nbuild/\n")
    (root / "empty_dir").mkdir()
    (root / "src" / "linked.py").symlink_to(root / "src" / "model.py")       # in-tree links: followed, like Ray
    (root / "srclink").symlink_to(root / "src", target_is_directory=True)
    (root / "dangling").symlink_to(root / "nowhere")


def test_scan_lists_exactly_what_ray_packages_with_gitignores_rayignore_and_excludes(tmp_path, monkeypatch):
    root, tmp = tmp_path / "work", tmp_path / "zips"
    root.mkdir(), tmp.mkdir()
    _ignore_tree(root)
    excludes = list(jobs.DEFAULT_EXCLUDES) + ["data/*.bin", "/top_only.txt"]
    s = jobs.prepare(["ebm", "train", "toy2"], working_dir=root, excludes=excludes)
    ours = _scan_list(s)
    assert ours == _ray_zip(root, s.excludes, tmp)
    # and it is the expected list, so the comparison above is not between two empty lists
    for kept in ("src/model.py", "keep.log", "sub/kept.csv", "sub/deeper/only_here.txt", "local_3.csv", "ray/y.txt",
                 "data/deep/b.bin", "nested/top_only.txt", "odd name [1].txt", "src/linked.py", "srclink/model.py",
                 "empty_dir/", "sub/.gitignore", ".gitignore"):
        assert kept in ours, kept
    for gone in ("src/notes.log", "build/out.txt", "sub/local_1.csv", "sub/only_here.txt", "sub/deeper/local_2.csv",
                 "ray/x.tmp", ".venv/lib/site.py", "runs/r1/ckpt.bin", "w/model.pt", "data/a.bin", "top_only.txt",
                 "we*ird[1].pem", ".env.local", "cfg/.aws/credentials", "dangling"):
        assert gone not in ours, gone
    assert sorted(s.left_out) == sorted(["we*ird[1].pem", ".env.local", "cfg/.aws/"])
    assert s.total_bytes == sum((root / f).stat().st_size for f in s.files)

    # RAY_RUNTIME_ENV_IGNORE_GITIGNORE=1: Ray stops reading .gitignore (not .rayignore); so does the scan
    monkeypatch.setenv("RAY_RUNTIME_ENV_IGNORE_GITIGNORE", "1")
    s2 = jobs.prepare(["ebm"], working_dir=root, excludes=excludes)
    assert _scan_list(s2) == _ray_zip(root, s2.excludes, tmp)
    assert {"src/notes.log", "build/out.txt", "sub/local_1.csv"} <= set(s2.files) and "ray/x.tmp" not in s2.files


def test_likely_secrets_are_left_out_by_name_and_named(tmp_path):
    root, tmp = tmp_path / "work", tmp_path / "zips"
    root.mkdir(), tmp.mkdir()
    secrets = [".env", ".env.production", ".envrc", "id_rsa", "id_ed25519.pub", ".netrc", ".git-credentials",
               "server.pem", "tls/server.key", "cert.p12", "kubeconfig", "credentials.json", "ops/.pgpass",
               ".aws/credentials", ".ssh/config", "home/.docker/config.json", ".kube/config",
               "gcp/app/.config/gcloud/application_default_credentials.json"]
    _write(root, {rel: "x\n" for rel in secrets})
    _write(root, {"src/train.py": "print(1)\n", "docs/credentials.md": "how to set AWS credentials\n",
                  "home/.docker/daemon.json": "{}\n"})
    s = jobs.prepare(["ebm"], working_dir=root)
    assert sorted(s.files) == ["docs/credentials.md", "home/.docker/daemon.json", "src/train.py"]
    assert sorted(s.left_out) == sorted([
        ".env", ".env.production", ".envrc", "id_rsa", "id_ed25519.pub", ".netrc", ".git-credentials", "server.pem",
        "tls/server.key", "cert.p12", "kubeconfig", "credentials.json", "ops/.pgpass", ".aws/", ".ssh/",
        "home/.docker/config.json", ".kube/", "gcp/app/.config/gcloud/"])
    assert _ray_zip(root, s.excludes, tmp) == sorted(s.files)

    # --allow-secrets PATTERN sends exactly the matching ones; Ray's package agrees
    s = jobs.prepare(["ebm"], working_dir=root, allow_secrets=["tls/server.key", ".aws"])
    assert {"tls/server.key", ".aws/credentials"} <= set(s.files) and "server.pem" in s.left_out
    assert sorted(s.allowed) == [".aws", ".aws/credentials", "tls/server.key"]
    assert _ray_zip(root, s.excludes, tmp) == sorted(s.files)
    with pytest.raises(jobs.SubmitError, match=r"--allow-secrets tls/typo\.key matches no likely secret"):
        jobs.prepare(["ebm"], working_dir=root, allow_secrets=["tls/typo.key"])


def test_secrets_found_by_content_are_refused_naming_the_files(tmp_path):
    root = tmp_path / "work"
    _write(root, {
        "src/train.py": "print(1)\n",
        "conf/settings.yaml": "region: us-east-1\n" + AWS,
        "deploy/notes.txt": "the key:\n" + PEM,
        "keys/sa.json": '{"type": "service_account", "private_key": "' + PEM.replace("\n", "\\n") + '"}\n',
        # what this project's own tests and docs contain must not trip the scan
        "tests/fake_s3.py": 'boto3.client("s3", aws_secret_access_key="testing")\nwords = ("AKIA", "token:")\n',
        "weights.bin": b"\0\1\2" + PEM.encode(),                    # binary: not read
    })
    with pytest.raises(jobs.SubmitError) as e:
        jobs.prepare(["ebm"], working_dir=root)
    msg = str(e.value)
    assert "conf/settings.yaml (an AWS secret access key)" in msg and "deploy/notes.txt (a PEM private key)" in msg
    assert "keys/sa.json (a PEM private key)" in msg and "--allow-secrets PATTERN" in msg
    assert "fake_s3" not in msg and "weights.bin" not in msg and "train.py" not in msg

    with pytest.raises(jobs.SubmitError) as e:
        jobs.prepare(["ebm"], working_dir=root, allow_secrets=["conf/settings.yaml", "keys/"])
    assert "deploy/notes.txt" in str(e.value) and "settings.yaml" not in str(e.value)
    s = jobs.prepare(["ebm"], working_dir=root, excludes=list(jobs.DEFAULT_EXCLUDES) + ["deploy/"],
                     allow_secrets=["conf/settings.yaml", "keys/"])
    assert sorted(s.allowed) == ["conf/settings.yaml", "keys/sa.json"] and "deploy/notes.txt" not in s.files
    # only small files are read: a large one is left to the size limit
    (root / "deploy" / "notes.txt").write_text(PEM + "x" * (jobs.SCAN_MAX_BYTES + 1))
    assert jobs.find_secret_content(root, ["deploy/notes.txt"]) == []
    assert jobs.find_secret_content(root, ["deploy/notes.txt"], max_bytes=10 * jobs.SCAN_MAX_BYTES) == \
        [("deploy/notes.txt", "a PEM private key")]


def test_symlinks_out_of_or_round_the_working_dir_are_refused(tmp_path):
    outside = tmp_path / "home_creds"
    outside.write_text("[default]\n" + AWS)
    tmp = tmp_path / "zips"
    tmp.mkdir()

    out_link = tmp_path / "w1"
    _write(out_link, {"src/a.py": "x\n"})
    (out_link / "innocent.txt").symlink_to(outside)
    # Ray's packaging follows the link and sends the outside file's content under an innocent name
    ray_names = _ray_zip(out_link, [], tmp)
    assert "innocent.txt" in ray_names
    with pytest.raises(jobs.SubmitError, match=r"innocent\.txt \(points outside the working dir, to .*home_creds\)"):
        jobs.prepare(["ebm"], working_dir=out_link)
    assert jobs.prepare(["ebm"], working_dir=out_link, excludes=["innocent.txt"]).files == ["src/a.py"]
    # a secret's name wins over where it points: left out (Ray never follows it), not refused
    (out_link / ".env").symlink_to(outside)
    s = jobs.prepare(["ebm"], working_dir=out_link, excludes=["innocent.txt"])
    assert s.files == ["src/a.py"] and s.left_out == [".env"] and _ray_zip(out_link, s.excludes, tmp) == ["src/a.py"]

    loop = tmp_path / "w2"
    _write(loop, {"src/a.py": "x\n", "b/c.py": "y\n"})
    (loop / "src" / "up").symlink_to("..", target_is_directory=True)
    (loop / "src" / "tob").symlink_to("../b", target_is_directory=True)       # a plain in-tree link: fine
    (loop / "b" / "tosrc").symlink_to("../src", target_is_directory=True)     # src/tob/tosrc -> src: a loop
    ray_names = _ray_zip(loop, ["tob", "tosrc"], tmp)                         # Ray on the one-link loop alone:
    assert max(n.count("up/") for n in ray_names) >= 20                     # the tree again at every level
    with pytest.raises(jobs.SubmitError) as e:
        jobs.prepare(["ebm"], working_dir=loop)
    assert "src/up (points back at the folder" in str(e.value) and "(a loop)" in str(e.value)
    assert "src/tob/tosrc (points back" in str(e.value) and "b/tosrc/tob (points back" in str(e.value)


def test_a_link_counts_the_size_of_what_it_points_to(tmp_path):
    root = tmp_path / "work"
    _write(root, {"data/big.bin": os.urandom(1_500_000)})
    (root / "latest.bin").symlink_to(root / "data" / "big.bin")     # Ray sends the 1.5 MB twice
    s = jobs.scan_working_dir(root)
    assert s.total_bytes == 3_000_000
    with pytest.raises(jobs.SubmitError, match=r"over the 2 MiB limit.*latest\.bin \(1\.4 MiB\)"):
        jobs.check_upload(root, jobs.DEFAULT_EXCLUDES, limit=2 * 2**20)


def test_a_huge_sparse_file_is_refused_by_size_without_reading_it(tmp_path):
    root = tmp_path / "work"
    _write(root, {"src/a.py": "x\n"})
    with open(root / "huge.bin", "wb") as f:
        f.truncate(3 * 2**30)                      # 3 GiB, sparse: reading it would take long, stat does not
    with pytest.raises(jobs.SubmitError, match=r"3072\.0 MiB in 2 files, over the 100 MiB limit.*huge\.bin"):
        jobs.prepare(["ebm"], working_dir=root)


@pytest.mark.parametrize("working_dir,message", [("missing", "does not exist"), ("a_file", "is not a directory")])
def test_a_working_dir_that_is_missing_or_a_file_is_refused(tmp_path, working_dir, message):
    (tmp_path / "a_file").write_text("x\n")
    with pytest.raises(jobs.SubmitError, match=message):
        jobs.prepare(["ebm"], working_dir=tmp_path / working_dir)


def test_commands_ids_storage_paths_and_addresses_are_checked_before_anything_is_sent():
    for cmd in ([], ["--"], [""], ["  "]):
        with pytest.raises(jobs.SubmitError, match="nothing to run"):
            jobs.check_entrypoint(cmd)
    jobs.check_entrypoint(["ebm", "train", "toy2"])
    for bad in ("../x y", "a/b", "", "-x", "x" * 129):
        with pytest.raises(jobs.SubmitError, match="is not allowed"):
            jobs.check_submission_id(bad)
    jobs.check_submission_id("raysubmit_AbC-1.2")
    jobs.check_submission_id(None)
    with pytest.raises(jobs.SubmitError, match="relative path"):
        jobs.check_storage_path("runs")
    for ok in ("", "/mnt/shared/ebm", "s3://b/ebm", "file:///mnt/ebm"):
        jobs.check_storage_path(ok)
    for bad in ("127.0.0.1:8265", "ray://127.0.0.1:10001", "auto", "http://", "http://h:99999"):
        with pytest.raises(jobs.SubmitError, match="not a job server URL"):
            jobs.check_address(bad)
    assert jobs.check_address("http://127.0.0.1:8265/") == "http://127.0.0.1:8265"


# ----------------------------------------------------------------------------------------- a real Ray head

def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tree(pid: int) -> set:
    out = {pid}
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for task in tasks:
        try:
            children = open(f"/proc/{pid}/task/{task}/children").read().split()
        except OSError:
            continue
        for child in children:
            out |= _tree(int(child))
    return out


def _listening(pids: set) -> list:
    """(process name, local address) of every listening TCP socket the processes hold, from /proc."""
    listen = {}
    for name, v6 in (("tcp", False), ("tcp6", True)):
        for line in open(f"/proc/net/{name}").read().splitlines()[1:]:
            f = line.split()
            if f[3] != "0A":                       # LISTEN
                continue
            hexip, hexport = f[1].split(":")
            raw = bytes.fromhex(hexip)
            if v6:
                raw = b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))
                ip = socket.inet_ntop(socket.AF_INET6, raw)
            else:
                ip = socket.inet_ntop(socket.AF_INET, raw[::-1])
            listen[f[9]] = f"{ip}:{int(hexport, 16)}"
    found = []
    for pid in pids:
        try:
            name = open(f"/proc/{pid}/comm").read().strip()
            for fd in os.listdir(f"/proc/{pid}/fd"):
                m = re.fullmatch(r"socket:\[(\d+)\]", os.readlink(f"/proc/{pid}/fd/{fd}"))
                if m and m.group(1) in listen:
                    found.append((name, listen[m.group(1)]))
        except OSError:
            continue
    return sorted(set(found))


def _loopback(addr: str) -> bool:
    ip = addr.rsplit(":", 1)[0]
    return ip in ("127.0.0.1", "::1", "::ffff:127.0.0.1") or ip.startswith("127.")


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    """A loopback-only Ray head (tests/clusterlab.py), started without this process's RAY_*/MLFLOW_*."""
    import clusterlab
    with clusterlab.loopback_head(tmp_path_factory.mktemp("hardhead"), object_store_bytes=100_000_000,
                                  inherit_env=False) as h:
        yield h


def _ebm(args, env, cwd=ROOT, timeout=300):
    """The installed `ebm` command, in its own process."""
    return subprocess.run([os.path.join(BIN, "ebm"), *args], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


class _Result:
    def __init__(self, returncode, stdout, stderr):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


@pytest.fixture
def cli(head, capsys, monkeypatch):
    """`ebm submit` / `ebm jobs` run in this process (the `ebm` entry point takes ~5 s to start here),
    with the head's environment; ``env`` adds variables for one call."""
    import argparse
    from cluster.cli import add_cluster_commands
    for k in [k for k in os.environ if k.startswith(("RAY_", "MLFLOW_"))]:
        monkeypatch.delenv(k)
    for k, v in head["env"].items():
        if k.startswith("RAY_"):
            monkeypatch.setenv(k, v)

    def run(args, env=None, cwd=None):
        ap = argparse.ArgumentParser(prog="ebm")
        add_cluster_commands(ap.add_subparsers(dest="command", required=True))
        ns = ap.parse_args(args)
        with monkeypatch.context() as m:
            for k, v in (env or {}).items():
                m.setenv(k, v)
            if cwd:
                m.chdir(cwd)
            capsys.readouterr()
            rc = ns.func(ns)
        out, err = capsys.readouterr()
        return _Result(rc, out, err)
    return run


def _one_line_error(r, prefix: str) -> str:
    assert r.returncode == 2, r.stdout + r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert r.stderr.startswith(prefix), r.stderr
    return r.stderr


def test_unknown_job_ids_and_unreachable_servers_are_one_line_and_exit_2(head, cli, tmp_path):
    a = head["address"]
    # the installed command, once: one line on stderr, exit code 2, no traceback
    err = _one_line_error(_ebm(["jobs", "status", "BADID", "--address", a], head["env"]), "ebm jobs: no job 'BADID'")
    assert a in err
    for args in (["status", "BADID"], ["logs", "BADID"], ["logs", "BADID", "--follow"], ["stop", "BADID"]):
        _one_line_error(cli(["jobs", *args, "--address", a]), f"ebm jobs: no job 'BADID' on the Ray job server at {a}")
    gone = f"http://127.0.0.1:{_free_port()}"
    for args in (["status", "X"], ["logs", "X"], ["stop", "X"], ["list"]):
        _one_line_error(cli(["jobs", *args, "--address", gone]), f"ebm jobs: cannot reach the Ray job server at {gone}")
    (tmp_path / "w").mkdir()
    _one_line_error(cli(["submit", "--address", gone, "--working-dir", str(tmp_path / "w"), "--", "ebm"]),
                    f"ebm submit: cannot reach the Ray job server at {gone}")
    # no scheme: Ray would take it for a GCS address and wait on it; refused at once
    _one_line_error(cli(["jobs", "list", "--address", a.replace("http://", "")]), "ebm jobs: --address")
    _one_line_error(cli(["jobs", "list"], env={"RAY_ADDRESS": a.replace("http://", "")}), "ebm jobs: $RAY_ADDRESS")


def test_the_address_flag_wins_over_ray_address_in_the_environment(head, cli):
    """Ray's client lets $RAY_ADDRESS / $RAY_API_SERVER_ADDRESS override the address it is given: a
    submission would go to another cluster than the one named on the command line."""
    elsewhere = f"http://127.0.0.1:{_free_port()}"
    for var in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
        r = cli(["jobs", "list", "--address", head["address"]], env={var: elsewhere})
        assert r.returncode == 0, r.stderr
        r = cli(["jobs", "list"], env={var: elsewhere})            # without --address the variable is used
        assert r.returncode == 2 and elsewhere in r.stderr


def test_a_job_sees_exactly_the_scanned_files_and_no_secrets(head, cli, tmp_path):
    work = tmp_path / "work"
    _ignore_tree(work)
    _write(work, {".env": "TOKEN=1\n", "id_rsa": PEM, ".aws/credentials": AWS, "list_files.py": textwrap.dedent("""
        import os
        for d, _, fs in os.walk("."):
            for f in fs:
                print("FILE", os.path.relpath(os.path.join(d, f)))
        """)})
    a = head["address"]
    r = _ebm(["submit", "--address", a, "--working-dir", str(work), "--submission-id", "hardening-1",
              "--exclude", "data/*.bin", "--", "python", "list_files.py"], head["env"])
    assert r.returncode == 0, r.stdout + r.stderr
    assert re.search(r"left out as likely secrets: .*\.env\b", r.stdout) and "id_rsa" in r.stdout
    sent = sorted(line[5:] for line in r.stdout.splitlines() if line.startswith("FILE "))
    s = jobs.prepare(["python"], working_dir=work, excludes=list(jobs.DEFAULT_EXCLUDES) + ["data/*.bin"])
    assert sent == sorted(s.files) and "src/model.py" in sent
    assert not {".env", "id_rsa", ".aws/credentials", "src/notes.log", "data/a.bin"} & set(sent)
    assert f"uploading {len(s.files)} files" in r.stdout

    # the same id again: refused before anything is uploaded; the first job is untouched
    r = cli(["submit", "--address", a, "--working-dir", str(work), "--submission-id", "hardening-1", "--",
             "echo", "second"])
    err = _one_line_error(r, "ebm submit: a job with submission id 'hardening-1' already exists")
    assert "Nothing was sent" in err and "uploading" not in r.stdout
    listed = cli(["jobs", "list", "--address", a]).stdout
    assert "hardening-1\tSUCCEEDED\tpython list_files.py" in listed and "second" not in listed
    # stopping a job that already ended says so
    r = cli(["jobs", "stop", "hardening-1", "--address", a])
    assert r.returncode == 0 and "already ended (SUCCEEDED); nothing to stop" in r.stdout
    # refusals that need no cluster: one line each, nothing sent
    (work / "conf.yaml").write_text(AWS)
    _one_line_error(cli(["submit", "--address", a, "--working-dir", str(work), "--", "ebm"]),
                    f"ebm submit: working dir {work.resolve()} would upload likely secrets: conf.yaml (an AWS secret")
    _one_line_error(cli(["submit", "--address", a, "--working-dir", str(work), "--storage", "runs", "--", "ebm"]),
                    "ebm submit: checkpoint storage 'runs' is a relative path")
    _one_line_error(cli(["submit", "--address", a, "--submission-id", "../x y", "--", "ebm"]),
                    "ebm submit: submission id '../x y' is not allowed")
    _one_line_error(cli(["submit", "--address", a, "--", "--"]), "ebm submit: nothing to run")
    _one_line_error(cli(["submit", "--address", a, "--", ""]), "ebm submit: nothing to run")
    assert cli(["jobs", "list", "--address", a]).stdout == listed


def test_ctrl_c_while_following_leaves_the_job_running_and_says_how_to_reach_it(head, cli, tmp_path):
    (tmp_path / "w").mkdir()
    a, env = head["address"], head["env"]
    p = subprocess.Popen([os.path.join(BIN, "ebm"), "submit", "--address", a, "--working-dir", str(tmp_path / "w"),
                          "--submission-id", "hardening-ctrl-c", "--", "sleep", "120"],
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in p.stdout:
            if line.startswith("submitted hardening-ctrl-c"):
                break
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 130 and "Traceback" not in err, err
    assert "job hardening-ctrl-c keeps running" in err and "ebm jobs stop hardening-ctrl-c" in err
    assert cli(["jobs", "status", "hardening-ctrl-c", "--address", a]).stdout.split("\t")[1] in ("PENDING", "RUNNING")
    r = cli(["jobs", "stop", "hardening-ctrl-c", "--address", a])
    assert r.returncode == 0 and "stop requested for hardening-ctrl-c" in r.stdout, r.stdout + r.stderr


def test_the_test_head_listens_on_loopback_only(head):
    """After the jobs above ran (so workers and agents are up): every listening socket of the head's
    processes is on 127.0.0.1."""
    deadline = time.monotonic() + 60
    while True:                                      # the raylet and the agents register after the job server
        socks = _listening(_tree(head["pid"]))
        names = {n for n, _ in socks}
        if {"gcs_server", "raylet", "ray::DashboardA", "ray::RuntimeEnv"} <= names or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert {"gcs_server", "raylet", "ray::DashboardA", "ray::RuntimeEnv"} <= names, socks
    assert all(_loopback(a) for _, a in socks), socks


def test_the_local_ray_started_by_ebm_listens_on_loopback_only(tmp_path):
    code = textwrap.dedent("""
        import os, sys, time
        from pipelines.driver.train_job import ray_init
        import ray
        assert ray_init(None, num_cpus=1)
        ray.get(ray.remote(lambda: 1).remote())
        print("READY", flush=True)
        sys.stdin.readline()
        ray.shutdown()
        """)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_"))}
    env.update(RAY_USAGE_STATS_ENABLED="0", EBM_RAY_TMPDIR=tempfile.mkdtemp(prefix="ebml", dir="/tmp"))
    p = subprocess.Popen([sys.executable, "-c", code], env=env, cwd=ROOT, stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for line in p.stdout:
            if line.startswith("READY"):
                break
        socks = _listening(_tree(p.pid))
        p.stdin.write("\n")
        p.stdin.flush()
        p.wait(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
        shutil.rmtree(env["EBM_RAY_TMPDIR"], ignore_errors=True)
    assert {"gcs_server", "raylet"} <= {n for n, _ in socks}, socks
    assert all(_loopback(a) for _, a in socks), socks
