"""Streaming training data out of the store, in bounded memory, deterministically.

A run pins one snapshot and *stages* what it will read into a local Parquet "plan":

* DuckDB joins the pinned tables (labeled images, or a selection joined to its images with
  each row repeated ``copies`` times) and orders the rows by ``md5(image_id, copy, seed)`` — a
  seeded random order that spreads classes and copies. To keep memory independent of the pool,
  one scan first splits the rows by image hash into local Parquet files of about ``GROUP_ROWS``
  rows per group; then each group is joined and sorted on its own and streamed out as Arrow
  batches into one Parquet plan with row groups of ``BLOCK_ROWS`` (the blocks). Nothing is held
  whole in RAM, the run keeps reading the same data even when the store moves on, and a remote
  data path is read once. What still scales with the store is its own layout: a reader
  decompresses one Parquet row group of ``images`` at a time.
* Each epoch the order is reshuffled from ``Generator([seed, epoch])``: the order of the blocks
  is permuted, then rows are shuffled inside windows of ``WINDOW_BLOCKS`` blocks. Only the O(n)
  index of row positions lives in memory; a worker caches the few blocks it is reading.
* The epoch sequence is split into contiguous equal shards per rank (wrapped-around padding so
  every rank runs the same number of steps, as DDP needs), then into batches. DataLoader worker
  w of W produces batches w, w+W, ...; the DataLoader's round robin hands them back in order,
  so the sample sequence does not depend on the number of workers.
* Augmentation randomness is seeded per batch from (seed, epoch, rank, batch), so resuming
  after ``skip_batches`` batches reproduces exactly the samples and augmentations of an
  uninterrupted run.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import random
import shutil
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from nsd.engine.errors import UsageError
from nsd.engine.params import LABELED_SPLITS
from nsd.engine.paths import quote as _quote
from nsd.engine.store import Store, check_name, name_literal
from nsd.engine.transforms import ToNormalizedTensor, decode_for_training

MEAN, STD = 0.5, 0.5  # normalisation of a model trained from scratch: [0, 1] pixels to [-1, 1]

BLOCK_ROWS = 512
WINDOW_BLOCKS = 8
# DuckDB may spill the staging sort to disk beyond this.
STAGE_MEMORY_LIMIT = "1GB"
# Rows are staged in hash groups of about this many, each sorted on its own: DuckDB never sorts
# more than one group of image bytes at once, so staging memory does not grow with the pool.
GROUP_ROWS = 16384
# Rows a partitioned COPY buffers (over all groups) before it writes them out.
PARTITION_FLUSH_ROWS = 4096


@dataclass
class Plan:
    """A staged, seeded-order Parquet file of (image_id, bytes, target) rows for one run."""

    path: str
    num_rows: int
    block_starts: np.ndarray  # row offset of each row group, plus num_rows at the end
    kind: str  # "labeled" (int label) or "pseudo" (soft target)
    num_classes: int

    @classmethod
    def open(cls, path: str, kind: str, num_classes: int) -> "Plan":

        meta = pq.ParquetFile(path).metadata
        sizes = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
        starts = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)]).astype(np.int64)
        return cls(str(path), int(starts[-1]), starts, kind, num_classes)


def _write_plan(con, queries, path: Path, empty_sql: str) -> None:
    """Stream (sql, params) queries, one after the other, into one Parquet file of BLOCK_ROWS-row groups.
    EMPTY_SQL gives the schema when there are no rows.

    ``execute(...).to_arrow_reader`` streams; ``con.sql(sql, params=...)`` would not: with
    parameters it runs the query eagerly and materializes the whole result in memory first.
    """

    writer, pending, npending = None, [], 0

    def flush(final: bool):
        # Whole BLOCK_ROWS blocks across query boundaries, so every block but the last is full.
        nonlocal pending, npending
        table = pa.Table.from_batches(pending)
        whole = npending if final else npending - npending % BLOCK_ROWS
        for start in range(0, whole, BLOCK_ROWS):
            writer.write_table(table.slice(start, min(BLOCK_ROWS, whole - start)), row_group_size=BLOCK_ROWS)
        pending = table.slice(whole).to_batches()
        npending -= whole

    try:
        for sql, params in queries:
            for batch in con.execute(sql, params).to_arrow_reader(BLOCK_ROWS):
                if writer is None:
                    writer = pq.ParquetWriter(str(path), batch.schema, compression="zstd")
                pending.append(batch)
                npending += batch.num_rows
                if npending >= BLOCK_ROWS:
                    flush(False)
        if writer is None:  # empty: still write a file with the schema
            writer = pq.ParquetWriter(str(path), con.execute(empty_sql).to_arrow_reader(1).schema)
        elif npending:
            flush(True)
    finally:
        if writer is not None:
            writer.close()


def _groups(con, count_sql: str, params: list) -> int:
    n = con.execute(count_sql, params).fetchone()[0] or 0
    return max(1, -(-int(n) // GROUP_ROWS))


def _partition(con, sql: str, params: list, dest: Path) -> list[list[str]]:
    """Write the rows of SQL (with a ``grp`` column) into local Parquet files, one folder per group,
    in one scan of the store. Returns the files of each group, by group number (0..max)."""
    con.execute(f"COPY ({sql}) TO '{_quote(dest)}' (FORMAT parquet, PARTITION_BY (grp), "
                "ROW_GROUP_SIZE 2048, OVERWRITE)", params)
    files: dict[int, list[str]] = {}
    for f in sorted(dest.glob("grp=*/*.parquet")):
        files.setdefault(int(f.parent.name.split("=", 1)[1]), []).append(str(f))
    return [files.get(i, []) for i in range(max(files, default=-1) + 1)]


def _stage_connection(store: Store, staging: Path):
    con = store.connect(read_only=True)
    con.execute(f"SET memory_limit = '{STAGE_MEMORY_LIMIT}'")
    con.execute("SET enable_progress_bar = false")
    con.execute("SET threads = 1")  # one sort run at a time: keeps the staging footprint small
    # DuckDB otherwise caches every Parquet byte it reads (here: all image bytes) in memory.
    con.execute("SET enable_external_file_cache = false")
    # A partitioned COPY otherwise buffers up to 524,288 rows (all of a smaller pool) before writing.
    con.execute(f"SET partitioned_write_flush_threshold = {PARTITION_FLUSH_ROWS}")
    con.execute(f"SET temp_directory = '{_quote(staging / 'spill')}'")
    return con


def stage_split(store: Store, images_version: int, split: str, dest: Path, seed: int,
                num_classes: int) -> Plan:
    """Plan over ``images`` rows of SPLIT (labeled/test) at IMAGES_VERSION: (image_id, bytes, label)."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    path = dest / f"{split}.parquet"
    con = _stage_connection(store, dest)
    try:
        where = "FROM images AT (VERSION => ?) WHERE split = ? AND label IS NOT NULL"
        base = [int(images_version), split]
        g = _groups(con, f"SELECT count(*) {where}", base)
        parts = _partition(con, "SELECT image_id, bytes, label, k, k % ?::UBIGINT AS grp FROM ("
                                f"SELECT *, md5_number(image_id || '/0/' || ?::VARCHAR) AS k {where})",
                           [g, int(seed), *base], dest / f"{split}-parts")
        _write_plan(con, (("SELECT image_id, bytes, label FROM read_parquet(?) ORDER BY k", [files])
                          for files in parts if files), path,
                    "SELECT image_id, bytes, label FROM images LIMIT 0")
    finally:
        con.close()
        shutil.rmtree(dest / f"{split}-parts", ignore_errors=True)
    return Plan.open(str(path), "labeled", num_classes)


