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
