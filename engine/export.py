"""`nsd export`: a selection or a split, pinned to a snapshot, in formats other trainers load.

``export(store, "fmnist-sel1", "out/", fmt="imagefolder")`` streams the rows of
schemas/export_selection.sql (or export_split.sql) in batches, so memory does not grow with the
data, and writes one of:

* ``imagefolder``: ``<class dir>/<image_id>[_<copy>].<ext>`` with the original bytes, each copy
  of a duplicated image as its own file, class dirs named ``<zero-padded id>-<name>`` so that
  sorted order (torchvision's ``ImageFolder``, timm's ``ImageDataset``) is class-id order; the
  soft labels go beside them in ``labels.parquet``;
* ``parquet``: the rows as they are (bytes, class, soft target, copies as a count), in shards;
* ``hf``: a Hugging Face ``datasets`` dataset on disk (``load_from_disk``): image, label (a
  ``ClassLabel`` of the class names), soft label, image id; one row per copy;
* ``webdataset``: tar shards of ``<key>.<ext>``, ``<key>.cls`` and ``<key>.json`` (soft label).

Every export writes ``manifest.json``: the store, snapshot, source, lineage (label runs and
teachers of a selection), counts and format. It is built in a temporary directory beside OUT
and renamed into place: an export is whole or absent. OUT must be new or empty, or (with
``force``) an earlier nsd export; never a link or inside the store.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import tarfile
from pathlib import Path

from nsd.engine.errors import UsageError
from nsd.engine.params import MAX_SHARD, SPLITS
from nsd.engine.paths import output_dir, quote
from nsd.engine.runtime import progress_bar
from nsd.engine.store import Store, check_name, now_utc
from nsd.schemas import read_sql

FORMATS = ("imagefolder", "parquet", "hf", "webdataset")
BATCH_ROWS = 256
EXPORT_MEMORY = "256MB"  # DuckDB's share of an export; beyond it the sort spills to the staging dir
MANIFEST = "manifest.json"
_HEX_ID = re.compile(r"[0-9a-f]{16,128}")


def export(store: Store, source: str, out: str | os.PathLike, fmt: str = "imagefolder", *,
           at: str | int | None = None, force: bool = False, shard_size: int = 10_000,
           progress: bool = True) -> dict:
    """Export SOURCE (a selection ``NAME[@REF]`` or a split) at snapshot AT (default latest) to
    directory OUT in FMT. Returns the manifest."""
    if fmt not in FORMATS:
        raise UsageError(f"unknown format {fmt!r}: use one of {', '.join(FORMATS)}")
    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or not 1 <= shard_size <= MAX_SHARD:
        raise UsageError(f"--shard-size must be a whole number in [1, {MAX_SHARD}], got {shard_size!r}")
    store.require()
    name, _, ref = source.partition("@")
    version = store.resolve(ref or at)
    query, params, kind = _query(name, version)
    if kind == "split" and name == "unlabeled" and fmt == "imagefolder":
        raise UsageError("the unlabeled split has no classes: export it as parquet, hf or webdataset")
    out = output_dir(out, force=force, protect=store.own_dirs(), marker=MANIFEST)
    with store.reader() as con, store.staging("export") as spill:
        # The rows are sorted by image id with their bytes: let DuckDB spill that sort to disk
        # instead of holding the selection in memory.
        con.execute(f"SET memory_limit = '{EXPORT_MEMORY}'")
        con.execute(f"SET temp_directory = '{quote(str(spill))}'")
        classes = [n for (n,) in con.execute(
            "SELECT name FROM classes AT (VERSION => ?) ORDER BY class_id", [version]).fetchall()]
        total, images = con.execute(f"SELECT coalesce(sum(copies), 0), count(*) FROM ({query})", params).fetchone()
        if kind == "selection" and images == 0:
            raise UsageError(f"unknown or empty selection {name!r} at version {version}")
        lineage = _lineage(con, query, params, version) if kind == "selection" else {}
        manifest = {"store": store.name, "snapshot": version, "source": source, "kind": kind, "format": fmt,
                    "images": int(images), "rows_with_copies": int(total), "classes": classes, **lineage,
                    "created_at": str(now_utc())}
        tmp = out.parent / f".{out.name}.export-{os.getpid()}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            batches = con.execute(query, params).to_arrow_reader(BATCH_ROWS)
            with progress_bar(progress, unit="img") as bar:
                task = bar.add_task(f"export {source} ({fmt})", total=int(total) if fmt != "parquet" else int(images))
                writer = WRITERS[fmt](tmp, classes, shard_size)
                for batch in batches:
                    for row in batch.to_pylist():
                        bar.advance(task, writer.add(row))
                manifest["files"] = writer.close()
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
            _replace_dir(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return dict(manifest, path=str(out))


def _query(name: str, version: int) -> tuple[str, dict, str]:
    if name in SPLITS:
        return read_sql("export_split").rstrip().rstrip(";"), {"version": version, "split": name}, "split"
    check_name(name, "selection")
    return read_sql("export_selection").rstrip().rstrip(";"), {"version": version, "selection": name}, "selection"


def _lineage(con, query: str, params: dict, version: int) -> dict:
    runs = [r for (r,) in con.execute(f"SELECT DISTINCT label_run FROM ({query}) ORDER BY 1", params).fetchall() if r]
    teachers = [t for (t,) in con.execute(
        "SELECT DISTINCT teacher FROM pseudo_labels AT (VERSION => ?) WHERE list_contains(?, label_run) "
        "AND teacher IS NOT NULL ORDER BY 1", [version, runs]).fetchall()]
    return {"label_runs": runs, "teachers": teachers}


def _replace_dir(new: Path, out: Path) -> None:
    """NEW renamed to OUT; what was at OUT (empty, or an earlier export) removed after."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
    os.replace(new, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _ext(data: bytes) -> str:
    """The file extension of encoded image DATA, by its signature."""
    for sig, ext in ((b"\x89PNG", "png"), (b"\xff\xd8", "jpg"), (b"GIF8", "gif"), (b"BM", "bmp"),
                     (b"II*\x00", "tif"), (b"MM\x00*", "tif")):
        if data.startswith(sig):
            return ext
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return "img"


def _file_id(image_id: str) -> str:
    """IMAGE_ID as a file name: the sha256 hex nsd gives images, else a hash of it."""
    if _HEX_ID.fullmatch(image_id or ""):
        return image_id

    return hashlib.sha256(str(image_id).encode()).hexdigest()


def class_dir(class_id: int, name: str, num_classes: int) -> str:
    """A class's directory name: its id zero-padded (sorted order = id order), then the name
    with anything but letters, digits, '.', '_' and '-' replaced (no path can escape)."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", str(name))[:48].strip("._") or "class"
    return f"{class_id:0{max(5, len(str(num_classes)))}d}-{safe}"


def _class_name(classes: list[str], cid) -> str | None:
    """The name of class CID, or None for a row without a (known) class."""
    return classes[cid] if cid is not None and 0 <= cid < len(classes) else None


def _soft(row: dict, num_classes: int) -> list[float] | None:
    """The row's soft target as a dense list over the classes (None for a split)."""
    target = row["target"]
    if target is None:
        return None
    if row["target_classes"] is None:
        return [float(x) for x in target]
    dense = [0.0] * num_classes
    for c, p in zip(row["target_classes"], target):
        if 0 <= c < num_classes:
            dense[c] = float(p)
    return dense


class _ImageFolder:
    def __init__(self, root: Path, classes: list[str], shard_size: int):
        import pyarrow as pa
        import pyarrow.parquet as pq

        self.root, self.classes, self.files = root, classes, 0
        self.schema = pa.schema([("path", pa.string()), ("image_id", pa.string()), ("class_id", pa.int32()),
                                 ("class_name", pa.string()), ("copy", pa.int32()),
                                 ("target", pa.list_(pa.float32())), ("confidence", pa.float32())])
        self.writer = pq.ParquetWriter(root / "labels.parquet", self.schema)
        self.rows: list[dict] = []

    def add(self, row: dict) -> int:
        cid = row["class_id"]
        if cid is None or not 0 <= cid < len(self.classes):
            raise UsageError(f"image {row['image_id']!r} has no class in this store ({cid!r})")
        folder = self.root / class_dir(cid, self.classes[cid], len(self.classes))
        folder.mkdir(exist_ok=True)
        data, copies, stem = row["bytes"], int(row["copies"]), _file_id(row["image_id"])
        for k in range(copies):
            rel = f"{folder.name}/{stem}{'' if copies == 1 else f'_{k}'}.{_ext(data)}"
            with open(self.root / rel, "xb") as f:  # never over an existing file
                f.write(data)
            self.rows.append({"path": rel, "image_id": row["image_id"], "class_id": cid,
                              "class_name": self.classes[cid], "copy": k, "target": _soft(row, len(self.classes)),
                              "confidence": row["confidence"]})
        self.files += copies
        if len(self.rows) >= BATCH_ROWS:
            self._flush()
        return copies

    def _flush(self):
        import pyarrow as pa

        if self.rows:
            self.writer.write_table(pa.Table.from_pylist(self.rows, self.schema))
            self.rows = []

    def close(self) -> dict:
        self._flush()
        self.writer.close()
        return {"images": self.files, "labels": "labels.parquet"}


class _Parquet:
    def __init__(self, root: Path, classes: list[str], shard_size: int):
        self.root, self.classes, self.shard_size = root, classes, shard_size
        self.rows: list[dict] = []
        self.writer, self.in_shard, self.shards = None, 0, []

    def add(self, row: dict) -> int:
        import pyarrow as pa
        import pyarrow.parquet as pq

        cid = row["class_id"]
        row = {"image_id": row["image_id"], "bytes": row["bytes"], "class_id": cid,
               "class_name": _class_name(self.classes, cid),
               "target": _soft(row, len(self.classes)), "confidence": row["confidence"], "copies": row["copies"]}
        if self.writer is None:
            name = f"data-{len(self.shards):05d}.parquet"
            self.schema = pa.schema([("image_id", pa.string()), ("bytes", pa.binary()), ("class_id", pa.int32()),
                                     ("class_name", pa.string()), ("target", pa.list_(pa.float32())),
                                     ("confidence", pa.float32()), ("copies", pa.int32())])
            self.writer = pq.ParquetWriter(self.root / name, self.schema)
            self.shards.append(name)
        self.rows.append(row)
        self.in_shard += 1
        if len(self.rows) >= BATCH_ROWS or self.in_shard >= self.shard_size:
            self.writer.write_table(pa.Table.from_pylist(self.rows, self.schema))
            self.rows = []
        if self.in_shard >= self.shard_size:
            self.writer.close()
            self.writer, self.in_shard = None, 0
        return 1

    def close(self) -> dict:
        import pyarrow as pa

        if self.writer is not None:
            if self.rows:
                self.writer.write_table(pa.Table.from_pylist(self.rows, self.schema))
            self.writer.close()
        return {"shards": self.shards}


class _WebDataset:
    def __init__(self, root: Path, classes: list[str], shard_size: int):
        self.root, self.classes, self.shard_size = root, classes, shard_size
        self.tar, self.in_shard, self.shards = None, 0, []

    def _put(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = len(data), 0, 0o644
        self.tar.addfile(info, io.BytesIO(data))

    def add(self, row: dict) -> int:
        cid, copies, stem = row["class_id"], int(row["copies"]), _file_id(row["image_id"])
        for k in range(copies):
            if self.tar is None:
                name = f"shard-{len(self.shards):05d}.tar"
                self.tar = tarfile.open(self.root / name, "w", format=tarfile.USTAR_FORMAT)
                self.shards.append(name)
            key = f"{stem}_{k}"
            self._put(f"{key}.{_ext(row['bytes'])}", row["bytes"])
            if cid is not None:
                self._put(f"{key}.cls", str(int(cid)).encode())
            meta = {"image_id": row["image_id"], "class_id": cid, "copy": k,
                    "class_name": _class_name(self.classes, cid),
                    "soft_label": _soft(row, len(self.classes)), "confidence": row["confidence"]}
            self._put(f"{key}.json", json.dumps(meta, sort_keys=True).encode())
            self.in_shard += 1
            if self.in_shard >= self.shard_size:
                self.tar.close()
                self.tar, self.in_shard = None, 0
        return copies

    def close(self) -> dict:
        if self.tar is not None:
            self.tar.close()
        return {"shards": self.shards}


class _HuggingFace:
    """Rows go to a local Parquet spool first; ``datasets`` then builds the dataset from it in
    its own bounded-memory way (Arrow files), and ``save_to_disk`` writes it."""

    def __init__(self, root: Path, classes: list[str], shard_size: int):
        self.root, self.classes, self.shard_size = root, classes, shard_size
        self.spool = _ImageRows(root.parent / f"{root.name}-spool")
        self.n = 0

    def add(self, row: dict) -> int:
        for k in range(int(row["copies"])):
            self.spool.add({"image": {"bytes": row["bytes"], "path": None}, "label": row["class_id"],
                            "soft_label": _soft(row, len(self.classes)), "image_id": row["image_id"]})
        self.n += int(row["copies"])
        return int(row["copies"])

    def close(self) -> dict:
        import datasets

        features = datasets.Features({
            "image": datasets.Image(), "label": datasets.ClassLabel(names=self.classes or ["_"]),
            "soft_label": datasets.Sequence(datasets.Value("float32")), "image_id": datasets.Value("string")})
        files = self.spool.close()
        try:
            ds = datasets.Dataset.from_parquet([str(f) for f in files], features=features,
                                               cache_dir=str(self.spool.dir / "cache")) if files else \
                datasets.Dataset.from_dict({k: [] for k in features}, features=features)
            ds.save_to_disk(str(self.root / "dataset"), max_shard_size="256MB")
        finally:
            shutil.rmtree(self.spool.dir, ignore_errors=True)
        return {"dataset": "dataset", "rows": self.n}


class _ImageRows:
    """A Parquet spool of HF-style rows (image struct, label, soft label, image id)."""

    def __init__(self, folder: Path):
        import pyarrow as pa

        self.dir = folder
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir()
        self.schema = pa.schema([("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
                                 ("label", pa.int64()), ("soft_label", pa.list_(pa.float32())),
                                 ("image_id", pa.string())])
        self.rows: list[dict] = []
        self.files: list[Path] = []

    def add(self, row: dict) -> None:
        self.rows.append(row)
        if len(self.rows) >= 4 * BATCH_ROWS:
            self._flush()

    def _flush(self):
        import pyarrow as pa
        import pyarrow.parquet as pq

        if self.rows:
            path = self.dir / f"part-{len(self.files):05d}.parquet"
            pq.write_table(pa.Table.from_pylist(self.rows, self.schema), path)
            self.files.append(path)
            self.rows = []

    def close(self) -> list[Path]:
        self._flush()
        return self.files


WRITERS = {"imagefolder": _ImageFolder, "parquet": _Parquet, "hf": _HuggingFace, "webdataset": _WebDataset}
