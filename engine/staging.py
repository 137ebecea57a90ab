"""Staging directories: where a command keeps Parquet parts before it commits them. Each one's
name carries its host and pid, so the directories of processes that are gone (killed with -9,
say) are found and removed (by the next command that stages, and by `nsd gc`)."""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from nsd.engine.runtime import host_name, pid_alive

if TYPE_CHECKING:  # the store imports this module
    from nsd.engine.store import Store

_STAGE_RE = re.compile(r"^stage-(?P<host>.+)-(?P<pid>\d+)-[^-]+$")


def staging_base(store: Store) -> Path:
    return (store.root / "staging") if store.kind == "local" else Path(tempfile.gettempdir()) / "nsd-staging"


def staging_prefix() -> str:
    """Name prefix of this process's staging directories: who owns one is in its name."""
    return f"stage-{host_name()}-{os.getpid()}-"


def stale_staging(base: Path, cutoff: float | None = None) -> list[Path]:
    """Staging directories of processes on this host that are gone; with CUTOFF (epoch
    seconds) also unowned ones (older nsd) last changed before it."""
    out = []
    for path, owner in _entries(base):
        if not path.name.startswith("stage-") or path.is_symlink() or not path.is_dir():
            continue
        if owner:
            if not _alive(owner):
                out.append(path)
        elif cutoff is not None and _mtime(path) < cutoff:
            out.append(path)
    return sorted(out)


def running_since(base: Path) -> float | None:
    """When the oldest staging directory of a live process (or one on another host) was made."""
    times = [_mtime(path) for path, owner in _entries(base) if owner and _alive(owner)]
    return min(times) if times else None


def _entries(base: Path) -> list[tuple[Path, re.Match | None]]:
    """Each entry of BASE with the match of its owner (host, pid) in its name, if any."""
    try:
        return [(path, _STAGE_RE.match(path.name)) for path in base.iterdir()]
    except OSError:
        return []


def _alive(owner: re.Match) -> bool:
    """Whether the owning process runs; one on another host counts as running."""
    return owner.group("host") != host_name() or pid_alive(int(owner.group("pid")))


def clean_stale_staging(base: Path) -> None:
    """Remove the staging directories of dead processes (called when a command stages)."""
    for path in stale_staging(base):
        shutil.rmtree(path, ignore_errors=True)


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return float("inf")
