"""Errors a user reads: UserError (one line, exit 2), the first line of any exception, write
failures (a full disk) named in words, and "did you mean". A leaf: imports nothing of the
package."""

from __future__ import annotations


class UserError(Exception):
    """A mistake in what the user asked for. Shown as one line, never as a traceback."""


def error_text(e: BaseException) -> str:
    """What a run record and a message say of an error: a user's mistake as its own words, a
    bug with its type."""
    return str(e) if isinstance(e, UserError) else f"{type(e).__name__}: {e}"


def clip(text: str, limit: int = 160) -> str:
    """The first line of `text`, shortened to about `limit` characters at a word boundary with
    "…" (a message is never cut mid-word)."""
    line = next((ln.strip() for ln in str(text).splitlines() if ln.strip()), "")
    if len(line) <= limit:
        return line
    end = line.rfind(" ", 0, limit + 1)
    if end <= 0:  # one long word (a path): kept whole up to the next space
        end = line.find(" ", limit)
        if end == -1:
            return line
    return line[:end].rstrip(" ,;:(") + "…"


# errno values that mean "this file system will not take the write": the run stops, failed,
# with one line, and the same command continues once it will
WRITE_ERRNOS = (28, 122, 30, 5)  # ENOSPC, EDQUOT, EROFS, EIO


def write_failure(e: BaseException, folder=None) -> str | None:
    """One line for a write the file system refused, or None for any other exception. Writers
    that do not say which file (TensorBoard's) are named by the folder they write in."""
    while e is not None and not isinstance(e, OSError):
        e = e.__cause__ or e.__context__
    if e is None or e.errno not in WRITE_ERRNOS:
        return None
    where = e.filename or (f"into {folder}" if folder is not None else "")
    return f"cannot write {where}: {e.strerror}" if where else f"cannot write: {e.strerror}"


def did_you_mean(name, names) -> str:
    """The one suggestion rule for every name a user types (a config key, a group choice, a
    freeze glob, a detach point): " (did you mean X?)" or " (did you mean X or Y?)" with the
    closest of `names` by difflib's similarity (its default cutoff, 0.6), or "" when none is
    close."""
    import difflib

    close = difflib.get_close_matches(str(name), [str(n) for n in names], n=2)
    return f" (did you mean {' or '.join(close)}?)" if close else ""


def reason(e: BaseException) -> str:
    """The first line of an exception's message, or its type's name when it has none: what a
    one-line error says of a library's exception."""
    text = str(e).strip()
    return text.splitlines()[0].strip() if text else type(e).__name__


def report(e: UserError) -> None:
    """Print a user's mistake as `autograd-lab: error: ...`, one line per problem, on stderr."""
    import sys

    for line in str(e).splitlines() or [""]:
        print(f"autograd-lab: error: {line}", file=sys.stderr)


def first_line(text: str) -> str:
    """Hydra's error text, reduced to its first two non-empty lines, joined."""
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return " ".join(lines[:2]) if lines else text


EXIT_USER_ERROR = 2

EXIT_INTERRUPTED = 130  # the shell's code for SIGINT
