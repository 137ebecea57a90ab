"""The pseudo-label store: a DuckLake catalog plus Parquet data files.

Every table lives in one DuckLake catalog attached as ``lake``. Each mutating command runs
through :meth:`Store.write`, which commits exactly one snapshot whose commit message and
``extra_info`` (JSON) carry the lineage: command, parameters, versions read, row counts and
the nsd version. Readers pin a snapshot (``AT (VERSION => n)``) and see a consistent table
however the store moves on.

Where the store lives (``--store``, else ``$NSD_STORE``, else ``./nsd-store``):

* a local directory: SQLite catalog ``catalog.sqlite`` + ``data/``. SQLite lets many
  processes read while one writes; a second writer is retried with backoff, then refused
  with "store busy".
* ``postgres:<libpq string>`` (or ``postgresql://...``): DuckLake's multi-user catalog, for
  teams and many nodes. The data path comes from ``--data-path`` / ``$NSD_DATA_PATH`` and
  may be an object store (``s3://``, ``gs://``) through DuckDB's httpfs.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import getpass
import json
import os
import random
import re
import shutil
import sqlite3
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import duckdb

from nsd.engine import live, ownership
from nsd.engine.connection import connect_with_extensions
from nsd.engine.env import env_number
from nsd.engine.errors import NsdError, StoreBusy, UsageError
from nsd.engine.objectstore import configure_duckdb, is_remote
from nsd.engine.paths import quote as _quote
from nsd.engine.release import __version__
from nsd.engine.staging import clean_stale_staging, staging_base, staging_prefix
from nsd.schemas import LATER_TABLES, TABLES, read_sql

DEFAULT_STORE = "./nsd-store"
# Retry a busy catalog for this long ($NSD_BUSY_TIMEOUT seconds) before saying the store is busy.
BUSY_TIMEOUT_S = 60.0

_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\-]{0,127}$")
_NUMBER_REF = re.compile(r"v?\d+")
# One writer at a time per store (Store._write_lock): a file in a local store's directory, an
# advisory lock key in a PostgreSQL catalog's database.
WRITE_LOCK_FILE = "write.lock"
PG_WRITE_LOCK_KEY = 0x6E73640001  # "nsd", 1
_RETRYABLE = ("database is locked", "database is busy", "conflict", "could not set lock")


# --------------------------------------------------------------------------- names and refs


def check_name(name: str, what: str = "name") -> str:
    """A user-given identifier (tag, selection, model name): letters, digits, _ . -"""
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise UsageError(f"invalid {what} {name!r}: use letters, digits, '_', '.', '-' (start with a letter)")
    return name


def name_literal(name: str, what: str = "name") -> str:
    """A checked name as a SQL string literal, for filters on name columns (selection, model).

    DuckLake skips the files of other names from its catalog's column statistics only when the
    filter holds a constant; with a bound parameter it opens every data file of the table
    (0.6 s for a store with 38 selections). check_name admits no quote, so this is safe.
    """
    return "'" + check_name(name, what) + "'"


def check_table(name: str) -> str:
    """Only the store's own tables may be named; returns the name for use in SQL."""
    if name not in TABLES:
        raise UsageError(f"unknown table {name!r}; tables are: {', '.join(TABLES)}")
    return name


def parse_table_ref(text: str) -> tuple[str, str | None]:
    """'images@3' -> ('images', '3'); 'images' -> ('images', None)."""
    table, sep, ref = text.partition("@")
    if sep and not ref:
        raise UsageError(f"malformed reference {text!r}: expected TABLE@VERSION or TABLE@TAG")
    return check_table(table), (ref if sep else None)


def is_retryable(exc: BaseException) -> bool:
    msg = str(exc).lower()
    return any(s in msg for s in _RETRYABLE)


def busy_timeout() -> float:
    """$NSD_BUSY_TIMEOUT (seconds, >= 0), read when used so a bad value is a usage error."""
    return env_number("NSD_BUSY_TIMEOUT", BUSY_TIMEOUT_S, lo=0, must="a number of seconds >= 0")


def now_utc() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc).replace(tzinfo=None)


class _LockBusy(Exception):
    """Another writer holds the store's writers' lock (retried like a busy catalog)."""


