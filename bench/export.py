"""nsd export of a whole Fashion-MNIST selection against a plain `datasets` save of the same rows.

    .venv/bin/python bench/export.py --store bench/_work/study-fmnist-100 --selection s0-sel1 --repeats 2

Each side runs in a fresh process (time and peak RSS of that process), sides alternated:

* ``nsd-<format>``: ``export(store, selection, out, fmt)`` for each format (streamed in batches);
* ``plain-hf``: the obvious hand-written way: one DuckDB query of the same rows into Python
  lists (copies expanded), ``datasets.Dataset.from_dict`` and ``save_to_disk``.

Both hf sides are loaded back and compared (row count, image ids, labels) before timing counts.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

SIDE = r"""
import json, resource, sys, time
from nsd.engine.store import Store
kind, store, selection, out = sys.argv[1:]
t = time.perf_counter()
if kind.startswith("nsd-"):
    from nsd.engine.export import export
    m = export(Store(store), selection, out, kind[4:], progress=False)
    rows = m["rows_with_copies"]
else:
    import datasets
    from nsd.schemas import read_sql
    s = Store(store)
    with s.reader() as con:
        got = con.execute(read_sql("export_selection"), {"version": s.resolve(None), "selection": selection}).fetchall()
        names = [n for (n,) in con.execute("SELECT name FROM classes ORDER BY class_id").fetchall()]
    cols = {"image": [], "label": [], "soft_label": [], "image_id": []}
    for image_id, data, cid, target, tc, conf, copies, run in got:
        for _ in range(copies):
            cols["image"].append({"bytes": data, "path": None}); cols["label"].append(cid)
            cols["soft_label"].append(target); cols["image_id"].append(image_id)
    feats = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=names),
                               "soft_label": datasets.Sequence(datasets.Value("float32")),
                               "image_id": datasets.Value("string")})
    datasets.Dataset.from_dict(cols, features=feats).save_to_disk(out + "/dataset")
    rows = len(cols["label"])
print(json.dumps({"s": time.perf_counter() - t, "rows": rows,
                  "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def run(kind: str, store: str, selection: str, tmp: str) -> dict:
    out = f"{tmp}/{kind}"
    shutil.rmtree(out, ignore_errors=True)
    proc = subprocess.run([sys.executable, "-c", SIDE, kind, store, selection, out], capture_output=True, text=True,
                          env={"HF_HOME": f"{tmp}/hf", "PATH": "/usr/bin:/bin", "HOME": tmp})
    if proc.returncode:
        raise SystemExit(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def same_rows(tmp: str) -> None:
    import datasets

    a = datasets.load_from_disk(f"{tmp}/nsd-hf/dataset")
    b = datasets.load_from_disk(f"{tmp}/plain-hf/dataset")
    assert len(a) == len(b)
    assert sorted(zip(a["image_id"], a["label"])) == sorted(zip(b["image_id"], b["label"]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", required=True)
    ap.add_argument("--selection", required=True)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--sides", default="nsd-hf,plain-hf,nsd-imagefolder,nsd-parquet,nsd-webdataset")
    args = ap.parse_args()
    sides = args.sides.split(",")
    results: dict[str, list[dict]] = {s: [] for s in sides}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            for side in (sides if r % 2 == 0 else sides[::-1]):  # alternate the order
                results[side].append(run(side, args.store, args.selection, tmp))
                print(side, results[side][-1], file=sys.stderr, flush=True)
            if r == 0 and {"nsd-hf", "plain-hf"} <= set(sides):
                same_rows(tmp)
    load = open("/proc/loadavg").read().split()[:3]
    print(f"    bench/export.py {' '.join(sys.argv[1:])}\n\nload average at the end: {' '.join(load)}\n")
    print("| side | rows | median s | rows/s | peak RSS MiB (max) |\n| --- | --- | --- | --- | --- |")
    for side, rs in results.items():
        med = statistics.median(x["s"] for x in rs)
        print(f"| {side} | {rs[0]['rows']:,} | {med:.1f} | {rs[0]['rows'] / med:,.0f} | {max(x['peak_mib'] for x in rs):,.0f} |")
    if "nsd-hf" in results and "plain-hf" in results:
        a = statistics.median(x["s"] for x in results["nsd-hf"])
        b = statistics.median(x["s"] for x in results["plain-hf"])
        print(f"\nnsd-hf time / plain-hf time: {a / b:.2f}; peak memory nsd-hf {max(x['peak_mib'] for x in results['nsd-hf']):,.0f} "
              f"MiB vs plain-hf {max(x['peak_mib'] for x in results['plain-hf']):,.0f} MiB")


if __name__ == "__main__":
    main()
