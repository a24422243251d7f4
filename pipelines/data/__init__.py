"""Datasets as sharded Parquet: ingest from the paper's formats, validate, inspect, stream.

See :mod:`pipelines.data.layout` for the on-disk layout. Submodules import pyarrow/Pillow (and Ray
only where asked for), so importing this package stays light.
"""
from .layout import FORMAT_VERSION, DatasetError, read_metadata, validate

__all__ = ["FORMAT_VERSION", "DatasetError", "read_metadata", "validate"]