def stage_selection(store: Store, selection: str, selection_version: int, images_version: int,
                    dest: Path, seed: int, num_classes: int) -> Plan:
    """Plan over a selection joined to its images, each row repeated ``copies`` times."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    path = dest / "pseudo.parquet"
    con = _stage_connection(store, dest)
    rows = f"FROM selections AT (VERSION => ?) WHERE selection = {name_literal(selection, 'selection')} AND copies > 0"
    sel = [int(selection_version)]
    try:
        g = _groups(con, f"SELECT sum(copies) {rows}", sel)
        # Both sides go to groups by image, so a group's join and sort only see that group's rows.
        grp = "md5_number(image_id || ?::VARCHAR) % ?::UBIGINT AS grp"
        sel_parts = _partition(con, f"SELECT image_id, copies, target, target_classes, {grp} {rows}",
                               [int(seed), g, *sel], dest / "selection-parts")
        img_parts = _partition(con, f"SELECT image_id, bytes, {grp} FROM images AT (VERSION => ?) "
                                    f"WHERE image_id IN (SELECT image_id {rows})",
                               [int(seed), g, int(images_version), *sel], dest / "image-parts")
        sql = ("WITH s AS (SELECT image_id, target, target_classes, "
               "                  md5_number(image_id || '/' || copy::VARCHAR || '/' || ?::VARCHAR) AS k "
               "           FROM (SELECT *, unnest(range(copies)) AS copy FROM read_parquet(?))) "
               "SELECT s.image_id, i.bytes, s.target, s.target_classes "
               "FROM s JOIN read_parquet(?) i USING (image_id) ORDER BY s.k")
        # A group without image files has none of its images: the row count below catches it.
        _write_plan(con, ((sql, [int(seed), sel_parts[i], img_parts[i]])
                          for i in range(min(len(sel_parts), len(img_parts))) if sel_parts[i] and img_parts[i]),
                    path, "SELECT s.image_id, i.bytes, s.target, s.target_classes FROM selections s, images i LIMIT 0")
        expected = con.execute(f"SELECT coalesce(sum(copies), 0) {rows}", sel).fetchone()[0]
        staged = Plan.open(str(path), "pseudo", num_classes)
        if staged.num_rows != expected:
            missing = con.execute(
                f"SELECT count(DISTINCT image_id) FROM (SELECT image_id {rows}) s "
                "ANTI JOIN (SELECT image_id FROM images AT (VERSION => ?)) i USING (image_id)",
                [*sel, int(images_version)]).fetchone()[0]
            raise UsageError(f"selection {selection!r} names {missing} images that are not in images "
                             f"at version {images_version}")
    finally:
        con.close()
        for d in ("selection-parts", "image-parts"):
            shutil.rmtree(dest / d, ignore_errors=True)
    return staged


# --------------------------------------------------------------------------- ordering


def epoch_order(plan: Plan, seed: int, epoch: int) -> np.ndarray:
    """Row positions of the plan in the order of EPOCH: blocks permuted, rows shuffled per window."""
    rng = np.random.default_rng([int(seed), int(epoch)])
    starts = plan.block_starts
    nblocks = len(starts) - 1
    perm = rng.permutation(nblocks)
    parts = []
    for w in range(0, nblocks, WINDOW_BLOCKS):
        idx = np.concatenate([np.arange(starts[b], starts[b + 1]) for b in perm[w:w + WINDOW_BLOCKS]])
        rng.shuffle(idx)
        parts.append(idx)
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def rank_sequence(plan: Plan, seed: int, epoch: int, rank: int = 0, world_size: int = 1) -> np.ndarray:
    """This rank's contiguous share of the epoch, padded by wrapping so all ranks are equal."""
    order = epoch_order(plan, seed, epoch)
    if world_size == 1 or len(order) == 0:
        return order
    per = math.ceil(len(order) / world_size)
    padded = np.resize(order, per * world_size)  # np.resize repeats from the start
    return padded[rank * per:(rank + 1) * per]


