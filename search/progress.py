"""Progress bars for long work: shown when `progress_bar=true`, on the main process, and only when stderr is a
terminal (a log file gets the stages' periodic INFO lines instead of a bar redrawn thousands of times)."""

from __future__ import annotations

import sys
from typing import Any, Iterable

from tqdm.auto import tqdm


def progress_bar(iterable: Iterable[Any] | None = None, *, progress: bool, main: bool = True, **kwargs: Any) -> tqdm:
    """`tqdm(iterable, **kwargs)`, disabled unless `progress`, `main` and stderr is a terminal."""
    return tqdm(iterable, disable=not (progress and main and sys.stderr.isatty()), **kwargs)