@dataclass
class Commit:
    """What a write committed."""

    snapshot_id: int
    run_id: str
    rows: dict[str, int]
    result: Any = None


# --------------------------------------------------------------------------- the store


_SECRET = re.compile(r"(?i)\b(password|passwd|secret|aws_secret_access_key)\s*=\s*('[^']*'|\S+)")
_URL_PASSWORD = re.compile(r"(://[^:/@\s]+):[^@\s]+@")


def mask_secrets(text: str) -> str:
    """TEXT with passwords and secret keys (conninfo ``password=...``, ``user:pass@`` in URLs)
    replaced by ***: a store string is printed in messages, errors and commit messages."""
    return _URL_PASSWORD.sub(r"\1:***@", _SECRET.sub(lambda m: f"{m.group(1)}=***", text))


def _check_location(uri: str) -> None:
    """A usage error for a store location that is empty or a URL of no supported catalog (a
    local directory named like ``s3:`` would be created instead)."""
    if not uri.strip():
        raise UsageError("--store is empty: give a directory or a postgres: catalog")
    scheme = re.match(r"([A-Za-z][A-Za-z0-9+.-]*):", uri)
    if scheme and scheme.group(1).lower() not in ("postgres", "postgresql") and len(scheme.group(1)) > 1:
        raise UsageError(f"--store {uri!r}: {scheme.group(1)}: URLs are not catalogs; give a local directory or "
                         "postgres:... (object storage holds the data: --data-path s3://...)")


