"""Benchmark: nsd's store stream vs LitData, WebDataset and MosaicML streaming (MDS), same images,
same augmentation, same batch size, one epoch each, sides alternated and repeated.

    make bench-venv
    bench/.venv/bin/python bench/stream_peers.py --images 20000 --workers 0 2 --repeats 5 [--before main]
    bench/.venv/bin/python bench/stream_peers.py --images 200000 --workers 2 --repeats 1

The images are bench/stream.py's (synthetic 28x28 grey PNGs, ids and labels as its store has
them). Every side does, per image: PNG decode (transforms.decode) + nsd's train transform
(random crop + RandAugment N=2 M=9 + ToTensor + Normalize), batches of 256, a shuffled epoch;
with workers, DataLoader(num_workers=W, prefetch_factor=4). One-off conversions are timed apart:
nsd staging (store -> local Parquet plan), LitData ``optimize``, WebDataset tar shards (20 per
pool), MDS ``MDSWriter``. Each epoch runs in a fresh process (``--child``), so imports, caches
and peak memory are per side; the timed window is dataset construction + one full epoch. Each
side reports the number of images and a checksum of their ids, compared with the pool's, so a
side that skips or repeats images is caught. Peak memory: VmHWM of the process, and the largest
VmHWM of its DataLoader workers (sampled from /proc every 0.2 s while they run; a forked worker
counts the pages it shares with its parent, as the kernel does).

Timed work holds /tmp/nsd-bench.lock (flock, shared with other timed benchmarks) one round at
a time: the conversions, then each A B C D round at one worker count.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SIDES = ("nsd", "litdata", "webdataset", "mds")
BEFORE = "nsd-before"  # nsd's stream as of another git revision (--before REV), staged the same way
BATCH = 256
SHARDS = 20  # WebDataset tar shards per pool


def hwm_mib() -> float:
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM")) / 1024


class WorkerPeaks:
    """Samples the peak RSS (VmHWM) of this process's descendants (DataLoader workers) while they live."""

    def __init__(self, every: float = 0.2):
        import threading

        self.peaks: dict[int, float] = {}
        self.every, self.stop = every, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _descendants(self, pid: int):
        for task in Path(f"/proc/{pid}/task").glob("*"):
            with contextlib.suppress(OSError):
                for c in (task / "children").read_text().split():
                    yield int(c)
                    yield from self._descendants(int(c))

    def _run(self):
        while not self.stop.wait(self.every):
            for pid in set(self._descendants(os.getpid())):
                with contextlib.suppress(OSError, StopIteration):
                    self.peaks[pid] = max(self.peaks.get(pid, 0), next(
                        int(line.split()[1]) for line in open(f"/proc/{pid}/status") if line.startswith("VmHWM")) / 1024)

    def close(self) -> float:
        self.stop.set()
        self.thread.join()
        return max(self.peaks.values(), default=0.0)


def id_hashes(ids):
    """64-bit hashes of ids: what a side's epoch is checked with (8 bytes an image, so the check
    itself does not grow the peak memory being measured)."""
    import numpy as np

    return np.array([int.from_bytes(hashlib.blake2b(i.encode(), digest_size=8).digest(), "little")
                     for i in ids], dtype=np.uint64)


def epoch_check(hashes) -> tuple[int, int, str]:
    """(images, distinct images, order-free checksum) of an epoch's id hashes."""
    import numpy as np

    h = np.sort(np.asarray(hashes, dtype=np.uint64))
    distinct = int(len(h) and 1 + np.count_nonzero(h[1:] != h[:-1]))
    return len(h), distinct, hashlib.sha256(h.tobytes()).hexdigest()[:16]


@contextlib.contextmanager
def bench_lock(path: str | None):
    if not path:
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# --------------------------------------------------------------------------- conversions


def convert(work: Path, n: int) -> dict:
    """Build the store and every side's on-disk form of the same N images; seconds of each step."""
    sys.path.insert(0, str(ROOT / "bench"))
    import stream as base

    times = {}
    t = time.perf_counter()
    store, data = base.make_store(work / "store", n)
    times["store build (not timed against peers)"] = time.perf_counter() - t
    ids = [hashlib.sha256(d + i.to_bytes(4, "little")).hexdigest() for i, d in enumerate(data)]
    labels = [i % 10 for i in range(n)]

    from nsd.engine import stream

    t = time.perf_counter()
    stream.stage_split(store, store.latest_snapshot(), "labeled", work / "nsd", 0, 10)
    times["nsd"] = time.perf_counter() - t

    times["litdata"] = convert_litdata(work / "litdata", ids, data, labels)
    times["webdataset"] = convert_wds(work / "webdataset", ids, data, labels)
    times["mds"] = convert_mds(work / "mds", ids, data, labels)
    (work / "expected.json").write_text(json.dumps({"n": n, "checksum": epoch_check(id_hashes(ids))[2]}))
    return times


