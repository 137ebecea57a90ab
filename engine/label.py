"""Teacher labeling: soft pseudo labels for the unlabeled pool, with no noise.

``label()`` runs a teacher in eval mode (no dropout, no stochastic depth) over every image of
the unlabeled split at one pinned snapshot, through the deterministic eval transform with the
teacher's normalisation, and writes ``softmax(logits / T)`` to ``pseudo_labels``.

Resumable and distributable by construction:

* The run id is derived from what determines the rows (teacher, checkpoint sha256, the pool's
  image ids, T, top-k), so the same command after a crash finds the same run.
* The pool, ordered by image_id, is cut into fixed shards of ``shard_size`` images. Each
  finished shard becomes one Parquet part under ``label-runs/<run_id>/s<shard_size>/`` in the
  store's data path, written under a temporary name and renamed, so a part is either whole or
  absent. A restart skips the parts that exist.
* With ``torchrun`` (WORLD_SIZE > 1) rank r takes the r-th of W contiguous blocks of shards
  (sizes within one shard; contiguous shards are read by one query). After a barrier, rank 0
  commits every part in ONE ``Store.write`` (one snapshot with lineage) and removes the work
  directory. No snapshot ever shows part of a run.
"""

from __future__ import annotations

import bisect
import collections
import contextlib
import dataclasses
import datetime as _dt
import hashlib
import io
import json
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np

from nsd.engine import live
from nsd.engine.calibration import calibrate
from nsd.engine.env import env_number
from nsd.engine.errors import NsdError, UsageError
from nsd.engine.models import load_model
from nsd.engine.params import (MAX_BATCH, MAX_SHARD, MAX_TOP_K, MAX_WORKERS, MIN_TEMPERATURE, check_options, option,
                               with_options)
from nsd.engine.paths import url as _url, write_url
from nsd.engine.runtime import Dist, pick_device, progress_bar, tune_malloc
from nsd.engine.store import Store, now_utc
from nsd.engine.transforms import eval_batch

# CPU labeling runs at most this many batches at once (one per thread; more cores go to
# intra-op threads), so memory does not grow with the core count.
MAX_CPU_STREAMS = 8
# Test hook: seconds to sleep after each part is written, so a test can kill a run mid-way.
PAUSE_ENV = "NSD_TEST_LABEL_PAUSE"


class _AlreadyCommitted(Exception):
    """Raised inside the commit transaction when another process committed the run first."""


@dataclass
class _Pool:
    """The unlabeled pool at a snapshot, as shard boundaries (O(n / shard_size) memory)."""

    count: int
    bounds: list  # first image_id of each shard; shard k = [bounds[k], bounds[k+1])
    digest: str  # sha256 over the ordered ids: the pool's identity, whatever the snapshot
    shard_size: int

    @property
    def num_shards(self) -> int:
        return len(self.bounds)


# --------------------------------------------------------------------------- public API


