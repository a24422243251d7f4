import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))     # tests/faults.py: fault injection lives with the tests

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
SHARED = os.path.join(os.path.dirname(__file__), "..", "..", "shared")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def shared_dir():
    path = os.path.abspath(SHARED)
    if not os.path.isdir(os.path.join(path, "data")):
        pytest.skip("../shared/data is not beside this checkout")
    return path


@pytest.fixture(scope="module")
def ray_local():
    """A local Ray for one test module (a module may define its own): 2 CPUs on loopback, a small
    object store, the dashboard (Ray Train's placement-group cleanup needs it); shut down after."""
    import ray
    ray.init(num_cpus=2, _node_ip_address="127.0.0.1", include_dashboard=True, dashboard_host="127.0.0.1",
             object_store_memory=200 * 1024 * 1024, log_to_driver=False)
    yield
    ray.shutdown()
