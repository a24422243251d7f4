"""Energy-based regression with learned mixture proposals: single-device math only.

Imports torch and numpy, never ray, mlflow, pyarrow or torch.distributed.
"""
from .config import Config, ConfigError

__all__ = ["Config", "ConfigError"]
__version__ = "0.1.0"
