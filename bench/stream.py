"""Benchmark: training input pipeline from the store vs the same pipeline over in-memory PNG bytes,
and peak RSS of a short student run at two pool sizes.

    .venv/bin/python bench/stream.py --images 20000 --workers 0 2
    .venv/bin/python bench/stream.py --memory 10000 50000 100000 --row-group-rows 0 8192

Both pipelines do the same work per image: PNG decode (transforms.decode) + RandAugment(2, 9) +
ToTensor + Normalize, batches of 256. The store side adds: Parquet block reads of a staged
plan, the epoch shuffle, and per-batch seeding. Staging time (DuckDB join + ordered write) is
a once-per-run cost and is reported separately.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def make_store(path: Path, n: int, unlabeled: int = 0, seed: int = 0, row_group_rows: int | None = None):
    """N labeled + UNLABELED 28x28 grey synthetic images, inserted via Arrow (fast), plus a selection.

    ROW_GROUP_ROWS sets the store's Parquet row-group size (DuckLake option) before the insert;
    None keeps DuckDB's default (122,880 rows per group).
    """
    import pyarrow as pa

    from helpers import png_bytes, synthetic_image
    from nsd.engine.store import Store

    store = Store(path)
    store.init()
    if row_group_rows:
        with store.connect() as con:
            con.execute("CALL lake.set_option('parquet_row_group_size', ?)", [int(row_group_rows)])
    rng = np.random.default_rng(seed)
    rows = {k: [] for k in ("image_id", "bytes", "split", "label")}
    for i in range(n + unlabeled):
        label = i % 10
        data = png_bytes(synthetic_image(label, rng, 28, 10))
        rows["image_id"].append(hashlib.sha256(data + i.to_bytes(4, "little")).hexdigest())
        rows["bytes"].append(data)
        rows["split"].append("labeled" if i < n else "unlabeled")
        rows["label"].append(label)
    table = pa.table(rows)

    def fn(con):
        con.register("new_images", table)
        con.execute("INSERT INTO classes SELECT range, 'c' || range FROM range(10)")
        con.execute("INSERT INTO images SELECT image_id, bytes, 'png', 28, 28, 1, 'bench', split, "
                    "CASE WHEN split = 'labeled' THEN label END, NULL, 'bench' FROM new_images")
        if unlabeled:
            con.execute("INSERT INTO selections SELECT 'pool', image_id, "
                        "list_transform(range(10), c -> CASE WHEN c = label THEN 1.0 ELSE 0.0 END)::FLOAT[], "
                        "NULL, label, 1.0, 1, 'bench' FROM new_images WHERE split = 'unlabeled'")
        return {"images": len(table)}

    store.write("bench", {"n": n}, fn)
    return store, rows["bytes"]


def throughput_store(store, workers: int, bs: int = 256) -> tuple[float, float]:
    import torch

    from nsd.engine import stream
    from nsd.engine.transforms import train_transform

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        plan = stream.stage_split(store, store.latest_snapshot(), "labeled", Path(tmp), 0, 10)
        staged = time.perf_counter() - t0
        tf = train_transform(28, (0.5,), (0.5,), 2, 9)
        ds = stream.StoreStream(plan, bs, tf, seed=0, epoch=0, image_size=28)
        t0, n = time.perf_counter(), 0
        for b in torch.utils.data.DataLoader(ds, batch_size=None, num_workers=workers,
                                             prefetch_factor=4 if workers else None):
            n += len(b["x"])
        return n / (time.perf_counter() - t0), staged


class _Memory:
    """The same decode + augment over PNG bytes held in a Python list (map-style dataset)."""

    def __init__(self, data, labels, tf):
        self.data, self.labels, self.tf = data, labels, tf

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        from nsd.engine.transforms import decode

        return self.tf(decode(self.data[i], 1)), self.labels[i]


def throughput_memory(data, workers: int, bs: int = 256) -> float:
    import torch

    from nsd.engine.transforms import train_transform

    ds = _Memory(data, [i % 10 for i in range(len(data))], train_transform(28, (0.5,), (0.5,), 2, 9))
    g = torch.Generator().manual_seed(0)
    dl = torch.utils.data.DataLoader(ds, batch_size=bs, shuffle=True, generator=g, num_workers=workers,
                                     prefetch_factor=4 if workers else None)
    t0, n = time.perf_counter(), 0
    for x, _ in dl:
        n += len(x)
    return n / (time.perf_counter() - t0)


def peak_rss_child(pool: int, steps: int, row_group_rows: int | None = None) -> dict:
    """Peak RSS (MiB, VmHWM) of a fresh process that trains a student for STEPS steps on a store with
    POOL selection rows (built in a separate process first), and the peak of staging alone."""
    with tempfile.TemporaryDirectory() as tmp:
        build = (f"import sys; sys.path.insert(0, {str(ROOT / 'bench')!r}); import stream as b; "
                 f"b.make_store(__import__('pathlib').Path({tmp!r}) / 's', 2000, {pool}, "
                 f"row_group_rows={row_group_rows!r})")
        subprocess.run([sys.executable, "-c", build], check=True)
        code = (
            "import resource, time, json\n"
            "from nsd.engine import stream\n"
            "from nsd.engine.store import Store\n"
            "from nsd.engine.train import train, TrainConfig\n"
            "def hwm():\n"
            "    return next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM')) / 1024\n"
            f"s = Store({tmp!r} + '/s')\n"
            "before = hwm()\n"
            "stage = stream.stage_selection\n"
            "peaks = {}\n"
            "def measured(*a, **k):\n"
            "    plan = stage(*a, **k); peaks['staging'] = hwm(); return plan\n"
            "stream.stage_selection = measured\n"
            "t = time.perf_counter()\n"
            "train(s, TrainConfig(name='m', arch='test_resnet', selection='pool', epochs=1, batch_size=64,\n"
            "      workers=2, progress=False, eval_split=None), stop_after_steps=" + str(steps) + ")\n"
            "print(json.dumps({'seconds': time.perf_counter() - t, 'imports_mib': before,\n"
            "  'after_staging_mib': peaks['staging'], 'self_mib': hwm(),\n"
            "  'workers_mib': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))\n"
        )
        out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
        return {"pool": pool, "row_group_rows": row_group_rows, **json.loads(out.stdout.strip().splitlines()[-1])}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=20000)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    ap.add_argument("--memory", type=int, nargs="*", default=None, help="pool sizes for the RSS benchmark")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--row-group-rows", type=int, nargs="+", default=[0],
                    help="store Parquet row-group sizes for the RSS benchmark (0: DuckDB's default)")
    args = ap.parse_args()
    if args.memory:
        print("| store row group | selection rows | after imports | staging peak | run peak "
              "| workers peak | seconds |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for rg in args.row_group_rows:
            for pool in args.memory:
                r = peak_rss_child(pool, args.steps, rg or None)
                print(f"| {rg or 'default'} | {pool:,} | {r['imports_mib']:,.0f} | {r['after_staging_mib']:,.0f} "
                      f"| {r['self_mib']:,.0f} | {r['workers_mib']:,.0f} | {r['seconds']:.1f} |", flush=True)
        return
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        store, data = make_store(Path(tmp) / "s", args.images)
        print(f"store with {args.images} images built in {time.perf_counter() - t0:.1f} s", flush=True)
        print("| workers | store img/s | memory img/s | ratio | staging s |")
        print("| --- | --- | --- | --- | --- |")
        for w in args.workers:
            mem = throughput_memory(data, w)
            st, staged = throughput_store(store, w)
            print(f"| {w} | {st:,.0f} | {mem:,.0f} | {st / mem:.2f} | {staged:.2f} |", flush=True)


if __name__ == "__main__":
    main()
