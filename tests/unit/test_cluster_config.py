"""ray_cluster.yaml is schema-valid and in step with the project; upload and storage checks."""
import json
import os
import tomllib

import jsonschema
import pytest
import ray
import yaml

from cluster import jobs

pytestmark = pytest.mark.unit
ROOT = os.path.join(os.path.dirname(__file__), "..", "..")


def _cfg():
    with open(os.path.join(ROOT, "ray_cluster.yaml")) as f:
        return yaml.safe_load(f)


def test_cluster_yaml_validates_against_the_schema_ray_ships():
    with open(os.path.join(os.path.dirname(ray.__file__), "autoscaler", "ray-schema.json")) as f:
        schema = json.load(f)
    jsonschema.validate(_cfg(), schema)


def test_cluster_yaml_installs_this_project_with_the_pinned_torch():
    cfg = _cfg()
    setup = "\n".join(cfg["setup_commands"])
    assert "pip install -q -e ~/ebm-proposals" in setup and "torch==2.13.0" in setup
    assert cfg["file_mounts"]["~/ebm-proposals"] == "."
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        deps = tomllib.load(f)["project"]["dependencies"]
    ray_pin = next(d for d in deps if d.startswith("ray["))
    assert ray_pin.endswith("==" + ray.__version__)
    types = cfg["available_node_types"]
    assert types[cfg["head_node_type"]]["resources"].get("GPU", 0) == 0
    assert any(t["resources"].get("GPU", 0) >= 1 and t["max_workers"] >= 1 for t in types.values())


def test_cluster_yaml_binds_services_to_loopback_and_holds_no_secrets():
    text = open(os.path.join(ROOT, "ray_cluster.yaml")).read()
    assert "--dashboard-host=127.0.0.1" in text and "--host 127.0.0.1" in text
    assert "0.0.0.0" not in text
    for word in ("aws_secret_access_key", "AKIA", "password", "token:"):
        assert word.lower() not in text.lower()


def test_upload_scan_excludes_and_refuses_oversized_dirs(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.py").write_text("x = 1\n")
    (tmp_path / ".venv" / "lib").mkdir(parents=True)
    (tmp_path / ".venv" / "lib" / "big.so").write_bytes(b"\0" * 3_000_000)
    (tmp_path / "model.pt").write_bytes(b"\0" * 2_000_000)
    s = jobs.scan_working_dir(tmp_path)
    assert s.n_files == 1 and s.total_bytes == 6
    (tmp_path / "data.bin").write_bytes(b"\0" * 2_000_000)
    with pytest.raises(jobs.SubmitError, match=r"data\.bin \(1\.9 MiB\)"):
        jobs.check_upload(tmp_path, jobs.DEFAULT_EXCLUDES, limit=1_000_000)
    assert jobs.check_upload(tmp_path, list(jobs.DEFAULT_EXCLUDES) + ["*.bin"], limit=1_000_000).n_files == 1


def test_node_local_storage_is_refused_for_multi_node_clusters():
    jobs.check_storage("/tmp/ckpt", n_nodes=1, shared_fs=False)
    jobs.check_storage("s3://bucket/ebm", n_nodes=4, shared_fs=False)
    jobs.check_storage("/mnt/nfs/ebm", n_nodes=4, shared_fs=True)
    with pytest.raises(jobs.SubmitError, match="local path, but the cluster has 4 nodes"):
        jobs.check_storage("/tmp/ckpt", n_nodes=4, shared_fs=False)


def test_runtime_env_forwards_the_tracking_uri(monkeypatch, tmp_path):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    env = jobs.build_runtime_env(tmp_path, [".venv"], {"EBM_STORAGE_PATH": "s3://b/x"})
    assert env["env_vars"]["MLFLOW_TRACKING_URI"] == "http://127.0.0.1:5000"
    assert env["env_vars"]["EBM_STORAGE_PATH"] == "s3://b/x" and env["excludes"] == [".venv"]


def test_cluster_package_never_imports_ebm():
    import ast
    for name in os.listdir(os.path.join(ROOT, "cluster")):
        if name.endswith(".py"):
            tree = ast.parse(open(os.path.join(ROOT, "cluster", name)).read())
            mods = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)] + \
                   [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
            assert not any(m and (m == "ebm" or m.startswith("ebm.")) for m in mods), name