class Store:
    """Handle on one nsd store. Cheap to create; opens connections on demand."""

    def __init__(self, uri: str | os.PathLike | None = None, data_path: str | None = None):
        uri = str(uri if uri is not None else os.environ.get("NSD_STORE") or DEFAULT_STORE)
        _check_location(uri)
        self.uri = uri
        self.name = mask_secrets(uri)  # what messages show
        data_path = data_path or os.environ.get("NSD_DATA_PATH")
        # An explicit data path is checked against the one the catalog records (DuckLake
        # refuses a mismatch); without one, the recorded path is used.
        if data_path and not is_remote(data_path):  # stored as typed, ./lake/ meant another place per user
            data_path = os.path.abspath(os.path.expanduser(data_path))
        given = (data_path.rstrip("/") + "/") if data_path else None
        if uri.startswith(("postgres:", "postgresql://", "postgresql:")):
            self.kind = "postgres"
            conn = uri.split(":", 1)[1] if uri.startswith("postgres:") else uri
            self.conninfo = conn
            self.catalog = f"ducklake:postgres:{conn}"
            self.root = None
            self._data_path = given  # None: read from the catalog on first use
        else:
            self.kind = "local"
            self.conninfo = None
            self.root = Path(uri).expanduser().resolve()
            self.catalog = f"ducklake:sqlite:{self.root / 'catalog.sqlite'}"
            default = str(self.root / "data") + "/"
            recorded = None if given else _recorded_data_path(self.root / "catalog.sqlite", default)
            self._data_path = given or recorded or default
        # The catalog records the data path it was created with, as an absolute path; the
        # default one moves with the store directory (data file paths are relative to it).
        self._data_moves_with_store = self.kind == "local" and not given and self._data_path == default
        self._given_data_path = given is not None
        self._data_path_moved = False  # set once the marker proved a --data-path moved data

    def __repr__(self) -> str:
        return f"Store({self.name!r})"

    # -- locations ---------------------------------------------------------------------

    @property
    def data_path(self) -> str:
        """Where the data files live (a directory or an object-store URL), ending in '/'."""
        if self._data_path is None:
            self._data_path = self._catalog_data_path()
        return self._data_path

    @property
    def remote_data(self) -> bool:
        return is_remote(self.data_path)

    def own_dirs(self) -> tuple[Path, ...]:
        """The local directories that are this store's (its directory, a local data path): no
        file a user names with -o may land there."""
        dirs = [self.root] if self.root is not None else []
        if not self.remote_data:
            dirs.append(Path(self.data_path))
        return tuple(dirs)

    def path(self, *parts: str) -> str:
        """A location under the store's data path (checkpoints, staging, label parts)."""
        return self.data_path + "/".join(parts)

    def relative_path(self, location: str) -> str:
        """LOCATION as tables record it: relative to the data path when inside it (as DuckLake
        records data files), so a moved or copied store still finds its own files."""
        return location[len(self.data_path):] if location.startswith(self.data_path) else location

    def absolute_path(self, recorded: str) -> str:
        """The location of a path a table recorded (relative to the data path, or absolute)."""
        if recorded.startswith("/") or "://" in recorded:
            return recorded
        return self.data_path + recorded

    def exists(self) -> bool:
        """The catalog holds nsd's tables. A failure to reach it (server down, wrong port,
        missing database, refused data path) is raised as it is, not taken for "no store"."""
        if self.kind == "local":
            return (self.root / "catalog.sqlite").exists()
        if getattr(self, "_exists", False):  # asked by every step of a command: once is enough
            return True
        if not self._catalog_created():
            return False
        with contextlib.closing(self.connect(read_only=True)) as con:
            self._exists = has_table(con, "images")
        return self._exists

    def _catalog_exists(self) -> bool:
        return (self.root / "catalog.sqlite").exists() if self.kind == "local" else self._catalog_created()

    def require(self) -> "Store":
        if not self.exists():
            hint = " --data-path DIR_OR_URL" if self.kind == "postgres" and self._data_path is None else ""
            raise UsageError(f"no nsd store at {self.name} (run `nsd init --store {self.name}{hint}` first)")
        return self

    # -- the PostgreSQL catalog database -------------------------------------------------

    def _pg_connection(self) -> duckdb.DuckDBPyConnection:
        """A DuckDB connection with the catalog's PostgreSQL database attached as ``pg``."""
        con = connect_with_extensions(postgres=True)
        try:
            con.execute(f"ATTACH '{_quote(self.conninfo)}' AS pg (TYPE postgres)")
        except duckdb.Error as exc:
            con.close()
            raise NsdError(f"cannot reach the catalog of {self.name}: {mask_secrets(' '.join(str(exc).split()))}") from None
        return con

    def _catalog_created(self) -> bool:
        """The PostgreSQL database holds a DuckLake catalog (made by ``nsd init``); on the way,
        the data path it records, so that --data-path is not needed."""
        if getattr(self, "_created", False):
            return True
        with contextlib.closing(self._pg_connection()) as con:
            created = bool(con.execute(
                "SELECT * FROM postgres_query('pg', 'SELECT count(*) FROM information_schema.tables "
                "WHERE table_name = ''ducklake_metadata''')").fetchone()[0])
            if created and self._data_path is None:
                row = con.execute("SELECT * FROM postgres_query('pg', 'SELECT value FROM ducklake_metadata "
                                  "WHERE key = ''data_path''')").fetchone()
                if row and row[0]:
                    self._data_path = row[0].rstrip("/") + "/"
        self._created = created
        return created

    def _catalog_data_path(self) -> str:
        if not self._catalog_created():
            raise UsageError(f"no nsd store at {self.name}: create it with `nsd init` and --data-path "
                             "(a directory or an s3:// URL)")
        if self._data_path is None:
            raise NsdError(f"the catalog of {self.name} records no data path: pass --data-path")
        return self._data_path

    # -- connections -------------------------------------------------------------------

    def connect(self, snapshot: int | None = None, read_only: bool = False) -> duckdb.DuckDBPyConnection:
        """A DuckDB connection with the store attached as ``lake`` (and ``USE lake``).

        ``snapshot`` attaches the catalog as of that snapshot (implies read-only).
        """
        con = connect_with_extensions(
            sqlite=self.kind == "local",
            postgres=self.kind == "postgres",
            httpfs=self.remote_data,
        )
        try:
            if self.remote_data:
                configure_duckdb(con)
            options = [f"DATA_PATH '{_quote(self.data_path)}'", "DATA_INLINING_ROW_LIMIT 0"]
            if self._data_moves_with_store or self._data_path_moved:  # moved data still opens
                options.append("OVERRIDE_DATA_PATH TRUE")
            if snapshot is not None:
                options.append(f"SNAPSHOT_VERSION {int(snapshot)}")
            if read_only or snapshot is not None:
                options.append("READ_ONLY")
            try:
                self._attach(con, options)
            except duckdb.Error as exc:  # server down, missing database, another data path ...
                if not (self._given_data_path and "OVERRIDE_DATA_PATH" in str(exc)) or self._data_path_moved:
                    raise NsdError(f"cannot open the store {self.name}: {mask_secrets(' '.join(str(exc).split()))}") from None
                self._check_moved_data_path()
                self._attach(con, [*options, "OVERRIDE_DATA_PATH TRUE"])
            con.execute("USE lake")
        except Exception:
            con.close()
            raise
        return con

    def _attach(self, con: duckdb.DuckDBPyConnection, options: list[str]) -> None:
        self._retry(lambda: con.execute(f"ATTACH '{_quote(self.catalog)}' AS lake ({', '.join(options)})"),
                    what="attach")

    def _check_moved_data_path(self) -> None:
        """A --data-path other than the one the catalog records is this store's data, moved or
        mounted elsewhere, when its marker (engine/ownership.py) names this store; else refused."""
        con = connect_with_extensions(sqlite=self.kind == "local", postgres=self.kind == "postgres",
                                      httpfs=self.remote_data)
        try:
            if self.remote_data:
                configure_duckdb(con)
            self._attach(con, [f"DATA_PATH '{_quote(self.data_path)}'", "OVERRIDE_DATA_PATH TRUE", "READ_ONLY"])
            sid = ownership.store_id(con)
            recorded = con.execute("SELECT value FROM __ducklake_metadata_lake.ducklake_metadata "
                                   "WHERE key = 'data_path'").fetchone()
        finally:
            con.close()
        marker = ownership.read_marker(self) or {}
        if sid is None or marker.get("store_id") != sid:
            raise UsageError(f"--data-path {self.data_path} does not match the data path the catalog records "
                             f"({recorded[0] if recorded else '?'}) and holds no {ownership.MARKER} of this "
                             "store: give the recorded one, or the place its data moved to")
        self._data_path_moved = True

    @contextlib.contextmanager
    def reader(self, snapshot: int | None = None) -> Iterator[duckdb.DuckDBPyConnection]:
        self.require()
        con = self.connect(snapshot=snapshot, read_only=True)
        try:
            yield con
        finally:
            con.close()

    def _retry(self, fn: Callable[[], Any], what: str) -> Any:
        timeout = busy_timeout()
        deadline = time.monotonic() + timeout
        delay = 0.05
        while True:
            try:
                return fn()
            except (duckdb.Error, _LockBusy) as exc:
                if not isinstance(exc, _LockBusy) and not is_retryable(exc):
                    raise
                if time.monotonic() > deadline:
                    raise StoreBusy(
                        f"store busy: another process is writing to {self.name}; gave up after "
                        f"{timeout:g} s ({what}); try again"
                    ) from None
                time.sleep(delay * (1 + random.random()))
                # The writers' lock is polled more often: it is held for one commit only.
                delay = min(delay * 2, 0.5 if isinstance(exc, _LockBusy) else 2.0)

    # -- the writers' lock -----------------------------------------------------------------

    @contextlib.contextmanager
    def _write_lock(self) -> Iterator[None]:
        """Held by one writer of the store at a time, from before its transaction reads until
        after it commits, so that every check-then-write (dedup, class ids, unique names) is
        atomic with its commit on every catalog. Raises _LockBusy when another writer holds it.

        A local store locks a file beside its catalog (flock); a PostgreSQL catalog takes a
        transaction-level advisory lock in its database, on a connection of its own that
        ends after the commit. Either is released by the system if the process dies.
        """
        if self.kind == "local":
            self.root.mkdir(parents=True, exist_ok=True)
            try:
                fd = os.open(self.root / WRITE_LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o664)
            except PermissionError:  # flock works on a read-only descriptor too
                fd = os.open(self.root / WRITE_LOCK_FILE, os.O_RDONLY)
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    raise _LockBusy() from None
                yield
            finally:
                os.close(fd)  # releases the lock
            return
        con = self._pg_connection()
        try:
            # Inside a DuckDB transaction the postgres extension keeps one server connection
            # and one server transaction, which holds the lock until the ROLLBACK below.
            con.execute("BEGIN TRANSACTION")
            got = con.execute("SELECT * FROM postgres_query('pg', "
                              f"'SELECT pg_try_advisory_xact_lock({PG_WRITE_LOCK_KEY})')").fetchone()[0]
            if not got:
                raise _LockBusy()
            yield
        finally:
            with contextlib.suppress(Exception):
                con.execute("ROLLBACK")
            con.close()

    # -- creating ----------------------------------------------------------------------

    def init(self) -> int | None:
        """Create the catalog and every table. Returns the snapshot, or None if it existed."""
        if self.kind == "local":
            _check_store_dir(self.root)
        elif self._data_path is None and not self._catalog_created():
            raise UsageError("a new postgres store needs --data-path or $NSD_DATA_PATH "
                             "(a directory, the same on every node, or an s3:// URL)")
        if not self.remote_data:
            _check_creatable(Path(self.data_path))
        run_id = f"init-{uuid.uuid4().hex[:12]}"
        if not self._catalog_exists():  # the data path is claimed before the catalog is created
            ownership.claim(self, run_id, new=True)
        try:
            if self.kind == "local":
                self.root.mkdir(parents=True, exist_ok=True)
            if not self.remote_data:  # object stores have no directories to create
                Path(self.data_path).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UsageError(f"cannot create a store at {self.name}: {exc.strerror or exc}") from None
        with self.connect() as con:
            missing = [t for t in TABLES if not has_table(con, t)]
            sid = None if set(missing) - set(LATER_TABLES) else ownership.store_id(con)
        if not set(missing) - set(LATER_TABLES):
            if sid is not None:
                ownership.claim(self, sid, new=False)  # stores made before markers claim theirs now
            if not missing:
                return None
            # a store made by an older nsd: add the tables it lacks, as one snapshot
            return self.write("init", {"store": self.name, "added_tables": missing},
                              lambda con: con.execute(read_sql("tables")) and {},
                              message=f"nsd init {self.name}: add tables {', '.join(missing)}").snapshot_id
        ownership.claim(self, run_id, new=True)
        commit = self.write(
            "init",
            {"store": self.name},
            lambda con: con.execute(read_sql("tables")) and {},
            message=f"nsd init {self.name}",
            run_id=run_id,
        )
        with self.connect() as con:
            self._retry(lambda: con.execute(read_sql("options")), what="init options")
        return commit.snapshot_id

    # -- writing -----------------------------------------------------------------------

    def write(
        self,
        command: str,
        params: dict,
        fn: Callable[[duckdb.DuckDBPyConnection], dict | tuple],
        *,
        reads: dict[str, int] | None = None,
        name: str | None = None,
        message: str | None = None,
        run_id: str | None = None,
        started_at: _dt.datetime | None = None,
    ) -> Commit:
        """Run ``fn(con)`` in one transaction and commit it as one snapshot with lineage.

        ``fn`` returns ``{table: rows_written}`` or ``(row_counts, result)``. It may be called
        more than once: when the catalog is busy the whole transaction is retried, so ``fn``
        must only read from staged inputs (Parquet files, Arrow tables), never consume a stream.
        A ``runs`` row is added for every command except ``init``.
        """

        run_id = run_id or f"{command}-{uuid.uuid4().hex[:12]}"
        started_at = started_at or now_utc()

        def attempt() -> Commit:
            with self._write_lock():
                return _commit()

        def _commit() -> Commit:
            con = self.connect()
            try:
                con.execute("BEGIN TRANSACTION")
                out = fn(con)
                rows, result = out if isinstance(out, tuple) else (out or {}, None)
                rows = {k: int(v) for k, v in rows.items()}
                lineage = {
                    "command": command,
                    "run_id": run_id,
                    "params": params,
                    "reads": reads or {},
                    "rows": rows,
                    "nsd_version": __version__,
                }
                if command != "init":
                    con.execute(
                        "INSERT INTO runs VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                        [run_id, command, name, _json(params), _json(reads or {}), _json(rows), started_at, now_utc()],
                    )
                msg = message or f"nsd {command}" + (f" {name}" if name else "")
                con.execute(
                    "CALL lake.set_commit_message(?, ?, extra_info => ?)",
                    [_author(), msg, _json(lineage)],
                )
                con.execute("COMMIT")
                snap = con.execute("SELECT id FROM ducklake_last_committed_snapshot('lake')").fetchone()
                snap_id = snap[0] if snap and snap[0] is not None else self.latest_snapshot(con)
                return Commit(int(snap_id), run_id, rows, result)
            except BaseException:
                with contextlib.suppress(Exception):
                    con.execute("ROLLBACK")
                raise
            finally:
                con.close()

        return self._retry(attempt, what="commit")

    # -- snapshots, tags, refs -----------------------------------------------------------

    def latest_snapshot(self, con: duckdb.DuckDBPyConnection | None = None) -> int:
        with _maybe(con, self) as c:
            return int(c.execute("SELECT max(snapshot_id) FROM ducklake_snapshots('lake')").fetchone()[0])

    def snapshots(self) -> list[dict]:
        """Every snapshot, oldest first, with its lineage parsed."""
        with self.reader() as con:
            rows = con.execute(
                "SELECT snapshot_id, snapshot_time::VARCHAR, author, commit_message, "
                "commit_extra_info, changes::VARCHAR FROM ducklake_snapshots('lake') ORDER BY snapshot_id"
            ).fetchall()
        out = []
        for sid, ts, author, msg, extra, changes in rows:
            try:
                lineage = json.loads(extra) if extra else {}
            except json.JSONDecodeError:
                lineage = {"raw": extra}
            out.append(
                {"snapshot_id": sid, "time": ts, "author": author, "message": msg,
                 "changes": changes, "lineage": lineage}
            )
        return out

    def tags(self) -> dict[str, int]:
        with self.reader() as con:
            rows = con.execute("SELECT tag, snapshot_id FROM tags ORDER BY created_at").fetchall()
        return {t: int(s) for t, s in rows}

    def tag(self, tag: str, ref: str | int | None = None, force: bool = False) -> Commit:
        """Name a snapshot (default: the latest). Moving an existing tag to another snapshot
        needs ``force`` (as with git): a tag a team relies on never moves silently."""
        check_name(tag, "tag")
        if _NUMBER_REF.fullmatch(tag.lower()) or tag.lower() == "latest":
            # resolve() reads these (in any case) as a snapshot number or the newest snapshot
            raise UsageError(f"invalid tag {tag!r}: 'latest', numbers and v<number> name snapshots already")
        self.require()
        snap = self.resolve(ref)

        def fn(con):
            # checked under the writers' lock, so two taggers cannot both think the name is free
            old = con.execute("SELECT snapshot_id FROM tags WHERE tag = ?", [tag]).fetchone()
            if old is not None and int(old[0]) != snap and not force:
                raise UsageError(f"tag {tag!r} already names snapshot {old[0]}: pass --force to move it to {snap}")
            con.execute("DELETE FROM tags WHERE tag = ?", [tag])
            con.execute("INSERT INTO tags VALUES (?, ?, ?)", [tag, snap, now_utc()])
            return {"tags": 1}, snap

        return self.write("tag", {"tag": tag, "snapshot": snap, "force": force}, fn, name=tag,
                          message=f"nsd tag {tag} -> snapshot {snap}")

    def resolve(self, ref: str | int | None, con: duckdb.DuckDBPyConnection | None = None) -> int:
        """Snapshot id of REF: a snapshot number, a tag, or None/'latest' for the newest."""
        self.require()
        with _maybe(con, self) as c:
            latest = self.latest_snapshot(c)
            text = str(ref).strip() if ref is not None else "latest"
            if text.lower() == "latest":
                return latest
            if _NUMBER_REF.fullmatch(text.lower()):
                n = int(text.lower().lstrip("v"))
                if n > latest or not c.execute(
                        "SELECT 1 FROM ducklake_snapshots('lake') WHERE snapshot_id = ?", [n]).fetchone():
                    raise UsageError(f"unknown version {n} (latest is {latest})")
                first = c.execute("SELECT min(snapshot_id) FROM ducklake_snapshots('lake') "
                                  "WHERE list_contains(map_keys(changes), 'tables_created')").fetchone()[0]
                if first is not None and n < first:
                    raise UsageError(f"version {n} is older than the store's tables (nsd init made version {first})")
                return n
            if not _NAME_RE.match(text):
                raise UsageError(f"malformed reference {text!r}: expected a snapshot number or a tag")
            row = c.execute(
                "SELECT snapshot_id FROM tags AT (VERSION => ?) WHERE tag = ?", [latest, text]
            ).fetchone()
            if not row:
                raise UsageError(f"unknown tag {text!r}")
            return int(row[0])

    # -- staging -----------------------------------------------------------------------

    @contextlib.contextmanager
    def staging(self, command: str = "a command") -> Iterator[Path]:
        """A private local directory for Parquet parts before they are committed, while
        COMMAND announces itself at the data path (engine/live.py: gc on any host spares it).

        Its name carries this host and pid; the directories of processes that are gone
        (killed with -9, say) are removed here first.
        """
        base = staging_base(self)
        base.mkdir(parents=True, exist_ok=True)
        clean_stale_staging(base)
        path = Path(tempfile.mkdtemp(prefix=staging_prefix(), dir=base))
        try:
            with live.running(self, command):
                yield path
        finally:
            shutil.rmtree(path, ignore_errors=True)


