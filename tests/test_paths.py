"""nsd.engine.paths: one home for fsspec locations and paths in SQL text."""

import duckdb
import fsspec

from nsd.engine import paths


def test_exists_for_local_paths_and_fsspec_urls(tmp_path):
    (tmp_path / "a file").write_bytes(b"x")
    assert paths.exists(str(tmp_path / "a file"))
    assert paths.exists(f"file://{tmp_path}/a file")
    assert paths.exists(str(tmp_path))  # a directory too
    assert not paths.exists(str(tmp_path / "missing"))
    memory = fsspec.filesystem("memory")
    memory.pipe("/nsd-paths-test/w.bin", b"1")
    try:
        assert paths.exists("memory:///nsd-paths-test/w.bin")
        assert not paths.exists("memory:///nsd-paths-test/other.bin")
    finally:
        memory.rm("/nsd-paths-test", recursive=True)


def test_url_gives_back_what_url_to_fs_took_apart(tmp_path):
    for given in (str(tmp_path / "x.parquet"), "memory:///bucket/key.parquet"):
        fs, path = fsspec.core.url_to_fs(given)
        assert paths.url(fs, path) == given
    fs, path = fsspec.core.url_to_fs(f"file://{tmp_path}/x")
    assert paths.url(fs, path) == f"{tmp_path}/x"  # local files: a plain path


def test_quote_makes_any_path_one_sql_literal(tmp_path):
    name = tmp_path / "it's'; DROP TABLE t; --.parquet"
    assert paths.quote("a'b") == "a''b" and paths.quote(name) == str(name).replace("'", "''")
    con = duckdb.connect()
    con.execute("CREATE TABLE t AS SELECT 1 AS x")
    con.execute(f"COPY t TO '{paths.quote(name)}' (FORMAT parquet)")
    assert name.exists()
    assert con.execute(f"SELECT x FROM read_parquet('{paths.quote(name)}')").fetchall() == [(1,)]
    assert con.execute("SELECT count(*) FROM t").fetchone() == (1,)
