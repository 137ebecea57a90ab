"""Benchmark: `nsd label` end to end vs a bare PyTorch inference loop over the same images.

    .venv/bin/python bench/label.py                          # 59,000 unlabeled Fashion-MNIST
    .venv/bin/python bench/label.py --images 5000 --repeats 1  # quick, for development
    .venv/bin/python bench/label.py --torchrun 2               # `nsd label` on 1 vs 2 processes

Both sides run the same teacher (a randomly initialised timm model, saved as safetensors and
loaded the same way), in eval mode, under torch.inference_mode, batch size B, softmax, with
the same number of torch threads.

* bare loop: every unlabeled image decoded beforehand into one float tensor in memory (the
  decode is timed separately and NOT counted), then `softmax(net(x[i:i+B]))` batch by batch.
* label: `nsd.engine.label.label(...)` on a fresh copy of the store: read the pool at a pinned
  snapshot, decode, infer, write the Parquet parts, commit the run as one snapshot.

With ``--torchrun N`` the comparison is instead `nsd label` as a user types it, one process,
vs the same command under ``torchrun --standalone --nproc_per_node N`` (each rank labels its
share of the pool, rank 0 commits the one snapshot), on fresh copies of the store; the soft
labels of the two runs are compared row for row.

The two are run alternately (bare label, label bare, ...) so drifting machine load hits both
alike;
the ratio is label img/s / bare img/s of the medians. Working data lives in bench/_work/.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "bench" / "_work"
NSD = str(Path(sys.executable).parent / "nsd")
POOL = 59_000  # unlabeled images of `nsd ingest fashion-mnist --labeled-per-class 100`


def full_store():
    """Fashion-MNIST ingested as the README does it (cached under bench/_work/)."""
    from nsd.engine.store import Store

    path = WORK / "fmnist-store"
    store = Store(path)
    if not store.exists():
        shutil.rmtree(path, ignore_errors=True)
        for args in (["init"], ["ingest", "fashion-mnist", "--labeled-per-class", "100", "--seed", "0"]):
            subprocess.run([NSD, "--store", str(path), *args], check=True, stdout=subprocess.DEVNULL)
    return store


def pool_tables(n: int):
    """Arrow tables of the classes, the labeled split and the first N unlabeled images."""
    full = full_store()
    with full.reader() as con:
        classes = con.execute("SELECT * FROM classes").arrow().read_all()
        images = con.execute(
            "(SELECT * FROM images WHERE split = 'labeled') UNION ALL "
            "(SELECT * FROM images WHERE split = 'unlabeled' ORDER BY image_id LIMIT ?)", [n]
        ).arrow().read_all()
    return classes, images


def fresh_store(path: Path, classes, images):
    """A new store holding exactly these rows (one snapshot of images, as an ingest makes)."""
    from nsd.engine.store import Store

    shutil.rmtree(path, ignore_errors=True)
    store = Store(path)
    store.init()

    def fn(con):
        con.register("new_classes", classes)
        con.register("new_images", images)
        con.execute("INSERT INTO classes SELECT * FROM new_classes")
        con.execute("INSERT INTO images SELECT * FROM new_images")
        return {"classes": classes.num_rows, "images": images.num_rows}

    store.write("bench", {"images": images.num_rows}, fn, message="bench/label: pool copy")
    return store


def teacher_weights(arch: str, num_classes: int, seed: int = 0) -> str:
    from nsd.engine.models import create_model, save_weights

    path = WORK / f"teacher-{arch}-{num_classes}-seed{seed}.safetensors"
    if not path.exists():
        import torch

        torch.manual_seed(seed)
        save_weights(create_model(arch, num_classes, 1), str(path))
    return str(path)


def decode_pool(store, info) -> tuple[list[str], "torch.Tensor", float]:
    """Every unlabeled image through the eval transform, stacked: (ids, x, seconds)."""
    import torch

    from nsd.engine.transforms import decode, eval_transform

    with store.reader() as con:
        rows = con.execute("SELECT DISTINCT ON (image_id) image_id, bytes FROM images "
                           "WHERE split = 'unlabeled' ORDER BY image_id").fetchall()
    tf = eval_transform(info.image_size, info.mean, info.std)
    t0 = time.perf_counter()
    x = torch.stack([tf(decode(data, info.in_chans)) for _, data in rows])
    return [r[0] for r in rows], x, time.perf_counter() - t0


def bare_loop(net, x, batch_size: int) -> tuple[float, "torch.Tensor"]:
    import torch

    out = []
    t0 = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(x), batch_size):
            out.append(torch.softmax(net(x[i:i + batch_size]).float(), dim=1))
    seconds = time.perf_counter() - t0
    return seconds, torch.cat(out)


def label_run(tables, arch, weights, batch_size, num_workers):
    """`label()` on a fresh store (in the same store a finished run would be found and skipped)."""
    from nsd.engine.label import label

    store = fresh_store(WORK / "label-run", *tables)
    t0, cpu = time.perf_counter(), time.process_time()
    out = label(store, arch, weights, batch_size=batch_size, num_workers=num_workers, progress=False)
    seconds = time.perf_counter() - t0
    return seconds, {**out, "cpu_s": time.process_time() - cpu}, store


def label_command(tables, arch, weights, batch_size, processes: int):
    """Wall seconds of `nsd label` on a fresh store, on PROCESSES processes (torchrun when > 1)."""
    store = fresh_store(WORK / f"label-cmd-{processes}", *tables)
    argv = [NSD, "--store", str(store.root), "label", "--teacher", arch, "--weights", weights,
            "--batch-size", str(batch_size)]
    if processes > 1:
        # `python -m torch.distributed.run` is what the `torchrun` script runs
        argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
                "--no-python", *argv]
    t0 = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode:
        sys.exit(f"{' '.join(argv[:6])} ... failed:\n{proc.stderr[-3000:]}")
    return seconds, store


def torchrun_main(args, tables, weights, n: int):
    """One process vs torchrun with ARGS.torchrun processes, alternating, each a fresh store."""
    seconds = {1: [], args.torchrun: []}
    for k in range(args.repeats):
        order = (1, args.torchrun) if k % 2 == 0 else (args.torchrun, 1)
        stores = {}
        for procs in order:
            s, stores[procs] = label_command(tables, args.model, weights, args.batch_size, procs)
            seconds[procs].append(s)
        one, many = (stores[p].reader() for p in (1, args.torchrun))
        with one as a, many as b:
            rows_a = a.execute("SELECT image_id, probs FROM pseudo_labels ORDER BY image_id").fetchall()
            rows_b = b.execute("SELECT image_id, probs FROM pseudo_labels ORDER BY image_id").fetchall()
        same = rows_a == rows_b and len(rows_a) == n
        print(f"  round {k}: 1 process {seconds[1][-1]:.2f} s ({n / seconds[1][-1]:,.0f} img/s), "
              f"{args.torchrun} processes {seconds[args.torchrun][-1]:.2f} s ({n / seconds[args.torchrun][-1]:,.0f} img/s); "
              f"soft labels {'IDENTICAL' if same else 'DIFFERENT'} ({len(rows_a):,} rows), load {os.getloadavg()[0]:.1f}",
              flush=True)
        if not same:
            sys.exit(1)
        for store in stores.values():
            shutil.rmtree(store.root, ignore_errors=True)
    one, many = statistics.median(seconds[1]), statistics.median(seconds[args.torchrun])
    print(f"median: `nsd label` 1 process {one:.2f} s ({n / one:,.0f} img/s), torchrun {args.torchrun} processes "
          f"{many:.2f} s ({n / many:,.0f} img/s), speed-up {one / many:.2f}x (whole commands, start-up included)")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=POOL, help="unlabeled images (default: all 59,000)")
    ap.add_argument("--model", default="test_resnet", help="timm architecture of the teacher")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--num-workers", type=int, default=1, help="label's --num-workers")
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    ap.add_argument("--repeats", type=int, default=3, help="alternating bare/label pairs")
    ap.add_argument("--torchrun", type=int, default=0, metavar="N",
                    help="compare `nsd label` on one process with torchrun on N processes instead")
    args = ap.parse_args(argv)

    import torch

    from nsd.engine.models import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    # label() tunes glibc malloc for the process; do it first, so both sides run under it.
    from nsd.engine.runtime import tune_malloc

    tuned = tune_malloc()
    WORK.mkdir(parents=True, exist_ok=True)
    tables = pool_tables(args.images)
    base = fresh_store(WORK / "bare-run", *tables)
    with base.reader() as con:
        num_classes = con.execute("SELECT count(*) FROM classes").fetchone()[0]
    weights = teacher_weights(args.model, num_classes)
    if args.torchrun:
        n = sum(1 for s in tables[1].column("split").to_pylist() if s == "unlabeled")
        print(f"{n} images, {args.model}, batch {args.batch_size}, `nsd label` vs torchrun "
              f"--nproc_per_node {args.torchrun}, load {os.getloadavg()[0]:.1f}", flush=True)
        torchrun_main(args, tables, weights, n)
        shutil.rmtree(base.root, ignore_errors=True)
        return
    net, info = load_model(base, args.model, weights, num_classes=num_classes, in_chans=1, image_size=28)
    net.eval()
    ids, x, decode_s = decode_pool(base, info)
    n = len(ids)
    print(f"{n} images, {args.model}, batch {args.batch_size}, torch threads {torch.get_num_threads()}, "
          f"label --num-workers {args.num_workers}, malloc tuned {tuned}, load {os.getloadavg()[0]:.1f}")
    print(f"decode into memory (not counted in the bare loop): {decode_s:.2f} s, {n / decode_s:,.0f} img/s")

    bare_s, label_s = [], []
    probs = None
    for k in range(args.repeats):
        # Alternate which side goes first (B L, L B, ...): load that drifts hits both alike.
        for side in (("bare", "label") if k % 2 == 0 else ("label", "bare")):
            if side == "bare":
                cpu = time.process_time()
                s, probs = bare_loop(net, x, args.batch_size)
                bare_s.append(s)
                bare_cpu = (time.process_time() - cpu) / n * 1e6
            else:
                s, out, store = label_run(tables, args.model, weights, args.batch_size, args.num_workers)
                label_s.append(s)
                label_cpu = out["cpu_s"] / n * 1e6
        assert out["rows"] == n and not out["already_labeled"], out
        print(f"  pair {k}: bare {n / bare_s[-1]:,.0f} img/s ({bare_cpu:.0f} CPU us/img), "
              f"label {n / label_s[-1]:,.0f} img/s ({label_cpu:.0f} CPU us/img), "
              f"ratio {bare_s[-1] / label_s[-1]:.3f}, load {os.getloadavg()[0]:.1f}")
        if k == args.repeats - 1:  # same model, same images: same soft labels
            with store.reader() as con:
                got = con.execute("SELECT probs FROM pseudo_labels ORDER BY image_id").fetchall()
            diff = float(np.abs(np.array([g[0] for g in got], dtype=np.float32) - probs.numpy()).max())
            print(f"max |label probs - bare probs| = {diff:.2e}")
        shutil.rmtree(store.root, ignore_errors=True)

    bare = n / statistics.median(bare_s)
    lab = n / statistics.median(label_s)
    print(f"median: bare {bare:,.0f} img/s, label {lab:,.0f} img/s, ratio {lab / bare:.3f}")
    shutil.rmtree(base.root, ignore_errors=True)
    print(f"load average now: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