def open_store(uri: str | None = None, data_path: str | None = None) -> Store:
    """The store at URI (default ``$NSD_STORE`` or ``./nsd-store``); it must exist."""
    return Store(uri, data_path).require()


# --------------------------------------------------------------------------- helpers


def _check_store_dir(root: Path) -> None:
    """ROOT may become a store: missing, empty, or a store already. Never a file, never a
    directory of other things (nsd would write its catalog among them)."""
    if root.exists() and not root.is_dir():
        raise UsageError(f"cannot create a store at {root}: it exists and is not a directory")
    if root.is_dir() and not (root / "catalog.sqlite").exists():
        try:
            other = next(iter(root.iterdir()), None)
        except OSError as exc:
            raise UsageError(f"cannot create a store at {root}: {exc.strerror or exc}") from None
        if other is not None:
            raise UsageError(f"cannot create a store at {root}: the directory is not empty and holds no nsd store")


def _check_creatable(path: Path) -> None:
    """PATH exists as a directory or can be made one: its nearest existing ancestor is one.
    Checked before the data path is claimed, so a refused init creates nothing."""
    for p in (path, *path.parents):
        if p.exists():
            if not p.is_dir():
                raise UsageError(f"cannot create a store at {path}: {p} is not a directory")
            return


def has_table(con: duckdb.DuckDBPyConnection, table: str) -> bool:
    """Whether the attached store has TABLE (stores made by an older nsd lack LATER_TABLES)."""
    return bool(
        con.execute(
            "SELECT 1 FROM duckdb_tables() WHERE database_name = 'lake' AND table_name = ?", [table]
        ).fetchone()
    )


