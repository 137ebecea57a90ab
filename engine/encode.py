"""How `nsd ingest` encodes what a source yields: arrays to PNG, image bytes decoded once to
check them and read their size, each image hashed; in chunks, in worker processes when worth it."""

from __future__ import annotations

import hashlib
import io
import os
import warnings
from typing import Iterable, Iterator

import numpy as np
from PIL import Image

from nsd.engine.dups import phash_or_none
from nsd.engine.errors import first_line
from nsd.engine.runtime import ordered_map
from nsd.engine.sources import Limits, Unreadable
from nsd.engine.transforms import to_8bit

CHUNK_ITEMS = 2048
CHUNK_BYTES = 32 << 20  # a chunk also closes at this many source bytes (big JPEGs)
PNG_LEVEL = 1           # fast zlib level: 28x28 grey images barely compress better at 6


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
    """A 16-bit (or 32-bit integer) grey image as an 8-bit PNG (transforms.to_8bit: scaled,
    not clipped); values outside 0-65535 are refused rather than clipped."""
    arr = np.asarray(im)
    if arr.size and (arr.min() < 0 or arr.max() > 65535):
        raise _Reject(f"unsupported pixel values for mode {im.mode}: {arr.min()}..{arr.max()}")
    buf = io.BytesIO()
    to_8bit(im).save(buf, format="PNG", compress_level=PNG_LEVEL)
    return buf.getvalue()


def _prepare(chunk: list, need_label: bool, limits: Limits = Limits()) -> tuple[list, list]:
    """Encode or check every item of a chunk. Runs in worker processes: plain data in and out.

    Returns (rows, rejects); rows are (index_in_chunk, image_id, bytes, format, w, h, c, phash).
    """

    # Pillow refuses images over twice this and warns over it; nsd checks the size itself
    # from the header, before decoding a pixel.
    Image.MAX_IMAGE_PIXELS = limits.max_pixels
    rows, rejects = [], []
    for k, (source, data, label) in enumerate(chunk):
        try:
            if isinstance(data, Unreadable):
                raise _Reject(data.reason)
            if isinstance(label, Unreadable):
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


def chunk_items(items: Iterable) -> Iterator[list]:
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


def encode_chunks(chunks: Iterator[list], need_label: bool, workers: int,
              limits: Limits = Limits()) -> Iterator[tuple[list, list, list]]:
    """(chunk, rows, rejects) in source order; at most 2 chunks per worker in flight."""
    for chunk, (rows, rejects) in ordered_map(_prepare, chunks, workers, need_label, limits):
        yield chunk, rows, rejects


def default_workers() -> int:
    return max(1, min(os.cpu_count() or 1, 8))
