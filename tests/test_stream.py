"""Streaming from the store: determinism, rank/worker split, copies, resume, sparse targets."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from helpers import add_images, new_store
from nsd.engine import stream
from nsd.engine.transforms import eval_transform, train_transform


def add_selection(store, name, rows):
    """rows: (image_id, target list, target_classes or None, copies)."""
    def fn(con):
        con.executemany("INSERT INTO selections VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                        [(name, i, t, c, 0, 1.0, k, "label-test") for i, t, c, k in rows])
        return {"selections": len(rows)}

    return store.write("test-selection", {"name": name}, fn).snapshot_id


@pytest.fixture(scope="module")
def staged(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("stream")
    store = new_store(tmp / "store")
    ids = add_images(store, {"labeled": 25, "unlabeled": 10}, size=8)  # 100 labeled, 40 unlabeled
    unl = ids[100:]
    rows = [(i, [0.0, 0.0, 1.0, 0.0], None, 3 if k == 0 else 1) for k, i in enumerate(unl)]
    rows[1] = (unl[1], [0.75, 0.25], [2, 0], 1)  # sparse top-2 target
    snap = add_selection(store, "sel", rows)
    # Many small row groups so that block shuffling and block caching are really exercised, and
    # small staging groups (7 for the labeled plan, 3 for the pseudo plan) so grouping is too.
    saved = stream.BLOCK_ROWS, stream.WINDOW_BLOCKS, stream.GROUP_ROWS
    stream.BLOCK_ROWS, stream.WINDOW_BLOCKS, stream.GROUP_ROWS = 16, 2, 16
    try:
        lab = stream.stage_split(store, snap, "labeled", tmp / "stage", seed=7, num_classes=4)
        pse = stream.stage_selection(store, "sel", snap, snap, tmp / "stage", seed=7, num_classes=4)
        yield lab, pse, unl
    finally:
        stream.BLOCK_ROWS, stream.WINDOW_BLOCKS, stream.GROUP_ROWS = saved


def ids_of(ds, workers=0):
    out = []
    for b in DataLoader(ds, batch_size=None, num_workers=workers):
        out += b["ids"]
    return out


def test_plan_is_staged_in_small_blocks(staged):
    lab, pse, _ = staged
    assert lab.num_rows == 100 and len(lab.block_starts) - 1 == 7  # 6 x 16 + 4
    assert pse.num_rows == 42  # 40 images, one with 3 copies


def plan_groups(plan, key_sql, groups):
    """(group, key) of every plan row, in plan order; key_sql is an expression of ``id``."""
    import duckdb
    import pyarrow.parquet as pq

    ids = pq.read_table(plan.path, columns=["image_id"]).column(0).to_pylist()
    return duckdb.execute(f"SELECT k % {groups}::UBIGINT, k FROM (SELECT {key_sql} AS k, o "
                          "FROM (SELECT unnest(?) AS id, generate_subscripts(?, 1) AS o)) ORDER BY o",
                          [ids, ids]).fetchall()


def test_plan_is_staged_group_by_group(staged):
    lab, pse, unl = staged
    # Labeled: 100 rows in 7 hash groups, written one after the other, each sorted by its key.
    rows = plan_groups(lab, "md5_number(id || '/0/7')", 7)
    assert sorted({g for g, _ in rows}) == list(range(7))
    assert [g for g, _ in rows] == sorted(g for g, _ in rows)
    for g in range(7):
        keys = [k for gg, k in rows if gg == g]
        assert keys == sorted(keys) and len(keys) < 30
    # Pseudo: 42 rows in 3 groups by image, so the 3 copies of an image share a group.
    groups = [g for g, _ in plan_groups(pse, "md5_number(id || '7')", 3)]
    assert sorted(set(groups)) == [0, 1, 2] and groups == sorted(groups)


def test_staging_reports_missing_images_and_writes_empty_plans(tmp_path, monkeypatch):
    from nsd.engine.errors import UsageError

    monkeypatch.setattr(stream, "GROUP_ROWS", 4)
    store = new_store(tmp_path / "store")
    ids = add_images(store, {"unlabeled": 3}, size=8)
    snap = add_selection(store, "bad", [(i, [1.0, 0.0, 0.0, 0.0], None, 1) for i in ids] +
                         [("f" * 64, [1.0, 0.0, 0.0, 0.0], None, 2)])
    with pytest.raises(UsageError, match="names 1 images that are not in images"):
        stream.stage_selection(store, "bad", snap, snap, tmp_path / "stage", seed=0, num_classes=4)
    empty = stream.stage_split(store, snap, "labeled", tmp_path / "stage", seed=0, num_classes=4)
    assert empty.num_rows == 0 and len(empty.block_starts) == 1
    assert sorted(p.name for p in (tmp_path / "stage").iterdir()) == ["labeled.parquet", "pseudo.parquet"]


@pytest.mark.slow  # DataLoader worker processes
def test_shuffle_is_deterministic_by_seed_and_epoch(staged):
    lab, _, _ = staged
    a, b = stream.epoch_order(lab, 1, 0), stream.epoch_order(lab, 1, 0)
    assert np.array_equal(a, b)
    assert sorted(a.tolist()) == list(range(100))
    assert not np.array_equal(a, stream.epoch_order(lab, 1, 1))
    assert not np.array_equal(a, stream.epoch_order(lab, 2, 0))
    # And through real DataLoader workers: same ids in the same order.
    ds = stream.StoreStream(lab, 8, None, seed=1, decode_images=False)
    assert ids_of(ds, 0) == ids_of(ds, 2)


@pytest.mark.slow
def test_two_ranks_two_workers_cover_everything_without_overlap(staged):
    _, pse, unl = staged
    per_rank = []
    for rank in range(2):
        ds = stream.StoreStream(pse, 5, None, seed=3, rank=rank, world_size=2, decode_images=False)
        per_rank.append(ids_of(ds, workers=2))
    assert len(per_rank[0]) == len(per_rank[1]) == 21  # equal steps for DDP
    assert sorted(per_rank[0] + per_rank[1]) == sorted(unl + [unl[0]] * 2)
    # Odd total: padding wraps around, every rank still gets the same number of batches.
    lab_like = stream.StoreStream(pse, 4, None, seed=3, rank=1, world_size=4, decode_images=False)
    assert len(lab_like) == stream.batches_per_epoch(pse, 4, 4) == 3


def test_copies_are_expanded(staged):
    _, pse, unl = staged
    seen = ids_of(stream.StoreStream(pse, 6, None, seed=0, decode_images=False))
    assert len(seen) == 42
    assert seen.count(unl[0]) == 3 and seen.count(unl[5]) == 1


def test_sparse_targets_become_dense(staged):
    _, pse, unl = staged
    for b in DataLoader(stream.StoreStream(pse, 64, eval_transform(8, (0.5,), (0.5,)), seed=0), batch_size=None):
        y = dict(zip(b["ids"], b["y"]))
        assert y[unl[1]].tolist() == [0.25, 0.0, 0.75, 0.0]
        assert y[unl[2]].tolist() == [0.0, 0.0, 1.0, 0.0]
        assert b["x"].shape == (42, 1, 8, 8)


@pytest.mark.slow
def test_resume_mid_epoch_gives_the_same_samples_and_augmentations(staged):
    lab, _, _ = staged
    tf = train_transform(8, (0.5,), (0.5,), randaug_n=2, randaug_m=9)
    it = iter(DataLoader(stream.StoreStream(lab, 8, tf, seed=5, cycle=True), batch_size=None, num_workers=2))
    full = [next(it) for _ in range(20)]  # 13 batches per epoch: crosses into epoch 1
    del it
    it = iter(DataLoader(stream.StoreStream(lab, 8, tf, seed=5, skip_batches=9, cycle=True), batch_size=None))
    resumed = [next(it) for _ in range(11)]
    for a, b in zip(full[9:], resumed):
        assert a["ids"] == b["ids"] and (a["epoch"], a["batch"]) == (b["epoch"], b["batch"])
        assert torch.equal(a["x"], b["x"])
    assert full[13]["epoch"] == 1 and full[13]["batch"] == 0
    # RandAugment really changed pixels relative to the unnoised transform.
    ev = list(DataLoader(stream.StoreStream(lab, 8, eval_transform(8, (0.5,), (0.5,)), seed=5), batch_size=None))
    assert ev[0]["ids"] == full[0]["ids"] and not torch.equal(ev[0]["x"], full[0]["x"])


def test_images_decoded_a_batch_at_a_time_give_the_same_batches(staged):
    # With the image size known, small PNGs are decoded together (transforms.decode_batch):
    # the batches, noise included, equal those of decoding one by one.
    lab, pse, _ = staged
    for plan in (lab, pse):
        tf = train_transform(8, (0.5,), (0.5,), randaug_n=2, randaug_m=9, random_erasing=0.5)
        one_by_one = list(stream.StoreStream(plan, 16, tf, seed=3))
        batched = list(stream.StoreStream(plan, 16, tf, seed=3, image_size=8))
        assert len(batched) == len(one_by_one) > 1
        for a, b in zip(one_by_one, batched):
            assert a["ids"] == b["ids"] and torch.equal(a["x"], b["x"]) and torch.equal(a["y"], b["y"])


def test_readme_stream_example_runs_and_the_stream_is_deterministic(tmp_path, monkeypatch):
    """The README's own-training-loop example, run as written against a store in ./nsd-store."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    code = re.search(r"<!-- readme-example: stream -->\n```python\n(.*?)```", readme, re.S).group(1)
    store = new_store(tmp_path / "nsd-store")
    add_images(store, {"labeled": 10, "test": 2}, num_classes=4)  # 40 labeled: 2 batches of 32
    monkeypatch.chdir(tmp_path)
    printed = []
    exec(compile(code, "README.md", "exec"), {"print": lambda *a: printed.append(a)})
    assert [(e, b, shape) for e, b, shape, _ in printed] == [(0, 0, (32, 1, 16, 16)), (0, 1, (8, 1, 16, 16))]

    def ids(**kw):
        with stream.open_stream(store, "labeled", batch_size=8, seed=3, **kw) as ds:
            return [i for batch in ds for i in batch["ids"]]

    everything = ids()
    assert len(everything) == 40 == len(set(everything)) and ids() == everything  # same seed, same order
    assert ids(skip_batches=2) == everything[16:]  # resumes exactly
    halves = ids(rank=0, world_size=2) + ids(rank=1, world_size=2)
    assert sorted(halves) == sorted(everything)  # two ranks: disjoint halves of the same epoch
