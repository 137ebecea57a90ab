"""nsd ingest: every source kind, splits, --labeled-per-class, dedupe, rejects, CLI errors."""

import gzip
import hashlib
import json
import struct

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from helpers import new_store, nsd, png_bytes, records, rows, synthetic_image
from nsd.engine import sources as sources_mod
from nsd.engine.errors import UsageError
from nsd.engine.ingest import ingest
from nsd.engine.sources import FASHION_MNIST_CLASSES


# --------------------------------------------------------------------------- test data


def write_idx(folder, prefix, images, labels=None, gz=True):
    """MNIST-format files: <prefix>-images-idx3-ubyte[.gz] (+ labels), big-endian headers."""
    folder.mkdir(parents=True, exist_ok=True)
    suffix = ".gz" if gz else ""
    opener = gzip.open if gz else open
    n, h, w = images.shape
    path = folder / f"{prefix}-images-idx3-ubyte{suffix}"
    with opener(path, "wb") as f:
        f.write(struct.pack(">4B3I", 0, 0, 8, 3, n, h, w) + images.astype(np.uint8).tobytes())
    if labels is not None:
        with opener(folder / f"{prefix}-labels-idx1-ubyte{suffix}", "wb") as f:
            f.write(struct.pack(">4BI", 0, 0, 8, 1, n) + np.asarray(labels, np.uint8).tobytes())
    return path


def idx_data(per_class, num_classes, seed=0, size=8):
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(num_classes), per_class)
    images = np.stack([synthetic_image(int(c), rng, size, num_classes) for c in labels])
    return images, labels


def image_folder(root, classes=("cat", "dog"), per_class=3, seed=0):
    rng = np.random.default_rng(seed)
    for k, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            (root / name / f"{i}.png").write_bytes(png_bytes(synthetic_image(k, rng, 12, 4)))
    return root


# --------------------------------------------------------------------------- IDX


def test_idx_labeled_counts_shape_and_lineage(store, tmp_path):
    images, labels = idx_data(per_class=5, num_classes=3)
    path = write_idx(tmp_path / "src", "train", images, labels)
    result = ingest(store, str(path), progress=False)
    assert result.added == {"labeled": 15, "unlabeled": 0, "test": 0}
    assert (result.read, result.rejected, result.duplicates, result.classes_added) == (15, 0, 0, 3)
    got = records(store, "SELECT image_id, bytes, format, width, height, channels, source, label, ingest_run "
                         "FROM images ORDER BY source")
    assert len(got) == 15
    by_index = {int(r["source"].rsplit(":", 1)[1]): r for r in got}
    for i, r in by_index.items():
        assert r["image_id"] == hashlib.sha256(r["bytes"]).hexdigest()
        assert ((r["format"], r["width"], r["height"], r["channels"], r["label"], r["ingest_run"])
                == ("png", 8, 8, 1, labels[i], result.run_id))
        assert r["source"] == f"{path}:{i}"
    # the PNG holds exactly the IDX pixels
    from PIL import Image
    import io
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(by_index[7]["bytes"]))), images[7])
    assert rows(store, "SELECT class_id, name FROM classes ORDER BY 1") == [(0, "0"), (1, "1"), (2, "2")]
    [run] = records(store, "SELECT kind, params, row_counts FROM runs WHERE run_id = ?", [result.run_id])
    assert run["kind"] == "ingest" and json.loads(run["params"])["source"] == str(path)
    assert json.loads(run["row_counts"]) == {"images": 15, "classes": 3, "rejects": 0, "image_hashes": 15}
    assert store.snapshots()[-1]["snapshot_id"] == result.snapshot_id


def test_idx_without_labels_file_is_unlabeled_and_ungzipped_works(store, tmp_path):
    images, _ = idx_data(per_class=2, num_classes=2)
    path = write_idx(tmp_path / "src", "pool", images, None, gz=False)
    result = ingest(store, str(path), progress=False)
    assert result.added == {"labeled": 0, "unlabeled": 4, "test": 0}
    assert rows(store, "SELECT count(*), count(label), count(gold_label) FROM images") == [(4, 0, 0)]
    with pytest.raises(UsageError, match="no labels"):
        ingest(store, str(path), split="labeled", progress=False)


