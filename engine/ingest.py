"""`nsd ingest`: bring images into the store from folders, Parquet, IDX, Hugging Face or fsspec URLs.

The pipeline keeps memory bounded whatever the source size:

1. a *source* (engine/sources.py) yields items ``(source_str, data, label)`` one at a time, where ``data`` is
   encoded image bytes (folders, Parquet, HF) or a uint8 array (IDX);
2. items are grouped in chunks (engine/encode.py); each chunk is encoded to PNG (arrays) or decoded once to
   check it and read its size (bytes), and hashed — in worker processes when worth it;
3. chunks are appended to a Parquet file in a private staging directory;
4. ONE :meth:`Store.write` transaction maps class names to ids, picks the labeled subset
   (``--labeled-per-class``), drops images the store already has (anti-join on
   ``image_id``) and inserts from the staged Parquet. Because it only reads staged files,
   a busy-retry can run it again safely.

    from nsd.engine import Store
    from nsd.engine.ingest import ingest
    result = ingest(Store("fm").require(), "fashion-mnist", labeled_per_class=100, seed=0)
    result.added  # {'labeled': 1000, 'unlabeled': 59000, 'test': 10000}
"""

from __future__ import annotations

import dataclasses
import uuid
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq
from rich.console import Console

from nsd.engine.encode import chunk_items, default_workers, encode_chunks
from nsd.engine.errors import UsageError
from nsd.engine.params import LABELED_SPLITS, MAX_WORKERS, SPLITS
from nsd.engine.runtime import progress_bar
from nsd.engine.sources import Limits, Source, open_source
from nsd.engine.store import Store, has_table
from nsd.schemas import read_sql

POOL_MIN_ITEMS = 4096   # below this, worker processes cost more than they save

STAGE_SCHEMA = pa.schema([
    ("ord", pa.int64()),          # position in the source stream: first copy wins on dedupe
    ("image_id", pa.string()),
    ("bytes", pa.binary()),
    ("format", pa.string()),
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("channels", pa.int32()),
    ("source", pa.string()),
    ("role", pa.string()),        # split before --labeled-per-class moves images
    ("label", pa.int32()),        # the source's own label index (mapped to class_id at commit)
    ("phash", pa.int64()),        # perceptual hash (engine/dups.py)
])
REJECT_SCHEMA = pa.schema([("source", pa.string()), ("reason", pa.string())])


@dataclass
class IngestResult:
    """What one ingest did."""

    source: str
    added: dict[str, int]          # new images per split
    already_present: int           # images the store had before (same image_id)
    repeated_in_source: int        # copies of an image seen earlier in the same source
    rejected: int                  # undecodable or unreadable items (see table rejects)
    classes_added: int
    snapshot_id: int
    run_id: str
    read: int = 0                  # items read from the source
    reject_examples: list[tuple[str, str]] = field(default_factory=list)

    @property
    def duplicates(self) -> int:
        return self.already_present + self.repeated_in_source

    @property
    def total_added(self) -> int:
        return sum(self.added.values())

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["duplicates"] = self.duplicates
        out["total_added"] = self.total_added
        out["reject_examples"] = [list(r) for r in self.reject_examples]
        return out


# --------------------------------------------------------------------------- ingest


