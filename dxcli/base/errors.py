"""Errors a user can cause. The CLI prints them as one red line; everything else is a bug."""

from __future__ import annotations

from pathlib import Path


class DxError(Exception):
    """A failure caused by input or environment (exit status 1)."""

    exit_code = 1


class UsageError(DxError):
    """A bad flag or argument value (exit status 2)."""

    exit_code = 2


class Interrupted(DxError):
    """Stopped by Ctrl-C or SIGTERM after saving what can be resumed (exit status 130, as a shell
    reports a SIGINT)."""

    exit_code = 130


# errno values of filesystem failures the user can fix (a read-only disk, a file where a folder
# belongs, no space, no permission): reported as one line naming the path, not as a traceback
USER_OS_ERRNOS = frozenset({13, 17, 20, 21, 28, 30, 1, 122})  # EACCES EEXIST ENOTDIR EISDIR ENOSPC EROFS EPERM EDQUOT


def user_os_error(exc: OSError) -> DxError | None:
    """The one-line DxError for a user-fixable filesystem failure that names its path, else None."""
    if exc.errno not in USER_OS_ERRNOS or not exc.filename:
        return None
    return DxError(f"cannot write {exc.filename}: {exc.strerror}")


def first_line(exc: BaseException) -> str:
    """An exception's message cut to its first line (without a final full stop), for one-line
    errors that quote a library's failure; its type's name when it has no message."""
    text = str(exc).strip()
    return text.splitlines()[0].rstrip(".") if text else type(exc).__name__


def refuse_nonempty_out(out: Path, force: bool) -> None:
    """Nothing is overwritten without asking: an `--out` that exists and is not an empty folder is a
    usage error unless `force`."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise UsageError(f"{out} exists and is not empty; pass --force to write into it")
