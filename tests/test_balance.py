"""nsd balance on hand-made pseudo labels where every answer is known."""

import hashlib
import json
import math
import statistics

import pyarrow as pa
import pytest

from helpers import new_store, nsd, records
from nsd.engine.balance import balance, balance_sql, plan

RUN = "label-aaa"


def add_labels(store, rows, run_id=RUN):
    """rows: (image_id, predicted, confidence, probs[, prob_classes]) as one label snapshot."""
    # One Arrow table, in row order (rowid follows it): executemany takes seconds per thousand rows.
    table = pa.table({
        "image_id": [r[0] for r in rows],
        "label_run": [run_id] * len(rows),
        "probs": pa.array([r[3] for r in rows], pa.list_(pa.float32())),
        "prob_classes": pa.array([r[4] if len(r) > 4 else None for r in rows], pa.list_(pa.int32())),
        "predicted": pa.array([r[1] for r in rows], pa.int32()),
        "confidence": pa.array([r[2] for r in rows], pa.float32()),
    })

    def fn(con):
        con.register("new_rows", table)
        con.execute("INSERT INTO pseudo_labels (image_id, label_run, teacher, probs, prob_classes, predicted, confidence) "
                    "SELECT image_id, label_run, 't', probs, prob_classes, predicted, confidence FROM new_rows")
        return {"pseudo_labels": len(rows)}

    return store.write("label", {}, fn, run_id=run_id).snapshot_id


def add_split(store, ids_by_split):
    def fn(con):
        rows = [(i, b"x", split) for split, ids in ids_by_split.items() for i in ids]
        con.executemany("INSERT INTO images (image_id, bytes, split) VALUES (?, ?, ?)", rows)
        return {"images": len(rows)}

    store.write("test-images", {}, fn)


def dense(c, conf, n=3):
    """A dense probability vector over n classes with `conf` on class c."""
    rest = (1 - conf) / (n - 1)
    return [conf if i == c else rest for i in range(n)]


# class 0: 5 candidates, a tie at 0.7 (b < c), one below threshold; class 1: 2 candidates;
# class 2: 1 candidate. Image "d" has two rows (the 0.99 one wins); "lab"/"tst" leak.
ROWS = [
    ("a0", 0, 0.9, dense(0, 0.9)),
    ("a1", 0, 0.8, dense(0, 0.8)),
    ("c", 0, 0.7, dense(0, 0.7)),
    ("b", 0, 0.7, dense(0, 0.7)),
    ("a4", 0, 0.6, dense(0, 0.6)),
    ("low", 0, 0.2, dense(0, 0.2)),
    ("x1", 1, 0.95, dense(1, 0.95)),
    ("x2", 1, 0.5, dense(1, 0.5)),
    ("y", 2, 0.4, dense(2, 0.4)),
    ("d", 0, 0.6, dense(0, 0.6)),
    ("d", 1, 0.99, dense(1, 0.99)),
    ("lab", 2, 0.99, dense(2, 0.99)),
    ("tst", 2, 0.98, dense(2, 0.98)),
    ("unl", 2, 0.35, dense(2, 0.35)),
]


# Module-scoped stores: each store operation attaches the catalog, so share them; every test
# writes selections under its own names.
@pytest.fixture(scope="module")
def labeled(tmp_path_factory):
    s = new_store(tmp_path_factory.mktemp("balance") / "store")
    add_split(s, {"labeled": ["lab"], "test": ["tst"], "unlabeled": ["unl", "a0"]})
    add_labels(s, ROWS)
    return s


