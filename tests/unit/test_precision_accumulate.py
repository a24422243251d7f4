"""optim.precision / optim.accumulate / optim.grad_comm: validated, serialised, and what they do."""
from __future__ import annotations

import pytest

from ebm.config import Config, ConfigError


@pytest.mark.parametrize("override,match", [
    ("optim.precision=fp16", "optim.precision must be one of"),
    ("optim.accumulate=0", "optim.accumulate must be an integer >= 1"),
    ("optim.accumulate=1.5", "optim.accumulate must be of type int"),
    ("optim.grad_comm=int8", "optim.grad_comm must be one of"),
])
def test_bad_values_name_the_key(override, match):
    with pytest.raises(ConfigError, match=match):
        Config().with_overrides([override])


def test_keys_round_trip_through_the_flat_form():
    cfg = Config().with_overrides(["optim.precision=bf16", "optim.accumulate=4", "optim.grad_comm=bf16"])
    flat = {k: str(v) for k, v in cfg.to_flat().items()}       # as MLflow params come back
    back = Config.from_flat(flat)
    assert (back.optim.precision, back.optim.accumulate, back.optim.grad_comm) == ("bf16", 4, "bf16")
    assert Config().optim.precision == "fp32" and Config().optim.accumulate == 1
