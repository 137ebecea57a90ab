"""Image decoding and transforms: the deterministic eval transform (teacher labeling, eval)
and the noised train transform (student RandAugment) live side by side so both sides of the
loop normalise the same way.
"""

from __future__ import annotations

import io
import zlib

import numpy as np
from PIL import Image

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def decode(data: bytes, in_chans: int) -> Image.Image:
    """Encoded image bytes -> PIL image with the model's channel count."""
    img = Image.open(io.BytesIO(data))
    return img.convert("L" if in_chans == 1 else "RGB")


def decode_batch(datas: list, in_chans: int, image_size: int = 0) -> np.ndarray:
    """Encoded images -> uint8 array (n, in_chans, H, W): the pixels of ``decode`` (resized
    bicubic to image_size x image_size where they differ, as the eval transform does).

    Plain PNGs already of that size (8-bit grey or RGB, not interlaced: what nsd ingest writes
    for arrays) are decoded together: each one's zlib stream is inflated, the scanlines of all
    are laid end to end as one tall image, and Pillow undoes the PNG row filters of the lot in
    one C call. Per-image decoders spend most of their ~25 us on set-up; this takes ~12 us per
    28x28 image. Anything else goes through ``decode`` one by one.
    """
    n, size = len(datas), int(image_size or 0)
    # filtered scanlines of the PNGs that are batched, None for the others
    rows = [_png_scanlines(data, in_chans, size) if size else None for data in datas]
    fast = [i for i in range(n) if rows[i] is not None]
    out = None
    if fast:
        mode = "L" if in_chans == 1 else "RGB"
        try:
            tall = Image.frombytes(mode, (size, size * len(fast)),
                                   zlib.compress(b"".join(rows[i] for i in fast), 0), "zip", mode, 0)
        except (OSError, ValueError):  # a broken row filter: decode() names the image's fault
            rows = [None] * n
        else:
            pix = np.asarray(tall).reshape(len(fast), size, size, in_chans)
            out = np.empty((n, in_chans, size, size), dtype=np.uint8)
            out[fast] = pix.transpose(0, 3, 1, 2)
    for i in range(n):
        if rows[i] is not None:
            continue
        img = decode(datas[i], in_chans)
        if size:
            img = _ResizeIfNeeded(size)(img)
        arr = np.asarray(img, dtype=np.uint8)
        arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
        if out is None:
            out = np.empty((n, *arr.shape), dtype=np.uint8)
        out[i] = arr
    return out if out is not None else np.empty((0, in_chans, size, size), dtype=np.uint8)


def _png_scanlines(data: bytes, in_chans: int, size: int) -> bytearray | None:
    """The inflated, still filtered scanlines of a plain SIZE x SIZE PNG, or None.

    The first row of a PNG is filtered against an all-zero row; in the tall image the previous
    picture's last row sits above it, so its filter is rewritten to the one that gives the same
    pixels without looking up (Up -> None, Paeth -> Sub). Average has no such twin: None.
    """
    # IHDR: width, height, bit depth 8, colour type 0 (grey) or 2 (RGB), compression 0,
    # filter method 0, no interlace.
    if not (len(data) > 33 and data[:8] == _PNG_SIGNATURE and data[8:16] == b"\x00\x00\x00\x0dIHDR"
            and data[24:29] == bytes((8, 0 if in_chans == 1 else 2 if in_chans == 3 else 255, 0, 0, 0))
            and int.from_bytes(data[16:20], "big") == size and int.from_bytes(data[20:24], "big") == size):
        return None
    pos, end, idat = 33, len(data), []
    while pos + 8 <= end:
        length, kind = int.from_bytes(data[pos:pos + 4], "big"), data[pos + 4:pos + 8]
        if kind == b"IDAT":
            idat.append(data[pos + 8:pos + 8 + length])
        elif kind == b"IEND":
            break
        pos += 12 + length
    expected = size * (1 + size * in_chans)
    try:  # at most one byte more than the image holds: a stream that inflates to more is not batched
        raw = bytearray(zlib.decompressobj().decompress(b"".join(idat), expected + 1))
    except zlib.error:
        return None
    if len(raw) != expected or raw[0] == 3 or raw[0] > 4:
        return None
    raw[0] = {2: 0, 4: 1}.get(raw[0], raw[0])
    return raw


def eval_batch(datas: list, image_size: int, in_chans: int, mean, std):
    """Encoded images -> the float batch the eval transform gives, stacked.

    The same float32 ops as ToTensor + Normalize per image (so the same values bit for bit),
    once per batch: per image they cost more than decoding a small image.
    """
    import torch

    x = torch.from_numpy(decode_batch(datas, in_chans, image_size)).to(torch.float32).div_(255)
    mean = torch.tensor(list(mean), dtype=torch.float32).view(-1, 1, 1)
    std = torch.tensor(list(std), dtype=torch.float32).view(-1, 1, 1)
    return x.sub_(mean).div_(std)


def eval_transform(image_size: int, mean, std):
    """No noise: resize to the model's input size (when it differs), to tensor, normalise."""
    from torchvision import transforms as T

    steps = []
    if image_size:
        steps.append(_ResizeIfNeeded(image_size))
    steps += [T.ToTensor(), T.Normalize(mean=list(mean), std=list(std))]
    return T.Compose(steps)


class _ResizeIfNeeded:
    """Resize (bicubic) only when the image is not already image_size x image_size."""

    def __init__(self, size: int):
        self.size = int(size)

    def __call__(self, img: Image.Image) -> Image.Image:
        if img.size == (self.size, self.size):
            return img
        return img.resize((self.size, self.size), Image.BICUBIC)


def to_array(img: Image.Image) -> np.ndarray:
    return np.asarray(img)


# Student noise defaults for small (28x28) grey images; the paper's ImageNet values are in
# the README. M uses timm's scale (10 = the op's full strength); above 10 needs magnitude_max.
RANDAUG_N = 2
RANDAUG_M = 9


def train_transform(image_size: int, mean, std, randaug_n: int = 0, randaug_m: float = RANDAUG_M,
                    in_chans: int = 1):
    """The student's input noise: RandAugment(N, M) (when N > 0), then the eval steps.

    timm clips M at 10 unless ``magnitude_max`` is set, so we pass ``max(10, M)`` and M up to
    30 (the paper's 27) really applies. Grey images are filled with mid-grey after geometric ops.
    """
    from torchvision import transforms as T

    steps = []
    if image_size:
        steps.append(_ResizeIfNeeded(image_size))
    if randaug_n and randaug_n > 0:
        steps.append(randaugment(randaug_n, randaug_m, in_chans))
    steps += [T.ToTensor(), T.Normalize(mean=list(mean), std=list(std))]
    return T.Compose(steps)


def randaugment(n: int, m: float, in_chans: int = 1):
    from timm.data.auto_augment import rand_augment_transform

    if not 0 <= m <= 30:
        from nsd.engine.errors import UsageError

        raise UsageError(f"--randaug-m must be between 0 and 30, got {m}")
    fill = 128 if in_chans == 1 else (128, 128, 128)
    hparams = {"img_mean": fill, "magnitude_max": max(10, int(round(m)))}
    return rand_augment_transform(f"rand-m{m:g}-n{int(n)}-mstd0.5", hparams)