@pytest.fixture(scope="module")
def runs3(tmp_path_factory):
    """Three label runs: RUN (dense), label-bbb (n = 1 and 2), label-sparse (top-2), newest last."""
    s = new_store(tmp_path_factory.mktemp("balance") / "store")
    first = add_labels(s, [("i", 0, 0.6, [0.6, 0.3, 0.1])])
    add_labels(s, [("p", 0, 0.9, [0.9, 0.1]), ("q", 1, 0.8, [0.2, 0.8]), ("r", 1, 0.7, [0.3, 0.7])],
               run_id="label-bbb")
    add_labels(s, [("j", 4, 0.6, [0.6, 0.3], [4, 7])], run_id="label-sparse")
    s.first = first
    return s


def selection(store, name):
    """{image_id: row as a dict} of selection NAME."""
    rows = records(store, "SELECT image_id, predicted, copies, confidence, target, target_classes, label_run "
                          "FROM selections WHERE selection = ? ORDER BY image_id", [name])
    return {r["image_id"]: r for r in rows}


def test_exact_k_topk_ties_duplication_dedup_and_leakage(labeled):
    out = balance(labeled, "s3", per_class=3)
    sel = selection(labeled, "s3")
    copies = {i: r["copies"] for i, r in sel.items()}
    # class 0: top 3 of 0.9, 0.8, 0.7(b), 0.7(c), 0.6, 0.6(d? no: d is class 1 after dedup)
    # class 1: d 0.99, x1 0.95, x2 0.5 -> exactly 3; class 2: y, unl -> 1 + 2 copies... K=3:
    # floor(3/2)=1 each, the remainder 1 to the most confident (y 0.4 > unl 0.35).
    assert copies == {"a0": 1, "a1": 1, "b": 1, "d": 1, "x1": 1, "x2": 1, "y": 2, "unl": 1}
    assert sel["d"]["predicted"] == 1 and sel["d"]["confidence"] == pytest.approx(0.99)  # the most confident row of d
    assert "lab" not in sel and "tst" not in sel and "c" not in sel and "low" not in sel
    per_class = {}
    for r in sel.values():
        per_class[r["predicted"]] = per_class.get(r["predicted"], 0) + r["copies"]
    assert per_class == {0: 3, 1: 3, 2: 3}
    assert out["rows"] == 8 and out["copies"] == 9 and out["classes"] == 3 and out["per_class"] == 3
    assert all(r["label_run"] == RUN for r in sel.values())


def test_dedup_ties_go_to_lower_class_then_first_written_row(tmp_path):
    s = new_store(tmp_path / "store")
    # "t": three rows at confidence 0.8; class 1 loses to class 0, and of the two class-0 rows
    # (the same image labeled twice, targets differing) the first written is kept, whatever
    # its probs sort like. "u" has one row.
    add_labels(s, [("t", 1, 0.8, [0.1, 0.8, 0.1]), ("t", 0, 0.8, [0.8, 0.15, 0.05]),
                   ("t", 0, 0.8, [0.8, 0.05, 0.15]), ("u", 0, 0.7, [0.7, 0.2, 0.1])])
    balance(s, "sel", per_class=2)
    sel = selection(s, "sel")
    assert set(sel) == {"t", "u"}
    assert sel["t"]["predicted"] == 0 and sel["t"]["copies"] == 1
    assert sel["t"]["target"] == pytest.approx([0.8, 0.15, 0.05])  # not the smaller list


def test_duplication_remainder_and_no_duplicate(labeled):
    balance(labeled, "s7", per_class=7)
    copies = {i: r["copies"] for i, r in selection(labeled, "s7").items()}
    # class 0: n=4 (a0 a1 c b a4 -> 5 above 0.3) -> 5 < 7: floor(7/5)=1, +1 for the top 2 (a0, a1)
    assert {k: copies[k] for k in ("a0", "a1", "b", "c", "a4")} == {"a0": 2, "a1": 2, "b": 1, "c": 1, "a4": 1}
    # class 1: n=3 (d, x1, x2): floor(7/3)=2, +1 for d
    assert {k: copies[k] for k in ("d", "x1", "x2")} == {"d": 3, "x1": 2, "x2": 2}
    # class 2: n=2 (y, unl): 3 each +1 for y
    assert (copies["y"], copies["unl"]) == (4, 3)
    balance(labeled, "once", per_class=7, duplicate=False)
    assert set(r["copies"] for r in selection(labeled, "once").values()) == {1}
    assert len(selection(labeled, "once")) == 10


