"""Near-duplicates by perceptual hash: how robust, how discriminating, how fast.

    .venv/bin/python bench/near_dups.py robustness   # near-copies vs distinct images, Fashion-MNIST
    .venv/bin/python bench/near_dups.py leakage      # test images with a near-copy in the pool
    .venv/bin/python bench/near_dups.py scale        # nsd dups on 1,000,000 hashes vs brute force

robustness: phash of 400 Fashion-MNIST test images against the phash of a near-copy of each
(JPEG quality 30-95, resize 0.5-2x, crop up to 5% / 10%, brightness +-10%, and all at once), and
the share of 4.5M pairs of 3,000 different training images within each distance: the false
matches a test image meets in a 60,000-image pool.
leakage: `nsd dups` over Fashion-MNIST's test and training images (a store in bench/_work), with
the pixel RMSE of each pair (a true near-copy is below 0.05 on a 0..1 scale).
scale: 1,000,000 random hashes with 1,000 planted near pairs in a store; `nsd dups` (the
banded join) timed with its peak memory, and its pairs among the first 20,000 hashes checked
against a brute-force comparison.
"""

from __future__ import annotations

import argparse
import gzip
import io
import random
import resource
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance

from nsd.engine.dups import dups, near_pairs_query, phash, pin
from nsd.engine.ingest import ingest
from nsd.engine.store import Store

ROOT = Path(__file__).resolve().parent
FMNIST = Path("/usr/share/datasets/fashion-mnist")


def fmnist(name: str) -> np.ndarray:
    with gzip.open(FMNIST / f"{name}-images-idx3-ubyte.gz", "rb") as f:
        return np.frombuffer(f.read()[16:], np.uint8).reshape(-1, 28, 28)


def jpeg(im, q):
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=q)
    return Image.open(io.BytesIO(buf.getvalue()))


def crop(im, r, most):
    w, h = im.size
    c = r.uniform(0, most)
    x0, y0 = r.uniform(0, w * c), r.uniform(0, h * c)
    return im.crop((round(x0), round(y0), round(x0 + w * (1 - c)), round(y0 + h * (1 - c))))


def resize(im, r):
    return im.resize((max(8, round(im.size[0] * r.uniform(0.5, 2))),) * 2, Image.BICUBIC)


def bright(im, r):
    return ImageEnhance.Brightness(im).enhance(r.uniform(0.9, 1.1))


COPIES = {
    "JPEG q30-95": lambda im, r: jpeg(im, r.randint(30, 95)),
    "resize 0.5-2x": resize,
    "crop <= 5%": lambda im, r: crop(im, r, 0.05),
    "crop <= 10%": lambda im, r: crop(im, r, 0.10),
    "brightness +-10%": bright,
    "all at once": lambda im, r: jpeg(bright(resize(crop(im, r, 0.10), r), r), r.randint(30, 95)),
}
DISTANCES = (0, 2, 4, 6, 8)  # phash distances are even: its 64 bits split at their median


def popcount(x):
    return np.bitwise_count(np.asarray(x, np.int64).view(np.uint64))


def robustness() -> None:
    test, train = fmnist("t10k")[:400], fmnist("train")
    r = random.Random(0)
    base = np.array([phash(Image.fromarray(x)) for x in test], np.int64)
    found = {}
    for name, make in COPIES.items():
        copy = np.array([phash(make(Image.fromarray(x), r)) for x in test], np.int64)
        found[name] = popcount(base ^ copy)
    pick = np.random.default_rng(0).choice(len(train), 3000, replace=False)
    hashes = np.array([phash(Image.fromarray(train[i])) for i in pick], np.int64)
    pair = np.concatenate([popcount(hashes[i] ^ hashes[i + 1:]) for i in range(len(hashes))])
    print("| distance | " + " | ".join(COPIES) + " | distinct pairs within | false matches per test image in 60,000 |")
    print("|" + " --- |" * (len(COPIES) + 3))
    for d in DISTANCES:
        rate = float(np.mean(pair <= d))
        print(f"| {d} | " + " | ".join(f"{np.mean(found[n] <= d):.2f}" for n in COPIES)
              + f" | {rate:.1e} | {rate * 60000:.2f} |")
    print(f"\n400 near-copies per column, {len(pair):,} distinct pairs")


