"""File modes: what this package writes is readable as the user's umask allows.

`tempfile.mkstemp` and the safetensors writer create files 0600, so a model or architecture written into a
shared run directory would be hidden from the user's group even where their umask (e.g. 022) shares it.
"""
from __future__ import annotations

import os
from pathlib import Path


def umask_mode() -> int:
    """The mode a plain `open(..., "w")` would give a new file under the current umask."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def follow_umask(*paths: str | os.PathLike) -> None:
    """Give each file (every regular file below each folder) the mode the umask allows for new files."""
    mode = umask_mode()
    for p in map(Path, paths):
        files = [f for f in p.rglob("*") if f.is_file()] if p.is_dir() else [p]
        for f in files:
            os.chmod(f, mode)