def ingest(
    store: Store,
    source: str,
    *,
    split: str | None = None,
    labeled_per_class: int | None = None,
    seed: int = 0,
    progress: bool = True,
    workers: int | None = None,
    limits: Limits | None = None,
) -> IngestResult:
    """Add the images of SOURCE to the store as one snapshot.

    SOURCE is an image folder (class subfolders = labeled), a Parquet file or folder, an
    IDX images file (labels file found beside it), a dataset saved with ``save_to_disk``,
    ``hf:NAME[:SPLIT]`` (streamed from the Hugging Face hub), any fsspec URL of those, or
    ``fashion-mnist`` (train -> labeled, t10k -> test).

    ``split`` overrides the default split (labeled for labeled sources, unlabeled for flat
    folders). ``labeled_per_class=N`` keeps N labeled images per class, chosen by ``seed``,
    and moves the rest to ``unlabeled`` with their label hidden in ``gold_label``.
    Images already in the store (same sha256) are skipped; undecodable items go to
    ``rejects``. ``workers`` processes encode/check images (default: one per core, at most
    64). ``limits`` caps bytes and pixels per image and the number of classes, and confines
    Parquet ``{path: ...}`` images (default: :meth:`Limits.from_env`); each refused item is
    a ``rejects`` row with its reason.
    """
    store.require()
    if split is not None and split not in SPLITS:
        raise UsageError(f"invalid split {split!r}: use one of {', '.join(SPLITS)}")
    if labeled_per_class is not None and (not isinstance(labeled_per_class, int) or labeled_per_class < 0):
        raise UsageError(f"--labeled-per-class must be a whole number >= 0, not {labeled_per_class!r}")
    if workers is not None and not (isinstance(workers, int) and 1 <= workers <= MAX_WORKERS):
        raise UsageError(f"--workers must be a whole number from 1 to {MAX_WORKERS}, not {workers!r}")
    limits = limits or Limits.from_env()
    src = open_source(source, limits)
    if src.class_names is not None and not src.sort_names and len(src.class_names) > limits.max_classes:
        raise UsageError(f"{source} has {len(src.class_names)} classes, over the cap of {limits.max_classes} "
                         f"(--max-classes, $NSD_MAX_CLASSES)")
    role = _default_role(src, split, labeled_per_class, source)
    with store.reader() as con:
        read_snapshot = store.latest_snapshot(con)
        if src.class_names is not None and not src.sort_names:  # fail before streaming, not after
            _class_map(_store_classes(con), src, src.class_names)

    run_id = f"ingest-{uuid.uuid4().hex[:12]}"
    params = {"source": source, "split": split, "labeled_per_class": labeled_per_class, "seed": seed}
    total = sum(p.total for p in src.parts) if all(p.total is not None for p in src.parts) else None
    if workers is None:
        workers = default_workers() if (total is None or total >= POOL_MIN_ITEMS) else 1

    with store.staging("ingest") as stage:
        images_file, rejects_file = str(stage / "images.parquet"), str(stage / "rejects.parquet")
        read, rejected, examples = _stage(src, role, workers, limits, progress, images_file, rejects_file)
        class_names = list(src.class_names) if src.class_names is not None else None

        def commit(con):
            return _commit(con, src, class_names, images_file, rejects_file, labeled_per_class, seed, run_id)

        if progress:
            _status("committing one snapshot")
        done = store.write("ingest", params, commit, reads={"images": read_snapshot}, run_id=run_id,
                           name=None, message=f"nsd ingest {source}")
    counts = done.result
    return IngestResult(
        source=source, added=counts["added"], already_present=counts["already_present"],
        repeated_in_source=counts["repeated"], rejected=rejected, classes_added=counts["classes_added"],
        snapshot_id=done.snapshot_id, run_id=done.run_id, read=read, reject_examples=examples,
    )


def _stage(src: Source, role: str, workers: int, limits: Limits, progress: bool, images_file: str,
           rejects_file: str) -> tuple[int, int, list[tuple[str, str]]]:
    """Read, check and encode every item of SRC into the staged Parquet files, in source order
    (``ord``). Returns (items read, items rejected, the first five rejects)."""
    read = rejected = 0
    examples: list[tuple[str, str]] = []
    with pq.ParquetWriter(images_file, STAGE_SCHEMA) as iw, \
            pq.ParquetWriter(rejects_file, REJECT_SCHEMA) as rw, progress_bar(progress) as bar:
        for part in src.parts:
            part_role = part.role or role
            task = bar.add_task(part.name, total=part.total)
            need_label = part_role in LABELED_SPLITS
            for chunk, rows, rejects in encode_chunks(chunk_items(part.items()), need_label, workers, limits):
                if rows:
                    iw.write_table(_stage_table(rows, chunk, read, part_role))
                if rejects:
                    rw.write_table(pa.table(list(zip(*rejects)), schema=REJECT_SCHEMA))
                    examples.extend(rejects[: max(0, 5 - len(examples))])
                read += len(chunk)
                rejected += len(rejects)
                bar.advance(task, len(chunk))
    return read, rejected, examples


def _default_role(src: Source, split: str | None, labeled_per_class: int | None, source: str) -> str:
    fixed = any(p.role for p in src.parts)
    if fixed and split is not None:
        raise UsageError(f"{source} sets its own splits (train -> labeled, test -> test): drop --split")
    role = split or ("labeled" if src.labeled else "unlabeled")
    if role in LABELED_SPLITS and not src.labeled:
        raise UsageError(f"{source} has no labels: it can only go to the unlabeled split")
    if labeled_per_class is not None and role != "labeled":
        raise UsageError("--labeled-per-class needs a labeled source going to the labeled split")
    return role


def _stage_table(rows: list, chunk: list, ord0: int, role: str) -> pa.Table:
    ks, ids, data, fmts, ws, hs, cs, hashes = zip(*rows)
    return pa.table({
        "ord": [ord0 + k for k in ks], "image_id": ids, "bytes": data, "format": fmts,
        "width": ws, "height": hs, "channels": cs, "source": [chunk[k][0] for k in ks],
        "role": [role] * len(ks), "label": [chunk[k][2] for k in ks], "phash": hashes,
    }, schema=STAGE_SCHEMA)


def _store_classes(con) -> dict[str, int]:
    return {name: int(cid) for cid, name in con.execute("SELECT class_id, name FROM classes").fetchall()}


