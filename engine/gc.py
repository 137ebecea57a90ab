"""`nsd gc`: remove what killed or failed commands left behind, never what a snapshot or a
running command uses.

* data files no snapshot references (a kill during a commit, a full disk): DuckLake's
  ``ducklake_delete_orphaned_files``; files every snapshot has dropped:
  ``ducklake_cleanup_old_files``. Both only consider files older than ``older_than``, and
  never files newer than the start of a running nsd command.
* staging directories of processes that are gone (they carry host and pid in their name);
* ``*.tmp`` files under the data path (a training state or label part half written when the
  process was killed or the disk filled),
  and the heartbeats of killed commands (engine/live.py).

Snapshots are never expired: every one is a version nsd's lineage, tags and ``AT (VERSION)``
reads may name. Dry run by default: ``delete=True`` removes.

    from nsd.engine.gc import gc
    report = gc(Store("fm").require(), older_than=3600, delete=False)
    report["bytes"]   # what deleting would free
"""

from __future__ import annotations

import datetime as _dt
import os
import posixpath
import re
import shutil
import time
from pathlib import Path

import fsspec

from nsd.engine import live, ownership
from nsd.engine.errors import UsageError
from nsd.engine.staging import running_since, staging_base, stale_staging
from nsd.engine.store import Store

# Data files and leftovers younger than this are kept: a running commit writes its files first.
DEFAULT_OLDER_THAN_S = 3600.0
_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text: str) -> float:
    """'90s', '30m', '2h', '7d', '1w' or plain seconds -> seconds."""
    m = _DURATION_RE.match(str(text))
    if not m:
        raise UsageError(f"invalid duration {text!r}: use e.g. 30m, 2h, 7d or a number of seconds")
    seconds = float(m.group(1)) * _UNITS[m.group(2)]
    if seconds > 100 * 365 * 86400:
        raise UsageError(f"invalid duration {text!r}: at most 100 years")
    return seconds


# --------------------------------------------------------------------------- gc


def gc(store: Store, older_than: float = DEFAULT_OLDER_THAN_S, delete: bool = False) -> dict:
    """What is (or, with DELETE, was) removed: orphan and old data files, stale staging
    directories, half-written ``.tmp`` files and dead heartbeats; files of running commands are
    kept and listed under "skipped". Returns paths and total bytes per kind."""
    store.require()
    if not (older_than >= 0):
        raise UsageError(f"--older-than must be >= 0, got {older_than!r}")
    base = staging_base(store)
    cutoff = time.time() - older_than
    running = live.live_commands(store)  # on any host that shares the data path
    starts = [r["started"] for r in running] + [t for t in [running_since(base)] if t is not None]
    if starts:  # a running command may be writing files it has not committed yet
        cutoff = min(cutoff, min(starts) - 60)
    cutoff_ts = _dt.datetime.fromtimestamp(cutoff, _dt.timezone.utc)

    functions = {"orphaned_files": "ducklake_delete_orphaned_files", "old_files": "ducklake_cleanup_old_files"}

    def run(kind: str, dry_run: bool) -> list[str]:
        with store.connect() as con:
            rel = store._retry(lambda: con.execute(
                f"SELECT path FROM {functions[kind]}('lake', dry_run => ?, older_than => ?)",
                [dry_run, cutoff_ts]).to_arrow_table(), what="gc")
        return sorted(rel.column("path").to_pylist())

    if delete:  # never another store's files: the data path must be this store's alone
        with store.connect(read_only=True) as con:
            ownership.check_owner(store, ownership.store_id(con))
    files = {kind: run(kind, True) for kind in functions}  # listed (and sized) before anything goes
    foreign = [f for kind in functions for f in files[kind] if not _inside_data_path(store, f)]
    if foreign and delete:  # a catalog shared with a team is input too: never delete outside the store
        raise UsageError(f"gc: the catalog names {len(foreign)} file(s) outside this store's data path "
                         f"(first: {foreign[0]}); nothing was deleted")
    files["orphaned_files"], skipped = _spare_running(store, files["orphaned_files"], running)
    staging = stale_staging(base, cutoff)
    tmp = _tmp_files(store, cutoff) + live.leftovers(store)
    out = {"dry_run": not delete, "older_than_s": older_than, "cutoff": cutoff_ts.isoformat(), **files,
           "staging": [str(p) for p in staging], "tmp_files": tmp, "skipped": skipped}
    out["bytes"] = {k: sum(_size(p) for p in out[k]) for k in ("orphaned_files", "old_files", "staging", "tmp_files")}
    if delete:
        for path in files["orphaned_files"]:  # one by one: DuckLake's call would take the spared too
            fs, p = fsspec.core.url_to_fs(path)
            fs.rm(p)
        if files["old_files"]:
            out["old_files"] = run("old_files", False)
        for path in staging:
            shutil.rmtree(path, ignore_errors=True)
        for path in tmp:
            fs, p = fsspec.core.url_to_fs(path)
            fs.rm(p)
    return out


def _spare_running(store: Store, orphans: list[str], running: list[dict]) -> tuple[list[str], list[dict]]:
    """ORPHANS less those under a folder a running command needs (a label run's parts, however
    old), and what was spared and why."""
    keep, skipped = [], []
    folders = [(store.path(f), r) for r in running for f in r["protects"]]
    for path in orphans:
        owner = next((r for root, r in folders if path.startswith(root)), None)
        if owner is None:
            keep.append(path)
        else:
            skipped.append({"path": path, "why": f"{owner.get('command')} running on {owner.get('host')} "
                                                  f"(pid {owner.get('pid')}) needs it"})
    return keep, skipped


def _inside_data_path(store: Store, path: str) -> bool:
    """Whether PATH (as DuckLake lists it) lies inside the store's data path, after resolving
    `..` (and, for local paths, links)."""
    root = store.data_path
    if "://" in root or "://" in path:
        norm = lambda p: p.split("://", 1)[0] + "://" + posixpath.normpath("/" + p.split("://", 1)[-1]).lstrip("/")  # noqa: E731
        return norm(path).startswith(norm(root).rstrip("/") + "/")
    return os.path.realpath(path).startswith(os.path.realpath(root).rstrip("/") + "/")


def _tmp_files(store: Store, cutoff: float) -> list[str]:
    """Half-written files of killed writers (training states, checkpoints, label parts)."""
    fs, root = fsspec.core.url_to_fs(store.path(""))
    try:
        found = fs.find(root, detail=True)
    except (FileNotFoundError, OSError):
        return []
    out = []
    for path, info in found.items():
        if path.endswith(".tmp") and _info_mtime(info) < cutoff:
            out.append(path if "://" not in store.data_path else f"{store.data_path.split('://')[0]}://{path}")
    return sorted(out)


def _info_mtime(info: dict) -> float:
    value = info.get("mtime") or info.get("LastModified") or info.get("last_modified") or 0
    return value.timestamp() if hasattr(value, "timestamp") else float(value)


def _size(path: str) -> int:
    if "://" in path:  # an object in the store's bucket
        try:
            fs, p = fsspec.core.url_to_fs(path)
            return int(fs.size(p) or 0)
        except Exception:  # noqa: BLE001 - gone already, or unreadable: nothing to free
            return 0
    try:
        p = Path(path)
        if p.is_dir():
            return sum(f.stat().st_size for f in p.rglob("*") if f.is_file() and not f.is_symlink())
        return p.stat().st_size
    except OSError:
        return 0
