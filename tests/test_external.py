"""nsd label --from: soft labels computed elsewhere become a label run the rest of nsd uses."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from helpers import add_images, json_out, new_store, nsd, one_line_error, records
from nsd.engine.balance import balance
from nsd.engine.lineage import lineage


@pytest.fixture()
def pool(tmp_path):
    store = new_store(tmp_path / "store")
    ids = add_images(store, {"labeled": 2, "unlabeled": 3}, num_classes=3)  # 9 pool images
    return store, ids[6:], ids[:6]


def write(path, rows):
    pq.write_table(pa.table({"image_id": [r[0] for r in rows],
                             "probs": pa.array([r[1] for r in rows], pa.list_(pa.float64()))}), path)
    return path


def test_external_soft_labels_are_checked_and_become_a_label_run(pool, tmp_path):
    store, unl, labeled = pool
    nan = float("nan")
    good = [(i, [0.8, 0.15, 0.05] if k % 2 else [0.1, 0.2, 0.7]) for k, i in enumerate(unl[:6])]
    bad = [(unl[6], [0.5, 0.5]), (unl[7], [nan, 0.5, 0.5]), (unl[8], [0.9, 0.9, 0.1]), (labeled[0], [1.0, 0, 0]),
           ("nope", [1.0, 0, 0]), (unl[0], [0.8, 0.1, 0.1])]  # unl[0] twice: both refused
    (tmp_path / "in").mkdir()
    write(tmp_path / "in" / "a.parquet", good[:3])
    write(tmp_path / "in" / "b.parquet", good[3:] + bad)
    before = store.latest_snapshot()
    out = nsd(store, "label", "--from", tmp_path / "in", "--teacher", "vit-cluster", "--json")
    assert out.exit_code == 0, out.output
    res = json_out(out)
    assert (res["rows"], res["rejected"]) == (5, 7) and res["snapshot_id"] == before + 1
    reasons = {r["image_id"]: r["reason"] for r in res["rejects"]}
    assert reasons[unl[6]] == "probability vector of length 2, the store has 3 classes"
    assert reasons[unl[7]] == "NaN, infinite or negative probabilities"
    assert reasons[unl[8]].startswith("probabilities sum to 1.9")
    assert reasons[labeled[0]] == reasons["nope"] == "not an image of the unlabeled pool"
    assert reasons[unl[0]] == "image id given more than once"
    got = records(store, "SELECT image_id, teacher, predicted, confidence FROM pseudo_labels WHERE label_run = ? "
                         "ORDER BY image_id", [res["run_id"]])
    assert [(r["image_id"], r["predicted"]) for r in got] == sorted(
        (i, 0 if p[0] > 0.5 else 2) for i, p in good[1:])
    assert {r["teacher"] for r in got} == {"external:vit-cluster"}
    assert all(r["confidence"] == pytest.approx(0.8 if r["predicted"] == 0 else 0.7) for r in got)
    # the rest of the pipeline treats it like any other label run
    sel = balance(store, "ext-sel", run=res["run_id"], threshold=0.3, per_class=10, duplicate=False)
    assert sel["rows"] == 5
    from nsd.engine.train import TrainConfig, train

    train(store, TrainConfig(name="st", arch="test_resnet", selection="ext-sel", steps=1, batch_size=4, workers=0,
                             progress=False, eval_split=None))
    chain = lineage(store, "st")
    assert [(link["kind"], link["name"]) for link in chain] == [
        ("model", "st"), ("selection", "ext-sel"), ("label_run", res["run_id"]), ("external_teacher", "vit-cluster")]


def test_nothing_is_committed_without_one_good_row(pool, tmp_path):
    store, unl, _ = pool
    before = store.latest_snapshot()
    one_line_error(nsd(store, "label", "--from", write(tmp_path / "x.parquet", [(unl[0], [0.5, 0.6, 0.1])]),
                       "--teacher", "t"), 2, "no row is a usable soft label")
    pq.write_table(pa.table({"id": ["a"]}), tmp_path / "cols.parquet")
    one_line_error(nsd(store, "label", "--from", tmp_path / "cols.parquet", "--teacher", "t"), 2,
                   "needs Parquet columns image_id and probs")
    one_line_error(nsd(store, "label", "--from", tmp_path / "none", "--teacher", "t"), 2, "no such file")
    # far more rows than the pool has images: refused from the footers, before any row is read
    from nsd.engine.external import max_rows

    n = max_rows(len(unl)) + 1
    many = write(tmp_path / "many.parquet", [(unl[k % len(unl)], [1.0, 0, 0]) for k in range(n)])
    one_line_error(nsd(store, "label", "--from", many, "--teacher", "t"), 2,
                   f"{n:,} rows, but the pool has {len(unl):,} images")
    (tmp_path / "fake.parquet").write_bytes(b"PAR1" + b"\0" * 64 + b"PAR1")
    one_line_error(nsd(store, "label", "--from", tmp_path / "fake.parquet", "--teacher", "t"), 2,
                   "not readable as Parquet")
    one_line_error(nsd(store, "label", "--from", tmp_path / "x.parquet", "--teacher", "bad name"), 2, "teacher name")
    assert store.latest_snapshot() == before


def test_a_label_run_round_trips_through_a_file(pool, tmp_path):
    """Soft labels written out and imported again balance to the same selection."""
    store, unl, _ = pool
    rows = [(i, [[0.6, 0.3, 0.1], [0.2, 0.5, 0.3], [0.05, 0.05, 0.9]][k % 3]) for k, i in enumerate(unl)]
    first = json_out(nsd(store, "label", "--from", write(tmp_path / "a.parquet", rows), "--teacher", "t1", "--json"))
    exported = records(store, "SELECT image_id, probs FROM pseudo_labels WHERE label_run = ?", [first["run_id"]])
    pq.write_table(pa.table({"image_id": [r["image_id"] for r in exported],
                             "probs": pa.array([r["probs"] for r in exported], pa.list_(pa.float32()))}),
                   tmp_path / "b.parquet")
    second = json_out(nsd(store, "label", "--from", tmp_path / "b.parquet", "--teacher", "t2", "--json"))
    assert second["rejected"] == 0 and second["run_id"] != first["run_id"]
    balance(store, "s1", run=first["run_id"])
    balance(store, "s2", run=second["run_id"])
    pick = "SELECT image_id, predicted, copies, target FROM selections WHERE selection = ? ORDER BY image_id"
    a, b = records(store, pick, ["s1"]), records(store, pick, ["s2"])
    assert [(r["image_id"], r["predicted"], r["copies"]) for r in a] == [(r["image_id"], r["predicted"], r["copies"])
                                                                          for r in b]
    assert all(x["target"] == pytest.approx(y["target"]) for x, y in zip(a, b)) and len(a) == 9