def test_default_k_is_median_rounded_down(labeled, runs3):
    # n_c after threshold, dedup and leakage: class 0 -> 5, class 1 -> 3, class 2 -> 2: median 3
    assert balance(labeled, "auto")["per_class"] == 3
    # two classes, n = 1 and 2: median 1.5 -> 1
    assert plan(runs3, run="label-bbb")["per_class"] == 1


def test_targets_soft_sharpen_hard_dense_and_sparse(runs3):
    store = runs3
    balance(store, "soft", run=RUN)
    balance(store, "sharp", run=RUN, sharpen=0.5)
    balance(store, "hard", run=RUN, hard=True)
    balance(store, "ssoft", run="label-sparse")
    balance(store, "ssharp", run="label-sparse", sharpen=0.5)
    balance(store, "shard", run="label-sparse", hard=True)
    t = {name: selection(store, name) for name in ("soft", "sharp", "hard", "ssoft", "ssharp", "shard")}
    assert t["soft"]["i"]["target"] == pytest.approx([0.6, 0.3, 0.1]) and t["soft"]["i"]["target_classes"] is None
    assert t["sharp"]["i"]["target"] == pytest.approx([0.36 / 0.46, 0.09 / 0.46, 0.01 / 0.46], rel=1e-5)
    assert t["hard"]["i"]["target"] == [1.0, 0.0, 0.0] and t["hard"]["i"]["target_classes"] is None
    assert t["ssoft"]["j"]["target"] == pytest.approx([0.6, 0.3]) and t["ssoft"]["j"]["target_classes"] == [4, 7]
    assert t["ssharp"]["j"]["target"] == pytest.approx([0.8, 0.2], rel=1e-5)
    assert t["ssharp"]["j"]["target_classes"] == [4, 7]
    assert t["shard"]["j"]["target"] == [1.0] and t["shard"]["j"]["target_classes"] == [4]


def test_dry_run_counts_write_nothing(labeled):
    before = labeled.latest_snapshot()
    result = json.loads(nsd(labeled, "balance", "--dry-run", "--per-class", "4", "--json").output)
    assert labeled.latest_snapshot() == before
    rows = {r["class"]: r for r in result["classes"]}
    # class 0: a0 a1 b c a4 low (d moved to class 1) = 6 rows, 5 above 0.3, keep 4, drop 1
    assert rows[0] == {"class": 0, "candidates": 6, "after_threshold": 5, "kept": 4, "copies_added": 0,
                       "dropped": 1, "total": 4}
    # class 1: d x1 x2: 3 kept, 4 = 2 + 1 + 1 copies; class 2: y unl (lab/tst leak): 2 copies each
    assert rows[1] == {"class": 1, "candidates": 3, "after_threshold": 3, "kept": 3, "copies_added": 1,
                       "dropped": 0, "total": 4}
    assert rows[2] == {"class": 2, "candidates": 2, "after_threshold": 2, "kept": 2, "copies_added": 2,
                       "dropped": 0, "total": 4}
    assert result["totals"]["total"] == 12 and result["totals"]["candidates"] == 11
    text = nsd(labeled, "balance", "--dry-run")
    assert text.exit_code == 0 and "K=3" in text.output and "total" in text.output


