"""The generic top-level names ``ebm``, ``pipelines`` and ``cluster`` cannot clash silently: the ``ebm``
command refuses to start (exit 2, one line naming the other distribution or the shadowing folder) when
another installed distribution claims one of them or an imported package is not the one ebm-proposals
installed. Real metadata: a ``.dist-info`` on a temporary sys.path entry, read by importlib.metadata in
a fresh ``ebm`` process."""
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration
EBM = os.path.join(os.path.dirname(sys.executable), "ebm")


def _ebm_version(tmp_path, pythonpath=None):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if pythonpath:
        env["PYTHONPATH"] = str(pythonpath)
    return subprocess.run([EBM, "--version"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)


def test_the_installed_packages_pass(tmp_path):
    r = _ebm_version(tmp_path)
    assert r.returncode == 0 and r.stdout.startswith("ebm "), r.stderr


def test_another_distribution_claiming_pipelines_is_refused(tmp_path):
    site = tmp_path / "site"
    info = site / "other_pipes-2.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: other-pipes\nVersion: 2.0\n")
    (info / "top_level.txt").write_text("pipelines\n")
    r = _ebm_version(tmp_path, site)
    assert r.returncode == 2 and r.stdout == "", r
    (line,) = r.stderr.strip().splitlines()
    assert "'pipelines'" in line and "'other-pipes'" in line and "pip uninstall other-pipes" in line


def test_a_folder_shadowing_cluster_is_refused(tmp_path):
    site = tmp_path / "site"
    (site / "cluster").mkdir(parents=True)
    (site / "cluster" / "__init__.py").write_text("")
    r = _ebm_version(tmp_path, site)
    assert r.returncode == 2, r
    (line,) = r.stderr.strip().splitlines()
    assert "'cluster'" in line and str(site / "cluster") in line and "shadows" in line


def test_a_copy_of_the_project_first_on_the_path_is_not_a_clash(tmp_path):
    """``ebm submit`` sends the project's source as the job's working dir, which Ray puts first on the
    job's path: the same project, so the job runs (a plain folder named ``cluster`` beside it still
    does not pass, above)."""
    import shutil
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    copy = tmp_path / "_ray_pkg_0123"
    for name in ("ebm", "pipelines", "cluster"):
        shutil.copytree(os.path.join(root, name), copy / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(os.path.join(root, "pyproject.toml"), copy / "pyproject.toml")
    r = _ebm_version(tmp_path, copy)
    assert r.returncode == 0 and r.stdout.startswith("ebm "), r.stderr
    (copy / "pyproject.toml").write_text('[project]\nname = "someone-else"\n')
    r = _ebm_version(tmp_path, copy)
    assert r.returncode == 2 and "shadows" in r.stderr, r