@dataclass(frozen=True)
class LabelParams:
    """How a teacher labels the pool (``nsd label``'s options); the defaults of every front end.

    temperature: soft labels are softmax(logits / T), T > 0 (the paper uses T = 1).
    top_k: keep only the K largest probabilities (``prob_classes`` holds their class ids).
    batch_size: images per forward pass.
    device: cpu, cuda or cuda:N (default: cuda when available; under torchrun the local rank's).
    num_workers: 0 reads, decodes and infers in the calling thread. Otherwise a reader thread
        feeds the model; on CPU each of ``torch.get_num_threads()`` threads (at most 8; more
        cores become intra-op threads of those 8) decodes and labels whole batches with one
        intra-op thread, so up to 8 cores the rows do not depend on the number of cores; on GPU
        ``num_workers`` threads decode.
    shard_size: images per resumable unit (one Parquet part each).
    progress: show a progress bar (rank 0 only).
    calibrate: fit T on the store's val split instead (engine/calibration.py) and label with it.
    """

    temperature: float = option(1.0, "Soft labels are softmax(logits / T); T > 0.", low=MIN_TEMPERATURE, high=100)
    top_k: int | None = option(None, "Keep only the K largest probabilities per image.", low=1, high=MAX_TOP_K,
                               whole=True)
    batch_size: int = option(256, "Images per forward pass.", low=1, high=MAX_BATCH, whole=True)
    device: str | None = option(None, "cpu, cuda or cuda:N (default: cuda when available).")
    num_workers: int = option(1, "0: read, decode and infer in one thread. Otherwise a reader thread feeds the "
                                 "model; on CPU each of torch's threads decodes and labels whole batches, on "
                                 "GPU N threads decode.", low=0, high=MAX_WORKERS, whole=True)
    shard_size: int = option(4096, "Images per resumable unit (one Parquet part each).", low=1, high=MAX_SHARD,
                             whole=True)
    progress: bool = option(True, "No progress bar.", flag="--no-progress")
    calibrate: bool = option(False, "Fit T on the val split (labeled images no model trained on) and label "
                                    "with it.", flag="--calibrate")

    def check(self) -> None:
        """A usage error for any value out of range."""
        check_options(self)
        if self.calibrate and self.temperature != 1.0:
            raise UsageError("--calibrate fits the temperature itself: leave out --temperature")


def label(store: Store, teacher: str, weights: str | None = None, images: str | int | None = None,
          params: LabelParams | None = None, **options) -> dict:
    """Label the unlabeled split with TEACHER; one completed run = one snapshot.

    teacher: a model in the store's ``models`` table, or with ``weights`` a timm architecture
        whose weights (safetensors / weights-only state dict) come from elsewhere.
    images: snapshot number or tag pinning the images (default: latest).
    params, options: how to label, as a :class:`LabelParams` or its fields as keyword
        arguments (temperature, top_k, batch_size, device, num_workers, shard_size, progress);
        keywords override PARAMS, and LabelParams holds the defaults.

        label(store, "fmnist-m0", temperature=1.0, batch_size=512)

    Under torchrun every rank calls this with the same arguments; all ranks return the result.
    Returns a dict: run_id, snapshot_id, rows, images_version, teacher, ..., already_labeled.
    """
    params = with_options(LabelParams, params, options)
    params.check()
    store.require()
    tune_malloc()
    # Only small Python objects and barriers cross ranks (inference is per rank), so gloo
    # serves CPU and GPU alike; the long timeout covers uneven shard loads.
    dist = Dist.from_env("gloo", timeout=_dt.timedelta(hours=12))
    try:
        with live.running(store, "label") as beat:
            return _label(store, dist, teacher, weights, images, params, beat)
    finally:
        dist.close()


def run_id_for(teacher: str, teacher_sha256: str, pool_digest: str, temperature: float,
               top_k: int | None) -> str:
    """The deterministic id of a label run: the same inputs always give the same id."""
    key = json.dumps([teacher, teacher_sha256, pool_digest, float(temperature), top_k])
    return "label-" + hashlib.sha256(key.encode()).hexdigest()[:12]


# --------------------------------------------------------------------------- the run


@dataclass
class _Run:
    """One label run: its id, teacher, pinned images and the work directory of its parts."""

    run_id: str
    teacher: str  # the teacher's name (model name, or the architecture of a weights file)
    teacher_sha256: str
    images_version: int
    pool: _Pool
    fs: Any
    root: str  # the work directory on FS