def batches_per_epoch(plan: Plan, batch_size: int, world_size: int = 1) -> int:
    per = math.ceil(plan.num_rows / world_size)
    return math.ceil(per / batch_size)


# --------------------------------------------------------------------------- the dataset


def _torch_iterable():
    from torch.utils.data import IterableDataset

    return IterableDataset


class StoreStream(_torch_iterable()):
    """Batches of a Plan: dicts with ``x`` (B,C,H,W), ``y`` (labels, or (B,K) soft targets) and ``ids``.

    Yields whole batches (use ``DataLoader(ds, batch_size=None, num_workers=W)``). Starts at
    ``epoch`` after ``skip_batches`` batches; with ``cycle`` it runs on into later epochs forever.
    """

    def __init__(self, plan: Plan, batch_size: int, transform=None, *, in_chans: int = 1, seed: int = 0,
                 epoch: int = 0, skip_batches: int = 0, rank: int = 0, world_size: int = 1,
                 cycle: bool = False, decode_images: bool = True, image_size: int | None = None):
        super().__init__()
        self.plan, self.batch_size, self.transform = plan, int(batch_size), transform
        self.in_chans, self.seed, self.epoch, self.skip = in_chans, int(seed), int(epoch), int(skip_batches)
        self.rank, self.world_size, self.cycle = int(rank), int(world_size), cycle
        # the size the transform brings images to: small ones are then decoded a batch at a time
        self.decode_images, self.image_size = decode_images, image_size
        self.nbatches = batches_per_epoch(plan, self.batch_size, self.world_size)

    def __len__(self):
        return max(0, self.nbatches - self.skip) if not self.cycle else 1 << 62

    def positions(self):
        """(epoch, batch index, plan rows) of every batch this stream yields, all workers together."""
        epoch, seq = None, None
        t = self.skip
        while True:
            e, j = self.epoch + t // self.nbatches, t % self.nbatches
            if not self.cycle and e > self.epoch:
                return
            if e != epoch:
                epoch, seq = e, rank_sequence(self.plan, self.seed, e, self.rank, self.world_size)
            yield e, j, seq[j * self.batch_size:(j + 1) * self.batch_size]
            t += 1

    def __iter__(self):
        from torch.utils.data import get_worker_info

        info = get_worker_info()
        wid, nworkers = (info.id, info.num_workers) if info else (0, 1)
        if self.nbatches == 0:
            return
        reader = _BlockReader(self.plan)
        for t, (epoch, j, rows) in enumerate(self.positions()):
            if t % nworkers == wid:
                yield self._batch(reader, epoch, j, rows)

    def _batch(self, reader, epoch, j, rows):
        import torch


        records = [reader.row(int(r)) for r in rows]
        # Seed the augmentation per batch: same batch, same noise, whatever the worker or resume.
        key = f"{self.seed}/{epoch}/{self.rank}/{j}"
        random.seed(key)  # RandAugment
        np.random.seed(int.from_bytes(_digest(key)[:4], "little"))
        torch.manual_seed(int.from_bytes(_digest(key), "little") >> 1)  # crops, flips, random erasing
        out = {"ids": [r[0] for r in records], "rows": torch.as_tensor(rows), "epoch": epoch, "batch": j}
        if self.decode_images:
            images = decode_for_training([r[1] for r in records], self.in_chans, self.image_size)
            out["x"] = torch.stack([self.transform(im) for im in images]) if self.transform else images
        if self.plan.kind == "labeled":
            out["y"] = torch.as_tensor([r[2] for r in records], dtype=torch.long)
        else:
            out["y"] = _dense([r[2] for r in records], [r[3] for r in records], self.plan.num_classes)
        return out


