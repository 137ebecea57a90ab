"""Running commands announce themselves at the data path, so `nsd gc` on any host spares them.

A command that writes files before it commits them (ingest and training stage, label writes
resumable parts under ``label-runs/<run_id>/``) holds a heartbeat file
``live/<host>-<pid>-<id>.json`` at the store's data path: what runs, since when, and which
folders it needs. A daemon thread rewrites it every ``HEARTBEAT_S`` seconds; it is removed when
the command ends. gc counts a heartbeat younger than ``STALE_S`` (or one of a live process on
its own host) as a running command: it keeps every file newer than its start and everything
under the folders it names, whatever their age (a resumed label run's parts are older than
the run). The data path is shared by every host of a team, so this works across machines;
a killed command's heartbeat goes stale and stops protecting anything.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Iterator

import fsspec

from nsd.engine.paths import read_capped, write_url
from nsd.engine.runtime import host_name, pid_alive

HEARTBEAT_S = 30.0
STALE_S = 120.0  # four missed beats: the command is gone
_DIR = "live"
_CAP = 64 << 10


@dataclass
class Heartbeat:
    """One running command's announcement; `protect` adds a folder (relative to the data path)."""

    store: object
    command: str
    name: str = field(default_factory=lambda: f"{host_name()}-{os.getpid()}-{uuid.uuid4().hex[:8]}.json")
    started: float = field(default_factory=time.time)
    protects: list[str] = field(default_factory=list)

    def protect(self, folder: str) -> None:
        self.protects.append(folder.rstrip("/") + "/")
        self.beat()

    def beat(self) -> None:
        body = {"command": self.command, "host": host_name(), "pid": os.getpid(), "started": self.started,
                "protects": self.protects}
        # Whole or absent: gc takes an unreadable heartbeat for a dead command's. One that
        # cannot be written only weakens gc's guard.
        with contextlib.suppress(Exception):
            write_url(self.store.path(_DIR, self.name), json.dumps(body).encode())

    def remove(self) -> None:
        fs, path = fsspec.core.url_to_fs(self.store.path(_DIR, self.name))
        with contextlib.suppress(Exception):
            fs.rm(path)


@contextlib.contextmanager
def running(store, command: str) -> Iterator[Heartbeat]:
    """Announce COMMAND at STORE's data path while the block runs."""
    for path in leftovers(store):  # of killed commands: one listing, as staging does
        with contextlib.suppress(Exception):
            fsspec.core.url_to_fs(path)[0].rm(fsspec.core.url_to_fs(path)[1])
    beat = Heartbeat(store, command)
    beat.beat()
    stop = threading.Event()

    def refresh():
        while not stop.wait(HEARTBEAT_S):
            beat.beat()

    thread = threading.Thread(target=refresh, name="nsd-heartbeat", daemon=True)
    thread.start()
    try:
        yield beat
    finally:
        stop.set()
        thread.join()
        beat.remove()


def live_commands(store) -> list[dict]:
    """The commands running on STORE, on any host: fresh heartbeats (a heartbeat of a dead
    process on this host does not count, however fresh)."""
    return [body for _, body in _scan(store) if body is not None]


def leftovers(store) -> list[str]:
    """Heartbeats of commands that are gone (killed): stale, unreadable, or of a dead
    process on this host."""
    return [path for path, body in _scan(store) if body is None]


def _scan(store) -> Iterator[tuple[str, dict | None]]:
    """(URL, body) of every heartbeat; body None for one of a command that is gone."""
    now = time.time()
    fs, root = fsspec.core.url_to_fs(store.path(_DIR))
    try:
        found = fs.find(root, detail=True)
    except (FileNotFoundError, OSError):
        return
    scheme = store.data_path.split("://")[0] + "://" if "://" in store.data_path else ""
    for path, info in sorted(found.items()):
        if not path.endswith(".json"):
            continue
        body = None if now - _mtime(info) > STALE_S else _read(fs, path)
        if body is not None and body.get("host") == host_name() and not (
                isinstance(body.get("pid"), int) and pid_alive(body["pid"])):
            body = None
        yield scheme + path, body


def _read(fs, path: str) -> dict | None:
    """A heartbeat's body, checked: hostile or half-written files count as nothing."""
    try:
        with fs.open(path, "rb") as f:
            body = json.loads(read_capped(f, _CAP) or b"")
    except Exception:  # noqa: BLE001 - removed meanwhile, half written, not JSON
        return None
    if not (isinstance(body, dict) and isinstance(body.get("started"), (int, float))
            and isinstance(body.get("protects"), list) and all(isinstance(p, str) for p in body["protects"])):
        return None
    return body


def _mtime(info: dict) -> float:
    value = info.get("mtime") or info.get("LastModified") or info.get("last_modified") or 0
    return value.timestamp() if hasattr(value, "timestamp") else float(value)