def _label(store, dist, teacher, weights, images, params: LabelParams, beat: live.Heartbeat) -> dict:
    import torch  # noqa: F401

    started_at = now_utc()
    # Two connections for all the reads (each costs ~50 ms): one at the latest snapshot, one
    # pinned at the images' snapshot, which also feeds the model.
    with contextlib.ExitStack() as stack:
        latest = stack.enter_context(store.reader())
        # Rank 0 resolves "latest" once, so every rank reads the same snapshot.
        snap = dist.broadcast(lambda: store.resolve(images, latest))
        models_snap = store.latest_snapshot(latest) if weights is None else None
        con = stack.enter_context(store.reader(snap))
        num_classes, channels, side = _pool_shape(con, snap, params.top_k)
        pool = _scan_pool(con, params.shard_size)
        net, info = _load_teacher(store, teacher, weights, num_classes, channels, side)
        calibration = None
        if params.calibrate:  # rank 0 fits T; every rank labels with it
            calibration = dist.broadcast(lambda: calibrate(con, net, info, next(net.parameters()).device,
                                                           params.batch_size))
            params = dataclasses.replace(params, temperature=calibration["temperature"])
        teacher_name = info.name or info.arch
        run_id = run_id_for(teacher_name, info.sha256, pool.digest, params.temperature, params.top_k)
        result = {
            "run_id": run_id, "teacher": teacher_name, "teacher_sha256": info.sha256,
            "images_version": snap, "temperature": float(params.temperature), "top_k": params.top_k,
            "num_classes": num_classes, "images": pool.count, "calibration": calibration,
        }

        done = _committed_snapshot(store, run_id, latest)
        if done is not None:
            return {**result, **done, "already_labeled": True}
        latest.close()

        beat.protect(f"label-runs/{run_id}/")  # its parts, from this start or an earlier one
        fs, root = fsspec.core.url_to_fs(store.path("label-runs", run_id, f"s{params.shard_size}"))
        fs.makedirs(root, exist_ok=True)
        run = _Run(run_id, teacher_name, info.sha256, snap, pool, fs, root)
        have = _existing_parts(fs, root)
        mine = [k for k in _block(pool.num_shards, dist.rank, dist.world) if k not in have]

        dev = pick_device(params.device, dist.local_rank)
        t0 = time.perf_counter()
        labeled = _run_shards(con, pool, mine, net, info, dev, params, fs, root,
                              params.progress and dist.rank == 0, dist)
    elapsed = time.perf_counter() - t0
    dist.barrier()

    lineage = {"teacher": teacher, "weights": weights, "images": images, "temperature": params.temperature,
               "top_k": params.top_k, "batch_size": params.batch_size, "shard_size": params.shard_size,
               "world_size": dist.world, "calibration": calibration}
    reads = {"images": snap} if models_snap is None else {"images": snap, "models": models_snap}
    out = dist.broadcast(lambda: _commit(store, run, lineage, reads, started_at))
    n_here = sum(labeled)
    return {**result, **out, "world_size": dist.world, "labeled_here": n_here,
            "elapsed_s": round(elapsed, 3), "images_per_s": round(n_here / elapsed, 1) if elapsed > 0 else None}


def _pool_shape(con, snap: int, top_k: int | None) -> tuple[int, int, int]:
    """(classes, channels, side) of the images at SNAP: the side and channels most of the
    unlabeled images have, for a teacher from a weights file; checks there is a pool to label."""
    num_classes = con.execute("SELECT count(*) FROM classes").fetchone()[0]
    shape = con.execute(
        "SELECT greatest(width, height), channels FROM images WHERE split = 'unlabeled' "
        "GROUP BY ALL ORDER BY count(*) DESC, 1 DESC, 2 DESC LIMIT 1").fetchone()
    if not num_classes:
        raise UsageError(f"no classes at version {snap}: ingest labeled data first")
    if shape is None:
        raise UsageError(f"no unlabeled images at version {snap}")
    if top_k is not None and top_k > num_classes:
        raise UsageError(f"--top-k {top_k} is larger than the number of classes ({num_classes})")
    return num_classes, int(shape[1]), int(shape[0])


