"""DuckDB connections for nsd: no network, extensions from the installed packages.

Every connection nsd opens comes from here. It never installs or auto-loads an extension:
DuckLake, SQLite, PostgreSQL and httpfs are loaded from the ``duckdb-extension-*`` pip
packages (a DuckDB build only loads the extensions of its own version, ``DUCKDB_VERSION``).
DuckDB checks an extension file's signature on every LOAD, which costs 0.2-0.5 s a command;
a file this user has seen verified before is loaded without the check (see ``_verified``).
``$NSD_MEMORY_LIMIT`` caps each connection's memory.

:mod:`nsd.engine.store` attaches the store's catalog to these connections.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import site
import tempfile
from pathlib import Path

import duckdb

from nsd.engine.errors import NsdError, UsageError
from nsd.engine.paths import quote as _quote, write_file

DUCKDB_VERSION = "v1.5.5"


def _extension_file(package: str, name: str) -> Path:
    """Path of a DuckDB extension shipped as a pip package (duckdb-extension-<package>)."""
    for base in [*site.getsitepackages(), site.getusersitepackages()]:
        path = Path(base) / f"duckdb_extension_{package}" / "extensions" / DUCKDB_VERSION
        path = path / f"{name}.duckdb_extension"
        if path.exists():
            return path
    try:  # editable/odd layouts: ask the package itself
        module = __import__(f"duckdb_extension_{package}")
        path = Path(module.__file__).parent / "extensions" / DUCKDB_VERSION / f"{name}.duckdb_extension"
        if path.exists():
            return path
    except ImportError:
        pass
    raise NsdError(
        f"DuckDB extension {name} not found: pip install duckdb-extension-{package}=={DUCKDB_VERSION[1:]}"
    )


def _sqlite_extension() -> Path:
    # The sqlite package ships `sqlite.duckdb_extension` whose entry point is named after
    # `sqlite_scanner`; DuckDB derives the entry point from the file name, so load a link.
    target = _extension_file("sqlite", "sqlite")
    caches = [Path(tempfile.gettempdir()) / f"nsd-{os.getuid()}"]
    with contextlib.suppress(RuntimeError):  # no HOME and no passwd entry
        caches.insert(0, Path.home() / ".cache" / "nsd")
    for cache in caches:
        link = cache / "extensions" / DUCKDB_VERSION / "sqlite_scanner.duckdb_extension"
        try:
            if link.is_symlink() and Path(os.readlink(link)) == target:
                return link
            link.parent.mkdir(parents=True, exist_ok=True)
            tmp = link.with_suffix(f".{os.getpid()}.tmp")
            tmp.unlink(missing_ok=True)
            tmp.symlink_to(target)
            os.replace(tmp, link)
            return link
        except OSError:
            continue
    raise NsdError("cannot create a link to the DuckDB sqlite extension (no writable cache directory)")


# Extension files DuckDB has already verified. Its signature check re-hashes the whole file
# (35 MB: 0.2-0.5 s for the two extensions) on every LOAD, i.e. at the start of every nsd
# command; a file verified before, by this process or by an earlier one of this user, is
# loaded again without it. A file counts as the same while its path, inode, size, mtime and
# ctime are unchanged (any write changes ctime), and only while nobody but this user or root
# can change the file, its directory or the link nsd loads it through (a link in a shared
# temporary directory is always checked); the record lives in a directory only this user can
# write.
_verified: set[tuple] = set()
_VERIFIED_RECORD = "verified-extensions.json"


def connect_with_extensions(*, sqlite=False, postgres=False, httpfs=False) -> duckdb.DuckDBPyConnection:
    """A new DuckDB connection with the extensions nsd needs, loaded from the installed
    packages; it never installs or auto-loads anything from the network."""
    files = [str(_extension_file("ducklake", "ducklake"))]
    if sqlite:
        files.append(str(_sqlite_extension()))
    if postgres:
        files.append(str(_extension_file("postgres_scanner", "postgres_scanner")))
    if httpfs:
        files.append(str(_extension_file("httpfs", "httpfs")))
    keys = [_file_key(f) for f in files]
    trusted = _trusted(files)
    if trusted and not _verified.issuperset(keys):
        _verified.update(_read_verified())
    known = trusted and _verified.issuperset(keys)
    con = new_connection(skip_signature_check=known)
    try:
        for f in files:
            con.execute(f"LOAD '{_quote(f)}'")
    except Exception:
        con.close()
        raise
    if trusted and not known and [_file_key(f) for f in files] == keys:  # unchanged while loading
        _verified.update(keys)
        _write_verified(_verified)
    return con


def _file_key(path: str) -> tuple:
    """The file behind PATH as it is now: a replaced or rewritten file is verified again."""
    real = os.path.realpath(path)
    st = os.stat(real)
    return real, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def _safe(path: Path) -> bool:
    """Nobody but this user or root can change PATH (owned by either, not group/other-writable)."""
    st = path.lstat()
    return st.st_uid in (os.getuid(), 0) and not st.st_mode & 0o022


def _trusted(files: list[str]) -> bool:
    """Each file, its directory and the directory of the path it is loaded by are safe."""
    try:
        return all(_safe(Path(f).parent) and _safe(Path(os.path.realpath(f)))
                   and _safe(Path(os.path.realpath(f)).parent) for f in files)
    except OSError:
        return False


def _verified_record() -> Path | None:
    base = os.environ.get("XDG_CACHE_HOME", "")
    if not os.path.isabs(base):  # unset or relative: the XDG default
        try:
            base = str(Path.home() / ".cache")
        except RuntimeError:  # no HOME and no passwd entry: no record, check every time
            return None
    return Path(base) / "nsd" / _VERIFIED_RECORD


def _read_verified() -> set[tuple]:
    record = _verified_record()
    try:
        if record is None or not (_safe(record.parent) and _safe(record)):
            return set()
        return {tuple(key) for key in json.loads(record.read_text())}
    except (OSError, ValueError, TypeError):
        return set()  # no record yet, or unreadable: verify again


def _write_verified(keys: set[tuple]) -> None:
    record = _verified_record()
    if record is None:
        return
    current = set()
    for key in keys:  # drop files that changed or went away since they were recorded
        try:
            if _file_key(key[0]) == tuple(key):
                current.add(tuple(key))
        except (OSError, TypeError, IndexError):
            pass
    try:
        record.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        if _safe(record.parent):
            write_file(record, json.dumps(sorted(current)).encode(), mode=0o600)
    except OSError:  # an unwritable cache only costs the check next time
        pass


def new_connection(skip_signature_check: bool = False) -> duckdb.DuckDBPyConnection:
    """A DuckDB connection that never installs or auto-loads extensions from the network."""
    config = {"autoinstall_known_extensions": False, "autoload_known_extensions": False}
    if skip_signature_check:
        config["allow_unsigned_extensions"] = True
    limit = memory_limit()
    con = duckdb.connect(config=config)
    try:
        # DuckDB draws a progress bar on stdout for queries over 2 s: it would corrupt --json output.
        con.execute("SET enable_progress_bar = false")
        if limit:  # DuckDB spills sorts, joins and aggregates to disk beyond it
            con.execute(f"SET memory_limit = '{limit}'")
    except Exception:
        con.close()
        raise
    return con


_MEMORY_RE = re.compile(r"\s*\d+(\.\d+)?\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)\s*", re.IGNORECASE | re.ASCII)


def memory_limit() -> str | None:
    """$NSD_MEMORY_LIMIT (e.g. 4GB): DuckDB's memory limit per connection (default: 80% of RAM).

    Per connection: DataLoader workers and label threads each open their own.
    """
    text = os.environ.get("NSD_MEMORY_LIMIT", "")
    if not text.strip():
        return None
    if not _MEMORY_RE.fullmatch(text):
        raise UsageError(f"NSD_MEMORY_LIMIT must be a size such as 4GB or 512MiB, got {text!r}")
    return text.strip()
