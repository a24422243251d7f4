"""One typed config tree, validated on construction, serialisable to a flat dict.

The flat form (``{"proposal.K": 4, ...}``) goes unchanged to Ray's ``train_loop_config`` and to
MLflow params; :func:`Config.from_flat` rebuilds the tree from it. Defaults are the paper's toy-2
protocol (docs/method.md §4.7): Adam 1e-3, 75 epochs, batch 32, M = 1024, K = 4.
"""
from __future__ import annotations

import dataclasses
import math
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, get_type_hints


def read_toml(path: str | Path, what: str = "file") -> dict:
    """A TOML file as a dict; a missing file or bad TOML is a ConfigError naming the file."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{what} {path} is a directory, not a TOML file")
    if not path.is_file():
        raise ConfigError(f"{what} not found: {path}")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a TOML file (not UTF-8 text)") from None
    except OSError as e:
        raise ConfigError(f"{what} {path} cannot be read: {e.strerror or e}") from None


class ConfigError(ValueError):
    """A config value is missing, unknown or out of range; the message names the key."""


METHODS = ("ebm_learned_proposal", "nce_fixed", "nce_plus", "ml_is", "mdn", "mdn_ebm_teacher")
FEATURE_NETS = ("toy_mlp", "resnet18", "resnet_slim")
PRECISIONS = ("fp32", "bf16")


def _check(cond: bool, key: str, msg: str, value: Any) -> None:
    if not cond:
        raise ConfigError(f"{key} {msg}, got {value!r}")


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check_finite(section: Any, name: str) -> None:
    """Every float field of ``section`` is a finite number: ``inf`` passes bounds such as ``lr > 0`` and
    diverges a run at its first step, and ``nan`` deserves a clearer message than "must be > 0"."""
    for f in fields(section):
        v = getattr(section, f.name)
        if f.type in ("float", float):
            _check(_finite(v), f"{name}.{f.name}", "must be a finite number", v)
        elif f.type in ("list[float]", list[float]):
            _check(isinstance(v, (list, tuple)) and all(_finite(x) for x in v), f"{name}.{f.name}",
                   "must be a list of finite numbers", v)


@dataclass
class TaskConfig:
    name: str = "toy2"      # a generator (toy1, toy2, star) without data_dir; with one, the dataset's task
    data_dir: str = ""      # a Parquet dataset (pipelines/data): it defines the task; "" = generate in memory
    seed: int = 0           # data seed for synthetic tasks (toy2 is a fixed split)
    n_train: int = 0        # 0 = the task's default size
    n_val: int = 0
    n_test: int = 0
    image_size: int = 0     # 0 = the task's default

    def __post_init__(self):
        _check(isinstance(self.name, str), "task.name", "must be a task name", self.name)
        _check(isinstance(self.data_dir, str), "task.data_dir", "must be a path", self.data_dir)
        if not self.data_dir:
            # With a dataset the dataset defines the task (its name is taken from it, see
            # pipelines.worker.data.prepare_dataset); without one the name picks a generator.
            from .tasks import GENERATED
            _check(self.name in GENERATED, "task.name",
                   f"must name a generated task ({', '.join(GENERATED)}) when task.data_dir is empty; for any "
                   "other data ingest it (`ebm data ingest`) and set task.data_dir", self.name)
        for k in ("n_train", "n_val", "n_test", "image_size"):
            v = getattr(self, k)
            _check(isinstance(v, int) and v >= 0, f"task.{k}", "must be an integer >= 0", v)


@dataclass
class FeatureNetConfig:
    kind: str = "toy_mlp"
    hidden: int = 10        # toy MLP width
    standardize: bool = True  # toy MLP: standardise x with train-split statistics (kept in the model)
    width: int = 64         # ResNet base width (64 = ResNet-18; resnet_slim defaults to 16)
    in_channels: int = 0    # 0 = from the task's image shape

    def __post_init__(self):
        _check(self.kind in FEATURE_NETS, "features.kind", f"must be one of {FEATURE_NETS}", self.kind)
        _check(isinstance(self.hidden, int) and self.hidden >= 1, "features.hidden", "must be >= 1", self.hidden)
        _check(isinstance(self.width, int) and self.width >= 4, "features.width", "must be >= 4", self.width)
        _check(isinstance(self.in_channels, int) and self.in_channels >= 0, "features.in_channels",
               "must be >= 0", self.in_channels)


@dataclass
class EnergyHeadConfig:
    y_embed: list[int] = field(default_factory=lambda: [10, 10])  # image tasks: [16, 32, 64, 128]
    hidden: int = 10                                                # image tasks: 512
    residual_blocks: int = 1                                        # image tasks: 0

    def __post_init__(self):
        self.y_embed = list(self.y_embed)
        _check(len(self.y_embed) >= 1 and all(isinstance(w, int) and w >= 1 for w in self.y_embed),
               "energy.y_embed", "must be a non-empty list of widths >= 1", self.y_embed)
        _check(isinstance(self.hidden, int) and self.hidden >= 1, "energy.hidden", "must be >= 1", self.hidden)
        _check(isinstance(self.residual_blocks, int) and self.residual_blocks >= 0,
               "energy.residual_blocks", "must be >= 0", self.residual_blocks)


@dataclass
class ProposalConfig:
    K: int = 4
    hidden: int = 0                 # 0 = the feature width (docs/method.md §2)
    log_sigma2_min: float = -18.0   # clamp: an allowed stabiliser (docs/method.md §2)
    log_sigma2_max: float = 18.0

    def __post_init__(self):
        _check_finite(self, "proposal")
        _check(isinstance(self.K, int) and self.K >= 1, "proposal.K", "must be an integer >= 1", self.K)
        _check(isinstance(self.hidden, int) and self.hidden >= 0, "proposal.hidden", "must be >= 0", self.hidden)
        _check(self.log_sigma2_min < self.log_sigma2_max, "proposal.log_sigma2_min",
               "must be < proposal.log_sigma2_max", (self.log_sigma2_min, self.log_sigma2_max))


@dataclass
class MethodConfig:
    name: str = "ebm_learned_proposal"
    kl_weight: float = 1.0              # L_NCE + kl_weight * L_KL (paper: 1)
    teacher_nll_weight: float = 0.5     # MDN with EBM teacher: 0.5 L_KL + 0.5 NLL
    nce_plus_beta: float = 0.025
    fixed_sigmas: list[float] = field(default_factory=list)   # [] = the task's (docs/method.md §4.4, §7)

    def __post_init__(self):
        _check_finite(self, "method")
        _check(self.name in METHODS, "method.name", f"must be one of {METHODS}", self.name)
        _check(self.kl_weight >= 0, "method.kl_weight", "must be >= 0", self.kl_weight)
        _check(0 <= self.teacher_nll_weight <= 1, "method.teacher_nll_weight", "must be in [0, 1]",
               self.teacher_nll_weight)
        _check(self.nce_plus_beta > 0, "method.nce_plus_beta", "must be > 0", self.nce_plus_beta)
        self.fixed_sigmas = [float(s) for s in self.fixed_sigmas]
        _check(all(s > 0 for s in self.fixed_sigmas), "method.fixed_sigmas", "must all be > 0", self.fixed_sigmas)


@dataclass
class SamplerConfig:
    M_train: int = 1024
    M_eval: int = 1024
    refine_steps: int = 10          # gradient-ascent refinement of the mode (0 = off)

    def __post_init__(self):
        for k in ("M_train", "M_eval"):
            v = getattr(self, k)
            _check(isinstance(v, int) and v >= 1, f"sampler.{k}", "must be an integer >= 1", v)
        _check(isinstance(self.refine_steps, int) and self.refine_steps >= 0, "sampler.refine_steps",
               "must be >= 0", self.refine_steps)


@dataclass
class OptimConfig:
    lr: float = 1e-3
    weight_decay: float = 0.0
    batch_size: int = 32
    epochs: int = 75
    grad_clip: float = 0.0          # 0 = off (the paper uses none)
    precision: str = "fp32"         # "bf16": autocast for the backbone and the energy head (losses stay fp32)
    accumulate: int = 1             # micro-batches of batch_size per optimiser step (effective batch k·b)
    grad_comm: str = "fp32"         # DDP gradient communication dtype ("bf16" halves the bytes; 1 worker: none)

    def __post_init__(self):
        _check_finite(self, "optim")
        _check(self.precision in PRECISIONS, "optim.precision", f"must be one of {PRECISIONS}", self.precision)
        _check(isinstance(self.accumulate, int) and not isinstance(self.accumulate, bool) and self.accumulate >= 1,
               "optim.accumulate", "must be an integer >= 1", self.accumulate)
        _check(self.grad_comm in PRECISIONS, "optim.grad_comm", f"must be one of {PRECISIONS}", self.grad_comm)
        _check(self.lr > 0, "optim.lr", "must be > 0", self.lr)
        _check(self.weight_decay >= 0, "optim.weight_decay", "must be >= 0", self.weight_decay)
        _check(isinstance(self.batch_size, int) and self.batch_size >= 1, "optim.batch_size", "must be >= 1",
               self.batch_size)
        _check(isinstance(self.epochs, int) and self.epochs >= 1, "optim.epochs", "must be >= 1", self.epochs)
        _check(self.grad_clip >= 0, "optim.grad_clip", "must be >= 0", self.grad_clip)


@dataclass
class ScheduleConfig:
    freeze_backbone_epochs: int = 0     # image tasks in the paper: 20
    proposal_warmup_epochs: int = 0     # head pose in the paper: 1

    def __post_init__(self):
        for k in ("freeze_backbone_epochs", "proposal_warmup_epochs"):
            v = getattr(self, k)
            _check(isinstance(v, int) and v >= 0, f"schedule.{k}", "must be an integer >= 0", v)


@dataclass
class EvalConfig:
    grid_nll: bool = True           # log-space quadrature on the task grid (D <= 3)
    select: str = "last"            # "last" epoch or "best_val" (lowest validation NLL)
    every: int = 1                  # validate every N epochs
    batch_size: int = 64
    interval_level: float = 0.9
    # what each epoch's validation computes: "all" figures, or "nll" — only the NLL that eval.select and
    # the curves read (and the exact KL where the task has a true density): no IS prediction, CRPS,
    # coverage or PITs, about 60 % of a star validation. The draws are per evaluation batch, so training
    # and the selected epoch are the same either way; the test split always gets every figure.
    val_figures: str = "all"

    def __post_init__(self):
        _check_finite(self, "eval")
        _check(self.val_figures in ("all", "nll"), "eval.val_figures", "must be 'all' or 'nll'", self.val_figures)
        _check(self.select in ("last", "best_val"), "eval.select", "must be 'last' or 'best_val'", self.select)
        _check(isinstance(self.every, int) and self.every >= 1, "eval.every", "must be >= 1", self.every)
        _check(isinstance(self.batch_size, int) and self.batch_size >= 1, "eval.batch_size", "must be >= 1",
               self.batch_size)
        _check(0 < self.interval_level < 1, "eval.interval_level", "must be in (0, 1)", self.interval_level)


@dataclass
class Config:
    task: TaskConfig = field(default_factory=TaskConfig)
    features: FeatureNetConfig = field(default_factory=FeatureNetConfig)
    energy: EnergyHeadConfig = field(default_factory=EnergyHeadConfig)
    proposal: ProposalConfig = field(default_factory=ProposalConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    seed: int = 0

    def __post_init__(self):
        _check(isinstance(self.seed, int), "seed", "must be an integer", self.seed)
        # an energy-only model has no proposal to estimate log Z with: its NLL needs the grid
        _check(self.eval.grid_nll or self.method.name not in ("nce_fixed", "nce_plus", "ml_is"), "eval.grid_nll",
               f"must be true for method.name = {self.method.name!r} (no learned proposal, so no IS NLL)",
               self.eval.grid_nll)

    # -- serialisation -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_flat(self) -> dict[str, Any]:
        """``{"section.key": value}``; lists stay lists (MLflow stringifies them)."""
        flat: dict[str, Any] = {}
        for name, value in self.to_dict().items():
            if isinstance(value, dict):
                flat.update({f"{name}.{k}": v for k, v in value.items()})
            else:
                flat[name] = value
        return flat

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Config":
        sections = {f.name: f for f in fields(cls)}
        unknown = sorted(set(d) - set(sections))
        if unknown:
            raise ConfigError(f"unknown config section(s) {unknown}; known: {sorted(sections)}")
        kwargs: dict[str, Any] = {}
        hints = get_type_hints(cls)
        for name, value in d.items():
            sub = hints[name]
            if dataclasses.is_dataclass(sub):
                if not isinstance(value, dict):
                    raise ConfigError(f"[{name}] must be a table of keys, got {value!r}")
                known = {f.name for f in fields(sub)}
                bad = sorted(set(value) - known)
                if bad:
                    raise ConfigError(f"unknown key(s) {[f'{name}.{b}' for b in bad]}; known in [{name}]: "
                                      f"{sorted(known)}")
                sub_hints = get_type_hints(sub)
                kwargs[name] = sub(**{k: _coerce(f"{name}.{k}", v, sub_hints[k]) for k, v in value.items()})
            else:
                kwargs[name] = _coerce(name, value, sub)
        return cls(**kwargs)

    @classmethod
    def from_flat(cls, flat: dict[str, Any]) -> "Config":
        nested: dict[str, Any] = {}
        for key, value in flat.items():
            if "." in key:
                section, sub = key.split(".", 1)
                nested.setdefault(section, {})[sub] = value
            else:
                nested[key] = value
        return cls.from_dict(nested)

    @classmethod
    def from_toml(cls, path: str | Path, overrides: list[str] | None = None) -> "Config":
        """The file's values over the defaults, then ``overrides``; validated once, on the result (so
        an override may complete what the file leaves open, e.g. ``task.data_dir``)."""
        flat = Config().to_flat()
        for name, value in read_toml(path, "config file").items():
            if isinstance(value, dict) and name in _SECTIONS:
                flat.update({f"{name}.{k}": v for k, v in value.items()})
            else:
                flat[name] = value
        return cls.from_flat(_apply_overrides(flat, overrides or []))

    def with_overrides(self, overrides: list[str]) -> "Config":
        """Apply ``section.key=value`` strings (values parsed as TOML, else taken as strings)."""
        if not overrides:
            return self
        return Config.from_flat(_apply_overrides(self.to_flat(), overrides))

    def to_toml(self) -> str:
        lines = [f"seed = {_toml_value(self.seed)}"]
        for name, value in self.to_dict().items():
            if isinstance(value, dict):
                lines.append(f"\n[{name}]")
                lines += [f"{k} = {_toml_value(v)}" for k, v in value.items()]
        return "\n".join(lines) + "\n"


_SECTIONS = ("task", "features", "energy", "proposal", "method", "sampler", "optim", "schedule", "eval")


def _apply_overrides(flat: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """``section.key=value`` strings applied to a flat dict (values parsed as TOML, else strings)."""
    flat = dict(flat)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        if key not in flat:
            import difflib
            close = difflib.get_close_matches(key, list(flat), n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ConfigError(f"override names unknown key {key!r}{hint}; known: {sorted(flat)}")
        try:
            value = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw
        flat[key] = value
    return flat


def _coerce(key: str, value: Any, typ: Any) -> Any:
    """Flat dicts come back from MLflow/Ray as strings or numbers: turn them into the field's type."""
    t = getattr(typ, "__origin__", None) or typ
    try:
        if t is bool:
            if isinstance(value, str):
                if value.lower() not in ("true", "false"):
                    raise ValueError(value)
                return value.lower() == "true"
            return bool(value)
        if t is int:
            # an integral float is taken (TOML's 1e3), one beyond 2**53 is not an exact integer
            exact = not isinstance(value, float) or (value.is_integer() and abs(value) <= 2**53)
            if isinstance(value, bool) or not exact:
                raise ValueError(value)
            return int(value)
        if t is float:
            if isinstance(value, bool):         # float(True) would be 1.0
                raise ValueError(value)
            return float(value)
        if t is list:
            if isinstance(value, str):
                value = tomllib.loads(f"v = {value}")["v"]
            if not isinstance(value, (list, tuple)):
                raise ValueError(value)
            return list(value)
        if t is str:
            if not isinstance(value, str):
                raise ValueError(value)
            return value
    except (ValueError, TypeError, OverflowError, tomllib.TOMLDecodeError):
        raise ConfigError(f"{key} must be of type {getattr(t, '__name__', t)}, got {value!r}") from None
    return value


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return repr(v)
