"""nsd export: a selection or split loads back with the real libraries (torchvision's ImageFolder,
datasets' load_from_disk, webdataset, DuckDB on Parquet), and an export never harms what is there."""

from __future__ import annotations

import json
import os

import pytest

from helpers import add_images, json_out, new_store, nsd, one_line_error, records

EVIL = "../../evil\x1b[31m name"


@pytest.fixture(scope="module")
def sel_store(tmp_path_factory):
    """4 classes (class 3 named hostilely), a label run by teacher t0 and selection `sel`: 8
    pool images, image k of class k % 4, soft targets, image 0 with 3 copies."""
    store = new_store(tmp_path_factory.mktemp("export") / "store")
    ids = add_images(store, {"labeled": 3, "test": 2, "unlabeled": 2}, num_classes=4)
    pool = ids[4 * 5:]
    rows = [(i, [0.7 if c == k % 4 else 0.1 for c in range(4)], k % 4, 3 if k == 0 else 1) for k, i in enumerate(pool)]

    def fn(con):
        con.execute("UPDATE classes SET name = ? WHERE class_id = 3", [EVIL])
        con.executemany("INSERT INTO pseudo_labels (image_id, label_run, teacher, predicted, confidence) "
                        "VALUES (?, 'label-x', 't0', ?, 0.7)", [(i, c) for i, _, c, _ in rows])
        con.executemany("INSERT INTO selections VALUES ('sel', ?, ?, NULL, ?, 0.7, ?, 'label-x')", rows)
        return {"selections": len(rows)}

    store.write("test-selection", {}, fn)
    return store, rows


def test_imagefolder_loads_in_torchvision_with_copies_and_soft_labels(sel_store, tmp_path):
    import pyarrow.parquet as pq
    from torchvision.datasets import ImageFolder

    store, rows = sel_store
    out = nsd(store, "export", "sel", tmp_path / "f", "--json")
    assert out.exit_code == 0, out.output
    manifest = json_out(out)
    assert (manifest["images"], manifest["rows_with_copies"]) == (8, 10)
    assert manifest["label_runs"] == ["label-x"] and manifest["teachers"] == ["t0"]
    assert manifest["snapshot"] == store.latest_snapshot() and manifest["kind"] == "selection"
    assert json.loads((tmp_path / "f" / "manifest.json").read_text()) == {k: v for k, v in manifest.items() if k != "path"}
    ds = ImageFolder(str(tmp_path / "f"))
    assert len(ds) == 10 and len(ds.classes) == 4
    assert [ds.class_to_idx[c] for c in sorted(ds.class_to_idx)] == [0, 1, 2, 3]  # folder order = class ids
    assert all(".." not in c and "\x1b" not in c for c in ds.classes)  # the hostile name stays inside
    by_id = {i: c for i, _, c, _ in rows}
    for path, label in ds.samples:
        assert label == by_id[os.path.basename(path).split("_")[0].split(".")[0]]
    ds[0][0].load()  # the original bytes decode
    stored = {r["image_id"]: r["bytes"] for r in records(store, "SELECT image_id, bytes FROM images")}
    for path, _ in ds.samples:  # byte for byte what the store holds
        assert open(path, "rb").read() == stored[os.path.basename(path).split("_")[0].split(".")[0]]
    labels = pq.read_table(tmp_path / "f" / "labels.parquet").to_pylist()
    assert len(labels) == 10 and sorted(r["copy"] for r in labels if r["image_id"] == rows[0][0]) == [0, 1, 2]
    assert all(r["target"] == pytest.approx(dict((i, t) for i, t, _, _ in rows)[r["image_id"]]) for r in labels)


def test_hf_webdataset_and_parquet_load_back(sel_store, tmp_path):
    import datasets
    import duckdb
    import webdataset as wds

    store, rows = sel_store
    assert nsd(store, "export", "sel", tmp_path / "hf", "--format", "hf").exit_code == 0
    ds = datasets.load_from_disk(str(tmp_path / "hf" / "dataset"))
    assert len(ds) == 10 and ds.features["label"].names[:3] == ["class0", "class1", "class2"]
    assert ds.features["label"].names[3] == EVIL
    first = ds[0]
    assert first["image"].size == (16, 16) and len(first["soft_label"]) == 4

    out = nsd(store, "export", "sel", tmp_path / "wds", "--format", "webdataset", "--shard-size", "4")
    assert out.exit_code == 0, out.output
    shards = sorted(str(p) for p in (tmp_path / "wds").glob("shard-*.tar"))
    assert len(shards) == 3  # 10 samples, 4 a shard
    samples = list(wds.WebDataset(shards, shardshuffle=False).decode("pil"))
    assert len(samples) == 10 and all(int(s["cls"]) == s["json"]["class_id"] for s in samples)
    assert samples[0]["png"].size == (16, 16) and len(samples[0]["json"]["soft_label"]) == 4
    raw = list(wds.WebDataset(shards, shardshuffle=False))
    stored = {r["image_id"]: r["bytes"] for r in records(store, "SELECT image_id, bytes FROM images")}
    assert all(s["png"] == stored[json.loads(s["json"])["image_id"]] for s in raw)
    copies = {}
    for s in raw:
        meta = json.loads(s["json"])
        copies[meta["image_id"]] = copies.get(meta["image_id"], 0) + 1
        assert meta["soft_label"] == pytest.approx(dict((i, t) for i, t, _, _ in rows)[meta["image_id"]])
    assert copies == {i: k for i, _, _, k in rows}

    assert nsd(store, "export", "sel", tmp_path / "pq", "--format", "parquet").exit_code == 0
    got = duckdb.sql(f"SELECT image_id, class_id, copies FROM read_parquet('{tmp_path / 'pq'}/*.parquet') "
                     "ORDER BY image_id").fetchall()
    assert got == sorted((i, c, k) for i, _, c, k in rows)

    assert nsd(store, "export", "test", tmp_path / "t", "--format", "parquet").exit_code == 0
    test = records(store, "SELECT image_id, label FROM images WHERE split = 'test' ORDER BY image_id")
    assert duckdb.sql(f"SELECT image_id, class_id FROM read_parquet('{tmp_path / 't'}/*.parquet') ORDER BY 1"
                      ).fetchall() == [(r["image_id"], r["label"]) for r in test]


def test_exports_never_harm_what_is_there(sel_store, tmp_path):
    store, _ = sel_store
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    (tmp_path / "link").symlink_to(mine)
    for args, message in (([mine], "holds no nsd output"), ([tmp_path / "link"], "symbolic link"),
                          ([store.root / "x"], "inside the store"), ([tmp_path / "no" / "x"], "does not exist"),
                          ([tmp_path / "u", "--format", "imagefolder"], None),
                          ([tmp_path / "z", "--format", "zip"], "'zip'")):
        source = "unlabeled" if message is None else "sel"
        one_line_error(nsd(store, "export", source, *args), 2, message or "unlabeled split has no classes")
    one_line_error(nsd(store, "export", "nosuch", tmp_path / "n"), 2, "unknown or empty selection")
    assert (mine / "notes.txt").read_text() == "keep" and not (tmp_path / "u").exists()
    assert nsd(store, "export", "sel", tmp_path / "e").exit_code == 0
    one_line_error(nsd(store, "export", "sel", tmp_path / "e"), 2, "pass --force")
    assert nsd(store, "export", "sel", tmp_path / "e", "--force", "--format", "parquet").exit_code == 0
    assert json.loads((tmp_path / "e" / "manifest.json").read_text())["format"] == "parquet"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temporary left
