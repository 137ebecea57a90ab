"""Where `nsd ingest` reads images from: one reader per kind of source (image folders,
Parquet, IDX files, Fashion-MNIST, Hugging Face datasets on the hub or on disk), each yielding
items ``(source_str, data, label)`` one at a time, and the caps on what one file may cost."""

from __future__ import annotations

import gzip
import json
import os
import posixpath
import re
import stat
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from nsd.engine.env import check_number, env_number
from nsd.engine.errors import NsdError, UsageError, first_line
from nsd.engine.params import MAX_CLASSES_CAP
from nsd.engine.paths import read_capped
from nsd.engine.paths import url as _url

FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_HUB = "zalando-datasets/fashion_mnist"

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


class Unreadable:
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
class Source:
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


def open_source(source: str, limits: Limits | None = None) -> Source:
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


def _image_folder(fs, root: str, files: list[str], single: bool = False, limits: Limits = Limits()) -> Source:
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

    return Source("folder", labeled, [_Part(root, None, len(files), items)], classes if labeled else None)


def _read(fs, path: str, max_bytes: int = MAX_IMAGE_BYTES):
    """The file's bytes, or Unreadable: only regular files (never a FIFO, device or socket,
    directly or through a link), at most MAX_BYTES of them."""
    if _url(fs, path) == path:  # local: open without blocking, then check what it is
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
        except (OSError, ValueError) as exc:  # ValueError: a NUL byte in the path
            return Unreadable(f"unreadable: {first_line(exc)}")
        try:
            st = os.fstat(fd)
            if stat.S_ISDIR(st.st_mode):  # a directory (or a link to one) among the files
                return Unreadable("a directory, not an image file")
            if not stat.S_ISREG(st.st_mode):
                return Unreadable("not a regular file (a device, FIFO or socket)")
            if st.st_size > max_bytes:
                return Unreadable(f"too large: {st.st_size} bytes > {max_bytes} (--max-bytes)")
            with os.fdopen(os.dup(fd), "rb") as f:
                return _read_capped(f, max_bytes)
        except OSError as exc:
            return Unreadable(f"unreadable: {first_line(exc)}")
        finally:
            os.close(fd)
    try:
        info = fs.info(path)
        if info.get("type") not in (None, "file"):
            return Unreadable(f"not a regular file ({info.get('type')})")
        if (info.get("size") or 0) > max_bytes:
            return Unreadable(f"too large: {info['size']} bytes > {max_bytes} (--max-bytes)")
        with fs.open(path, "rb") as f:
            return _read_capped(f, max_bytes)
    except Exception as exc:
        return Unreadable(f"unreadable: {first_line(exc)}")


def _read_capped(f, max_bytes: int):
    data = read_capped(f, max_bytes)
    if data is None:
        return Unreadable(f"too large: more than {max_bytes} bytes (--max-bytes)")
    return data


# -- parquet -----------------------------------------------------------------------------


def _parquet(fs, paths: list[str], limits: Limits = Limits()) -> Source:
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
    return Source("parquet", label_col is not None, [_Part(paths[0], None, total, items)],
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
                    return Unreadable(f"unreadable image path {path!r}: {first_line(exc)}")
                if inside is None:
                    return Unreadable(f"image path {path!r} is outside {root} (see --image-root)")
                path = inside
            try:
                pfs, ppath = fsspec.core.url_to_fs(path)
            except Exception as exc:
                return Unreadable(f"unreadable: {first_line(exc)}")
            return _read(pfs, ppath, limits.max_bytes)
        return Unreadable("no image bytes")
    if data is None:
        return Unreadable("no image bytes")
    if isinstance(data, (bytes, bytearray, memoryview)):
        return bytes(data)
    if hasattr(data, "save"):  # a decoded PIL image (datasets with decode=True)
        return np.asarray(data)
    return Unreadable(f"unsupported image value of type {type(data).__name__}")


def _label_index(label, registry: _Names | None, max_classes: int = MAX_CLASSES):
    """The label's index, None for no label, or Unreadable for a label nsd will not guess at."""
    if label is None:
        return None
    if registry is not None:
        if str(label) not in registry and len(registry.names) >= max_classes:
            return Unreadable(f"too many classes: more than {max_classes} (--max-classes)")
        return registry.index(str(label))
    try:
        value = float(label) if isinstance(label, float) else int(label)
    except (TypeError, ValueError, OverflowError):
        return Unreadable(f"label {str(label)[:40]!r} is not a whole number")
    if isinstance(value, float):
        if not value.is_integer():  # 0.9 must not quietly become class 0
            return Unreadable(f"label {value!r} is not a whole number")
        value = int(value)
    if value < 0:
        return None  # HF writes -1 for "no label"
    if value >= max_classes:
        return Unreadable(f"label {value} is over the class cap: at most {max_classes} classes (--max-classes)")
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


def _idx(fs, path: str, name: str | None = None, class_names=None, role=None) -> Source:
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
    return Source("idx", labeled, [_Part(prefix, role, n, items)], class_names if labeled else None)


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


# -- fashion-mnist -----------------------------------------------------------------------


def _fashion_mnist() -> Source:
    """Debian's dataset-fashion-mnist files if installed, else the Hugging Face hub."""
    d = FASHION_MNIST_DIR
    files = [d / f"{p}-{k}-ubyte.gz" for p in ("train", "t10k") for k in ("images-idx3", "labels-idx1")]
    if all(f.exists() for f in files):
        import fsspec

        fs = fsspec.filesystem("file")
        train = _idx(fs, str(files[0]), "fashion-mnist/train", FASHION_MNIST_CLASSES)
        test = _idx(fs, str(files[2]), "fashion-mnist/test", FASHION_MNIST_CLASSES, role="test")
        return Source("fashion-mnist", True, train.parts + test.parts, FASHION_MNIST_CLASSES)
    train = _hf_hub(f"{FASHION_MNIST_HUB}:train", class_names=FASHION_MNIST_CLASSES,
                    hint="install the Debian package dataset-fashion-mnist for an offline copy")
    test = _hf_hub(f"{FASHION_MNIST_HUB}:test", class_names=FASHION_MNIST_CLASSES, role="test",
                   hint="install the Debian package dataset-fashion-mnist for an offline copy")
    return Source("fashion-mnist", True, train.parts + test.parts, FASHION_MNIST_CLASSES)


# -- Hugging Face datasets ---------------------------------------------------------------


def _hf_hub(spec: str, class_names=None, role=None, hint: str = "") -> Source:
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


def _hf_disk(path: str, limits: Limits = Limits()) -> Source:
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


def _hf_source(ds, prefix: str, total, class_names, role, limits: Limits = Limits()) -> Source:
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

    return Source("hf", label_col is not None, [_Part(prefix, role, total, items)], class_names,
                   sort_names=registry is not None)


def _basename(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1]

def _hidden(path: str, root: str) -> bool:
    rel = path[len(root.rstrip("/")) + 1:]
    return any(part.startswith(".") for part in rel.split("/"))
