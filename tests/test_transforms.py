"""Batched decoding gives exactly the pixels of the one-by-one PIL path; malloc tuning works."""

import io
import os
import subprocess
import sys
import tracemalloc
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from nsd.engine.transforms import _png_scanlines, decode, decode_batch, eval_batch, eval_transform


def png(pixels: np.ndarray, filters: list[int]) -> bytes:
    """A PNG of PIXELS (H, W, C uint8) with the given PNG row filter per row, IDAT in two chunks."""
    h, w, c = pixels.shape
    prev = np.zeros(w * c, dtype=np.int64)
    body = bytearray()
    for r, f in enumerate(filters):
        row = pixels[r].reshape(-1).astype(np.int64)
        left = np.concatenate([np.zeros(c, np.int64), row[:-c]])
        upleft = np.concatenate([np.zeros(c, np.int64), prev[:-c]])
        p = left + prev - upleft
        pa, pb, pc = np.abs(p - left), np.abs(p - prev), np.abs(p - upleft)
        paeth = np.where((pa <= pb) & (pa <= pc), left, np.where(pb <= pc, prev, upleft))
        pred = [0, left, prev, (left + prev) // 2, paeth][f]
        body += bytes([f]) + ((row - pred) % 256).astype(np.uint8).tobytes()
        prev = row
    z = zlib.compress(bytes(body), 9)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

    ihdr = w.to_bytes(4, "big") + h.to_bytes(4, "big") + bytes([8, 0 if c == 1 else 2, 0, 0, 0])
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"tEXt", b"Comment\x00nsd")
            + chunk(b"IDAT", z[:7]) + chunk(b"IDAT", z[7:]) + chunk(b"IEND", b""))


def reference(datas, chans, size):
    """decode() one by one, resized as the eval transform does, stacked as (n, C, H, W)."""
    out = []
    for d in datas:
        img = decode(d, chans)
        if img.size != (size, size):
            img = img.resize((size, size), Image.BICUBIC)
        a = np.asarray(img)
        out.append(a[None] if a.ndim == 2 else a.transpose(2, 0, 1))
    return np.stack(out)