@contextlib.contextmanager
def _maybe(con, store: Store):
    if con is not None:
        yield con
    else:
        c = store.connect(read_only=True)
        try:
            yield c
        finally:
            c.close()


def _json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, default=str)


def _author() -> str:
    try:
        return os.environ.get("NSD_AUTHOR") or getpass.getuser()
    except Exception:
        return "nsd"


def _recorded_data_path(catalog: Path, default: str) -> str | None:
    """The data path a local store's SQLite catalog records, when the store must keep using it:
    an object-store URL, or a directory of its own elsewhere that exists. None otherwise (the
    default ``data/`` beside the catalog, which moves with the store directory)."""

    if not catalog.exists():
        return None
    try:
        con = sqlite3.connect(f"file:{catalog}?mode=ro", uri=True, timeout=5)
        try:
            row = con.execute("SELECT value FROM ducklake_metadata WHERE key = 'data_path'").fetchone()
        finally:
            con.close()
    except sqlite3.Error:
        return None  # DuckLake itself says what is wrong when it attaches
    if not row or not row[0]:
        return None
    recorded = row[0].rstrip("/") + "/"
    if is_remote(recorded) or recorded == default:
        return recorded
    parent = Path(recorded.rstrip("/")).parent
    if recorded.endswith("/data/") and (not parent.is_dir() or (parent / "catalog.sqlite").exists()):
        return None  # the default data/ of this store before it was moved or copied
    return recorded
