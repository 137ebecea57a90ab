"""Perceptual hashes and near-duplicates: `nsd hash`, `nsd dups` and balance's leakage gate.

Every image gets imagehash's DCT hash (``phash``: 64 bits, stored as a signed BIGINT in
``image_hashes``): computed at ingest for new images, by :func:`hash_images` for the images of a
store made before. Two images are near-duplicates when their hashes differ in at most a
distance of bits; schemas/near_pairs.sql finds all such pairs with a banded join.

The default distance (2) is measured (bench/near_dups.py, bench/results/near-dups.md): on
Fashion-MNIST it finds most re-encoded, resized and brightened copies while distinct images
rarely come that close; small crops of 28-pixel images mostly escape any 64-bit hash.

This module owns the ``image_hashes`` table's queries.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from nsd.engine.errors import UsageError
from nsd.engine.runtime import ordered_map, progress_bar
from nsd.engine.store import Store, has_table
from nsd.engine.transforms import decode
from nsd.schemas import read_sql, sql_path

DEFAULT_DISTANCE = 2
# A larger distance means narrower bands in the join and many more candidate pairs.
MAX_DISTANCE = 8
# `nsd dups` refuses to group more pairs than this (lower --distance instead).
MAX_PAIRS = 5_000_000
HASH_BATCH = 512  # images per worker task in `nsd hash`
HASH_SCHEMA = pa.schema([("image_id", pa.string()), ("phash", pa.int64())])


def phash(image) -> int:
    """imagehash.phash of a PIL image as a signed 64-bit integer (its 64 bits, row-major)."""
    import imagehash

    value = int(str(imagehash.phash(image)), 16)
    return value - (1 << 64) if value >= 1 << 63 else value


def phash_or_none(image) -> int | None:
    """phash, or None for an image no hash can be computed of (left for `nsd hash` to count)."""
    try:
        return phash(image)
    except Exception:
        return None


def distance(a: int, b: int) -> int:
    """Hamming distance of two stored hashes."""
    return bin((a ^ b) & ((1 << 64) - 1)).count("1")


def check_distance(value, what: str = "--distance") -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 0 <= value <= MAX_DISTANCE:
        raise UsageError(f"{what} must be an integer in [0, {MAX_DISTANCE}], got {value!r}")
    return int(value)


# --------------------------------------------------------------------------- reading


def pin(con, snap: int) -> None:
    """Make `image_hashes` and `images` mean those tables at version SNAP (as schemas/ SQL reads
    them); a store made before image_hashes existed reads as one with no hashes."""
    con.execute(f"CREATE OR REPLACE TEMP VIEW images AS SELECT *, rowid FROM lake.images AT (VERSION => {int(snap)})")
    if has_table(con, "image_hashes"):
        con.execute("CREATE OR REPLACE TEMP VIEW image_hashes AS "
                    f"SELECT * FROM lake.image_hashes AT (VERSION => {int(snap)})")
    else:
        con.execute("CREATE OR REPLACE TEMP VIEW image_hashes AS "
                    "SELECT NULL::VARCHAR AS image_id, NULL::BIGINT AS phash WHERE false")


def near_pairs_query() -> str:
    return read_sql("near_pairs").rstrip().rstrip(";")


def hash_counts(con) -> tuple[int, int]:
    """(images with a hash, images without) in the pinned views."""
    hashed, total = con.execute(
        "SELECT (SELECT count(*) FROM images WHERE image_id IN (SELECT image_id FROM image_hashes)), "
        "(SELECT count(*) FROM images)").fetchone()
    return int(hashed), int(total - hashed)


def create_near_test(con, max_distance: int) -> int:
    """Temp table ``near_test(image_id, test_image, distance)``: every unlabeled image within
    MAX_DISTANCE bits of a test image, with its nearest test image. Reads the pinned views.
    Returns the number of unlabeled images in it."""
    con.execute(f"""
        CREATE OR REPLACE TEMP TABLE near_test AS
        SELECT CASE WHEN split_a = 'test' THEN image_b ELSE image_a END AS image_id,
               arg_min(CASE WHEN split_a = 'test' THEN image_a ELSE image_b END, distance) AS test_image,
               min(distance) AS distance
        FROM ({near_pairs_query()}) p
        WHERE (split_a = 'test' AND split_b = 'unlabeled') OR (split_a = 'unlabeled' AND split_b = 'test')
        GROUP BY ALL""", {"distance": int(max_distance), "splits": ["test", "unlabeled"]})
    return int(con.execute("SELECT count(*) FROM near_test").fetchone()[0])


def near_test_pairs(store: Store, snap: int, max_distance: int, label_run: str | None = None,
                    limit: int = 24) -> tuple[int, list[dict]]:
    """What balance's leakage gate left out at version SNAP: (how many unlabeled images of
    LABEL_RUN are near a test image, the first LIMIT of them with their nearest test image and
    both images' bytes), nearest first."""
    with store.reader() as con:
        pin(con, snap)
        create_near_test(con, max_distance)
        mine = ("n.image_id IN (SELECT image_id FROM lake.pseudo_labels AT (VERSION => $snap) "
                "WHERE label_run = $run)") if label_run else "true"
        args = {"snap": int(snap), "run": label_run} if label_run else {}
        total = con.execute(f"SELECT count(*) FROM near_test n WHERE {mine}", args).fetchone()[0]
        rows = con.execute(
            f"SELECT n.image_id, n.test_image, n.distance, p.bytes, t.bytes, t.label FROM near_test n "
            f"JOIN images p ON p.image_id = n.image_id JOIN images t ON t.image_id = n.test_image "
            f"WHERE {mine} ORDER BY n.distance, n.image_id LIMIT {int(limit)}", args).fetchall()
    keys = ("image_id", "test_image", "distance", "bytes", "test_bytes", "test_label")
    return int(total), [dict(zip(keys, r)) for r in rows]