def leakage(distance: int) -> None:
    path = ROOT / "_work" / "near-dups-fmnist"
    store = Store(path)
    if not store.exists():
        store.init()
        t = time.perf_counter()
        ingest(store, "fashion-mnist", progress=False)
        print(f"ingest (with hashing): {time.perf_counter() - t:.0f} s")
    with store.reader() as con:
        pin(con, store.latest_snapshot(con))
        for d in sorted({0, 2, 4, distance}):
            pairs = con.execute(f"SELECT * FROM ({near_pairs_query()}) WHERE split_a <> split_b",
                                {"distance": d, "splits": None}).fetchall()
            test = {p[0] if p[2] == "test" else p[1] for p in pairs}
            pool = {p[1] if p[2] == "test" else p[0] for p in pairs}
            print(f"distance <= {d}: {len(pairs):,} test-train pairs, {len(test):,} test images with a near "
                  f"train image, {len(pool):,} train images near a test image")
        rows = con.execute(f"""SELECT a.bytes, b.bytes FROM ({near_pairs_query()}) p
                               JOIN images a ON a.image_id = p.image_a JOIN images b ON b.image_id = p.image_b
                               WHERE p.split_a <> p.split_b""", {"distance": distance, "splits": None}).fetchall()
    rmse = np.array([np.sqrt(np.mean((_pixels(a) - _pixels(b)) ** 2)) for a, b in rows])
    print(f"distance <= {distance}: pixel RMSE of the {len(rmse):,} pairs: median {np.median(rmse):.3f}, "
          f"{int(np.sum(rmse < 0.05))} below 0.05 (true near-copies), {int(np.sum(rmse < 0.01))} below 0.01")


def _pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("L"), np.float64) / 255


def scale(n: int, planted: int, check: int) -> None:
    path = ROOT / "_work" / f"near-dups-{n}"
    store = Store(path)
    rng = np.random.default_rng(0)
    hashes = rng.integers(-2**63, 2**63 - 1, size=n, dtype=np.int64)
    for k in rng.choice(n - 1, planted, replace=False):  # hash k+1 := hash k with 0-2 bits flipped
        flipped = hashes[k]
        for bit in rng.choice(63, size=rng.integers(0, 3), replace=False):
            flipped ^= np.int64(1) << np.int64(bit)
        hashes[k + 1] = flipped
    if not store.exists():
        import pyarrow as pa

        store.init()
        ids = [f"h{k:07d}" for k in range(n)]
        table = pa.table({"image_id": ids, "phash": hashes})

        def fn(con):
            con.register("h", table)
            con.execute("INSERT INTO image_hashes SELECT image_id, phash FROM h")
            con.execute("INSERT INTO images (image_id, bytes, split) SELECT image_id, ''::BLOB, 'unlabeled' FROM h")
            return {"images": n, "image_hashes": n}

        store.write("bench-hashes", {"n": n}, fn)
    t = time.perf_counter()
    out = dups(store, 2, limit=0)
    took = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"nsd dups, {n:,} hashes, distance <= 2: {took:.1f} s, {out['pairs']:,} pairs, {out['groups']:,} groups, "
          f"peak RSS of this process {peak:.0f} MiB")
    with store.reader() as con:
        pin(con, store.latest_snapshot(con))
        got = set(con.execute(f"SELECT image_a, image_b FROM ({near_pairs_query()}) "
                              f"WHERE image_b < 'h{check:07d}'", {"distance": 2, "splits": None}).fetchall())
    sub = hashes[:check]
    want = {(f"h{i:07d}", f"h{j:07d}") for i in range(check)
            for j in (np.nonzero(popcount(sub[i] ^ sub[i + 1:]) <= 2)[0] + i + 1)}
    print(f"brute force over the first {check:,} hashes: {len(want)} pairs; the banded join: {len(got)}; "
          f"same pairs: {got == want}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("part", choices=("robustness", "leakage", "scale"))
    ap.add_argument("--distance", type=int, default=2)
    ap.add_argument("--n", type=int, default=1_000_000)
    args = ap.parse_args()
    print(" ".join(["bench/near_dups.py", *sys.argv[1:]]), time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    if args.part == "robustness":
        robustness()
    elif args.part == "leakage":
        leakage(args.distance)
    else:
        scale(args.n, planted=1000, check=20_000)


if __name__ == "__main__":
    main()