def encoded(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


@pytest.mark.parametrize("chans", [1, 3])
def test_decode_batch_equals_pil_for_every_row_filter(chans):
    rng = np.random.default_rng(chans)
    size = 12
    datas, batched = [], []
    for first in range(5):  # every filter on the first row (Average cannot be batched)
        for shift in range(5):  # and every filter after every other one
            pixels = rng.integers(0, 256, (size, size, chans), dtype=np.uint8)
            pixels[: size // 2] //= 7  # runs of similar values, as in real images
            filters = [first] + [(shift + r) % 5 for r in range(1, size)]
            data = png(pixels, filters)
            assert np.array_equal(reference([data], chans, size)[0], pixels.transpose(2, 0, 1))
            datas.append(data)
            batched.append(_png_scanlines(data, chans, size) is not None)
    assert batched == [first != 3 for first in range(5) for _ in range(5)]  # 20 of 25 batched

    # Mixed in: Pillow's own PNG, a JPEG and a PNG of another size (both decoded one by one).
    mode = "L" if chans == 1 else "RGB"
    pil = Image.fromarray(rng.integers(0, 256, (size, size, chans), dtype=np.uint8).squeeze(), mode)
    big = Image.fromarray(rng.integers(0, 256, (20, 20, chans), dtype=np.uint8).squeeze(), mode)
    datas[3:3] = [encoded(pil, "PNG"), encoded(pil, "JPEG"), encoded(big, "PNG")]
    got = decode_batch(datas, chans, size)
    assert got.shape == (len(datas), chans, size, size) and got.dtype == np.uint8
    assert np.array_equal(got, reference(datas, chans, size))


def test_png_scanlines_refuses_what_it_cannot_batch():
    pixels = np.arange(64, dtype=np.uint8).reshape(8, 8, 1)
    ok = png(pixels, [4] * 8)
    assert _png_scanlines(ok, 1, 8) is not None
    assert _png_scanlines(ok, 1, 16) is None  # another size: resized by the slow path
    assert _png_scanlines(ok, 3, 8) is None  # grey PNG for an RGB model: converted by PIL
    interlaced = ok[:28] + b"\x01" + ok[29:]
    assert _png_scanlines(interlaced, 1, 8) is None
    sixteen_bit = ok[:24] + b"\x10" + ok[25:]
    assert _png_scanlines(sixteen_bit, 1, 8) is None
    assert _png_scanlines(b"\xff\xd8 not a png", 1, 8) is None


def test_a_stream_that_inflates_past_the_image_is_not_batched():
    """Extra inflated bytes (PIL ignores them) must not be inflated into memory: PIL decodes it."""
    pixels = np.arange(64, dtype=np.uint8).reshape(8, 8, 1)
    good = png(pixels, [0] * 8)
    raw = b"".join(b"\x00" + pixels[r].tobytes() for r in range(8)) + bytes(8 << 20)
    z = zlib.compress(raw, 9)
    start = good.index(b"IDAT") - 4
    idat = len(z).to_bytes(4, "big") + b"IDAT" + z + zlib.crc32(b"IDAT" + z).to_bytes(4, "big")
    long = good[:start] + idat + good[good.index(b"IEND") - 4:]
    tracemalloc.start()
    try:
        assert len(long) < 64 << 10 and _png_scanlines(long, 1, 8) is None
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20  # the 8 MiB of zeros were never inflated
    assert np.array_equal(decode_batch([long, good], 1, 8), np.stack([pixels.transpose(2, 0, 1)] * 2))


def test_a_broken_row_filter_is_an_error_not_garbage():
    pixels = np.arange(64, dtype=np.uint8).reshape(8, 8, 1)
    good = png(pixels, [1] * 8)
    # Rebuild with filter byte 9 on row 5: the inflated stream is valid, the PNG is not.
    raw = bytearray()
    for r in range(8):
        raw += bytes([9 if r == 5 else 0]) + pixels[r].tobytes()
    z = zlib.compress(bytes(raw))
    start = good.index(b"IDAT") - 4
    chunk = len(z).to_bytes(4, "big") + b"IDAT" + z + zlib.crc32(b"IDAT" + z).to_bytes(4, "big")
    bad = good[:start] + chunk + good[good.index(b"IEND") - 4:]
    with pytest.raises(Exception):
        decode(bad, 1).load()
    with pytest.raises(Exception):
        decode_batch([good, bad], 1, 8)


def test_eval_batch_is_the_eval_transform_bit_for_bit():
    rng = np.random.default_rng(0)
    datas = [png(rng.integers(0, 256, (16, 16, 1), dtype=np.uint8), [r % 5 for r in range(16)]) for _ in range(9)]
    datas.append(encoded(Image.fromarray(rng.integers(0, 256, (30, 30), dtype=np.uint8)), "PNG"))
    tf = eval_transform(16, (0.3,), (0.2,))
    ref = torch.stack([tf(decode(d, 1)) for d in datas])
    got = eval_batch(datas, 16, 1, (0.3,), (0.2,))
    assert got.dtype == torch.float32 and torch.equal(got, ref)


MALLINFO = """
import ctypes
from nsd.engine.runtime import tune_malloc
class Info(ctypes.Structure):  # struct mallinfo2 (glibc >= 2.33)
    _fields_ = [(f, ctypes.c_size_t) for f in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Info
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
tuned = tune_malloc()
block = libc.malloc(16 << 20)  # a batch's activations
mapped = libc.mallinfo2().hblkhd  # bytes in blocks mapped on their own (unmapped when freed)
libc.free(block)
print(tuned, mapped >> 20, libc.mallinfo2().fordblks >> 20)  # and free bytes kept for reuse
"""


@pytest.mark.slow  # fresh interpreters
def test_tuned_malloc_keeps_freed_batch_memory():
    def run(**env):
        out = subprocess.run([sys.executable, "-c", MALLINFO], env={**os.environ, **env},
                             capture_output=True, text=True, check=True).stdout.split()
        return out[0] == "True", int(out[1]), int(out[2])

    tuned, mapped, kept = run()
    off, mapped_off, kept_off = run(NSD_MALLOC_TUNE="0")
    assert tuned and not off
    # glibc's default maps a 16 MiB block on its own and unmaps it when freed: the next batch
    # faults every page in again. Tuned, it comes from the heap and stays there for reuse.
    assert mapped_off >= 16 and kept_off < 16
    assert mapped == 0 and kept >= 16
    theirs = subprocess.run([sys.executable, "-c", "from nsd.engine.runtime import tune_malloc; print(tune_malloc())"],
                            env={**os.environ, "MALLOC_TRIM_THRESHOLD_": "1000000"}, capture_output=True, text=True)
    assert theirs.stdout.split() == ["False"]  # the user's own glibc settings win


def reference_train_transform(size, mean, std, n, m, in_chans, hflip, random_erasing):
    """train_transform as plain torchvision/timm steps: RandomCrop with reflect padding, the
    factory's ToTensor + Normalize + RandomErasing."""
    from timm.data import create_transform
    from torchvision import transforms as T

    from nsd.engine.transforms import eval_geometry, randaugment

    _, _, final = create_transform(size, is_training=True, separate=True, hflip=hflip, mean=mean, std=std,
                                   color_jitter=None, re_prob=random_erasing, re_mode="pixel")
    flip = [T.RandomHorizontalFlip(hflip)] if hflip > 0 else []
    return T.Compose([*eval_geometry(size).transforms, T.RandomCrop(size, padding=max(1, size // 8),
                                                                   padding_mode="reflect"),
                      *flip, randaugment(n, m, in_chans, size, mean), *final.transforms])


@pytest.mark.parametrize("size,in_chans,shape", [(28, 1, (28, 28)), (32, 3, (32, 32)), (28, 1, (40, 30)),
                                                 (16, 3, (9, 20))])
def test_train_transform_matches_torchvision_bit_for_bit(size, in_chans, shape):
    """The fast crop / tensor steps draw the same random numbers and give the same values."""
    import random

    from nsd.engine.transforms import train_transform

    mean, std = (0.3,) * in_chans, (0.7,) * in_chans
    fast = train_transform(size, mean, std, 2, 9, in_chans, hflip=0.5, random_erasing=0.5)
    reference = reference_train_transform(size, mean, std, 2, 9, in_chans, 0.5, 0.5)
    steps = [type(t).__name__ for t in fast.transforms]
    assert "RandomCrop" not in steps and "ReflectPadRandomCrop" in steps and "ToNormalizedTensor" in steps
    rng = np.random.default_rng(0)
    mode = "L" if in_chans == 1 else "RGB"
    for k in range(60):
        pixels = rng.integers(0, 256, shape + ((3,) if in_chans == 3 else ()), dtype=np.uint8)
        image = Image.fromarray(pixels, mode)
        outs = []
        for tf in (fast, reference):
            random.seed(k)  # RandAugment's magnitudes; its choice of ops is numpy's
            np.random.seed(k)
            torch.manual_seed(k)
            outs.append(tf(image))
        assert outs[0].shape == (in_chans, size, size)
        assert outs[0].dtype == outs[1].dtype == torch.float32
        assert torch.equal(outs[0], outs[1]), k