def _commit(store: Store, run: _Run, lineage: dict, reads: dict, started_at) -> dict:
    """Rank 0, after every rank finished: all parts of RUN into pseudo_labels as one snapshot,
    then the work directory removed. An identical run that committed first wins."""
    pool = run.pool

    def fn(con):
        # Under the store's writers' lock: an identical run that finished meanwhile has
        # committed the parts and removed them; this one then finds the run done.
        if con.execute("SELECT 1 FROM runs WHERE run_id = ?", [run.run_id]).fetchone():
            raise _AlreadyCommitted()
        have = _existing_parts(run.fs, run.root)
        missing = sorted(set(range(pool.num_shards)) - set(have))
        if missing:
            raise NsdError(f"label run {run.run_id}: {len(missing)} shard(s) missing after all ranks "
                           f"finished (first: {missing[0]}); run the command again to resume")
        files = [_url(run.fs, have[k]) for k in sorted(have)]
        con.execute(
            "INSERT INTO pseudo_labels SELECT image_id, ?, ?, ?, probs, prob_classes, predicted, "
            "confidence, margin, entropy FROM read_parquet(?) ORDER BY image_id",
            [run.run_id, run.teacher, run.teacher_sha256, files])
        n = con.execute("SELECT count(*) FROM pseudo_labels WHERE label_run = ?", [run.run_id]).fetchone()[0]
        if n != pool.count:  # a part from a different pool would show here; never commit it
            raise NsdError(f"label run {run.run_id}: parts hold {n} rows, the pool has {pool.count}")
        return {"pseudo_labels": n}

    try:
        c = store.write("label", lineage, fn, reads=reads, name=run.teacher, run_id=run.run_id,
                        started_at=started_at,
                        message=f"nsd label {run.teacher} on images@{run.images_version} ({pool.count} images)")
        out = {"snapshot_id": c.snapshot_id, "rows": c.rows["pseudo_labels"], "already_labeled": False}
    except _AlreadyCommitted:
        out = {**(_committed_snapshot(store, run.run_id) or {}), "already_labeled": True}
    # The parts are in the catalog's own files now; the work directory has served.
    run_dir = fsspec.core.url_to_fs(store.path("label-runs", run.run_id))[1]
    with contextlib.suppress(FileNotFoundError):  # an identical run removed it first
        run.fs.rm(run_dir, recursive=True)
    return out