def test_custom_sql_ok_and_wrong_columns(labeled, tmp_path):
    good = tmp_path / "mine.sql"
    good.write_text("-- everything above the threshold, twice\n"
                    "SELECT image_id, probs AS target, prob_classes AS target_classes, predicted, confidence,\n"
                    "       2 AS copies, label_run\n"
                    "FROM pseudo_labels WHERE label_run = $label_run AND confidence > $threshold\n"
                    "  AND image_id NOT IN (SELECT image_id FROM images WHERE split <> 'unlabeled');\n"
                    "-- end\n")
    out = balance(labeled, "mine", sql_file=str(good), threshold=0.9)
    assert {i: r["copies"] for i, r in selection(labeled, "mine").items()} == {"d": 2, "x1": 2}
    assert out["rows"] == 2 and out["copies"] == 4
    bad = tmp_path / "bad.sql"
    bad.write_text("SELECT image_id, probs AS target, predicted, confidence, label_run FROM pseudo_labels")
    r = nsd(labeled, "balance", "--name", "bad", "--sql", str(bad))
    assert r.exit_code == 2 and "missing target_classes, copies" in r.output
    typed = tmp_path / "typed.sql"
    typed.write_text("SELECT image_id, probs AS target, prob_classes AS target_classes, predicted, confidence, "
                     "'two' AS copies, label_run FROM pseudo_labels")
    r = nsd(labeled, "balance", "--name", "bad", "--sql", str(typed))
    assert r.exit_code == 2 and "column copies has type VARCHAR" in r.output
    before = labeled.latest_snapshot()
    for body, message in [("NULL::VARCHAR AS image_id", "NOT NULL constraint failed: selections.image_id"),
                          ("image_id", "returned 1 rows with copies < 1")]:
        rule = tmp_path / "rule.sql"
        copies = "CASE WHEN image_id = 'x1' THEN 0 ELSE 1 END"
        rule.write_text(f"SELECT {body}, probs AS target, prob_classes AS target_classes, predicted, confidence, "
                        f"{copies} AS copies, label_run FROM pseudo_labels WHERE confidence > 0.3")
        r = nsd(labeled, "balance", "--name", "rule", "--sql", str(rule))
        assert r.exit_code == 2 and message in r.output and len(r.output.strip().splitlines()) == 1, r.output
    assert labeled.latest_snapshot() == before


ERRORS = [
    (["--threshold", "1.5"], "1.5 is not in the range 0<=x<=1"),
    (["--threshold", "-0.1"], "-0.1 is not in the range 0<=x<=1"),
    (["--per-class", "0"], "0 is not in the range 1<=x<=1000000"),
    (["--run", "label-nope"], "unknown label run 'label-nope' at version"),
    (["--threshold", "1"], "selection would be empty"),
    (["--name", "taken"], "selection 'taken' already exists"),
    (["--name", "bad name"], "invalid selection name"),
    (["--hard", "--sharpen", "2"], "--hard and --sharpen exclude each other"),
    (["--sharpen", "0"], "0.01<=x<=100"),
    (["--labels", "99"], "unknown version 99"),
    ([], "--name is required"),
]


def test_non_finite_labels_never_reach_a_selection(tmp_path):
    """NaN or infinite confidences pass no threshold; a NaN probability with a finite confidence
    refuses the whole selection; sharpening at the lowest T keeps tiny probabilities finite."""
    store = new_store(tmp_path / "s")
    nan, inf = float("nan"), float("inf")
    add_labels(store, [("ok", 0, 0.9, dense(0, 0.9)), ("nanconf", 1, nan, [nan] * 3), ("infconf", 1, inf, dense(1, 0.9)),
                       ("tiny", 2, 0.5, [1e-7, 1e-6, 0.5])])
    balance(store, "clean", run=RUN, duplicate=False)
    assert sorted(selection(store, "clean")) == ["ok", "tiny"]
    balance(store, "sharpest", run=RUN, sharpen=0.01, duplicate=False)
    target = selection(store, "sharpest")["tiny"]["target"]
    assert all(math.isfinite(x) for x in target) and target[2] == pytest.approx(1.0)
    add_labels(store, [("bad", 0, 0.9, [nan, 0.05, 0.05]), ("neg", 0, 0.8, [0.9, -0.1, 0.2])], run_id="label-bad")
    before = store.latest_snapshot()
    r = nsd(store, "balance", "--name", "poisoned", "--run", "label-bad")
    assert r.exit_code == 2 and "2 selected rows have targets that are not probabilities" in r.output
    assert len(r.output.strip().splitlines()) == 1 and store.latest_snapshot() == before
    for args in (["--sharpen", "0.001"], ["--sharpen", "1e-300"]):
        r = nsd(store, "balance", "--name", "x", "--run", RUN, *args)
        assert r.exit_code == 2 and "0.01<=x<=100" in r.output, r.output
    with pytest.raises(Exception, match=r"--sharpen must be a number in \[0.01, 100\], got 1e-300$"):
        balance(store, "x", run=RUN, sharpen=1e-300)
    with pytest.raises(Exception, match=r"--per-class must be a whole number in \[1, 1000000\], got 1000000000$"):
        balance(store, "x", run=RUN, per_class=10**9)  # the CLI's cap holds for Python callers too


