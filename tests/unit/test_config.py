import pytest

from ebm.config import Config, ConfigError

pytestmark = pytest.mark.unit


def test_defaults_are_the_paper_protocol():
    c = Config()
    assert (c.optim.lr, c.optim.epochs, c.optim.batch_size, c.sampler.M_train, c.proposal.K) == (1e-3, 75, 32, 1024, 4)


def test_flat_round_trip_including_strings_from_mlflow():
    c = Config().with_overrides(["proposal.K=8", "energy.y_embed=[16, 32]", "method.name=mdn"])
    flat = c.to_flat()
    assert flat["proposal.K"] == 8 and flat["method.name"] == "mdn"
    assert Config.from_flat(flat) == c
    as_strings = {k: str(v) if not isinstance(v, str) else v for k, v in flat.items()}
    as_strings["eval.grid_nll"] = "True"
    assert Config.from_flat(as_strings) == c


def test_toml_round_trip(tmp_path):
    c = Config().with_overrides(["seed=3", "task.name=star", "features.kind=resnet_slim"])
    p = tmp_path / "c.toml"
    p.write_text(c.to_toml())
    assert Config.from_toml(p) == c


@pytest.mark.parametrize("override,match", [
    ("proposal.K=0", "proposal.K"),
    ("optim.lr=-1", "optim.lr"),
    ("method.name=banana", "method.name"),
    ("features.kind=vgg", "features.kind"),
    ("sampler.M_train=2.5", "sampler.M_train"),
    ("eval.select=worst", "eval.select"),
    ("proposal.nonsense=1", "unknown key"),
    ("K=4", "unknown key"),
    ("noequals", "section.key=value"),
    ("optim.lr=inf", "optim.lr must be a finite number"),
    ("optim.lr=nan", "optim.lr must be a finite number"),
    ("optim.grad_clip=inf", "optim.grad_clip must be a finite number"),
    ("method.kl_weight=inf", "method.kl_weight must be a finite number"),
    ("method.fixed_sigmas=[0.1, nan]", "method.fixed_sigmas must be a list of finite numbers"),
    ("proposal.log_sigma2_min=-inf", "proposal.log_sigma2_min must be a finite number"),
    ("eval.interval_level=nan", "eval.interval_level must be a finite number"),
    ("optim.lr=true", "optim.lr must be of type float"),
    ("optim.epochs=1e300", "optim.epochs must be of type int"),
    ("optim.lrr=0.1", "did you mean optim.lr"),
])
def test_bad_values_name_the_key(override, match):
    with pytest.raises(ConfigError, match=match):
        Config().with_overrides([override])


def test_unknown_section_and_bad_file(tmp_path):
    with pytest.raises(ConfigError, match="unknown config section"):
        Config.from_dict({"optimiser": {}})
    with pytest.raises(ConfigError, match="not found"):
        Config.from_toml(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[optim\nlr = 1")
    with pytest.raises(ConfigError, match="not valid TOML"):
        Config.from_toml(bad)
    bad.write_bytes(b"# caf\xe9\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        Config.from_toml(bad)
    with pytest.raises(ConfigError, match="is a directory"):
        Config.from_toml(tmp_path)


def test_non_finite_floats_are_refused_however_the_config_is_built():
    from ebm.config import OptimConfig
    with pytest.raises(ConfigError, match="optim.lr must be a finite number"):
        OptimConfig(lr=float("inf"))
    with pytest.raises(ConfigError, match="optim.lr must be a finite number"):
        Config.from_flat({**Config().to_flat(), "optim.lr": "nan"})      # strings, as MLflow params come back
    assert Config.from_flat({**Config().to_flat(), "optim.epochs": 1e3}).optim.epochs == 1000


def test_an_energy_only_method_needs_the_grid_nll():
    with pytest.raises(ConfigError, match="eval.grid_nll must be true for method.name = 'nce_fixed'"):
        Config.from_dict({"method": {"name": "nce_fixed"}, "eval": {"grid_nll": False}})