def dups(store: Store, distance: int = DEFAULT_DISTANCE, *, splits: list[str] | None = None,
         version: str | int | None = None, across: bool = False, limit: int = 50) -> dict:
    """Near-duplicate groups: images linked by pairs within DISTANCE bits (connected
    components), largest first. SPLITS restricts the images; ACROSS keeps only groups with
    images of more than one split (a test image and its copy in the pool, say). The first
    LIMIT groups come with their images; the counts cover every group.

        dups(store, 2, splits=["test", "unlabeled"], across=True)
    """
    distance = check_distance(distance)
    if splits is not None:
        bad = sorted(set(splits) - {"labeled", "unlabeled", "test"})
        if bad or not splits:
            raise UsageError(f"--splits takes labeled, unlabeled, test; got {', '.join(bad) or 'none'}")
    with store.reader() as con:
        snap = store.resolve(version, con)
        pin(con, snap)
        hashed, unhashed = hash_counts(con)
        con.execute(f"CREATE TEMP TABLE pairs AS {near_pairs_query()} LIMIT {MAX_PAIRS + 1}",
                    {"distance": distance, "splits": splits})
        n_pairs = con.execute("SELECT count(*) FROM pairs").fetchone()[0]
        if n_pairs > MAX_PAIRS:
            raise UsageError(f"more than {MAX_PAIRS:,} pairs within distance {distance}: lower --distance")
        groups = _groups(con)
        if across:
            groups = [g for g in groups if len({m["split"] for m in g}) > 1]
        shown = [_group_row(con, i + 1, g) for i, g in enumerate(groups[: max(0, limit)])]
    return {"version": snap, "distance": distance, "splits": splits, "images_hashed": hashed,
            "images_unhashed": unhashed, "pairs": int(n_pairs), "groups": len(groups),
            "images_in_groups": sum(len(g) for g in groups), "shown": shown,
            "sql": sql_path("near_pairs")}


