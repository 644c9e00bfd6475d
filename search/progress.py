"""Progress bars for long work: shown when `progress_bar=true`, on the main process, and only when stderr is a
terminal (a log file gets the stages' periodic INFO lines instead of a bar redrawn thousands of times)."""

from __future__ import annotations

import sys
from typing import Any, Iterable

from tqdm.auto import tqdm


_enabled = True  # the run's `progress_bar` setting (`configure`), for bars deep inside a stage such as evaluation's


def configure(progress: bool) -> None:
    """Apply a run's `progress_bar` setting: to `progress_bar`'s default and to the libraries' own bars (datasets'
    tokenising, transformers' weight loading), which would otherwise print into a log file or a disabled console."""
    global _enabled
    _enabled = progress
    import datasets
    from transformers.utils import logging as hf_logging

    if progress and sys.stderr.isatty():
        datasets.enable_progress_bars()
        hf_logging.enable_progress_bar()
    else:
        datasets.disable_progress_bars()
        hf_logging.disable_progress_bar()


def progress_bar(iterable: Iterable[Any] | None = None, *, progress: bool | None = None, main: bool = True,
                 **kwargs: Any) -> tqdm:
    """`tqdm(iterable, **kwargs)`, disabled unless `progress` (default: the run's setting, see `configure`), `main`
    and stderr is a terminal."""
    on = _enabled if progress is None else progress
    return tqdm(iterable, disable=not (on and main and sys.stderr.isatty()), **kwargs)