def _litdata_item(item):
    i, png, label = item
    return {"id": i, "png": png, "label": label}


def convert_litdata(out: Path, ids, data, labels) -> float:
    from litdata import optimize

    t = time.perf_counter()
    optimize(fn=_litdata_item, inputs=list(zip(ids, data, labels)), output_dir=str(out),
             chunk_bytes="64MB", num_workers=1, verbose=False)
    return time.perf_counter() - t


def convert_wds(out: Path, ids, data, labels) -> float:
    import webdataset as wds

    out.mkdir(parents=True)
    t = time.perf_counter()
    with wds.ShardWriter(str(out / "shard-%05d.tar"), maxcount=-(-len(ids) // SHARDS), verbose=0) as w:
        for i, png, label in zip(ids, data, labels):
            w.write({"__key__": i, "png": png, "cls": label})
    return time.perf_counter() - t


def convert_mds(out: Path, ids, data, labels) -> float:
    from streaming import MDSWriter

    t = time.perf_counter()
    with MDSWriter(out=str(out), columns={"id": "str", "png": "bytes", "label": "int"}) as w:
        for i, png, label in zip(ids, data, labels):
            w.write({"id": i, "png": png, "label": label})
    return time.perf_counter() - t


# --------------------------------------------------------------------------- one epoch (child)


def _transform():
    from nsd.engine.transforms import train_transform

    return train_transform(28, (0.5,), (0.5,), 2, 9)


class _Augment:
    """Picklable per-sample step of the peers: (id, png, label) -> (tensor, label, id)."""

    def __init__(self):
        self.tf = _transform()

    def __call__(self, i, png, label):
        from nsd.engine.transforms import decode

        return self.tf(decode(png, 1)), int(label), i


def loader_nsd(work: Path, workers: int):
    import torch

    from nsd.engine import stream

    plan = stream.Plan.open(str(work / "nsd" / "labeled.parquet"), "labeled", 10)
    ds = stream.StoreStream(plan, BATCH, _transform(), seed=0, epoch=0, image_size=28)  # as nsd train passes it
    dl = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=workers,
                                     prefetch_factor=4 if workers else None)
    return ((b["x"], b["ids"]) for b in dl)


def loader_nsd_before(work: Path, workers: int):
    """The same as loader_nsd with engine/stream.py of --before REV (written to the work folder)."""
    import importlib.util

    import torch

    spec = importlib.util.spec_from_file_location("stream_before", work / "stream_before.py")
    old = sys.modules["stream_before"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(old)
    plan = old.Plan.open(str(work / "nsd" / "labeled.parquet"), "labeled", 10)
    ds = old.StoreStream(plan, BATCH, _transform(), seed=0, epoch=0)
    dl = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=workers,
                                     prefetch_factor=4 if workers else None)
    return ((b["x"], b["ids"]) for b in dl)


def loader_litdata(work: Path, workers: int):
    from litdata import StreamingDataLoader, StreamingDataset

    aug = _Augment()
    ds = StreamingDataset(str(work / "litdata"), shuffle=True, seed=0,
                          transform=lambda s: aug(s["id"], s["png"], s["label"]))
    dl = StreamingDataLoader(ds, batch_size=BATCH, num_workers=workers, prefetch_factor=4 if workers else None)
    return ((x, i) for x, _, i in dl)


def loader_webdataset(work: Path, workers: int):
    import webdataset as wds

    aug = _Augment()
    urls = sorted(str(p) for p in (work / "webdataset").glob("shard-*.tar"))
    # The shuffle buffer holds as many samples as nsd's shuffle window (8 blocks of 512 rows).
    ds = (wds.WebDataset(urls, shardshuffle=len(urls), seed=0, empty_check=False)
          .shuffle(4096).map(lambda s: aug(s["__key__"], s["png"], s["cls"].decode())).batched(BATCH))
    dl = wds.WebLoader(ds, batch_size=None, num_workers=workers, prefetch_factor=4 if workers else None)
    return ((x, i) for x, _, i in dl)


def loader_mds(work: Path, workers: int):
    import torch
    from streaming import StreamingDataset

    aug = _Augment()

    class Augmented(StreamingDataset):
        def __getitem__(self, idx):
            s = super().__getitem__(idx)
            return aug(s["id"], s["png"], s["label"])

    ds = Augmented(local=str(work / "mds"), shuffle=True, shuffle_seed=0, batch_size=BATCH)
    dl = torch.utils.data.DataLoader(ds, batch_size=BATCH, num_workers=workers,
                                     prefetch_factor=4 if workers else None)
    return ((x, i) for x, _, i in dl)


def child(side: str, work: Path, workers: int) -> dict:
    import gc

    _transform()  # imports torch, timm, torchvision before the clock starts, as for every side
    before = hwm_mib()
    peaks = WorkerPeaks()
    t0 = time.perf_counter()
    n, hashes = 0, []
    it = globals()[f"loader_{side.replace('-', '_')}"](work, workers)
    for x, batch_ids in it:
        n += len(x)
        hashes.append(id_hashes(batch_ids))
    seconds = time.perf_counter() - t0
    workers_mib = peaks.close()
    del it
    gc.collect()
    import numpy as np

    images, distinct, checksum = epoch_check(np.concatenate(hashes) if hashes else [])
    assert images == n
    return {"side": side, "workers": workers, "n": n, "unique": distinct, "checksum": checksum,
            "seconds": seconds, "img_s": n / seconds, "imports_mib": before, "self_mib": hwm_mib(),
            "workers_mib": workers_mib}


def run_child(side: str, work: Path, workers: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", side, "--work", str(work), "--workers", str(workers)],
                         capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"{side} with {workers} workers failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- driver


def versions() -> str:
    from importlib.metadata import version

    return ", ".join(f"{p} {version(p)}" for p in ("torch", "pillow", "pyarrow", "duckdb", "litdata",
                                                    "webdataset", "mosaicml-streaming"))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=20000)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--sides", nargs="+", default=list(SIDES), choices=SIDES)
    ap.add_argument("--lock", default="/tmp/nsd-bench.lock", help="flock file held while timing ('' for none)")
    ap.add_argument("--work", default=None, help="work folder (default: a fresh one under bench/_work)")
    ap.add_argument("--before", default=None, metavar="REV",
                    help=f"also time nsd's stream as of git revision REV (side {BEFORE!r})")
    ap.add_argument("--child", choices=(*SIDES, BEFORE), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, Path(args.work), args.workers[0])))
        return
    work = Path(args.work or ROOT / "bench" / "_work" / f"peers-{args.images}")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    if args.before:
        (work / "stream_before.py").write_bytes(subprocess.run(
            ["git", "-C", str(ROOT), "show", f"{args.before}:engine/stream.py"], check=True, capture_output=True).stdout)
        args.sides.insert(1, BEFORE)
    print(f"# {versions()}\n# {args.images:,} images, batch {BATCH}, load average {os.getloadavg()[0]:.2f}",
          flush=True)
    try:
        with bench_lock(args.lock):
            conv = convert(work, args.images)
        print("| conversion | seconds |\n| --- | --- |")
        for k, v in conv.items():
            print(f"| {k} | {v:.2f} |")
        conv[BEFORE] = conv["nsd"]
        expected = json.loads((work / "expected.json").read_text())
        results = []
        for r in range(args.repeats):
            for w in args.workers:
                with bench_lock(args.lock):
                    load = os.getloadavg()[0]
                    for side in args.sides:
                        res = run_child(side, work, w)
                        res["ok"] = res["n"] == res["unique"] == expected["n"] and res["checksum"] == expected["checksum"]
                        res["load"], res["repeat"] = load, r
                        results.append(res)
                        print(json.dumps(res), flush=True)
        report(results, conv, args)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def report(results, conv, args):
    print(f"\n# load average at the end {os.getloadavg()[0]:.2f}")
    print("| workers | side | img/s median | min - max | runs | every image once | conversion s "
          "| peak MiB (process) | peak MiB (workers) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for w in args.workers:
        for side in args.sides:
            rs = [r for r in results if r["workers"] == w and r["side"] == side]
            v = [r["img_s"] for r in rs]
            print(f"| {w} | {side} | {statistics.median(v):,.0f} | {min(v):,.0f} - {max(v):,.0f} | {len(v)} "
                  f"| {'yes' if all(r['ok'] for r in rs) else 'NO'} | {conv[side]:.2f} "
                  f"| {max(r['self_mib'] for r in rs):,.0f} | {max(r['workers_mib'] for r in rs):,.0f} |")
        peers = {s: statistics.median(r["img_s"] for r in results if r["workers"] == w and r["side"] == s)
                 for s in args.sides}
        others = [s for s in peers if s not in ("nsd", BEFORE)]
        if "nsd" in peers and others:
            best = max(others, key=peers.get)
            print(f"\nworkers {w}: nsd / fastest peer ({best}) = {peers['nsd'] / peers[best]:.2f}\n")


if __name__ == "__main__":
    main()
