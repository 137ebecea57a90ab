"""`nsd ingest`: bring images into the store from folders, Parquet, IDX, Hugging Face or fsspec URLs.

The pipeline keeps memory bounded whatever the source size:

1. a *source* yields items ``(source_str, data, label)`` one at a time, where ``data`` is
   encoded image bytes (folders, Parquet, HF) or a uint8 array (IDX);
2. items are grouped in chunks; each chunk is encoded to PNG (arrays) or decoded once to
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
import gzip
import hashlib
import io
import json
import os
import posixpath
import re
import stat
import struct
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from nsd.engine.dups import phash_or_none
from nsd.engine.env import check_number, env_number
from nsd.engine.errors import NsdError, UsageError, first_line
from nsd.engine.params import LABELED_SPLITS, MAX_CLASSES_CAP, MAX_WORKERS, SPLITS
from nsd.engine.paths import read_capped
from nsd.engine.paths import url as _url
from nsd.engine.runtime import ordered_map, progress_bar
from nsd.engine.store import Store, has_table
from nsd.schemas import read_sql


FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_HUB = "zalando-datasets/fashion_mnist"

CHUNK_ITEMS = 2048
CHUNK_BYTES = 32 << 20  # a chunk also closes at this many source bytes (big JPEGs)
POOL_MIN_ITEMS = 4096   # below this, worker processes cost more than they save
PNG_LEVEL = 1           # fast zlib level: 28x28 grey images barely compress better at 6

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

# Caps on what one file may cost (each can be raised by option or environment variable).
# Defaults suit photos: a 48 MP phone picture passes, a 13000x13000 "decompression bomb" not.
MAX_IMAGE_BYTES = 64 << 20        # --max-bytes, $NSD_MAX_IMAGE_BYTES: bytes read per file
MAX_IMAGE_PIXELS = 50_000_000     # --max-pixels, $NSD_MAX_IMAGE_PIXELS: width x height decoded
MAX_CLASSES = 10_000              # --max-classes, $NSD_MAX_CLASSES: classes a store may hold


@dataclass(frozen=True)
class Limits:
    """What ingest accepts. ``image_root``: Parquet ``{path: ...}`` images are read only
    inside it (default: the directory of the Parquet file that names them)."""

    max_bytes: int = MAX_IMAGE_BYTES
    max_pixels: int = MAX_IMAGE_PIXELS
    max_classes: int = MAX_CLASSES
    image_root: str | None = None

    @classmethod
    def from_env(cls, max_bytes=None, max_pixels=None, max_classes=None, image_root=None) -> "Limits":
        """Explicit values win, then $NSD_MAX_IMAGE_BYTES / _PIXELS / $NSD_MAX_CLASSES, then defaults."""
        return cls(_limit(max_bytes, "NSD_MAX_IMAGE_BYTES", MAX_IMAGE_BYTES, "max bytes"),
                   _limit(max_pixels, "NSD_MAX_IMAGE_PIXELS", MAX_IMAGE_PIXELS, "max pixels"),
                   _limit(max_classes, "NSD_MAX_CLASSES", MAX_CLASSES, "max classes", MAX_CLASSES_CAP),
                   image_root)


def _limit(value, env: str, default: int, what: str, cap: int = 1 << 40) -> int:
    must = f"a whole number from 1 to {cap:,}"
    if value is not None:
        return int(check_number(str(value), what, lo=1, hi=cap, integer=True, must=must))
    return int(env_number(env, default, lo=1, hi=cap, integer=True, must=must))


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


# --------------------------------------------------------------------------- sources


class _Unreadable:
    """Stands in for data that could not be read; becomes a reject."""

    def __init__(self, reason: str):
        self.reason = reason


@dataclass
class _Part:
    """A stream of items that share a role: ('train', items) or ('test', items)."""

    name: str
    role: str | None                  # fixed split (fashion-mnist t10k -> test), else None
    total: int | None
    items: Callable[[], Iterator[tuple[str, Any, int | None]]]


@dataclass
class _Source:
    kind: str
    labeled: bool
    parts: list[_Part]
    # Class names by the source's label index. None with labeled=True: labels are bare
    # integers, taken as class ids. A growing list when discovered while reading (string labels).
    class_names: list[str] | None = None
    sort_names: bool = False          # discovered names: give new classes ids in name order


class _Names:
    """Class names discovered while streaming (string labels): name -> index."""

    def __init__(self):
        self.names: list[str] = []
        self._index: dict[str, int] = {}

    def __contains__(self, name: str) -> bool:
        return name in self._index

    def index(self, name: str) -> int:
        if name not in self._index:
            self._index[name] = len(self.names)
            self.names.append(name)
        return self._index[name]


def open_source(source: str, limits: Limits | None = None) -> _Source:
    """Work out what SOURCE is and how to stream it. Raises UsageError if it is not there."""
    limits = limits or Limits()
    if not source or not str(source).strip():
        raise UsageError("empty source: give a folder, file, URL, hf:NAME or fashion-mnist")
    source = str(source)
    if source.lower() in ("fashion-mnist", "fashion_mnist", "fashionmnist"):
        return _fashion_mnist()
    if source.startswith("hf:"):
        return _hf_hub(source[3:])
    import fsspec

    try:
        fs, path = fsspec.core.url_to_fs(source)
    except (ValueError, ImportError) as exc:
        raise UsageError(f"cannot open source {source!r}: {first_line(exc)}") from None
    try:
        exists = fs.exists(path)
    except Exception as exc:  # remote filesystems raise their own errors
        raise UsageError(f"cannot open source {source!r}: {first_line(exc)}") from None
    if not exists:
        raise UsageError(f"source not found: {source}")
    if fs.isdir(path):
        names = {_basename(p) for p in fs.ls(path, detail=False)}
        if names & {"dataset_dict.json", "dataset_info.json", "state.json"}:
            return _hf_disk(source, limits)
        files = [p for p in fs.find(path) if not _hidden(p, path)]
        if files and all(p.endswith(".parquet") for p in files):
            return _parquet(fs, sorted(files), limits)
        return _image_folder(fs, path, files, limits=limits)
    name = _basename(path)
    if name.endswith(".parquet"):
        return _parquet(fs, [path], limits)
    if re.search(r"idx3-ubyte(\.gz)?$", name):
        return _idx(fs, path)
    return _image_folder(fs, path, [path], single=True, limits=limits)


# -- image folders -----------------------------------------------------------------------


def _image_folder(fs, root: str, files: list[str], single: bool = False, limits: Limits = Limits()) -> _Source:
    """Class subfolders: labeled, class names = folder names sorted. Flat: unlabeled."""
    root = root.rstrip("/")
    files = sorted(files)
    rel = [p[len(root) + 1:] for p in files] if not single else [_basename(files[0])]
    classes = sorted({r.split("/", 1)[0] for r in rel if "/" in r})
    labeled = bool(classes)
    index = {c: i for i, c in enumerate(classes)}

    def items():
        for path, r in zip(files, rel):
            label = index[r.split("/", 1)[0]] if "/" in r else None
            yield _url(fs, path), _read(fs, path, limits.max_bytes), label

    return _Source("folder", labeled, [_Part(root, None, len(files), items)], classes if labeled else None)


def _read(fs, path: str, max_bytes: int = MAX_IMAGE_BYTES):
    """The file's bytes, or _Unreadable: only regular files (never a FIFO, device or socket,
    directly or through a link), at most MAX_BYTES of them."""
    if _url(fs, path) == path:  # local: open without blocking, then check what it is
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
        except (OSError, ValueError) as exc:  # ValueError: a NUL byte in the path
            return _Unreadable(f"unreadable: {first_line(exc)}")
        try:
            st = os.fstat(fd)
            if stat.S_ISDIR(st.st_mode):  # a directory (or a link to one) among the files
                return _Unreadable("a directory, not an image file")
            if not stat.S_ISREG(st.st_mode):
                return _Unreadable("not a regular file (a device, FIFO or socket)")
            if st.st_size > max_bytes:
                return _Unreadable(f"too large: {st.st_size} bytes > {max_bytes} (--max-bytes)")
            with os.fdopen(os.dup(fd), "rb") as f:
                return _read_capped(f, max_bytes)
        except OSError as exc:
            return _Unreadable(f"unreadable: {first_line(exc)}")
        finally:
            os.close(fd)
    try:
        info = fs.info(path)
        if info.get("type") not in (None, "file"):
            return _Unreadable(f"not a regular file ({info.get('type')})")
        if (info.get("size") or 0) > max_bytes:
            return _Unreadable(f"too large: {info['size']} bytes > {max_bytes} (--max-bytes)")
        with fs.open(path, "rb") as f:
            return _read_capped(f, max_bytes)
    except Exception as exc:
        return _Unreadable(f"unreadable: {first_line(exc)}")


def _read_capped(f, max_bytes: int):
    data = read_capped(f, max_bytes)
    if data is None:
        return _Unreadable(f"too large: more than {max_bytes} bytes (--max-bytes)")
    return data


# -- parquet -----------------------------------------------------------------------------


def _parquet(fs, paths: list[str], limits: Limits = Limits()) -> _Source:
    """Parquet with an `image`/`bytes` column (raw bytes or {bytes, path}) and optional `label`."""
    first = pq.ParquetFile(fs.open(paths[0], "rb"))
    schema = first.schema_arrow
    image_col = next((c for c in ("image", "bytes", "img") if c in schema.names), None)
    if image_col is None:
        raise UsageError(f"parquet {paths[0]} has no image column: expected 'image' or 'bytes' "
                         f"(columns: {', '.join(schema.names)})")
    label_col = next((c for c in ("label", "labels") if c in schema.names), None)
    names = _hf_label_names(schema, label_col) if label_col else None
    string_labels = label_col is not None and pa.types.is_string(schema.field(label_col).type) \
        or (label_col is not None and pa.types.is_large_string(schema.field(label_col).type))
    registry = _Names() if string_labels else None
    total = 0
    for p in paths:
        total += pq.ParquetFile(fs.open(p, "rb")).metadata.num_rows

    def items():
        for p in paths:
            with fs.open(p, "rb") as f:
                pf = pq.ParquetFile(f)
                cols = [image_col] + ([label_col] if label_col else [])
                row = 0
                for batch in pf.iter_batches(batch_size=512, columns=cols):
                    images = batch.column(0).to_pylist()
                    labels = batch.column(1).to_pylist() if label_col else [None] * len(images)
                    for data, label in zip(images, labels):
                        src = f"{_url(fs, p)}:{row}"
                        row += 1
                        yield (src, _image_bytes(data, fs, limits, _image_root(fs, p, limits)),
                               _label_index(label, registry, limits.max_classes))

    class_names = registry.names if registry else names
    return _Source("parquet", label_col is not None, [_Part(paths[0], None, total, items)],
                   class_names, sort_names=registry is not None)


def _hf_label_names(schema: pa.Schema, label_col: str) -> list[str] | None:
    """ClassLabel names from the Hugging Face metadata a Parquet export carries, if any."""
    meta = (schema.metadata or {}).get(b"huggingface")
    if not meta:
        return None
    try:
        feature = json.loads(meta)["info"]["features"][label_col]
        return list(feature["names"]) if feature.get("_type") == "ClassLabel" else None
    except (KeyError, TypeError, ValueError):
        return None


def _image_root(fs, parquet_path: str, limits: Limits) -> str:
    """Where `{path: ...}` images of this Parquet file may be read from."""
    if limits.image_root:
        return limits.image_root
    return _url(fs, parquet_path.rstrip("/").rsplit("/", 1)[0] if "/" in parquet_path else ".")


def _inside(path: str, root: str) -> str | None:
    """PATH (relative ones taken from ROOT) if it lies inside ROOT, else None."""
    if "://" in root or "://" in path:
        full = path if "://" in path else root.rstrip("/") + "/" + path
        scheme, _, rest = full.partition("://")
        full = f"{scheme}://{posixpath.normpath('/' + rest).lstrip('/')}"
        base = root.rstrip("/") + "/"
    else:
        full = os.path.realpath(os.path.join(root, path))
        base = os.path.realpath(root).rstrip("/") + "/"
    return full if full.startswith(base) else None


def _image_bytes(data, fs=None, limits: Limits = Limits(), root: str | None = None):
    """Raw bytes, or the Hugging Face image struct {bytes, path}: a path is read only inside
    ROOT (when given), as a regular file within the byte cap."""
    if isinstance(data, dict):
        if data.get("bytes") is not None:
            return data["bytes"]
        if data.get("path"):
            import fsspec

            path = str(data["path"])
            if root is not None:
                try:
                    inside = _inside(path, root)
                except ValueError as exc:  # a NUL byte in the path
                    return _Unreadable(f"unreadable image path {path!r}: {first_line(exc)}")
                if inside is None:
                    return _Unreadable(f"image path {path!r} is outside {root} (see --image-root)")
                path = inside
            try:
                pfs, ppath = fsspec.core.url_to_fs(path)
            except Exception as exc:
                return _Unreadable(f"unreadable: {first_line(exc)}")
            return _read(pfs, ppath, limits.max_bytes)
        return _Unreadable("no image bytes")
    if data is None:
        return _Unreadable("no image bytes")
    if isinstance(data, (bytes, bytearray, memoryview)):
        return bytes(data)
    if hasattr(data, "save"):  # a decoded PIL image (datasets with decode=True)
        return np.asarray(data)
    return _Unreadable(f"unsupported image value of type {type(data).__name__}")


def _label_index(label, registry: _Names | None, max_classes: int = MAX_CLASSES):
    """The label's index, None for no label, or _Unreadable for a label nsd will not guess at."""
    if label is None:
        return None
    if registry is not None:
        if str(label) not in registry and len(registry.names) >= max_classes:
            return _Unreadable(f"too many classes: more than {max_classes} (--max-classes)")
        return registry.index(str(label))
    try:
        value = float(label) if isinstance(label, float) else int(label)
    except (TypeError, ValueError, OverflowError):
        return _Unreadable(f"label {str(label)[:40]!r} is not a whole number")
    if isinstance(value, float):
        if not value.is_integer():  # 0.9 must not quietly become class 0
            return _Unreadable(f"label {value!r} is not a whole number")
        value = int(value)
    if value < 0:
        return None  # HF writes -1 for "no label"
    if value >= max_classes:
        return _Unreadable(f"label {value} is over the class cap: at most {max_classes} classes (--max-classes)")
    return value


