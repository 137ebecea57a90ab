"""nsd versions / tag / show / head / diff / sql, on a real DuckLake store."""

import json

import pytest

from helpers import add_images, new_store, nsd, one_line_error
from nsd.engine import inspect
from nsd.engine.errors import UsageError

K = 6  # classes: more than inspect.LIST_ITEMS so probability lists get cut in `head`
CONFS = [0.2, 0.4, 0.6, 0.8, 0.95]


def _pred_a(k, gold):  # label-a: every 4th image wrong
    return gold if k % 4 else (gold + 1) % K


def _pred_b(k, gold):  # label-b: every 5th image wrong
    return gold if k % 5 else (gold + 2) % K


def _write_labels(store, run, rule):
    def fn(con):
        pool = con.execute("SELECT image_id, gold_label FROM images WHERE split = 'unlabeled' "
                           "ORDER BY image_id").fetchall()
        rows = []
        for k, (iid, gold) in enumerate(pool):
            conf = CONFS[k % 5]
            probs = [(1 - conf) / (K - 1)] * K
            pred = rule(k, gold)
            probs[pred] = conf
            rows.append((iid, run, "teacher-x", None, probs, None, pred, conf, 0.1, 1.0))
        con.executemany("INSERT INTO pseudo_labels VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
        return {"pseudo_labels": len(rows)}

    return store.write("label", {"teacher": "teacher-x"}, fn, run_id=run).snapshot_id


@pytest.fixture(scope="module")
def lake(tmp_path_factory):
    """A store with a known history:

    1 init, 2 images (6 labeled, 24 unlabeled with gold, 6 test), 3 tag raw -> 2,
    4 label-a, 5 label-b, 6 selection s1, 7 more test images, 8 model m1.
    """
    s = new_store(tmp_path_factory.mktemp("inspect") / "store", {"labeled": 1, "unlabeled": 4, "test": 1},
                  num_classes=K)
    s.tag("raw", 2)
    _write_labels(s, "label-a", _pred_a)
    _write_labels(s, "label-b", _pred_b)

    def select(con):
        con.execute("""INSERT INTO selections
            SELECT 's1', image_id, probs, NULL, predicted, confidence,
                   CASE WHEN predicted % 2 = 0 THEN 2 ELSE 1 END, label_run
            FROM pseudo_labels WHERE label_run = 'label-b' AND confidence >= 0.3""")
        return {"selections": con.execute("SELECT count(*) FROM selections").fetchone()[0]}

    s.write("balance", {}, select, name="s1")
    add_images(s, {"test": 1}, num_classes=K, seed=7)

    def model(con):
        con.execute("INSERT INTO models (model, arch, num_classes, metrics) VALUES ('m1', 'test_resnet', ?, ?)",
                    [K, json.dumps({"top1": 0.5})])
        return {"models": 1}

    s.write("train", {}, model, name="m1")
    with s.reader() as con:
        pool = con.execute("SELECT image_id, gold_label FROM images WHERE split = 'unlabeled' "
                           "ORDER BY image_id").fetchall()
    s.pool = pool  # expected values below are computed from these
    return s


# --------------------------------------------------------------------------- versions, tag


def test_versions_lists_history_with_changes_and_tags(lake):
    vs = inspect.versions(lake)
    assert [v["snapshot_id"] for v in vs] == list(range(9))
    assert vs[2]["summary"] == "+36 images" and vs[2]["tags"] == ["raw"]
    assert vs[4]["command"] == "label" and vs[4]["run_id"] == "label-a"
    assert vs[4]["summary"] == "+24 pseudo_labels"
    assert vs[1]["summary"] == "created 9 tables"
    assert inspect.versions(lake, last=2)[0]["snapshot_id"] == 7

    out = nsd(lake, "versions", "--json")
    assert out.exit_code == 0, out.output
    data = json.loads(out.output)
    assert set(data[0]) == {"snapshot_id", "time", "author", "message", "command", "run_id", "rows",
                            "reads", "tags", "summary"}
    text = nsd(lake, "versions").output
    assert "+36 images" in text and "raw" in text and "nsd balance s1" in text


def test_tag_cli_names_and_moves(store):
    add_images(store, {"labeled": 1}, num_classes=2)
    out = nsd(store, "tag", "first", "--version", "2", "--json")
    assert out.exit_code == 0, out.output
    assert json.loads(out.output) == {"tag": "first", "snapshot_id": 2, "commit_snapshot_id": 3}
    # a tag never moves silently: moving it needs --force
    out = nsd(store, "tag", "first")
    assert out.exit_code == 2 and out.output == ("error: tag 'first' already names snapshot 2: "
                                                 "pass --force to move it to 3\n"), out.output
    assert store.resolve("first") == 2 and store.latest_snapshot() == 3
    assert nsd(store, "tag", "first", "--version", "2").exit_code == 0  # the same snapshot again: fine
    out = nsd(store, "tag", "first", "--version", "3", "--force")
    assert out.exit_code == 0 and "tagged snapshot 3 as first" in out.output
    assert store.resolve("first") == 3
    assert [v["tags"] for v in inspect.versions(store)][2:] == [[], ["first"], [], []]


# --------------------------------------------------------------------------- show


def test_show_images_counts_per_split_and_class(lake):
    out = inspect.show(lake, "images")
    assert out["snapshot_id"] == 8 and out["rows"] == 42
    assert out["by_split"] == [{"split": "labeled", "rows": 6}, {"split": "test", "rows": 12},
                               {"split": "unlabeled", "rows": 24}]
    test_rows = [r for r in out["by_class"] if r["split"] == "test"]
    assert [(r["class_id"], r["name"], r["rows"]) for r in test_rows] == [(c, f"class{c}", 2) for c in range(K)]
    assert {"split": "unlabeled", "class_id": None, "rows": 24, "name": None} in out["by_class"]
    # time travel: before the second batch of test images, by number and by tag
    assert inspect.show(lake, "images", "raw")["rows"] == 36
    assert inspect.show(lake, "images", 6)["rows"] == 36
    assert inspect.show(lake, "images", 1)["rows"] == 0


def _expected_accuracy(pool, rule):
    right = [rule(k, g) == g for k, (_, g) in enumerate(pool)]
    buckets = [[CONFS[k % 5], ok] for k, ok in enumerate(right)]
    return sum(right), buckets


def test_show_pseudo_labels_reports_accuracy(lake):
    out = inspect.show(lake, "pseudo_labels")
    assert out["rows"] == 48
    runs = {r["label_run"]: r for r in out["label_runs"]}
    assert list(runs) == ["label-a", "label-b"]  # in the order they were added
    a = runs["label-a"]
    assert a["rows"] == 24 and a["teacher"] == "teacher-x"
    assert a["mean_confidence"] == pytest.approx(sum(CONFS[k % 5] for k in range(24)) / 24, abs=1e-6)
    correct, buckets = _expected_accuracy(lake.pool, _pred_a)
    assert correct == 18  # every 4th of 24 wrong
    acc = a["accuracy"]
    assert (acc["rows"], acc["correct"]) == (24, 18) and acc["accuracy"] == pytest.approx(0.75)
    # every confidence bucket: count and accuracy, computed independently here
    for i, b in enumerate(acc["buckets"]):
        lo, hi = inspect.CONFIDENCE_BUCKETS[i]
        inside = [ok for c, ok in buckets if lo <= c < hi or (i == 4 and c == 1.0)]
        assert b["rows"] == len(inside)
        assert b["correct"] == sum(inside)
    assert [b["bucket"] for b in acc["buckets"]][-1] == "[0.9, 1.0]"
    assert sum(b["rows"] for b in acc["buckets"]) == 24
    # per class: precision over predicted, recall over gold
    for e in acc["per_class"]:
        c = e["class_id"]
        pairs = [(_pred_a(k, g), g) for k, (_, g) in enumerate(lake.pool)]
        assert e["predicted"] == sum(p == c for p, _ in pairs)
        assert e["gold"] == sum(g == c for _, g in pairs) == 4
        assert e["correct"] == sum(p == g == c for p, g in pairs)
    assert sum(r["rows"] for r in a["by_class"]) == 24
    assert runs["label-b"]["accuracy"]["correct"] == _expected_accuracy(lake.pool, _pred_b)[0]
    # before any label run the table is empty, and accuracy is absent, not zero
    assert inspect.show(lake, "pseudo_labels", "raw") == {"table": "pseudo_labels", "snapshot_id": 2,
                                                           "rows": 0, "label_runs": []}
    text = nsd(lake, "show", "pseudo_labels").output
    assert "accuracy 75.0%" in text and "[0.9, 1.0]" in text


def test_show_pseudo_labels_without_gold_has_no_accuracy(store):
    add_images(store, {"unlabeled": 1}, num_classes=2, hide_labels=False)

    def fn(con):
        con.execute("INSERT INTO pseudo_labels SELECT image_id, 'r', 't', NULL, [0.9, 0.1], NULL, 0, 0.9, 0.8, 0.3 "
                    "FROM images")
        return {"pseudo_labels": 2}

    store.write("label", {}, fn, run_id="r")
    [r] = inspect.show(store, "pseudo_labels")["label_runs"]
    assert r["rows"] == 2 and r["accuracy"] is None
    assert r["by_class"] == [{"class_id": 0, "rows": 2, "mean_confidence": pytest.approx(0.9), "name": "class0"}]


def test_show_selections_models_runs(lake):
    sel = inspect.show(lake, "selections")
    pool_b = [(_pred_b(k, g), CONFS[k % 5]) for k, (_, g) in enumerate(lake.pool)]
    kept = [p for p, c in pool_b if c >= 0.3]
    [s1] = sel["selections"]
    assert s1["selection"] == "s1" and s1["rows"] == len(kept) == 19
    assert s1["copies"] == sum(2 if p % 2 == 0 else 1 for p in kept)
    assert {r["class_id"]: r["copies"] for r in s1["by_class"]} == {
        c: sum(2 if c % 2 == 0 else 1 for p in kept if p == c) for c in set(kept)}
    models = inspect.show(lake, "models")
    assert models["items"][0]["model"] == "m1" and models["items"][0]["metrics"] == {"top1": 0.5}
    runs = inspect.show(lake, "runs")
    assert [r["kind"] for r in runs["items"]] == ["test-images", "tag", "label", "label", "balance",
                                                  "test-images", "train"]
    assert runs["items"][2]["row_counts"] == {"pseudo_labels": 24}
    out = nsd(lake, "show", "selections@6", "--json")
    assert out.exit_code == 0 and json.loads(out.output)["selections"][0]["rows"] == 19
    assert "s1" in nsd(lake, "show", "selections").output


# --------------------------------------------------------------------------- head


def test_head_shows_blobs_and_cut_lists(lake):
    out = inspect.head(lake, "images", n=3)
    assert len(out["rows"]) == 3 and out["columns"][:2] == ["image_id", "bytes"]
    assert all(r["bytes"].startswith("<") and r["bytes"].endswith(" bytes>") for r in out["rows"])
    with lake.reader() as con:
        size = con.execute("SELECT octet_length(bytes) FROM images ORDER BY rowid LIMIT 1").fetchone()[0]
    assert out["rows"][0]["bytes"] == f"<{size} bytes>"
    pl = inspect.head(lake, "pseudo_labels", n=1)["rows"][0]
    assert len(pl["probs"]) == inspect.LIST_ITEMS + 1 and pl["probs"][-1] == "... +1 more"
    assert inspect.head(lake, "images", "raw", n=100)["rows"].__len__() == 36
    assert inspect.head(lake, "pseudo_labels", 3)["rows"] == []
    out = nsd(lake, "head", "images@raw", "-n", "2", "--json")
    assert out.exit_code == 0
    data = json.loads(out.output)
    assert data["snapshot_id"] == 2 and len(data["rows"]) == 2
    assert "bytes>" in nsd(lake, "head", "images", "-n", "1").output


# --------------------------------------------------------------------------- diff


def test_diff_images_per_class(lake):
    out = inspect.diff(lake, "images", "raw", 8)
    assert (out["from"], out["to"], out["rows_from"], out["rows_to"]) == (2, 8, 36, 42)
    assert (out["added"], out["removed"]) == (6, 0)
    assert [(r["split"], r["class_id"], r["delta"]) for r in out["by_class"]] == [("test", c, 1) for c in range(K)]
    back = inspect.diff(lake, "images", 8, "raw")  # reversed: the same rows, removed
    assert (back["added"], back["removed"]) == (0, 6)


def test_diff_counts_deletes(store):
    add_images(store, {"labeled": 3}, num_classes=2)
    store.write("drop", {}, lambda con: con.execute("DELETE FROM images WHERE label = 0") and {"images": 3})
    out = inspect.diff(store, "images", 2, 3)
    assert (out["added"], out["removed"]) == (0, 3)
    assert out["by_class"] == [{"split": "labeled", "class_id": 0, "name": "class0", "added": 0, "removed": 3,
                                "delta": -3}]


def test_diff_pseudo_labels_changed_class(lake):
    pairs = [(_pred_a(k, g), _pred_b(k, g), g) for k, (_, g) in enumerate(lake.pool)]
    changed = sum(a != b for a, b, _ in pairs)
    fixed = sum(a != g and b == g for a, b, g in pairs)
    broken = sum(a == g and b != g for a, b, g in pairs)
    out = inspect.diff(lake, "pseudo_labels", 4, 5)
    assert (out["added"], out["removed"]) == (24, 0)
    ch = out["label_change"]
    assert (ch["run_a"], ch["run_b"], ch["common_images"]) == ("label-a", "label-b", 24)
    assert ch["changed_class"] == changed and changed > 0
    assert (ch["fixed"], ch["broken"]) == (fixed, broken)
    assert sum(m["images"] for m in ch["top_moves"]) == changed
    assert inspect.diff(lake, "pseudo_labels", runs=("label-a", "label-b"))["label_change"] == ch
    out = nsd(lake, "diff", "pseudo_labels", "--runs", "label-a", "label-b")
    assert out.exit_code == 0, out.output
    assert f"{changed} of 24 images changed class" in out.output
    js = json.loads(nsd(lake, "diff", "models", "5", "8", "--json").output)
    assert js["added_keys"] == ["m1"] and js["added"] == 1


# --------------------------------------------------------------------------- sql


def test_sql_reads_at_snapshots(lake):
    q = "SELECT split, count(*) AS n FROM images GROUP BY split ORDER BY split"
    assert inspect.sql(lake, q, at="raw") == [{"split": "labeled", "n": 6}, {"split": "test", "n": 6},
                                              {"split": "unlabeled", "n": 24}]
    assert inspect.sql(lake, q)[1] == {"split": "test", "n": 12}
    assert inspect.sql(lake, "SELECT count(*) AS n FROM images WHERE split = ?", params=["test"]) == [{"n": 12}]
    assert len(inspect.sql(lake, "SELECT * FROM images", limit=5)) == 5
    out = nsd(lake, "sql", "SELECT image_id, bytes FROM images ORDER BY rowid LIMIT 2", "--at", "2", "--json")
    assert out.exit_code == 0, out.output
    rows = json.loads(out.output)
    assert len(rows) == 2 and rows[0]["bytes"].endswith(" bytes>")
    text = nsd(lake, "sql", "SELECT count(*) AS n FROM pseudo_labels", "--at", "4").output
    assert "24" in text and "1 rows" in text


@pytest.mark.parametrize("query", [
    "INSERT INTO tags VALUES ('x', 1, NULL)",
    "UPDATE images SET label = 0",
    "DELETE FROM images",
    "CREATE TABLE t AS SELECT 1",
    "COPY images TO '/tmp/nsd-leak.csv'",
    "ATTACH '/tmp/other.db' AS other",
    "INSTALL httpfs",
    "LOAD httpfs",
    "PRAGMA version",
    "SET threads = 1",
    "CALL ducklake_snapshots('lake')",
    "EXPLAIN ANALYZE SELECT 1",
    "SELECT 1; SELECT 2",
])
def test_sql_refuses_anything_but_one_select(lake, query):
    with pytest.raises(UsageError):
        inspect.sql(lake, query)


def test_sql_cannot_touch_other_files_or_write_the_store(lake):
    with pytest.raises(UsageError, match="table function read_text"):
        inspect.sql(lake, "SELECT * FROM read_text('/etc/hostname')")
    # a SELECT that calls a writing table function still cannot write: the attach is read-only
    before = lake.latest_snapshot()
    with pytest.raises(UsageError):
        inspect.sql(lake, "SELECT * FROM ducklake_expire_snapshots('lake', versions => [3])")
    assert lake.latest_snapshot() == before


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize("args, message", [
    (["show", "users"], "unknown table 'users'"),
    (["show", "images@99"], "unknown version 99"),
    (["show", "images@nope"], "unknown tag 'nope'"),
    (["show", "images@"], "malformed reference"),
    (["head", "images@a b"], "malformed reference"),
    (["head", "images", "-n", "-1"], "-n must be 0 or more"),
    (["diff", "images", "1", "42"], "unknown version 42"),
    (["diff", "images"], "diff needs two versions"),
    (["diff", "images", "1", "2", "--runs", "a", "b"], "--runs only applies"),
    (["diff", "pseudo_labels", "--runs", "label-a", "zzz"], "unknown label run 'zzz'"),
    (["sql", "DELETE FROM images"], "read-only: DELETE"),
    (["sql", "SELECT 1", "--at", "nope"], "unknown tag"),
    (["sql", "SELEC nonsense"], "SQL does not parse"),
    (["sql", "SELECT * FROM no_such_table"], "reads only the store's tables"),
    (["sql", "SELECT no_such_column FROM images"], "SQL failed"),
    (["tag", "9"], "start with a letter"),
    (["tag", "ok", "--version", "77"], "unknown version 77"),
    (["versions", "--last", "0"], "--last must be at least 1"),
])
def test_errors_are_one_line_exit_2(lake, args, message):
    one_line_error(nsd(lake, *args), 2, message)


def test_unknown_store_is_exit_2(tmp_path):
    for args in (["versions"], ["show", "images"], ["sql", "SELECT 1"]):
        out = nsd(tmp_path / "none", *args)
        assert out.exit_code == 2 and out.output.startswith("error: no nsd store"), out.output