def _block(n: int, rank: int, world: int) -> range:
    """Rank RANK's share of N shards: the RANK-th of WORLD contiguous blocks, sizes within one."""
    return range(rank * n // world, (rank + 1) * n // world)


def _load_teacher(store, teacher, weights, num_classes, in_chans, image_size):
    if weights is None:
        net, info = load_model(store, teacher)
        if info.num_classes != num_classes:
            raise UsageError(f"teacher {teacher!r} has {info.num_classes} classes, the store has {num_classes}")
    else:
        net, info = load_model(store, teacher, weights, num_classes=num_classes, in_chans=in_chans,
                               image_size=image_size)
    net.eval()  # no noise: dropout and stochastic depth off
    return net, info


def _scan_pool(con, shard_size: int) -> _Pool:
    """Stream the ordered unlabeled ids once, keeping only shard starts and a digest."""
    cur = con.execute("SELECT DISTINCT image_id FROM images WHERE split = 'unlabeled' ORDER BY image_id")
    h = hashlib.sha256()
    bounds, n = [], 0
    while True:
        rows = cur.fetchmany(65536)
        if not rows:
            break
        for (iid,) in rows:
            if n % shard_size == 0:
                bounds.append(iid)
            h.update(iid.encode() + b"\n")
            n += 1
    return _Pool(n, bounds, h.hexdigest(), shard_size)


def _committed_snapshot(store: Store, run_id: str, con=None) -> dict | None:
    """The snapshot and row count of run RUN_ID if it was committed (CON: at the latest snapshot)."""
    with contextlib.nullcontext(con) if con is not None else store.reader() as c:
        row = c.execute("SELECT row_counts FROM runs WHERE run_id = ?", [run_id]).fetchone()
    if row is None:
        return None
    snap = next((s["snapshot_id"] for s in reversed(store.snapshots())
                 if s["lineage"].get("run_id") == run_id), None)
    return {"snapshot_id": snap, "rows": json.loads(row[0]).get("pseudo_labels")}


# --------------------------------------------------------------------------- parts


def _part_name(k: int) -> str:
    return f"part-{k:05d}.parquet"


def _existing_parts(fs, root: str) -> dict[int, str]:
    """Finished parts (temporary files of a killed writer are ignored).

    Other processes (ranks, nodes) write parts too: the listing is never taken from fsspec's
    cache. An object store has no empty directories: a prefix without parts does not exist.
    """
    out = {}
    fs.invalidate_cache(root)
    try:
        paths = fs.ls(root, detail=False)
    except FileNotFoundError:
        return out
    for path in paths:
        name = path.rstrip("/").rsplit("/", 1)[-1]
        if name.startswith("part-") and name.endswith(".parquet"):
            out[int(name[5:10])] = path
    return out


def _write_part(fs, root: str, k: int, table) -> None:
    import pyarrow.parquet as pq

    buf = io.BytesIO()  # one shard's soft labels: small
    pq.write_table(table, buf)
    # Whole or absent; its folder made again if an identical run that committed first removed it.
    write_url(_url(fs, f"{root}/{_part_name(k)}"), buf.getvalue())


def _part_table(ids, probs, top_k):
    """Arrow table of one shard from full probability rows (float64 for the statistics)."""
    import pyarrow as pa

    n, c = probs.shape
    order = np.argsort(-probs, axis=1, kind="stable")
    top1 = np.take_along_axis(probs, order[:, :1], axis=1)[:, 0]
    top2 = np.take_along_axis(probs, order[:, 1:2], axis=1)[:, 0] if c > 1 else np.zeros(n)
    with np.errstate(divide="ignore", invalid="ignore"):
        entropy = -np.where(probs > 0, probs * np.log(probs), 0.0).sum(axis=1)
    if top_k is None:
        vals, classes = probs, None
    else:
        keep = order[:, :top_k]
        vals = np.take_along_axis(probs, keep, axis=1)
        classes = keep
    width = vals.shape[1]
    offsets = pa.array(np.arange(0, (n + 1) * width, width, dtype=np.int32))
    probs_col = pa.ListArray.from_arrays(offsets, pa.array(vals.astype(np.float32).ravel()))
    if classes is None:
        classes_col = pa.nulls(n, pa.list_(pa.int32()))
    else:
        classes_col = pa.ListArray.from_arrays(offsets, pa.array(classes.astype(np.int32).ravel()))
    return pa.table({
        "image_id": pa.array(ids, pa.string()),
        "probs": probs_col,
        "prob_classes": classes_col,
        "predicted": pa.array(order[:, 0].astype(np.int32)),
        "confidence": pa.array(top1.astype(np.float32)),
        "margin": pa.array((top1 - top2).astype(np.float32)),
        "entropy": pa.array(entropy.astype(np.float32)),
    })


# --------------------------------------------------------------------------- inference


def _decode_batch(datas: list, info):
    """Encoded images -> one normalised float batch, equal to stacking the eval transform."""
    return eval_batch(datas, int(info.image_size or 0), int(info.in_chans), info.mean, info.std)


def _windows(shards: list, max_shards: int) -> list[list]:
    """Runs of consecutive shard numbers, at most MAX_SHARDS long: one query reads each run.

    The first run is one shard, so that the model starts while the next query runs.
    """
    out: list[list] = []
    for k in shards:
        if len(out) > 1 and k == out[-1][-1] + 1 and len(out[-1]) < max_shards:
            out[-1].append(k)
        else:
            out.append([k])
    return out


def _read_window(con, pool, window) -> list[list]:
    """The (image_id, bytes) rows of each shard of WINDOW, ordered by image_id, deduplicated.

    Each query scans the images table, so reading consecutive shards in one query divides the
    scans by the window length; sorting in Python (not ORDER BY) spares DuckDB sorting blobs.
    """
    lo = pool.bounds[window[0]]
    end = window[-1] + 1
    hi = pool.bounds[end] if end < pool.num_shards else None
    sql = "SELECT image_id, bytes FROM images WHERE split = 'unlabeled' AND image_id >= ?"
    args = [lo]
    if hi is not None:
        sql += " AND image_id < ?"
        args.append(hi)
    rows = con.execute(sql, args).fetchall()
    rows.sort(key=lambda r: r[0])
    # The same picture stored twice in the pool is labeled once.
    rows = [r for i, r in enumerate(rows) if i == 0 or r[0] != rows[i - 1][0]]
    ids = [r[0] for r in rows]
    cuts = [bisect.bisect_left(ids, pool.bounds[k]) for k in window[1:]]
    return [rows[i:j] for i, j in zip([0, *cuts], [*cuts, len(rows)])]


def _produce(con, pool, shards, batch_size, window_shards):
    """(shard, ids, encoded images, last-of-shard) for every batch of SHARDS, read on CON (pinned)."""
    for window in _windows(shards, window_shards):
        for k, rows in zip(window, _read_window(con, pool, window)):
            for start in range(0, len(rows), batch_size):
                chunk = rows[start:start + batch_size]
                yield k, [r[0] for r in chunk], [r[1] for r in chunk], start + batch_size >= len(rows)


def _feed(produce, out_q, stop):
    """Producer thread: push batches into OUT_Q, then None (done) or the exception it met.

    Every put gives up once STOP is set, so the thread ends even if the consumer has gone.
    """
    def put(item) -> bool:
        while not stop.is_set():
            try:
                out_q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    try:
        for item in produce:
            if not put(item):
                return
        put(None)
    except BaseException as exc:  # hand the failure to the consumer
        put(exc)


def _run_shards(con, pool, shards, net, info, dev, params: LabelParams, fs, root, show, dist) -> list[int]:
    """Label SHARDS of POOL and write each as one part; returns the images in each part."""
    total = sum(min(pool.shard_size, pool.count - k * pool.shard_size) for k in shards)
    bar = progress_bar(show)
    task = bar.add_task("label" if dist.world == 1 else f"label rank 0/{dist.world}", total=total)
    with _labeled_batches(con, pool, shards, net, info, dev, params) as batches:
        bar.start()
        try:
            return _write_parts(batches, fs, root, params.top_k, lambda n: bar.advance(task, n))
        finally:
            bar.stop()


def _write_parts(batches, fs, root: str, top_k: int | None, advance) -> list[int]:
    """Gather the batches of each shard (they come in order) into its Parquet part."""
    pause = env_number(PAUSE_ENV, 0, lo=0, hi=60, must="seconds from 0 to 60")
    counts = []
    ids_acc, probs_acc = [], []
    for k, ids, probs, last in batches:
        ids_acc.extend(ids)
        probs_acc.append(probs)
        advance(len(ids))
        if last:
            _write_part(fs, root, k, _part_table(ids_acc, np.concatenate(probs_acc), top_k))
            counts.append(len(ids_acc))
            ids_acc, probs_acc = [], []
            if pause:
                time.sleep(pause)
    return counts


@contextlib.contextmanager
def _labeled_batches(con, pool, shards, net, info, dev, params: LabelParams):
    """The batch source: (shard, ids, probabilities, last-of-shard) for every batch of SHARDS,
    in order, read on CON (pinned) and labeled by NET on DEV. It chooses who decodes and who
    infers (see LabelParams.num_workers); on exit every thread it started has stopped."""
    import torch

    net = net.to(dev)
    cuda = dev.type == "cuda"
    if cuda:
        net = net.to(memory_format=torch.channels_last)
        torch.backends.cudnn.benchmark = True
    # Read up to ~64 MiB of raw pixels per query (at least one shard): few table scans.
    side, chans = int(info.image_size or 0) or 224, int(info.in_chans)
    window_shards = max(1, min(64, (64 << 20) // (side * side * chans * pool.shard_size)))
    infer = _inference(net, dev, params.temperature)
    num_workers = params.num_workers

    # On CPU, split the cores by batch, not by operator: each of `streams` threads decodes a
    # batch and runs the model on it with one intra-op thread (up to 8 cores). Decoding then
    # never preempts one of torch's intra-op threads (which leaves the others waiting at every
    # operator), and one thread per batch is also the cheaper way to run a small model. The
    # rows are the same whichever thread computes a batch.
    threads = torch.get_num_threads()
    streams = min(threads, MAX_CPU_STREAMS) if not cuda and num_workers > 0 else 1
    executor = ThreadPoolExecutor(streams) if streams > 1 else None
    decode_pool = ThreadPoolExecutor(num_workers - 1) if cuda and num_workers > 1 else None
    feeder, stop = None, threading.Event()

    def prep(datas):
        if decode_pool is None:
            return _decode_batch(datas, info)
        step = -(-len(datas) // num_workers)
        parts = [datas[i:i + step] for i in range(0, len(datas), step)]
        futures = [decode_pool.submit(_decode_batch, part, info) for part in parts[1:]]
        return torch.cat([_decode_batch(parts[0], info), *(f.result() for f in futures)])

    raw = produce = _produce(con, pool, shards, params.batch_size, window_shards)
    if executor is None:  # GPU (or num_workers 0): decode before the queue, infer here
        produce = ((k, ids, prep(datas), last) for k, ids, datas, last in raw)
    if num_workers > 0:
        # A feeder thread reads (and for the GPU decodes) the next batches meanwhile.
        out_q: queue.Queue = queue.Queue(maxsize=2 * streams + 2)
        feeder = threading.Thread(target=_feed, args=(produce, out_q, stop), daemon=True)
        feeder.start()
        batches = _drain(out_q)
    else:
        batches = produce
    if executor is not None:
        # Many cores: at most MAX_CPU_STREAMS batches in flight (memory), each with the rest.
        torch.set_num_threads(threads // streams)
        source = _in_order(executor, batches, lambda datas: infer(_decode_batch(datas, info)), depth=streams + 1)
    else:
        source = ((k, ids, infer(x), last) for k, ids, x, last in batches)
    try:
        yield source
    finally:
        stop.set()
        if feeder is not None:
            feeder.join(timeout=5)
        source.close()
        if feeder is None:
            raw.close()  # ends the read query now, not at garbage collection
        for ex in (executor, decode_pool):
            if ex is not None:
                ex.shutdown(wait=True, cancel_futures=True)
        if executor is not None:
            torch.set_num_threads(threads)


def _inference(net, dev, temperature: float):
    """x -> softmax(net(x) / T) as float64 numpy rows, without noise or autograd."""
    import torch

    cuda = dev.type == "cuda"

    def infer(x):
        with torch.inference_mode():
            x = x.to(dev, non_blocking=True)
            if cuda:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(dev.type, dtype=torch.float16, enabled=cuda):
                logits = net(x)
            # Softmax in float32 (float64 on the host for the statistics) whatever autocast did.
            probs = torch.softmax(logits.float() / temperature, dim=1).double().cpu().numpy()
        if not np.isfinite(probs).all():  # never a NaN soft label in the store
            raise UsageError("the teacher's outputs are not finite numbers for some images (its weights or "
                             "logits overflow): no label run was committed")
        return probs

    return infer


def _in_order(executor, items, fn, depth: int):
    """(k, ids, fn(datas), last) for each item, DEPTH items in flight on EXECUTOR, in input order."""
    pending: collections.deque = collections.deque()
    try:
        for k, ids, datas, last in items:
            pending.append((k, ids, executor.submit(fn, datas), last))
            if len(pending) >= depth:
                k0, ids0, fut, last0 = pending.popleft()
                yield k0, ids0, fut.result(), last0
        while pending:
            k0, ids0, fut, last0 = pending.popleft()
            yield k0, ids0, fut.result(), last0
    finally:
        for *_, fut, _ in pending:
            fut.cancel()
        items.close()


def _drain(out_q):
    """Items from OUT_Q until the producer's None; re-raises the producer's exception."""
    for item in iter(out_q.get, None):
        if isinstance(item, BaseException):
            raise item
        yield item
