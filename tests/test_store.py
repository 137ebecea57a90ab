import json

import pytest

from helpers import add_images, nsd, records

from nsd.engine.errors import UsageError
from nsd.engine.store import Store, parse_table_ref


def test_init_creates_tables_and_one_snapshot(tmp_path):
    s = Store(tmp_path / "s")
    assert not s.exists()
    snap = s.init()
    assert snap == 1
    assert s.init() is None  # idempotent, no new snapshot
    snaps = s.snapshots()
    assert [x["snapshot_id"] for x in snaps] == [0, 1]
    assert snaps[1]["lineage"]["command"] == "init"
    with s.reader() as con:
        tables = {r[0] for r in con.execute("SHOW TABLES").fetchall()}
    assert {"images", "pseudo_labels", "selections", "models", "runs", "rejects", "tags"} <= tables
    # Small Parquet row groups for the image bytes only (schemas/options.sql); no snapshot for it.
    with s.reader() as con:
        groups = con.execute("SELECT scope, scope_entry, value FROM lake.options() "
                             "WHERE option_name = 'parquet_row_group_size'").fetchall()
    assert groups == [("TABLE", "main.images", "8192")]


def test_a_moved_store_directory_still_opens_and_writes(tmp_path):
    s = Store(tmp_path / "a")
    s.init()
    add_images(s, {"labeled": 2, "unlabeled": 3})
    with s.reader() as con:
        before = con.execute("SELECT count(*), sum(octet_length(bytes)) FROM images").fetchone()
    (tmp_path / "a").rename(tmp_path / "b")  # the old data path is gone
    moved = Store(tmp_path / "b")
    with moved.reader() as con:
        assert con.execute("SELECT count(*), sum(octet_length(bytes)) FROM images").fetchone() == before
    add_images(moved, {"unlabeled": 1}, seed=3)  # one per class: 4 images
    latest = moved.latest_snapshot()
    moved.tag("after-move")
    with moved.reader() as con:
        assert con.execute("SELECT count(*) FROM images").fetchone()[0] == before[0] + 4
    assert moved.resolve("after-move") == latest
    assert not (tmp_path / "a").exists()
    assert list((tmp_path / "b" / "data").rglob("*.parquet"))


def test_memory_limit_from_the_environment(tmp_path, monkeypatch):
    s = Store(tmp_path / "s")
    s.init()
    with s.reader() as con:
        default = con.execute("SELECT current_setting('memory_limit')").fetchone()[0]
    monkeypatch.setenv("NSD_MEMORY_LIMIT", "300MB")
    with s.reader() as con:
        limited = con.execute("SELECT current_setting('memory_limit')").fetchone()[0]
    assert limited != default and limited.startswith("286.") and limited.endswith("MiB")  # 300 MB
    monkeypatch.setenv("NSD_MEMORY_LIMIT", "lots'; DROP TABLE x")
    result = nsd(s, "show", "images")
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        "error: NSD_MEMORY_LIMIT must be a size such as 4GB or 512MiB, got \"lots'; DROP TABLE x\""]


def test_write_records_lineage_and_run(store):
    commit = store.write(
        "demo", {"k": 1}, lambda con: con.execute("INSERT INTO classes VALUES (0, 'a'), (1, 'b')") and {"classes": 2},
        reads={"images": 1}, name="x",
    )
    snap = store.snapshots()[-1]
    assert snap["snapshot_id"] == commit.snapshot_id
    assert snap["lineage"]["params"] == {"k": 1}
    assert snap["lineage"]["reads"] == {"images": 1}
    assert snap["lineage"]["rows"] == {"classes": 2}
    run = records(store, "SELECT kind, name, row_counts FROM runs")[0]
    assert run["kind"] == "demo" and run["name"] == "x" and json.loads(run["row_counts"]) == {"classes": 2}


def test_failed_write_leaves_no_snapshot(store):
    before = store.latest_snapshot()

    def boom(con):
        con.execute("INSERT INTO classes VALUES (0, 'a')")
        raise RuntimeError("half way")

    with pytest.raises(RuntimeError):
        store.write("demo", {}, boom)
    assert store.latest_snapshot() == before
    with store.reader() as con:
        assert con.execute("SELECT count(*) FROM classes").fetchone()[0] == 0


def test_tags_resolve_and_errors(store):
    store.write("demo", {}, lambda con: con.execute("INSERT INTO classes VALUES (0, 'a')") and {"classes": 1})
    store.tag("first", 1)
    store.tag("now")
    assert store.resolve("first") == 1
    assert store.resolve("now") == 3  # tagging "first" made snapshot 3
    assert store.resolve("2") == 2
    with pytest.raises(UsageError, match="unknown tag"):
        store.resolve("nope")
    with pytest.raises(UsageError, match="unknown version 99"):
        store.resolve(99)
    with pytest.raises(UsageError, match="malformed"):
        store.resolve("a b;")
    with pytest.raises(UsageError, match="invalid tag"):
        store.tag("drop table")


def test_parse_table_ref():
    assert parse_table_ref("images@3") == ("images", "3")
    assert parse_table_ref("selections") == ("selections", None)
    with pytest.raises(UsageError, match="unknown table"):
        parse_table_ref("users@1")
    with pytest.raises(UsageError, match="malformed"):
        parse_table_ref("images@")


def test_cli_init_and_unknown_store(tmp_path):
    result = nsd(tmp_path / "s", "init", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["snapshot_id"] == 1

