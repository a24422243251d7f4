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