# -- IDX (MNIST format) ------------------------------------------------------------------


def _labels_path_for(images_path: str) -> str:
    name = _basename(images_path)
    label_name = name.replace("images", "labels").replace("idx3", "idx1")
    return images_path[: len(images_path) - len(name)] + label_name


def _open_idx(fs, path: str):
    """File object over the (maybe gzipped) IDX file."""
    f = fs.open(path, "rb")
    magic = f.read(2)
    f.seek(0)
    return gzip.GzipFile(fileobj=f) if magic == b"\x1f\x8b" else f


def _idx_header(f, path: str, dims: int) -> tuple[int, ...]:
    head = f.read(4)
    if len(head) < 4 or head[0] != 0 or head[1] != 0 or head[2] != 0x08 or head[3] != dims:
        raise UsageError(f"{path} is not a uint8 IDX file with {dims} dimension(s)")
    return struct.unpack(f">{dims}I", f.read(4 * dims))


def _idx(fs, path: str, name: str | None = None, class_names=None, role=None) -> _Source:
    """IDX images (+ the labels file beside it, if any), streamed in chunks."""
    labels_path = None
    for candidate in (_labels_path_for(path), _labels_path_for(path).removesuffix(".gz"),
                      _labels_path_for(path) + ".gz"):
        if candidate != path and fs.exists(candidate):
            labels_path = candidate
            break
    with _open_idx(fs, path) as f:
        n, rows, cols = _idx_header(f, path, 3)
        gzipped = isinstance(f, gzip.GzipFile)
    # The header's sizes are checked before anything is allocated for them.
    if rows * cols > MAX_IMAGE_PIXELS or rows * cols == 0:
        raise UsageError(f"{path}: its header claims {rows}x{cols} images (at most {MAX_IMAGE_PIXELS:,} pixels)")
    if not gzipped and 16 + n * rows * cols > fs.size(path):
        raise UsageError(f"{path}: its header claims {n:,} images of {rows}x{cols}, more than the file holds")
    if labels_path:
        with _open_idx(fs, labels_path) as f:
            (n_labels,) = _idx_header(f, labels_path, 1)
        if n_labels != n:
            raise UsageError(f"{labels_path} has {n_labels} labels for {n} images in {path}")
    prefix = name or _url(fs, path)

    def items():
        with _open_idx(fs, path) as fi, (_open_idx(fs, labels_path) if labels_path else _null()) as fl:
            _idx_header(fi, path, 3)
            if fl is not None:
                _idx_header(fl, labels_path, 1)
            done, step = 0, max(1, min(4096, (16 << 20) // (rows * cols)))  # reads of at most 16 MiB
            while done < n:
                k = min(step, n - done)
                buf = fi.read(k * rows * cols)
                if len(buf) < k * rows * cols:
                    raise NsdError(f"{path} is truncated: expected {n} images, got {done + len(buf) // (rows * cols)}")
                images = np.frombuffer(buf, np.uint8).reshape(k, rows, cols)
                labels = np.frombuffer(fl.read(k), np.uint8) if fl is not None else [None] * k
                for i in range(k):
                    yield f"{prefix}:{done + i}", images[i], (None if fl is None else int(labels[i]))
                done += k

    labeled = labels_path is not None
    return _Source("idx", labeled, [_Part(prefix, role, n, items)], class_names if labeled else None)


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


# -- fashion-mnist -----------------------------------------------------------------------


def _fashion_mnist() -> _Source:
    """Debian's dataset-fashion-mnist files if installed, else the Hugging Face hub."""
    d = FASHION_MNIST_DIR
    files = [d / f"{p}-{k}-ubyte.gz" for p in ("train", "t10k") for k in ("images-idx3", "labels-idx1")]
    if all(f.exists() for f in files):
        import fsspec

        fs = fsspec.filesystem("file")
        train = _idx(fs, str(files[0]), "fashion-mnist/train", FASHION_MNIST_CLASSES)
        test = _idx(fs, str(files[2]), "fashion-mnist/test", FASHION_MNIST_CLASSES, role="test")
        return _Source("fashion-mnist", True, train.parts + test.parts, FASHION_MNIST_CLASSES)
    train = _hf_hub(f"{FASHION_MNIST_HUB}:train", class_names=FASHION_MNIST_CLASSES,
                    hint="install the Debian package dataset-fashion-mnist for an offline copy")
    test = _hf_hub(f"{FASHION_MNIST_HUB}:test", class_names=FASHION_MNIST_CLASSES, role="test",
                   hint="install the Debian package dataset-fashion-mnist for an offline copy")
    return _Source("fashion-mnist", True, train.parts + test.parts, FASHION_MNIST_CLASSES)


# -- Hugging Face datasets ---------------------------------------------------------------


def _hf_hub(spec: str, class_names=None, role=None, hint: str = "") -> _Source:
    """hf:NAME[:SPLIT] streamed with datasets.load_dataset(NAME, split=SPLIT, streaming=True)."""
    name, _, hf_split = spec.partition(":")
    if not name:
        raise UsageError("hf: needs a dataset name, e.g. hf:zalando-datasets/fashion_mnist")
    import datasets

    hf_split = hf_split or ("test" if role == "test" else "train")
    try:
        ds = datasets.load_dataset(name, split=hf_split, streaming=True)
    except Exception as exc:
        extra = f" ({hint})" if hint else ""
        raise UsageError(f"cannot load Hugging Face dataset {name!r} split {hf_split!r}: "
                         f"{first_line(exc)}{extra}") from None
    total = None
    try:
        total = ds.info.splits[hf_split].num_examples
    except Exception:
        pass
    return _hf_source(ds, f"hf:{name}/{hf_split}", total, class_names, role)


def _hf_disk(path: str, limits: Limits = Limits()) -> _Source:
    """A dataset saved with save_to_disk (a Dataset, or a DatasetDict: every split)."""
    import datasets

    try:
        ds = datasets.load_from_disk(path)
    except Exception as exc:
        raise UsageError(f"cannot load dataset saved at {path}: {first_line(exc)}") from None
    if isinstance(ds, datasets.DatasetDict):
        if len(ds) != 1:
            raise UsageError(f"{path} holds splits {', '.join(ds)}: ingest one of them, "
                             f"e.g. {path.rstrip('/')}/{next(iter(ds))}")
        (split_name, ds), = ds.items()
        path = f"{path.rstrip('/')}/{split_name}"
    return _hf_source(ds, path, len(ds), None, None, limits)


def _hf_source(ds, prefix: str, total, class_names, role, limits: Limits = Limits()) -> _Source:
    import datasets

    features = ds.features or {}
    image_col = next((c for c, f in features.items() if isinstance(f, datasets.Image)), None)
    image_col = image_col or next((c for c in ("image", "img", "bytes") if c in features), None)
    if image_col is None:
        raise UsageError(f"{prefix}: no image column (columns: {', '.join(features) or 'unknown'})")
    if isinstance(features[image_col], datasets.Image):
        ds = ds.cast_column(image_col, datasets.Image(decode=False))  # keep the encoded bytes
    label_col = next((c for c, f in features.items() if isinstance(f, datasets.ClassLabel)), None)
    label_col = label_col or next((c for c in ("label", "labels") if c in features), None)
    registry = None
    if label_col and class_names is None:
        feature = features[label_col]
        if isinstance(feature, datasets.ClassLabel):
            class_names = list(feature.names)
        elif getattr(feature, "dtype", None) == "string":
            registry = _Names()
            class_names = registry.names

    def items():
        for i, example in enumerate(ds.select_columns([image_col] + ([label_col] if label_col else []))):
            label = _label_index(example.get(label_col), registry, limits.max_classes) if label_col else None
            yield f"{prefix}:{i}", _image_bytes(example[image_col], None, limits), label

    return _Source("hf", label_col is not None, [_Part(prefix, role, total, items)], class_names,
                   sort_names=registry is not None)


# --------------------------------------------------------------------------- encoding


# Image formats ingest decodes: what cameras, scanners and data sets write. Pillow can open
# more (EPS runs Ghostscript, for one); those are rejected.
FORMATS = ("PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP", "PPM", "TGA")
_GREY = {"1", "L", "LA", "La", "I", "F", "I;16", "I;16B", "I;16L", "I;16N"}
_SIXTEEN = {"I", "I;16", "I;16B", "I;16L", "I;16N"}


def _channels(mode: str) -> int:
    """Channels a model sees: 1 for grey modes, 3 for the rest. Alpha, CMYK and palettes are
    converted to RGB when decoded for a model, so one RGBA image never makes in_chans 4."""
    return 1 if mode in _GREY else 3


def _to_8bit(im) -> bytes:
    """A 16-bit (or 32-bit integer) grey image as an 8-bit PNG, scaled, not clipped: Pillow's
    own convert('L') clips 16-bit values at 255 and turns the picture white."""
    from PIL import Image

    arr = np.asarray(im)
    if arr.size and (arr.min() < 0 or arr.max() > 65535):
        raise _Reject(f"unsupported pixel values for mode {im.mode}: {arr.min()}..{arr.max()}")
    out = ((arr.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(out).save(buf, format="PNG", compress_level=PNG_LEVEL)
    return buf.getvalue()


def _prepare(chunk: list, need_label: bool, limits: Limits = Limits()) -> tuple[list, list]:
    """Encode or check every item of a chunk. Runs in worker processes: plain data in and out.

    Returns (rows, rejects); rows are (index_in_chunk, image_id, bytes, format, w, h, c, phash).
    """
    from PIL import Image

    # Pillow refuses images over twice this and warns over it; nsd checks the size itself
    # from the header, before decoding a pixel.
    Image.MAX_IMAGE_PIXELS = limits.max_pixels
    rows, rejects = [], []
    for k, (source, data, label) in enumerate(chunk):
        try:
            if isinstance(data, _Unreadable):
                raise _Reject(data.reason)
            if isinstance(label, _Unreadable):
                raise _Reject(label.reason)
            if need_label and label is None:
                raise _Reject("missing label")
            if isinstance(data, np.ndarray):
                if data.dtype != np.uint8 or data.ndim not in (2, 3) or (data.ndim == 3 and data.shape[2] not in (1, 2, 3, 4)):
                    raise _Reject(f"unsupported array {data.dtype} {data.shape}")
                h, w = data.shape[:2]
                _check_pixels(w, h, limits)
                if data.ndim == 3 and data.shape[2] == 1:
                    data = data[:, :, 0]
                buf = io.BytesIO()
                Image.fromarray(data).save(buf, format="PNG", compress_level=PNG_LEVEL)
                encoded, fmt = buf.getvalue(), "png"
                c = 1 if data.ndim == 2 or data.shape[2] == 2 else 3
                hashed = phash_or_none(Image.fromarray(data))
            else:
                encoded = data
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                    im = Image.open(io.BytesIO(encoded), formats=FORMATS)
                with im:
                    (w, h), fmt = im.size, (im.format or "").lower()
                    _check_pixels(w, h, limits)
                    # load() decodes every pixel: a truncated file fails here, not in training.
                    im.load()
                    if im.mode in _SIXTEEN:
                        encoded, fmt = _to_8bit(im), "png"
                    elif im.mode == "F":
                        raise _Reject("unsupported mode F (32-bit float pixels)")
                    c = _channels(im.mode)
                    hashed = phash_or_none(Image.open(io.BytesIO(encoded)) if im.mode in _SIXTEEN else im)
        except _Reject as exc:
            rejects.append((source, str(exc)))
            continue
        except Image.UnidentifiedImageError:
            rejects.append((source, f"undecodable: not an image in a supported format ({', '.join(FORMATS)})"))
            continue
        except Image.DecompressionBombError:  # Pillow's own check, at twice the cap
            rejects.append((source, f"too many pixels: more than {limits.max_pixels:,} (--max-pixels)"))
            continue
        except Exception as exc:
            rejects.append((source, f"undecodable: {type(exc).__name__}: {first_line(exc)}"[:300]))
            continue
        rows.append((k, hashlib.sha256(encoded).hexdigest(), encoded, fmt, w, h, c, hashed))
    return rows, rejects


def _check_pixels(w: int, h: int, limits: Limits) -> None:
    if w * h > limits.max_pixels:
        raise _Reject(f"too many pixels: {w}x{h} = {w * h:,} > {limits.max_pixels:,} (--max-pixels)")


class _Reject(Exception):
    pass


def _chunks(items: Iterable) -> Iterator[list]:
    chunk, size = [], 0
    for item in items:
        chunk.append(item)
        data = item[1]
        size += len(data) if isinstance(data, bytes) else getattr(data, "nbytes", 0)
        if len(chunk) >= CHUNK_ITEMS or size >= CHUNK_BYTES:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def _prepared(chunks: Iterator[list], need_label: bool, workers: int,
              limits: Limits = Limits()) -> Iterator[tuple[list, list, list]]:
    """(chunk, rows, rejects) in source order; at most 2 chunks per worker in flight."""
    for chunk, (rows, rejects) in ordered_map(_prepare, chunks, workers, need_label, limits):
        yield chunk, rows, rejects


def default_workers() -> int:
    return max(1, min(os.cpu_count() or 1, 8))


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


def _stage(src: _Source, role: str, workers: int, limits: Limits, progress: bool, images_file: str,
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
            for chunk, rows, rejects in _prepared(_chunks(part.items()), need_label, workers, limits):
                if rows:
                    iw.write_table(_stage_table(rows, chunk, read, part_role))
                if rejects:
                    rw.write_table(pa.table(list(zip(*rejects)), schema=REJECT_SCHEMA))
                    examples.extend(rejects[: max(0, 5 - len(examples))])
                read += len(chunk)
                rejected += len(rejects)
                bar.advance(task, len(chunk))
    return read, rejected, examples


def _default_role(src: _Source, split: str | None, labeled_per_class: int | None, source: str) -> str:
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


def _class_map(existing: dict[str, int], src: _Source, names: list[str] | None,
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
    from rich.console import Console

    Console(stderr=True).print(f"[dim]{text}…[/dim]")


def _basename(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1]


def _hidden(path: str, root: str) -> bool:
    rel = path[len(root.rstrip("/")) + 1:]
    return any(part.startswith(".") for part in rel.split("/"))


def _shortlist(names: list[str], n: int = 8) -> str:
    shown = ", ".join(repr(x) for x in names[:n])
    return f"[{shown}{', ...' if len(names) > n else ''}]"
