"""Which failures are the user's to fix, and how they are reported: one line on stderr, no traceback.

A `UserError` is raised where a bad input is recognised (a config value, a missing checkpoint, a model
that cannot be loaded) with a message naming the problem and the fix. `search.data.DataError` (bad data)
and `FileNotFoundError` count as user errors wherever they surface. Every other exception is a bug and
keeps its traceback.
"""

from __future__ import annotations

from search.data import DataError

__all__ = ["UserError", "USER_ERRORS", "one_line", "first_line"]


class UserError(Exception):
    """A bad input; the message is one line naming the problem and the fix."""


USER_ERRORS: tuple[type[BaseException], ...] = (UserError, DataError, FileNotFoundError)


def one_line(e: BaseException) -> str:
    """`e` as one line: its message with newlines folded (a missing file also names the path)."""
    if isinstance(e, FileNotFoundError) and e.filename and str(e.filename) not in str(e):
        text = f"{e.strerror or e}: {e.filename}"
    else:
        text = str(e) or type(e).__name__
    return " ".join(text.split())


def first_line(e: BaseException) -> str:
    """The first non-empty line of `e`'s message (library errors often add a screenful of advice)."""
    return next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)