@pytest.mark.slow  # worker processes
def test_labeled_per_class_is_deterministic_and_hides_gold_labels(tmp_path):
    images, labels = idx_data(per_class=8, num_classes=4)
    path = write_idx(tmp_path / "src", "train", images, labels)

    def run(name, seed, workers):
        s = new_store(tmp_path / name)
        r = ingest(s, str(path), labeled_per_class=3, seed=seed, progress=False, workers=workers)
        return s, r

    s0, r0 = run("a", 0, 1)
    assert r0.added == {"labeled": 12, "unlabeled": 20, "test": 0}
    per_class = rows(s0, "SELECT label, count(*) FROM images WHERE split = 'labeled' GROUP BY 1 ORDER BY 1")
    assert per_class == [(0, 3), (1, 3), (2, 3), (3, 3)]
    # unlabeled: label hidden, gold label = the true IDX label
    unl = rows(s0, "SELECT source, label, gold_label FROM images WHERE split = 'unlabeled'")
    assert len(unl) == 20 and all(lab is None for _, lab, _ in unl)
    assert all(gold == labels[int(src.rsplit(":", 1)[1])] for src, _, gold in unl)
    assert rows(s0, "SELECT count(*) FROM images WHERE split = 'labeled' AND gold_label IS NOT NULL") == [(0,)]

    everything = "SELECT image_id, split, label, gold_label, source FROM images ORDER BY source"
    s0b, _ = run("b", 0, 2)  # same seed, worker processes: the very same rows
    assert rows(s0b, everything) == rows(s0, everything)
    s1, _ = run("c", 1, 1)   # another seed, another choice
    chosen = "SELECT image_id FROM images WHERE split = 'labeled' ORDER BY 1"
    assert rows(s1, chosen) != rows(s0, chosen)


def test_labeled_per_class_needs_labeled_split(store, tmp_path):
    images, labels = idx_data(per_class=2, num_classes=2)
    path = write_idx(tmp_path / "src", "train", images, labels)
    with pytest.raises(UsageError, match="labeled-per-class"):
        ingest(store, str(path), split="test", labeled_per_class=1, progress=False)
    assert rows(store, "SELECT count(*) FROM images") == [(0,)]


# --------------------------------------------------------------------------- fashion-mnist


def test_fashion_mnist_named_source_uses_debian_layout(store, tmp_path, monkeypatch):
    d = tmp_path / "fm"
    tr_images, tr_labels = idx_data(per_class=4, num_classes=10, seed=1)
    te_images, te_labels = idx_data(per_class=1, num_classes=10, seed=2)
    write_idx(d, "train", tr_images, tr_labels)
    write_idx(d, "t10k", te_images, te_labels)
    monkeypatch.setattr(sources_mod, "FASHION_MNIST_DIR", d)
    result = ingest(store, "fashion-mnist", labeled_per_class=1, seed=0, progress=False)
    assert result.added == {"labeled": 10, "unlabeled": 30, "test": 10}
    assert rows(store, "SELECT name FROM classes ORDER BY class_id") == [(n,) for n in FASHION_MNIST_CLASSES]
    assert rows(store, "SELECT count(*) FROM images WHERE split = 'test' AND source LIKE 'fashion-mnist/test:%' "
                       "AND label IS NOT NULL") == [(10,)]
    with pytest.raises(UsageError, match="drop --split"):
        ingest(store, "fashion-mnist", split="unlabeled", progress=False)


def test_fashion_mnist_falls_back_to_hub_and_fails_clearly_offline(store, tmp_path, monkeypatch):
    monkeypatch.setattr(sources_mod, "FASHION_MNIST_DIR", tmp_path / "absent")
    with pytest.raises(UsageError, match="zalando-datasets/fashion_mnist.*dataset-fashion-mnist"):
        ingest(store, "fashion-mnist", progress=False)


# --------------------------------------------------------------------------- folders


def test_class_folders_give_sorted_class_names_and_labels(store, tmp_path):
    root = image_folder(tmp_path / "pets", classes=("dog", "cat", "bird"), per_class=2)
    result = ingest(store, str(root), progress=False)
    assert result.added["labeled"] == 6
    assert rows(store, "SELECT class_id, name FROM classes ORDER BY 1") == [(0, "bird"), (1, "cat"), (2, "dog")]
    got = rows(store, "SELECT source, label, channels, format FROM images ORDER BY source")
    assert [(s.split("/")[-2], lab) for s, lab, _, _ in got] == [
        ("bird", 0), ("bird", 0), ("cat", 1), ("cat", 1), ("dog", 2), ("dog", 2)]
    assert {(c, f) for _, _, c, f in got} == {(1, "png")}

    # a folder with a subset of the classes maps onto the store's ids ...
    more = image_folder(tmp_path / "more", classes=("dog",), per_class=2, seed=9)
    ingest(store, str(more), progress=False)
    assert rows(store, "SELECT DISTINCT label FROM images WHERE source LIKE ?", [f"{more}/%"]) == [(2,)]
    # ... one with an unknown class is refused before anything is written
    before = store.latest_snapshot()
    odd = image_folder(tmp_path / "odd", classes=("cat", "fish"), per_class=1, seed=5)
    with pytest.raises(UsageError, match="class mismatch.*'fish'"):
        ingest(store, str(odd), progress=False)
    assert store.latest_snapshot() == before


