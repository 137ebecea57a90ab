"""Errors nsd reports to users as one line (the CLI turns them into stderr + exit code)."""


class NsdError(Exception):
    """A failure the user can act on. exit_code 1: the operation failed."""

    exit_code = 1


class UsageError(NsdError):
    """Bad input: unknown table, version, tag, malformed reference, bad option value."""

    exit_code = 2


class StoreBusy(NsdError):
    """Another process held the catalog for longer than we were willing to wait."""

    exit_code = 3


def first_line(exc: BaseException, empty: str | None = None) -> str:
    """The first non-blank line of EXC's message, for a one-line report; EMPTY (default: the
    exception's type name) when the message is blank."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if lines:
        return lines[0]
    return type(exc).__name__ if empty is None else empty
