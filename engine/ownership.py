"""Which store owns a data path: a marker file, so that two stores never share one.

`nsd gc --delete` removes every Parquet file under a data path that its own catalog does not
know, so a second store on the same path (an s3:// prefix given twice, a copied store
directory whose data lives elsewhere) would lose its files to the first one's gc. Hence:

* `nsd init` claims the data path with ``nsd-store.json``: the store's id (the run id of its
  init snapshot) and where its catalog lives. It refuses a path that another store claimed, or
  that already holds files of no store. Written before the catalog, the marker is also the
  probe that the data path is writable: a missing bucket or a refused key fails there, in one
  line, not at the first ingest.
* `nsd gc --delete` runs only on a data path its store owns; a copy of a store is told so.
  A store made before markers existed claims its path with `nsd init` once.

The marker is JSON, not Parquet: DuckLake's orphan cleanup never lists it.
"""

from __future__ import annotations

import json
from pathlib import Path

import fsspec

from nsd.engine.errors import UsageError
from nsd.engine.paths import read_capped, write_url

MARKER = "nsd-store.json"
_MARKER_CAP = 64 << 10


def store_id(con) -> str | None:
    """The store's id: the run id of its init snapshot (None: not initialised)."""
    row = con.execute(
        "SELECT json_extract_string(commit_extra_info, '$.run_id') FROM ducklake_snapshots('lake') "
        "WHERE json_extract_string(commit_extra_info, '$.command') = 'init' ORDER BY snapshot_id LIMIT 1").fetchone()
    return row[0] if row else None


def read_marker(store) -> dict | None:
    """The marker at STORE's data path (None: there is none; {} when it is not nsd's JSON)."""
    fs, path = fsspec.core.url_to_fs(store.path(MARKER))
    try:
        with fs.open(path, "rb") as f:
            data = read_capped(f, _MARKER_CAP)
    except FileNotFoundError:
        return None
    except Exception as exc:  # noqa: BLE001 - a refused key or a missing bucket, as one line
        raise UsageError(f"cannot read the data path {store.data_path}: {_reason(exc)}") from None
    try:
        marker = json.loads(data) if data is not None else {}
    except ValueError:
        marker = {}
    return marker if isinstance(marker, dict) else {}


def claim(store, sid: str, new: bool) -> None:
    """Mark STORE's data path as store SID's, or refuse: it is another store's, or (NEW)
    it holds files already."""
    marker = read_marker(store)
    if marker is None:
        if new and _has_files(store):
            raise UsageError(f"the data path {store.data_path} already holds files of no nsd store: "
                             "give a new or empty --data-path")
    elif marker.get("store_id") != sid:
        if not (new and marker.get("catalog") == location(store)):  # not our own interrupted init
            raise UsageError(f"the data path {store.data_path} belongs to another store "
                             f"({_shown(marker)}): give each store a data path of its own")
    elif marker.get("catalog") == location(store) or _copied(store, marker):
        return
    _write_marker(store, {"store_id": sid, "catalog": location(store)})


def check_owner(store, sid: str | None) -> None:
    """Before gc deletes anything: the data path is this store's (store SID), not another's
    or shared with a copy of this one. A moved store takes its marker along."""
    marker = read_marker(store)
    if marker is None:
        raise UsageError(f"gc: the data path {store.data_path} carries no owner marker (a store made by an "
                         f"older nsd): run `nsd init --store {store.name}` once to claim it; nothing was deleted")
    if marker.get("store_id") != sid:
        raise UsageError(f"gc: the data path {store.data_path} belongs to another store ({_shown(marker)}); "
                         "nothing was deleted")
    if marker.get("catalog") == location(store):
        return
    if _copied(store, marker):
        raise UsageError(f"gc: this store is a copy of {marker.get('catalog')}, which writes to the same data "
                         f"path {store.data_path}: gc here would delete its new files; nothing was deleted")
    _write_marker(store, dict(marker, catalog=location(store)))  # the store was moved: the marker follows


def _copied(store, marker: dict) -> bool:
    """STORE is a local copy of the store that claimed its data path, and that one is still
    there: both write to one data path. (A data path inside the store directory was copied
    with it; a PostgreSQL catalog's connection string differs from machine to machine.)"""
    if store.kind != "local" or store.data_path.startswith(str(store.root) + "/"):
        return False
    other = Path(str(marker.get("catalog", "")))
    return other.is_absolute() and other != store.root and (other / "catalog.sqlite").exists()


def location(store) -> str:
    """Where STORE's catalog lives, as its marker records it."""
    return str(store.root) if store.kind == "local" else store.name


def _shown(marker: dict) -> str:
    return f"catalog {marker.get('catalog', '?')}, id {marker.get('store_id', '?')}"


def _has_files(store) -> bool:
    fs, path = fsspec.core.url_to_fs(store.data_path)
    try:
        return bool(fs.ls(path, detail=False))
    except FileNotFoundError:
        return False
    except Exception as exc:  # noqa: BLE001
        raise UsageError(f"cannot list the data path {store.data_path}: {_reason(exc)}") from None


def _write_marker(store, marker: dict) -> None:
    try:
        write_url(store.path(MARKER), (json.dumps(marker, indent=1) + "\n").encode())
    except Exception as exc:  # noqa: BLE001 - e.g. NoSuchBucket, AccessDenied, a read-only disk
        raise UsageError(f"cannot write to the data path {store.data_path}: {_reason(exc)}") from None


def _reason(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:300]
