"""Calibration and the leakage gate on the demo's data: what they change in a loop.

    .venv/bin/python bench/calibration.py [--seed 0] [--ways default,calibrate,no-leakage-gate]

A store like the demo's (Fashion-MNIST, 100 labels per class, the rest of the first 59,000
training images as the pool with hidden gold labels, the test split) plus a val split: the
last 1,000 training images, which no model trains on. Then `nsd loop` with its defaults, one
iteration, three ways: as is (leakage gate on), with --calibrate, and with --no-leakage-gate.
Per loop: the teacher's ECE against the pool's gold labels as labeled (and, calibrated,
before), the pseudo-label accuracy, the selection, the student's test accuracy.
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from nsd.engine.ingest import ingest
from nsd.engine.loop import LoopConfig, loop
from nsd.engine.store import Store
from nsd.schemas import read_sql

ROOT = Path(__file__).resolve().parent
FMNIST = Path("/usr/share/datasets/fashion-mnist")
VAL = 1000


def _idx(name: str, kind: str) -> np.ndarray:
    with gzip.open(FMNIST / f"{name}-{kind}-ubyte.gz", "rb") as f:
        data = f.read()
    return np.frombuffer(data[16:], np.uint8).reshape(-1, 28, 28) if kind.startswith("images") else \
        np.frombuffer(data[8:], np.uint8)


def _folders(root: Path) -> Path:
    """train (the first 59,000), val (the last 1,000) and test as class folders of PNGs."""
    if (root / "done").exists():
        return root
    x, y = _idx("train", "images-idx3"), _idx("train", "labels-idx1")
    xt, yt = _idx("t10k", "images-idx3"), _idx("t10k", "labels-idx1")
    for split, xs, ys in (("train", x[:-VAL], y[:-VAL]), ("val", x[-VAL:], y[-VAL:]), ("test", xt, yt)):
        for k, (image, label) in enumerate(zip(xs, ys)):
            folder = root / split / f"c{label}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(folder / f"{k:05d}.png")
    (root / "done").write_text("")
    return root


def _store(path: Path) -> Store:
    store = Store(path)
    if not store.exists():
        src = _folders(path.parent / "calibration-images")
        store.init()
        ingest(store, str(src / "train"), labeled_per_class=100, seed=0, progress=False)
        ingest(store, str(src / "val"), split="val", progress=False)
        ingest(store, str(src / "test"), split="test", progress=False)
    return store


def _ece(store: Store, run: str, undo: float | None) -> float:
    with store.reader() as con:
        rows = con.execute(read_sql("report_reliability"),
                           {"label_run": run, "bins": 15, "undo_temperature": undo}).fetchall()
    total = sum(r[1] for r in rows)
    return sum(r[1] / total * abs(r[3] - r[2]) for r in rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ways", default="default,calibrate,no-leakage-gate")
    args = ap.parse_args()
    store = _store(ROOT / "_work" / "calibration")
    out_path = ROOT / "results" / "calibration.json"
    results = json.loads(out_path.read_text()) if out_path.exists() else {}
    ways = {"default": ({}, {}), "calibrate": ({"calibrate": True}, {}),
            "no-leakage-gate": ({}, {"leakage_distance": None})}
    for way in args.ways.split(","):
        label, balance = ways[way]
        name = f"{way}-s{args.seed}"
        t = time.time()
        cfg = LoopConfig(name=name, models=("test_resnet",), iterations=1,
                         train=dict(seed=args.seed, progress=False), label=dict(progress=False, **label),
                         balance=balance)
        table = loop(store, cfg, log=lambda msg: print(msg, file=sys.stderr))["table"]
        with store.reader() as con:
            run, params = con.execute(
                "SELECT run_id, params FROM runs WHERE kind = 'label' AND name = ? ORDER BY finished_at DESC "
                "LIMIT 1", [f"{name}-m0"]).fetchone()
            near = con.execute("SELECT params FROM runs WHERE kind = 'balance' AND name = ?",
                               [f"{name}-sel1"]).fetchone()[0]
        cal = json.loads(params).get("calibration")
        results[name] = {
            "teacher_acc": table[0]["test_acc"], "student_acc": table[1]["test_acc"],
            "pseudo_label_acc": table[1]["pseudo_label_acc"], "selection_images": table[1]["selection_images"],
            "near_test_excluded": json.loads(near).get("near_test_excluded"),
            "ece_pool_as_labeled": round(_ece(store, run, None), 4),
            "ece_pool_before": round(_ece(store, run, cal["temperature"]), 4) if cal else None,
            "calibration": cal, "minutes": round((time.time() - t) / 60, 1)}
        out_path.write_text(json.dumps(results, indent=1) + "\n")
        print(name, json.dumps(results[name]))


if __name__ == "__main__":
    main()
