"""The fenced code blocks of the README and docs/*.md, and the shell commands in them: what
tests/integration/test_your_data.py runs and tests/integration/test_docs_commands.py accounts for.

A block is ```` ```LANG ```` ... ```` ``` ```` at the start of a line. Shell blocks are ``sh``, ``bash``,
``shell`` and ``console``; in a ``console`` block the commands are the lines after ``$ `` and the lines
that follow a command, up to the next one, are its expected output."""
from __future__ import annotations

import os
import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHELL = ("sh", "bash", "shell", "console")
_FENCE = re.compile(r"^```([\w+-]*)[^\n]*\n(.*?)^```[ \t]*$", flags=re.S | re.M)
_HEREDOC = re.compile(r"<<-?\s*(['\"]?)(\w+)\1")


@dataclass
class Block:
    path: Path
    line: int               # the line of the opening fence, 1-based
    lang: str
    text: str

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT) if self.path.is_relative_to(ROOT) else self.path}:{self.line}"


@dataclass
class Command:
    text: str               # as written: continuation lines and any here-document included
    block: Block
    output: list[str] = field(default_factory=list)     # console blocks: the lines shown after it

    @property
    def key(self) -> str:
        """The command without comments, continuation breaks, here-document bodies or spacing
        differences: what a list of commands names it by."""
        first = self.text.split("\n<<HEREDOC>>", 1)[0]
        try:
            return " ".join(shlex.split(first, comments=True))
        except ValueError:                                  # unbalanced quotes: keep the text
            return " ".join(first.split())


def blocks(path: Path | str, langs: tuple[str, ...] | None = None) -> list[Block]:
    path = Path(path)
    text = path.read_text()
    found = [Block(path, text.count("\n", 0, m.start()) + 1, m.group(1).lower(), m.group(2))
             for m in _FENCE.finditer(text)]
    return [b for b in found if langs is None or b.lang in langs]


def commands(block: Block) -> list[Command]:
    """The block's commands, one per logical line: ``\\``-continued lines are joined and a here-document's
    body belongs to the command that opens it."""
    lines = block.text.splitlines()
    out: list[Command] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        i += 1
        if block.lang == "console":
            if not line.startswith("$ "):
                if out:
                    out[-1].output.append(line)
                continue
            line = line[2:]
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        while line.endswith("\\") and i < len(lines):
            line = line[:-1] + " " + lines[i].strip()
            i += 1
        text = line
        doc = _HEREDOC.search(line)
        if doc:
            body = []
            while i < len(lines) and lines[i].strip() != doc.group(2):
                body.append(lines[i])
                i += 1
            i += 1
            text = line + "\n<<HEREDOC>>\n" + "\n".join(body)
        out.append(Command(text, block))
    return out


def documents() -> list[Path]:
    """The README and every page under docs/."""
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def output_matches(expected: str, got: str) -> bool:
    """A line shown in a console block is in ``got``; ``…`` in it stands for any text (a path, say)."""
    pattern = ".*".join(re.escape(part) for part in expected.strip().split("…"))
    return re.search(pattern, got) is not None


def user_env(**extra: str) -> dict:
    """The environment of a user's shell with the venv activated (its bin first on PATH) and none of the
    test run's MLflow, storage, console or Ray settings: the documented defaults apply (``./mlruns.db``,
    ``./runs``, a local Ray). An earlier in-process test's mlflow.set_registry_uri leaves
    MLFLOW_REGISTRY_URI set, hence the list."""
    drop = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "EBM_STORAGE_PATH", "EBM_QUIET", "EBM_LOG_LEVEL",
            "EBM_PROGRESS", "RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "PYTHONPATH")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    return {**env, "PATH": os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", ""),
            "RAY_USAGE_STATS_ENABLED": "0", "EBM_RAY_TMPDIR": "", **extra}