def test_reingest_adds_nothing_and_dedupes_within_source(store, tmp_path):
    root = image_folder(tmp_path / "pets", per_class=3)
    (root / "cat" / "copy.png").write_bytes((root / "cat" / "0.png").read_bytes())
    first = ingest(store, str(root), progress=False)
    assert first.added["labeled"] == 6 and first.repeated_in_source == 1 and first.already_present == 0
    snap = store.latest_snapshot()
    again = ingest(store, str(root), progress=False)
    assert again.total_added == 0 and again.already_present == 6 and again.repeated_in_source == 1
    assert store.latest_snapshot() <= snap + 1
    assert rows(store, "SELECT count(*), count(DISTINCT image_id) FROM images") == [(6, 6)]


def test_corrupt_files_are_rejected_without_aborting(store, tmp_path):
    root = tmp_path / "pool"
    rng = np.random.default_rng(0)
    root.mkdir()
    for i in range(4):
        (root / f"{i}.png").write_bytes(png_bytes(synthetic_image(i % 4, rng, 10, 4)))
    (root / "broken.png").write_bytes(b"this is not an image")
    good = png_bytes(synthetic_image(1, rng, 10, 4))
    (root / "truncated.png").write_bytes(good[: len(good) // 2])
    (root / ".hidden").write_bytes(b"ignored")
    result = ingest(store, str(root), progress=False)
    assert result.added == {"labeled": 0, "unlabeled": 4, "test": 0}  # flat folder: unlabeled
    assert result.rejected == 2
    got = records(store, "SELECT source, reason, ingest_run FROM rejects ORDER BY source")
    assert [g["source"] for g in got] == [str(root / "broken.png"), str(root / "truncated.png")]
    assert all(g["reason"].startswith("undecodable") and g["ingest_run"] == result.run_id for g in got)


def test_single_rgb_jpeg_file(store, tmp_path):
    from PIL import Image

    path = tmp_path / "photo.jpg"
    Image.fromarray(np.full((5, 7, 3), 120, np.uint8)).save(path, quality=90)
    result = ingest(store, str(path), progress=False)
    assert result.added["unlabeled"] == 1
    assert rows(store, "SELECT format, width, height, channels FROM images") == [("jpeg", 7, 5, 3)]


# --------------------------------------------------------------------------- parquet and datasets


def test_parquet_hf_struct_with_string_labels_and_raw_bytes(store, tmp_path):
    rng = np.random.default_rng(0)
    names = ["zebra", "ant", "zebra", "moth", "ant"]
    structs = [{"bytes": png_bytes(synthetic_image(i % 4, rng, 9, 4)), "path": f"x{i}.png"} for i in range(5)]
    pq.write_table(pa.table({"image": structs, "label": names}), tmp_path / "labeled.parquet")
    result = ingest(store, str(tmp_path / "labeled.parquet"), progress=False)
    assert result.added["labeled"] == 5
    # discovered string labels get ids in name order
    assert rows(store, "SELECT class_id, name FROM classes ORDER BY 1") == [(0, "ant"), (1, "moth"), (2, "zebra")]
    got = rows(store, "SELECT source, label FROM images ORDER BY source")
    assert [lab for _, lab in got] == [2, 0, 2, 1, 0]

    raw = [png_bytes(synthetic_image(1, rng, 9, 4)) for _ in range(3)] + [b"junk"]
    pq.write_table(pa.table({"bytes": raw}), tmp_path / "pool.parquet")
    result = ingest(store, str(tmp_path / "pool.parquet"), progress=False)
    assert result.added["unlabeled"] == 3 and result.rejected == 1
    assert rows(store, "SELECT source FROM rejects") == [(f"{tmp_path / 'pool.parquet'}:3",)]


def test_parquet_without_image_column_is_a_usage_error(store, tmp_path):
    pq.write_table(pa.table({"pixels": [1, 2]}), tmp_path / "x.parquet")
    with pytest.raises(UsageError, match="no image column"):
        ingest(store, str(tmp_path / "x.parquet"), progress=False)


def test_dataset_saved_to_disk_with_classlabel(store, tmp_path):
    import datasets

    rng = np.random.default_rng(0)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["no", "yes"])})
    ds = datasets.Dataset.from_dict(
        {"image": [{"bytes": png_bytes(synthetic_image(i % 2, rng, 8, 2)), "path": None} for i in range(6)],
         "label": [i % 2 for i in range(6)]}, features=features)
    ds.save_to_disk(str(tmp_path / "saved"))
    result = ingest(store, str(tmp_path / "saved"), split="test", progress=False)
    assert result.added == {"labeled": 0, "unlabeled": 0, "test": 6}
    assert rows(store, "SELECT name FROM classes ORDER BY class_id") == [("no",), ("yes",)]
    assert rows(store, "SELECT label, count(*) FROM images GROUP BY 1 ORDER BY 1") == [(0, 3), (1, 3)]


