"""nsd.engine.connection: DuckDB connections with no network, extensions from packages."""

import json
import os

import pytest

import nsd.engine.connection as connection
from nsd.engine.errors import NsdError, UsageError


def _setting(con, name):
    return con.execute("SELECT current_setting(?)", [name]).fetchone()[0]


def test_a_new_connection_never_reaches_for_extensions_and_draws_no_progress_bar(monkeypatch):
    monkeypatch.delenv("NSD_MEMORY_LIMIT", raising=False)
    con = connection.new_connection()
    try:
        assert _setting(con, "autoinstall_known_extensions") is False
        assert _setting(con, "autoload_known_extensions") is False
        assert _setting(con, "enable_progress_bar") is False
        assert _setting(con, "allow_unsigned_extensions") is False
    finally:
        con.close()
    con = connection.new_connection(skip_signature_check=True)
    try:
        assert _setting(con, "allow_unsigned_extensions") is True
    finally:
        con.close()


@pytest.mark.parametrize("text, expected", [
    ("", None), ("   ", None), ("4GB", "4GB"), (" 512 MiB ", "512 MiB"), ("1.5gb", "1.5gb"), ("10b", "10b"),
])
def test_memory_limit_accepts_sizes(monkeypatch, text, expected):
    monkeypatch.setenv("NSD_MEMORY_LIMIT", text)
    assert connection.memory_limit() == expected


@pytest.mark.parametrize("text", ["4", "lots", "4 GB; SET x", "-1GB", "4PB", "4GB'", "٤GB"])
def test_memory_limit_refuses_anything_but_a_size(monkeypatch, text):
    monkeypatch.setenv("NSD_MEMORY_LIMIT", text)
    with pytest.raises(UsageError, match="NSD_MEMORY_LIMIT must be a size"):
        connection.memory_limit()
    with pytest.raises(UsageError):
        connection.new_connection()


def test_the_memory_limit_applies_to_each_connection(monkeypatch):
    monkeypatch.setenv("NSD_MEMORY_LIMIT", "300MB")
    con = connection.new_connection()
    try:
        assert _setting(con, "memory_limit") == "286.1 MiB"
    finally:
        con.close()


def test_extensions_load_from_the_installed_packages(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("HOME", str(tmp_path))
    con = connection.connect_with_extensions(sqlite=True)
    try:
        loaded = {r[0] for r in con.execute(
            "SELECT extension_name FROM duckdb_extensions() WHERE loaded").fetchall()}
        # DuckLake and the SQLite catalog; nothing that reaches the network.
        assert {"ducklake", "sqlite_scanner"} <= loaded and "httpfs" not in loaded
        catalog = tmp_path / "it's.sqlite"  # a quote in the path: quoted, not SQL
        con.execute(f"ATTACH 'ducklake:sqlite:{connection._quote(catalog)}' AS lake "
                    f"(DATA_PATH '{connection._quote(tmp_path / 'data')}/')")
        con.execute("CREATE TABLE lake.t AS SELECT 42 AS x")
        assert con.execute("SELECT x FROM lake.t").fetchall() == [(42,)]
    finally:
        con.close()
    # The sqlite extension is loaded through a link named after its entry point, in the
    # user's cache, pointing at the package's file.
    link = tmp_path / ".cache" / "nsd" / "extensions" / connection.DUCKDB_VERSION / "sqlite_scanner.duckdb_extension"
    assert link.is_symlink() and os.readlink(link) == str(connection._extension_file("sqlite", "sqlite"))


def test_a_missing_extension_package_names_what_to_install():
    with pytest.raises(NsdError, match=r"^DuckDB extension nope not found: pip install "
                                       r"duckdb-extension-nope==1\.5\.5$"):
        connection._extension_file("nope", "nope")


def test_extension_signatures_are_checked_once_per_file(tmp_path, monkeypatch):
    """DuckDB's signature check (0.2-0.5 s per command) runs once per extension file and user."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("HOME", str(tmp_path))  # the sqlite link too: no other checkout's process moves it
    monkeypatch.setattr(connection, "_verified", set())
    checked = []
    real_new_connection = connection.new_connection

    def new_connection(skip_signature_check=False):
        checked.append(not skip_signature_check)
        return real_new_connection(skip_signature_check=skip_signature_check)

    monkeypatch.setattr(connection, "new_connection", new_connection)
    record = tmp_path / "cache" / "nsd" / "verified-extensions.json"

    def connect_as_a_new_process():
        connection._verified.clear()
        con = connection.connect_with_extensions(sqlite=True)
        loaded = con.execute("SELECT extension_name FROM duckdb_extensions() WHERE loaded "
                             "AND extension_name IN ('ducklake', 'sqlite_scanner', 'sqlite')").fetchall()
        con.close()
        assert len(loaded) == 2

    connect_as_a_new_process()
    assert checked == [True] and record.stat().st_mode & 0o777 == 0o600
    keys = json.loads(record.read_text())
    assert len(keys) == 2 and all(len(k) == 5 for k in keys)
    connect_as_a_new_process()
    assert checked == [True, False]  # the same files: no second check
    # A file whose identity changed (here: another ctime recorded) is checked again.
    record.write_text(json.dumps([[*k[:4], k[4] + 1] for k in keys]))
    connect_as_a_new_process()
    assert checked == [True, False, True]
    # A record others could have written is not trusted.
    connect_as_a_new_process()
    assert checked[-1] is False
    record.chmod(0o666)
    connect_as_a_new_process()
    assert checked[-1] is True
    # A file loaded through a link in a directory others can write is always checked.
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    link = shared / "ducklake.duckdb_extension"
    link.symlink_to(connection._extension_file("ducklake", "ducklake"))
    assert connection._trusted([str(connection._extension_file("ducklake", "ducklake"))])
    assert not connection._trusted([str(link)])
