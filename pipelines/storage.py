"""Every location a user gives — ``task.data_dir``, ``ingest --out``, ``data inspect``, ``predict
--input``, ``--storage`` — is a local path or a URI (``s3://bucket/prefix``, or anything else
:func:`pyarrow.fs.FileSystem.from_uri` resolves: ``gs://``, ``abfs://``, ``hdfs://``, ``file://``).
This module is the one place that turns such a string into a pyarrow filesystem and a path, so
datasets, checkpoints and predictions read and write alike wherever they live (Ray Data and Ray Train
use the same pyarrow filesystems).

Credentials and the endpoint come from the standard AWS environment and config files
(``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``/``AWS_PROFILE``/``AWS_REGION``, instance roles) —
an S3-compatible store (MinIO, Ceph, moto) through ``AWS_ENDPOINT_URL`` — as for every AWS tool.
Locations keep the user's spelling in messages; local paths are made absolute (workers run elsewhere).
"""
from __future__ import annotations

import functools
import os
import tempfile
from pathlib import Path

import pyarrow.fs as pafs


class StorageError(ValueError):
    """A location cannot be opened, read or written; the message names it and the cause."""


def is_uri(location: str | os.PathLike) -> bool:
    return "://" in str(location)


def absolute(location: str | os.PathLike) -> str:
    """A URI unchanged, a local path made absolute."""
    return str(location) if is_uri(location) else str(Path(location).resolve())


def join(location: str, *parts: str) -> str:
    """``location/part/...`` for a local path or a URI alike."""
    return "/".join([str(location).rstrip("/"), *(p.strip("/") for p in parts)])


def name(location: str) -> str:
    return str(location).rstrip("/").rsplit("/", 1)[-1]


def parent(location: str) -> str:
    return str(location).rstrip("/").rsplit("/", 1)[0]


def resolve(location: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path within it) of a local path or a URI; StorageError if the URI's scheme or
    bucket cannot be opened (unknown scheme, no credentials, unreachable endpoint)."""
    if not is_uri(location):
        return pafs.LocalFileSystem(), str(Path(location).resolve())
    location = str(location)
    scheme, rest = location.split("://", 1)
    try:
        if scheme in _BUCKET_SCHEMES and "?" not in rest:
            # one filesystem per bucket: opening one may ask the store for the bucket's region
            return _bucket_fs(f"{scheme}://{rest.split('/', 1)[0]}"), rest.rstrip("/")
        fs, path = pafs.FileSystem.from_uri(location)
    except Exception as e:      # ArrowInvalid for an unknown scheme, OSError for credentials/endpoint
        raise StorageError(f"{location}: cannot open this location ({e})") from None
    return fs, path.rstrip("/")


_BUCKET_SCHEMES = ("s3", "gs", "gcs")     # URIs whose filesystem path is "bucket/key"


@functools.lru_cache(maxsize=64)
def _bucket_fs(bucket_uri: str) -> pafs.FileSystem:
    return pafs.FileSystem.from_uri(bucket_uri)[0]


def uri_of(location: str, path: str) -> str:
    """The user-facing spelling of ``path`` (a path within ``location``'s filesystem)."""
    if not is_uri(location):
        return path
    return f"{str(location).split('://', 1)[0]}://{path}"


def info(location: str) -> pafs.FileInfo:
    fs, path = resolve(location)
    try:
        return fs.get_file_info(path)
    except OSError as e:
        raise StorageError(f"{location}: cannot read ({e})") from None


def exists(location: str) -> bool:
    return info(location).type != pafs.FileType.NotFound


def is_dir(location: str) -> bool:
    """A directory, or on object storage a prefix that holds objects."""
    i = info(location)
    if i.type == pafs.FileType.Directory:
        return True
    if i.type == pafs.FileType.NotFound and is_uri(location):
        return bool(list_dir(location))
    return False


def is_file(location: str) -> bool:
    return info(location).type == pafs.FileType.File


def list_dir(location: str, recursive: bool = False) -> list[pafs.FileInfo]:
    """The entries under ``location`` (none if it does not exist); paths are filesystem paths."""
    fs, path = resolve(location)
    try:
        return fs.get_file_info(pafs.FileSelector(path, allow_not_found=True, recursive=recursive))
    except OSError as e:
        raise StorageError(f"{location}: cannot list ({e})") from None


def read_bytes(location: str) -> bytes:
    fs, path = resolve(location)
    try:
        with fs.open_input_stream(path) as f:
            return f.read()
    except FileNotFoundError:
        raise
    except OSError as e:
        raise StorageError(f"{location}: cannot read ({e})") from None


def open_input_file(location: str):
    """A random-access file (Parquet reads only the footer and the row groups asked for)."""
    fs, path = resolve(location)
    return fs.open_input_file(path)


def write_bytes(location: str, data: bytes) -> None:
    """Write a whole file: on local disk through a temporary file and a rename, on object storage as
    one PUT (an object appears whole or not at all)."""
    if not is_uri(location):
        path = Path(location)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return
    fs, path = resolve(location)
    try:
        with fs.open_output_stream(path) as f:
            f.write(data)
    except OSError as e:
        raise StorageError(f"{location}: cannot write ({e})") from None


def delete_dir(location: str) -> None:
    """Remove a directory / prefix and everything under it; nothing if it does not exist."""
    _remove(location, "delete_dir")


def delete_file(location: str) -> None:
    """Remove a file / object; nothing if it does not exist."""
    _remove(location, "delete_file")


def _remove(location: str, method: str) -> None:
    fs, path = resolve(location)
    try:
        getattr(fs, method)(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        raise StorageError(f"{location}: cannot delete ({e})") from None


def upload_dir(local_dir: str | os.PathLike, location: str) -> None:
    """Copy a local directory's files to ``location`` (streamed, file by file)."""
    fs, path = resolve(location)
    try:
        pafs.copy_files(str(Path(local_dir).resolve()), path, source_filesystem=pafs.LocalFileSystem(),
                        destination_filesystem=fs)
    except OSError as e:
        raise StorageError(f"{location}: cannot write ({e})") from None


def download_dir(location: str, local_dir: str | os.PathLike) -> None:
    fs, path = resolve(location)
    try:
        pafs.copy_files(path, str(local_dir), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    except OSError as e:
        raise StorageError(f"{location}: cannot read ({e})") from None
