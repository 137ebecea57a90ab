"""Property tests: random SQL text at `nsd sql` and random files at `nsd ingest`.

Whatever comes in: one line and exit 0 or 2 (never a traceback), no write to the store, no
read of a file outside it, no hang, bounded memory.
"""

import os
import resource
import sqlite3

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import new_store, no_hang, nsd, png_bytes

SECRET = "s3cr3t-0f-an0ther-f1le"


def store_state(store):
    files = sorted((str(p), p.stat().st_size) for p in (store.root / "data").rglob("*") if p.is_file())
    return store.latest_snapshot(), files


def max_rss_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# --------------------------------------------------------------------------- nsd sql


@pytest.fixture(scope="module")
def sql_world(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz-sql")
    store = new_store(root / "store", {"labeled": 1, "unlabeled": 1}, num_classes=2, size=8)
    with sqlite3.connect(root / "other.db") as con:
        con.execute("CREATE TABLE t (secret TEXT)")
        con.execute("INSERT INTO t VALUES (?)", [SECRET])
    (root / "other.csv").write_text(f"secret\n{SECRET}\n")
    return store, root


def _paths(root):
    return [str(root / "other.db"), str(root / "other.csv"), str(root / "out.csv"), "/etc/hostname"]


FRAGMENTS = [
    "SELECT", "*", "FROM", "images", "classes", "runs", "tags", "WHERE", "1=1", ",", "(", ")", ";", "AS x",
    "count(*)", "now()", "UNION ALL", "WITH c AS (SELECT 1)", "c", "LIMIT 3", "ORDER BY 1", "AT (VERSION => 1)",
    "PRAGMA", "version", "SET", "threads=1", "ATTACH", "DETACH", "COPY", "TO", "INSTALL", "LOAD", "CALL",
    "EXPORT DATABASE", "/*", "*/", "--", "\n", "'", '"', "lake.", "__ducklake_metadata_lake.ducklake_snapshot",
    "sqlite_scan({p}, 't')", "sqlite_query({p}, 'SELECT * FROM t')", "read_csv({p})", "read_text({p})",
    "read_parquet({p})", "glob({p})", "query('SELECT 1')", "ducklake_merge_adjacent_files('lake')",
    "ducklake_expire_snapshots('lake', older_than => now())", "ducklake_snapshots('lake')",
    "range(5)", "unnest([1,2])", "{p}", "current_setting('threads')", "DESCRIBE", "SUMMARIZE", "SHOW TABLES",
    "INSERT INTO tags VALUES ('x', 1, NULL)", "DELETE", "UPDATE images SET label = 0", "CREATE TABLE z AS",
]


@st.composite
def sql_text(draw, root):
    paths = [f"'{p}'" for p in _paths(root)]
    if draw(st.booleans()):
        parts = draw(st.lists(st.sampled_from(FRAGMENTS), min_size=1, max_size=12))
        return " ".join(p.replace("{p}", draw(st.sampled_from(paths))) for p in parts)
    return draw(st.text(min_size=1, max_size=80).filter(lambda t: not t.startswith("-")))


def test_random_sql_cannot_write_read_outside_or_crash(sql_world, monkeypatch):
    store, root = sql_world
    monkeypatch.setenv("NSD_SQL_TIMEOUT", "5")
    before, rss0 = store_state(store), max_rss_mib()

    @settings(max_examples=40, deadline=10_000, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
    @given(query=sql_text(root))
    def check(query):
        with no_hang(30):
            out = nsd(store, "sql", "--", query)
        assert out.exit_code in (0, 2), (query, out.output, out.exception)
        assert "Traceback" not in out.output and SECRET not in out.output, (query, out.output)
        if out.exit_code == 2:
            assert out.output.startswith("error:") and len(out.output.strip().splitlines()) == 1, out.output
        assert not (root / "out.csv").exists()

    check()
    assert store_state(store) == before
    assert max_rss_mib() - rss0 < 1024


# --------------------------------------------------------------------------- nsd ingest


KINDS = ["png", "png16", "rgba", "truncated", "random", "empty", "bomb", "fifo", "devzero", "dir", "textfile",
         "dirlink"]


def _write(path, kind, data: bytes, rng):
    if kind == "png":
        path.write_bytes(png_bytes(rng.integers(0, 255, (6, 6), np.uint8)))
    elif kind == "png16":
        from PIL import Image
        Image.fromarray(rng.integers(0, 65535, (6, 6), np.uint16)).save(path, format="PNG")
    elif kind == "rgba":
        path.write_bytes(png_bytes(rng.integers(0, 255, (6, 6, 4), np.uint8)))
    elif kind == "truncated":
        full = png_bytes(rng.integers(0, 255, (6, 6), np.uint8))
        path.write_bytes(full[: max(1, len(full) * len(data) // 300)])
    elif kind == "random":
        path.write_bytes(data)
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "bomb":
        import struct
        import zlib
        def chunk(t, d):
            return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))
        path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 60000, 60000, 8, 0, 0, 0, 0)))
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "devzero":
        path.symlink_to("/dev/zero")
    elif kind == "dir":
        path.mkdir()
        (path / "inner.png").write_bytes(png_bytes(rng.integers(0, 255, (6, 6), np.uint8)))
    elif kind == "textfile":
        path.write_text(data.decode("latin-1"))
    elif kind == "dirlink":  # a link to a directory (here: a loop back to the folder itself)
        path.symlink_to(path.parent)


def test_random_files_are_ingested_or_rejected_never_crash(tmp_path_factory):
    stores = []
    rss0 = max_rss_mib()
    counter = iter(range(10**6))

    @settings(max_examples=12, deadline=20_000, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow])
    @given(files=st.lists(st.tuples(st.sampled_from(KINDS), st.binary(max_size=300),
                                    st.sampled_from([".png", ".jpg", ".gif", ""])), min_size=1, max_size=6))
    def check(files):
        folder = tmp_path_factory.mktemp(f"src{next(counter)}")
        rng = np.random.default_rng(len(files))
        for i, (kind, data, ext) in enumerate(files):
            _write(folder / f"f{i}{ext}", kind, data, rng)
        # a store of its own: class folders of one example never meet another's classes
        store = new_store(tmp_path_factory.mktemp(f"store{next(counter)}") / "store")
        stores.append(store)
        snap = store.latest_snapshot()
        with no_hang(60):
            out = nsd(store, "ingest", folder, "--json", "--max-bytes", "100000")
        # one bad item never aborts an ingest: every file is added, a duplicate, or a rejects row
        assert out.exit_code == 0, (files, out.output, out.exception)
        assert "Traceback" not in out.output
        import json
        res = json.loads(out.stdout)
        assert res["read"] == res["total_added"] + res["duplicates"] + res["rejected"]
        # the decodable images: in class folders when there are any (loose files are then refused)
        dirs = sum(kind == "dir" for kind, _, _ in files)
        good = dirs or sum(kind in ("png", "png16", "rgba") for kind, _, _ in files)
        assert res["total_added"] + res["duplicates"] >= good, (files, res)
        assert store.latest_snapshot() == snap + 1

    check()
    assert max_rss_mib() - rss0 < 1024
    # every image in the stores decodes to pixels as stored
    for store in stores:
        with store.reader() as con:
            for fmt, w, h, c in con.execute("SELECT format, width, height, channels FROM images").fetchall():
                assert w * h <= 50_000_000 and c in (1, 3)
