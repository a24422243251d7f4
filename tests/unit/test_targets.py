"""Declaring a new task's targets at ingest (pipelines.data.ingest.declare_targets): circular
periods, per-dim σ's, grids, and clear errors."""
import math

import numpy as np
import pytest

from ebm.tasks import TaskSpec, task_from_metadata
from pipelines.data.ingest import declare_targets
from pipelines.data.layout import DatasetError
from pipelines.driver.runs import default_stamp, storage_root

pytestmark = pytest.mark.unit


def _y():
    rng = np.random.default_rng(0)
    return np.stack([rng.uniform(0, 360, 50), rng.uniform(0, 1000, 50)], 1).astype(np.float32)


def test_degrees_become_radians_and_each_dim_gets_its_own_sigmas():
    meta, y = declare_targets("t", _y(), ["angle", "size"], {"circular": {"angle": 360.0}})
    assert 0 <= y[:, 0].min() and y[:, 0].max() < 2 * math.pi
    np.testing.assert_allclose(y[:, 0], np.mod(_y()[:, 0], 360) * (2 * math.pi / 360), rtol=1e-6)
    assert meta["circular"] == [True, False] and meta["circular_source_period"] == {"angle": 360.0}
    s1, s2 = meta["fixed_sigmas"]
    assert s1[0] == 0.05 and s2[0] == 0.8                   # radians for the angle
    assert 9 < s1[1] < 12 and 190 < s2[1] < 230             # 1 % and 20 % of the size grid
    spec = task_from_metadata({**meta, "input": {"kind": "vector", "column": "x", "dim": 2}})
    assert isinstance(spec, TaskSpec) and spec.fixed_sigmas[1][1] == pytest.approx(s2[1])


def test_bad_circular_declarations_are_refused():
    with pytest.raises(DatasetError, match="the period must be > 0"):
        declare_targets("t", _y(), ["angle", "size"], {"circular": {"angle": 0.0}})
    with pytest.raises(DatasetError, match="taken as radians, but its values span"):
        declare_targets("t", _y(), ["angle", "size"], {"circular": {"angle": None}})
    with pytest.raises(DatasetError, match="not target columns"):
        declare_targets("t", _y(), ["angle", "size"], {"circular": {"phase": None}})
    with pytest.raises(DatasetError, match="does not hold the data's range"):
        declare_targets("t", _y(), ["angle", "size"], {"grid": {"size": (0, 10, 64)}})
    with pytest.raises(DatasetError, match="targets of 1 to 3 dims"):
        declare_targets("t", np.zeros((5, 4), np.float32), list("abcd"), {})


def test_storage_uris_stay_uris_and_default_names_do_not_collide():
    assert storage_root("s3://bucket/ebm") == "s3://bucket/ebm"
    assert storage_root("runs").startswith("/")
    assert len({default_stamp() for _ in range(50)}) == 50