def _class_map(existing: dict[str, int], src: Source, names: list[str] | None,
               seen_labels: list[int] | None = None) -> tuple[dict[int, int], list[tuple[int, str]]]:
    """Source label index -> store class_id, and the classes to create (store empty only)."""
    if not src.labeled:
        return {}, []
    if names is None:  # bare integer labels: they are class ids
        labels = seen_labels or []
        if existing:
            unknown = sorted(set(labels) - set(existing.values()))
            if unknown:
                raise UsageError(f"labels {unknown[:10]} are not class ids of this store "
                                 f"(classes 0..{max(existing.values())})")
            return {i: i for i in labels}, []
        n = max(labels) + 1 if labels else 0
        return {i: i for i in labels}, [(i, str(i)) for i in range(n)]
    if existing:
        unknown = [n for n in names if n not in existing]
        if unknown:
            raise UsageError(f"class mismatch: source classes {_shortlist(unknown)} are not in the store's "
                             f"classes {_shortlist(sorted(existing, key=existing.get))}")
        return {i: existing[n] for i, n in enumerate(names)}, []
    order = sorted(range(len(names)), key=lambda i: names[i]) if src.sort_names else range(len(names))
    ids = {i: cid for cid, i in enumerate(order)}
    return ids, sorted((ids[i], names[i]) for i in range(len(names)))


def _commit(con, src, class_names, images_file, rejects_file, labeled_per_class, seed, run_id):
    """The one transaction. Reads only the staged files, so it can be re-run on a busy retry."""
    staged = "read_parquet(?)"
    # Stream the insert instead of buffering it in source order: with a row-group byte cap on
    # `images` (parquet_row_group_size_bytes) memory then stays bounded by that cap.
    con.execute("SET preserve_insertion_order = false")
    existing = _store_classes(con)
    seen = None
    if src.labeled and class_names is None:
        seen = [r[0] for r in con.execute(
            f"SELECT DISTINCT label FROM {staged} WHERE label IS NOT NULL", [images_file]).fetchall()]
    mapping, new_classes = _class_map(existing, src, class_names, seen)
    con.register("label_map", pa.table({"label": pa.array(list(mapping), pa.int32()),
                                         "class_id": pa.array(list(mapping.values()), pa.int32())}))
    # Decide every row's fate from ids and labels only (schemas/ingest_plan.sql), then insert
    # the chosen rows by joining back on `ord`.
    con.execute("CREATE OR REPLACE TEMP TABLE ingest_plan AS\n" + read_sql("ingest_plan"),
                {"staged": images_file, "seed": str(seed), "labeled_per_class": labeled_per_class})
    if new_classes:
        con.executemany("INSERT INTO classes VALUES (?, ?)", new_classes)
    con.execute(f"""
        INSERT INTO images
        SELECT s.image_id, s.bytes, s.format, s.width, s.height, s.channels, s.source, p.split,
               CASE WHEN p.split = 'unlabeled' THEN NULL ELSE p.class_id END,
               CASE WHEN p.split = 'unlabeled' THEN p.class_id END,
               ?
        FROM {staged} s JOIN ingest_plan p USING (ord)
        WHERE p.new
    """, [run_id, images_file])
    if not has_table(con, "image_hashes"):  # a store made by an older nsd
        con.execute(read_sql("tables"))
    con.execute(f"INSERT INTO image_hashes SELECT s.image_id, s.phash FROM {staged} s JOIN ingest_plan p USING (ord) "
                "WHERE p.new AND s.phash IS NOT NULL", [images_file])
    con.execute(f"INSERT INTO rejects SELECT source, reason, ? FROM {staged}", [run_id, rejects_file])
    staged_rows = con.execute(f"SELECT count(*) FROM {staged}", [images_file]).fetchone()[0]
    uniq, present = con.execute("SELECT count(*), count(*) FILTER (WHERE NOT new) FROM ingest_plan").fetchone()
    added = {s: 0 for s in SPLITS if s != "val"}  # val only when the source went there
    for s, n in con.execute("SELECT split, count(*) FROM ingest_plan WHERE new GROUP BY split").fetchall():
        added[s] = int(n)
    rejects = con.execute(f"SELECT count(*) FROM {staged}", [rejects_file]).fetchone()[0]
    hashed = con.execute(f"SELECT count(*) FROM {staged} s JOIN ingest_plan p USING (ord) "
                         "WHERE p.new AND s.phash IS NOT NULL", [images_file]).fetchone()[0]
    rows = {"images": sum(added.values()), "classes": len(new_classes), "rejects": int(rejects),
            "image_hashes": int(hashed)}
    result = {"added": added, "already_present": int(present), "repeated": int(staged_rows - uniq),
              "classes_added": len(new_classes)}
    return rows, result


# --------------------------------------------------------------------------- helpers


def _status(text: str) -> None:

    Console(stderr=True).print(f"[dim]{text}…[/dim]")






def _shortlist(names: list[str], n: int = 8) -> str:
    shown = ", ".join(repr(x) for x in names[:n])
    return f"[{shown}{', ...' if len(names) > n else ''}]"
