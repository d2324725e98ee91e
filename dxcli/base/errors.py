"""Errors a user can cause. The CLI prints them as one red line; everything else is a bug."""


class DxError(Exception):
    """A failure caused by input or environment (exit status 1)."""

    exit_code = 1


class UsageError(DxError):
    """A bad flag or argument value (exit status 2)."""

    exit_code = 2