def _digest(key: str) -> bytes:

    return hashlib.blake2b(key.encode(), digest_size=8).digest()


def _dense(targets: list, classes: list, num_classes: int):
    """(B, num_classes) float32 soft targets: each row's probabilities at its classes (sparse
    top-k lists), or the row itself when it lists no classes (dense)."""
    import torch

    out = np.zeros((len(targets), num_classes), dtype=np.float32)
    for i, (target, cls) in enumerate(zip(targets, classes)):
        if cls is None:
            out[i] = target
        else:
            out[i, cls] = target
    return torch.from_numpy(out)


class _BlockReader:
    """Reads plan rows through a small LRU cache of row groups (bounded memory per worker)."""

    def __init__(self, plan: Plan, cache_blocks: int = 2 * WINDOW_BLOCKS):
        self.plan, self.cache_blocks = plan, cache_blocks
        self.cache: OrderedDict[int, list] = OrderedDict()
        self._file = None

    def row(self, pos: int):
        b = int(np.searchsorted(self.plan.block_starts, pos, side="right") - 1)
        block = self.cache.get(b)
        if block is None:
            block = self._read(b)
            self.cache[b] = block
            if len(self.cache) > self.cache_blocks:
                self.cache.popitem(last=False)
        else:
            self.cache.move_to_end(b)
        i = pos - int(self.plan.block_starts[b])
        return tuple(col[i] for col in block)

    def _read(self, b: int):

        if self._file is None:
            self._file = pq.ParquetFile(self.plan.path)
        cols = ["image_id", "bytes", "label"] if self.plan.kind == "labeled" else \
            ["image_id", "bytes", "target", "target_classes"]
        table = self._file.read_row_group(b, columns=cols)
        return [table.column(c).to_pylist() for c in cols]


