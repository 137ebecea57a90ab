"""schemas/ingest_plan.sql run on its own in DuckDB: dedup and the labeled subset."""

import hashlib

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nsd.schemas import read_sql


def _plan(tmp_path, staged_rows, store_ids=(), labeled_per_class=None, seed=0, label_map=None):
    """Rows (ord, image_id, role, label) staged as ingest stages them -> the plan, by ord."""
    staged = tmp_path / "images.parquet"
    ords, ids, roles, labels = zip(*staged_rows)
    pq.write_table(pa.table({"ord": pa.array(ords, pa.int64()), "image_id": pa.array(ids, pa.string()),
                             "role": pa.array(roles, pa.string()), "label": pa.array(labels, pa.int32())}),
                   staged)
    label_map = label_map if label_map is not None else {0: 10, 1: 11}
    con = duckdb.connect()
    con.register("label_map", pa.table({"label": pa.array(list(label_map), pa.int32()),
                                        "class_id": pa.array(list(label_map.values()), pa.int32())}))
    con.execute("CREATE TABLE images (image_id VARCHAR, split VARCHAR)")
    for image_id in store_ids:
        con.execute("INSERT INTO images VALUES (?, 'unlabeled')", [image_id])
    # As ingest runs it (engine/ingest.py, _commit).
    con.execute("CREATE TEMP TABLE ingest_plan AS\n" + read_sql("ingest_plan"),
                {"staged": str(staged), "seed": str(seed), "labeled_per_class": labeled_per_class})
    rows = con.execute("SELECT ord, image_id, class_id, split, role, new FROM ingest_plan ORDER BY ord")
    cols = [d[0] for d in rows.description]
    return [dict(zip(cols, r)) for r in rows.fetchall()]


def test_the_first_copy_of_an_image_wins_and_the_store_s_images_are_not_new(tmp_path):
    rows = [(0, "a", "labeled", 0), (1, "b", "labeled", 1), (2, "a", "labeled", 1), (3, "c", "unlabeled", None),
            (4, "c", "unlabeled", None)]
    plan = _plan(tmp_path, rows, store_ids=["b"])
    assert [(r["ord"], r["image_id"], r["class_id"], r["split"], r["new"]) for r in plan] == [
        (0, "a", 10, "labeled", True), (1, "b", 11, "labeled", False), (3, "c", None, "unlabeled", True)]


def test_labeled_per_class_keeps_the_seeded_first_n_of_each_class(tmp_path):
    rows = [(i, f"img{i:03d}", "labeled", i % 2) for i in range(40)] + [(40 + i, f"t{i}", "test", i % 2)
                                                                        for i in range(6)]
    plan = _plan(tmp_path, rows, labeled_per_class=3, seed=7)
    for label, class_id in ((0, 10), (1, 11)):
        ids = [f"img{i:03d}" for i in range(40) if i % 2 == label]
        # The seeded order: md5 of "<seed>:<image_id>", whatever the source order.
        expected = sorted(sorted(ids, key=lambda x: hashlib.md5(f"7:{x}".encode()).hexdigest())[:3])
        kept = sorted(r["image_id"] for r in plan if r["class_id"] == class_id and r["split"] == "labeled")
        assert kept == expected
        moved = [r for r in plan if r["class_id"] == class_id and r["split"] == "unlabeled"]
        assert len(moved) == 17 and {r["role"] for r in moved} == {"labeled"}  # gold label kept as class_id
    assert sum(r["split"] == "test" for r in plan) == 6  # only the labeled split is cut
    # Another seed picks another subset; the source order does not matter.
    assert plan != _plan(tmp_path, rows, labeled_per_class=3, seed=8)
    reordered = _plan(tmp_path, [(99 - o, i, r, lab) for o, i, r, lab in rows], labeled_per_class=3, seed=7)
    assert sorted((r["image_id"], r["split"]) for r in reordered) == sorted((r["image_id"], r["split"]) for r in plan)


@pytest.mark.parametrize("n", [None, 0, 2**64])
def test_labeled_per_class_none_zero_and_huge(tmp_path, n):
    rows = [(i, f"img{i}", "labeled", i % 2) for i in range(8)]
    splits = [r["split"] for r in _plan(tmp_path, rows, labeled_per_class=n)]
    assert splits == (["unlabeled"] * 8 if n == 0 else ["labeled"] * 8)
