"""Atomic file writes and provenance shared by every writer in the package."""
from __future__ import annotations

import os
import subprocess
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def atomic_path(dest: str | os.PathLike, suffix: str = "") -> Iterator[str]:
    """A temporary path beside ``dest`` to write to: renamed onto ``dest`` when the block
    succeeds, deleted when it raises, so readers never see a half-written file.
    ``suffix`` is for writers that insist on an extension (numpy's ``.npz``)."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=suffix, dir=dest.parent)
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def git_commit() -> str | None:
    """Short commit hash of the checkout this package runs from, or None outside git."""
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).parent, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def code_version() -> str:
    """This package's version plus, in a git checkout, its commit: which code computed a result."""
    from cc_core.version import __version__

    commit = git_commit()
    return f"{__version__}+{commit}" if commit else __version__