def test_fsspec_url_source(store, tmp_path):
    root = image_folder(tmp_path / "pets", per_class=2)
    result = ingest(store, f"file://{root}", progress=False)
    assert result.added["labeled"] == 4


# --------------------------------------------------------------------------- CLI


def test_cli_missing_source_is_one_line_exit_2(store, tmp_path):
    res = nsd(store, "ingest", tmp_path / "nope")
    assert res.exit_code == 2
    assert res.stderr.strip() == f"error: source not found: {tmp_path / 'nope'}"
    assert "Traceback" not in res.output
    res = nsd(store, "ingest", "hf:no-such/dataset-xyz")
    assert res.exit_code == 2 and len(res.stderr.strip().splitlines()) == 1
    assert "cannot load Hugging Face dataset 'no-such/dataset-xyz'" in res.stderr


def test_cli_json_and_table(store, tmp_path):
    root = image_folder(tmp_path / "pets", per_class=2)
    res = nsd(store, "ingest", root, "--json")
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["added"] == {"labeled": 4, "unlabeled": 0, "test": 0} and out["rejected"] == 0
    res = nsd(store, "ingest", root)
    assert res.exit_code == 0 and "already in store" in res.stdout and "4" in res.stdout
    res = nsd(store, "ingest", root, "--split", "bogus")
    assert res.exit_code == 2


def test_hf_streaming_source_through_load_dataset(store, tmp_path):
    # hf:NAME goes through datasets.load_dataset(NAME, streaming=True); a local data
    # directory is a NAME datasets can stream offline.
    import datasets

    rng = np.random.default_rng(0)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["no", "yes"])})
    ds = datasets.Dataset.from_dict(
        {"image": [{"bytes": png_bytes(synthetic_image(i % 2, rng, 8, 2)), "path": None} for i in range(6)],
         "label": [1, 0, 1, 1, 0, 1]}, features=features)
    (tmp_path / "pets").mkdir()
    ds.to_parquet(str(tmp_path / "pets" / "train.parquet"))
    result = ingest(store, f"hf:{tmp_path / 'pets'}", progress=False)
    assert result.added["labeled"] == 6
    assert rows(store, "SELECT name FROM classes ORDER BY class_id") == [("no",), ("yes",)]
    got = rows(store, "SELECT source, label FROM images")
    assert sorted(got) == [(f"hf:{tmp_path / 'pets'}/train:{i}", lab) for i, lab in enumerate([1, 0, 1, 1, 0, 1])]


def test_empty_folder_commits_nothing_but_a_run(store, tmp_path):
    (tmp_path / "empty").mkdir()
    result = ingest(store, str(tmp_path / "empty"), progress=False)
    assert result.total_added == 0 and result.read == 0
    assert rows(store, "SELECT count(*) FROM runs WHERE run_id = ?", [result.run_id]) == [(1,)]


def test_labeled_source_sent_to_unlabeled_keeps_truth_in_gold_label(store, tmp_path):
    images, labels = idx_data(per_class=2, num_classes=3)
    path = write_idx(tmp_path / "src", "train", images, labels)
    result = ingest(store, str(path), split="unlabeled", progress=False)
    assert result.added == {"labeled": 0, "unlabeled": 6, "test": 0}
    got = rows(store, "SELECT source, label, gold_label FROM images ORDER BY source")
    assert [(lab, gold) for _, lab, gold in got] == [(None, int(labels[int(s.rsplit(':', 1)[1])])) for s, _, _ in got]