# --------------------------------------------------------------------------- public API


def data_facts(store: Store, version: int) -> dict:
    """What a run needs to know of the images at VERSION: class names, channels (1 grey, 3
    colour), the most common width, and the labeled and test counts."""
    with store.reader() as con:
        names = [r[0] for r in con.execute(
            "SELECT name FROM classes AT (VERSION => ?) ORDER BY class_id", [version]).fetchall()]
        row = con.execute(
            "SELECT max(channels), mode(width), count(*) FILTER (WHERE split = 'labeled'), "
            "count(*) FILTER (WHERE split = 'test') FROM images AT (VERSION => ?) WHERE split <> 'unlabeled'",
            [version]).fetchone()
    if not names:
        raise UsageError(f"no classes in the store at version {version} (ingest a labeled data set first)")
    # Grey images train a 1-channel model; anything with colour (RGB, RGBA, CMYK, palettes)
    # a 3-channel one: decode() converts every image to that.
    return {"class_names": names, "in_chans": 3 if (row[0] or 1) > 1 else 1, "width": int(row[1] or 28),
            "labeled": int(row[2] or 0), "test": int(row[3] or 0)}


@contextlib.contextmanager
def open_stream(store: Store, source: str = "labeled", *, at: str | int | None = None, batch_size: int = 256,
                seed: int = 0, transform=None, image_size: int | None = None, epoch: int = 0,
                skip_batches: int = 0, cycle: bool = False, rank: int = 0, world_size: int = 1):
    """The stream `nsd train` reads, for your own training loop: a PyTorch ``IterableDataset``
    of whole batches from one pinned snapshot, in bounded memory, deterministic and resumable.

    source: a split (``labeled``, ``test``) or a selection (``NAME`` or ``NAME@REF``).
    at: the snapshot (number or tag) of the images and the selection (default: latest).
    transform: applied to each PIL image (e.g. ``engine.transforms.train_transform(...)``);
        default: the pixels as a float tensor in [-1, 1] (the scale nsd's models train on).
    epoch, skip_batches, cycle, rank, world_size: as ``StoreStream`` (resume from a batch,
        run on into later epochs, shard across torchrun ranks).

    Batches are dicts: ``x`` (B, C, H, W), ``y`` (class ids for a split, (B, num_classes) soft
    targets for a selection), ``ids`` (image ids), ``epoch`` and ``batch``. Example::

        with open_stream(Store("nsd-store"), "fmnist-sel1", batch_size=256) as ds:
            for batch in torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2):
                ...
    """

    store.require()
    name, _, ref = source.partition("@")
    version = store.resolve(ref or at)
    facts = data_facts(store, store.resolve(at))
    size = int(image_size or facts["width"])
    transform = transform or ToNormalizedTensor((MEAN,) * facts["in_chans"], (STD,) * facts["in_chans"])
    with store.staging("stream") as stage:
        if name in LABELED_SPLITS:
            plan = stage_split(store, version, name, stage, seed, len(facts["class_names"]))
        else:
            check_name(name, "selection")
            plan = stage_selection(store, name, version, store.resolve(at), stage, seed, len(facts["class_names"]))
        yield StoreStream(plan, batch_size, transform, in_chans=facts["in_chans"], seed=seed, epoch=epoch,
                          skip_batches=skip_batches, rank=rank, world_size=world_size, cycle=cycle,
                          image_size=size)
