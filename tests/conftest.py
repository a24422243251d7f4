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
