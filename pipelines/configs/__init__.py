"""The packaged configs (``*.toml`` beside this file) and the one way a front end names a config."""
from __future__ import annotations

from pathlib import Path

from ebm.config import ConfigError

CONFIG_DIR = Path(__file__).parent


def resolve_config(name: str) -> Path:
    """A path, or the name of a packaged config (``toy2`` -> pipelines/configs/toy2.toml)."""
    p = Path(name)
    if p.is_file():
        return p
    packaged = CONFIG_DIR / (name if name.endswith(".toml") else f"{name}.toml")
    if packaged.is_file():
        return packaged
    known = sorted(c.stem for c in CONFIG_DIR.glob("*.toml"))
    raise ConfigError(f"config {name!r} is neither a file nor a packaged config; packaged: {known}")
