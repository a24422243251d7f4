"""The distribution ``ebm-proposals`` installs three generic top-level packages, ``ebm``, ``pipelines``
and ``cluster`` (the project's layout). Another installed distribution that ships one of these names
would overwrite or shadow ours, and Python would import whichever comes first without a word: the
``ebm`` command checks at start that nobody else provides them and that the modules it imports are the
ones this distribution installed, and refuses to run otherwise (exit 2, one line)."""
from __future__ import annotations

import functools
import importlib.util
import json
import sys
from importlib import metadata
from pathlib import Path
from urllib.parse import unquote, urlparse

DISTRIBUTION = "ebm-proposals"
TOP_LEVEL = ("ebm", "pipelines", "cluster")
_FIX = "install ebm-proposals in a virtual environment of its own (python -m venv .venv; make install)"


def _canonical(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def _installed_dir(name: str) -> Path | None:
    """Where this distribution put package ``name``: from its file list, or for an editable install
    (``pip install -e``) the source tree named in ``direct_url.json``; None when it is not installed
    (running from a source checkout)."""
    try:
        dist = metadata.distribution(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return None
    for f in dist.files or ():
        if f.parts[:1] == (name,) and f.name == "__init__.py" and len(f.parts) == 2:
            return Path(dist.locate_file(f)).resolve().parent
    try:
        direct = json.loads(dist.read_text("direct_url.json") or "{}")
    except ValueError:
        return None
    if direct.get("dir_info", {}).get("editable") and direct.get("url", "").startswith("file:"):
        return (Path(unquote(urlparse(direct["url"]).path)) / name).resolve()
    return None


def _project_copy(root: Path) -> bool:
    """Whether ``root`` is a copy of this project's source (its pyproject.toml names ebm-proposals): a
    checkout run from its root, or the working directory ``ebm submit`` sends with a Ray job, which Ray
    puts first on the job's path — the same code by intent, not a clash."""
    import tomllib
    try:
        meta = tomllib.loads((root / "pyproject.toml").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return _canonical(str(meta.get("project", {}).get("name", ""))) == DISTRIBUTION


@functools.lru_cache(maxsize=1)
def clash() -> str | None:
    """One line naming a clash of the top-level names with another distribution, or None."""
    providers = metadata.packages_distributions()
    for name in TOP_LEVEL:
        others = sorted({d for d in providers.get(name, ()) if _canonical(d) != DISTRIBUTION})
        if others:
            return (f"the top-level package '{name}' of ebm-proposals is also installed by the distribution "
                    f"{others[0]!r}: one overwrites or shadows the other; pip uninstall {others[0]}, or {_FIX}")
    for name in TOP_LEVEL:
        want = _installed_dir(name)
        if want is None:
            continue
        module = sys.modules.get(name)
        origin = getattr(module, "__file__", None) if module else getattr(importlib.util.find_spec(name), "origin", None)
        if origin is None:
            continue
        got = Path(origin).resolve().parent
        if got != want and not _project_copy(got.parent):
            return (f"the package '{name}' imported from {got} is not the one ebm-proposals installed ({want}): "
                    f"something on sys.path (PYTHONPATH, the current directory) shadows it; remove it, or {_FIX}")
    return None