def _groups(con) -> list[list[dict]]:
    """Connected components of the temp table ``pairs``, largest first, ties by first image id."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    con.execute("""CREATE TEMP TABLE members AS
                   SELECT image_id, any_value(split) AS split, (row_number() OVER (ORDER BY image_id)) - 1 AS k
                   FROM (SELECT image_a AS image_id, split_a AS split FROM pairs
                         UNION ALL SELECT image_b, split_b FROM pairs) GROUP BY image_id""")
    n = con.execute("SELECT count(*) FROM members").fetchone()[0]
    if not n:
        return []
    a, b = con.execute("SELECT ma.k, mb.k FROM pairs p JOIN members ma ON ma.image_id = p.image_a "
                       "JOIN members mb ON mb.image_id = p.image_b").fetchnumpy().values()
    _, comp = connected_components(coo_matrix((np.ones(len(a)), (a, b)), shape=(n, n)), directed=False)
    ids, splits = con.execute("SELECT image_id, split FROM members ORDER BY k").fetchnumpy().values()
    groups: dict[int, list[dict]] = {}
    for c, image_id, split in zip(comp, ids, splits):
        groups.setdefault(int(c), []).append({"image_id": str(image_id), "split": str(split)})
    return sorted(groups.values(), key=lambda g: (-len(g), g[0]["image_id"]))


def _group_row(con, number: int, members: list[dict]) -> dict:
    ids = [m["image_id"] for m in members]
    info = {r[0]: r[1:] for r in con.execute(
        "SELECT i.image_id, i.split, i.label, i.source, h.phash FROM images i "
        "LEFT JOIN image_hashes h USING (image_id) WHERE i.image_id IN (SELECT unnest($ids::VARCHAR[]))",
        {"ids": ids}).fetchall()}
    first = info[ids[0]][3]
    images = [{"image_id": i, "split": info[i][0], "label": info[i][1], "source": info[i][2],
               "distance": distance(first, info[i][3])} for i in ids]
    return {"group": number, "size": len(ids), "splits": sorted({m["split"] for m in images}), "images": images}


# --------------------------------------------------------------------------- writing


def hash_images(store: Store, *, workers: int = 2, progress: bool = True) -> dict:
    """Fill in the perceptual hash of every stored image that has none, as one snapshot
    (`nsd hash`). Images that cannot be decoded are counted, not hashed."""
    with store.reader() as con:
        snap = store.latest_snapshot(con)
        pin(con, snap)
        _, todo = hash_counts(con)
    if todo == 0:
        return {"hashed": 0, "failed": 0, "snapshot_id": None}
    with store.staging("hash") as stage:
        staged = str(Path(stage) / "hashes.parquet")
        failed = _stage_hashes(store, snap, todo, staged, workers, progress)

        def fn(con):
            con.execute(read_sql("tables"))  # a store made by an older nsd gets the table here
            con.execute("INSERT INTO image_hashes SELECT s.image_id, s.phash FROM read_parquet(?) s "
                        "WHERE s.image_id IN (SELECT image_id FROM images) "
                        "AND s.image_id NOT IN (SELECT image_id FROM image_hashes)", [staged])
            n = con.execute("SELECT count(*) FROM image_hashes WHERE image_id IN "
                            "(SELECT image_id FROM read_parquet(?))", [staged]).fetchone()[0]
            return {"image_hashes": n}, {"failed": failed}

        commit = store.write("hash", {"images_version": snap}, fn, reads={"images": snap},
                             message=f"nsd hash: {todo - failed:,} images")
    return {"hashed": commit.rows.get("image_hashes", 0), "failed": failed, "snapshot_id": commit.snapshot_id}


def _stage_hashes(store: Store, snap: int, todo: int, path: str, workers: int, progress: bool) -> int:
    failed = 0
    with pq.ParquetWriter(path, HASH_SCHEMA) as out, progress_bar(progress) as bar:
        task = bar.add_task("hashing", total=todo)
        for batch, rows in ordered_map(_hash_batch, _unhashed(store, snap), workers):
            kept = [(i, h) for i, h in rows if h is not None]
            failed += len(rows) - len(kept)
            if kept:
                out.write_table(pa.table(list(zip(*kept)), schema=HASH_SCHEMA))
            bar.advance(task, len(batch))
    return failed


def _unhashed(store: Store, snap: int) -> Iterator[list]:
    """(image_id, bytes) of the images without a hash, HASH_BATCH at a time (streamed)."""
    with store.reader() as con:
        pin(con, snap)
        reader = con.execute("SELECT image_id, bytes FROM images WHERE image_id NOT IN "
                             "(SELECT image_id FROM image_hashes)").to_arrow_reader(HASH_BATCH)
        for batch in reader:
            yield list(zip(batch.column(0).to_pylist(), batch.column(1).to_pylist()))


def _hash_batch(batch: list) -> list:
    out = []
    for image_id, data in batch:
        try:
            image = decode(data, 1)
        except Exception:  # a hostile or damaged image: counted, never hashed
            image = None
        out.append((image_id, None if image is None else phash_or_none(image)))
    return out