def test_errors_are_one_line_exit_2(labeled):
    balance(labeled, "taken", per_class=1)
    before = labeled.latest_snapshot()
    for args, message in ERRORS:
        argv = ["balance", *args]
        if args and "--name" not in args:
            argv += ["--name", "new"]
        r = nsd(labeled, *argv)
        assert r.exit_code == 2, (args, r.output)
        assert message in r.output, (message, r.output)
        assert len(r.output.strip().splitlines()) == 1 and "Traceback" not in r.output
    assert labeled.latest_snapshot() == before


def test_allow_empty_and_no_labels(store, labeled):
    r = nsd(store, "balance", "--name", "x")
    assert r.exit_code == 2 and "no pseudo labels at version 1" in r.output
    out = balance(labeled, "empty", threshold=1.0, allow_empty=True)
    assert out["rows"] == 0 and selection(labeled, "empty") == {}


def test_lineage_and_pinned_version(runs3):
    r = nsd(runs3, "balance", "--name", "old", "--labels", runs3.first, "--per-class", "2", "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    # at the first label snapshot the most recent run is RUN, not the newer label-sparse
    assert out["label_run"] == RUN and out["labels_version"] == runs3.first
    snap = runs3.snapshots()[-1]
    assert snap["snapshot_id"] == out["snapshot_id"]
    lin = snap["lineage"]
    assert lin["command"] == "balance" and lin["reads"] == {"pseudo_labels": runs3.first, "images": runs3.first}
    assert lin["rows"] == {"selections": 1}
    assert selection(runs3, "old")["i"]["copies"] == 2  # one candidate, K=2: two copies
    assert lin["params"]["per_class"] == 2 and lin["params"]["label_run"] == RUN
    assert lin["params"]["sql_sha256"] == hashlib.sha256(balance_sql().encode()).hexdigest()
    assert lin["params"]["sql"].endswith("balance.sql") and lin["params"]["name"] == "old"
    with runs3.reader() as con:
        assert con.execute("SELECT kind FROM runs WHERE name = 'old'").fetchall() == [("balance",)]
    assert balance(runs3, "newest")["label_run"] == "label-sparse"  # default: the most recent run


def test_show_sql_runs_standalone_in_duckdb(labeled):
    r = nsd(None, "balance", "--show-sql")
    assert r.exit_code == 0 and r.output == balance_sql() and "$per_class" in r.output
    balance(labeled, "nsd")
    snap = labeled.latest_snapshot() - 1
    # What the SQL file's header tells a user to do: pin a version, PREPARE, EXECUTE.
    con = labeled.connect(snapshot=snap)
    con.execute("CREATE TEMP TABLE near_test (image_id VARCHAR)")  # no leakage gate
    query = balance_sql().rstrip().rstrip(";")
    con.execute(f"PREPARE balance AS {query}")
    cur = con.execute(f"EXECUTE balance(label_run := '{RUN}', threshold := 0.3, per_class := NULL, "
                      "duplicate := true, hard := false, sharpen := NULL)")
    names = [d[0] for d in cur.description]
    rows = [dict(zip(names, r)) for r in cur.fetchall()]
    con.close()
    assert (sorted((r["image_id"], r["copies"]) for r in rows)
            == sorted((i, v["copies"]) for i, v in selection(labeled, "nsd").items()))


def reference(rows, leaked, threshold, k=None, duplicate=True):
    """The README rules in plain Python: {image_id: (predicted, copies, confidence)}."""
    best = {}
    for pos, (image, pred, conf, _probs) in enumerate(rows):
        if image in leaked or not conf > threshold:
            continue
        key = (-conf, pred, pos)  # most confident, then lower class, then first written
        if image not in best or key < best[image][0]:
            best[image] = (key, pred, conf)
    classes = {}
    for image, (_, pred, conf) in best.items():
        classes.setdefault(pred, []).append((-conf, image))
    if k is None:
        k = max(1, math.floor(statistics.median(len(c) for c in classes.values())))
    out = {}
    for pred, members in classes.items():
        members.sort()
        n = len(members)
        for rank, (neg_conf, image) in enumerate(members[:k], start=1):
            copies = 1 if n >= k or not duplicate else k // n + (rank <= k % n)
            out[image] = (pred, copies, -neg_conf)
    return out, k


def test_random_tables_match_a_python_reference(tmp_path):
    """Thousands of rows with ties, bucket edges, repeated images and leakage, several K."""
    import random

    rng = random.Random(7)
    s = new_store(tmp_path / "store")
    # Confidences on a coarse grid (many ties), on the 1/128 bucket edges, and exactly 1.
    grid = [round(0.25 + 0.005 * i, 3) for i in range(151)] + [i / 128 for i in range(32, 129)]
    weights = [2 ** (c % 7) for c in range(9)]  # skewed class sizes: some capped, some duplicated
    rows = []
    for i in range(3000):
        image = f"img{rng.randrange(2600):05d}"  # ~13% of images get two or more rows
        pred = rng.choices(range(9), weights)[0]
        conf = rng.choice(grid)
        rows.append((image, pred, conf, dense(pred % 3, min(conf, 1.0))))
    # exact copies and same-confidence rows of another class for the dedup tie-breaks
    rows += [rows[i] for i in range(0, 3000, 97)] + [(r[0], (r[1] + 1) % 9, r[2], r[3]) for r in rows[5:3000:211]]
    leaked = {f"img{j:05d}" for j in range(0, 2600, 37)}
    add_split(s, {"labeled": sorted(leaked)[::2], "test": sorted(leaked)[1::2]})
    add_labels(s, rows)
    add_labels(s, [(r[0], r[1], 0.99, r[3]) for r in rows[:50]], run_id="label-other")  # another run
    with s.reader() as con:  # confidence is stored as FLOAT: compare what was stored
        stored = dict(con.execute("SELECT rowid, confidence FROM pseudo_labels WHERE label_run = ?", [RUN]).fetchall())
    rows = [(img, pred, stored[i], p) for i, (img, pred, _, p) in enumerate(rows)]
    for name, kwargs in [("median", {}), ("k40", {"per_class": 40}), ("k400", {"per_class": 400}),
                         ("once", {"per_class": 400, "duplicate": False}), ("t07", {"threshold": 0.7})]:
        out = balance(s, name, run=RUN, **kwargs)
        want, k = reference(rows, leaked, kwargs.get("threshold", 0.3), kwargs.get("per_class"),
                            kwargs.get("duplicate", True))
        got = {i: (r["predicted"], r["copies"], r["confidence"]) for i, r in selection(s, name).items()}
        assert out["per_class"] == k
        assert got.keys() == want.keys(), name
        assert got == {i: (p, c, pytest.approx(conf)) for i, (p, c, conf) in want.items()}, name
