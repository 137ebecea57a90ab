"""Image decoding and transforms: the deterministic eval transform (teacher labeling, eval)
and the noised train transform (student RandAugment) live side by side so both sides of the
loop normalise the same way.
"""

from __future__ import annotations

import io
import zlib

import numpy as np
from PIL import Image

from nsd.engine.errors import UsageError
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def decode(data: bytes, in_chans: int) -> Image.Image:
    """Encoded image bytes -> PIL image with the model's channel count.

    Any mode becomes grey ("L") or RGB: alpha is dropped, CMYK and palettes are converted,
    16-bit grey is scaled to 8 bits (``to_8bit``).
    """
    img = Image.open(io.BytesIO(data))
    if img.mode in WIDE_GREY:
        img = to_8bit(img)
    return img.convert("L" if in_chans == 1 else "RGB")


# Grey modes wider than 8 bits: 16-bit and 32-bit integers, 32-bit floats.
WIDE_GREY = {"I", "I;16", "I;16B", "I;16L", "I;16N", "F"}


def to_8bit(img: Image.Image) -> Image.Image:
    """A grey image of a WIDE_GREY mode as 8-bit "L": integers scaled from 0-65535 to 0-255
    (rounded; values outside are clipped), floats clipped to 0-255. Pillow's own convert("L")
    clips 16-bit values at 255 and turns the picture white. The one conversion, for ingest and
    for decoding alike."""
    arr = np.asarray(img)
    if img.mode == "F":
        return Image.fromarray(arr.clip(0, 255).astype(np.uint8), "L")
    wide = arr.astype(np.int64).clip(0, 65535)
    return Image.fromarray(((wide * 255 + 32767) // 65535).astype(np.uint8), "L")


def decode_batch(datas: list, in_chans: int, image_size: int = 0) -> np.ndarray:
    """Encoded images -> uint8 array (n, in_chans, H, W): the pixels of ``decode`` brought to
    image_size x image_size by the eval transform's geometry (``eval_geometry``).

    Plain PNGs already of that size (8-bit grey or RGB, not interlaced: what nsd ingest writes
    for arrays) are decoded together: each one's zlib stream is inflated, the scanlines of all
    are laid end to end as one tall image, and Pillow undoes the PNG row filters of the lot in
    one C call. Per-image decoders spend most of their ~25 us on set-up; this takes ~12 us per
    28x28 image. Anything else goes through ``decode`` one by one.
    """
    n, size = len(datas), int(image_size or 0)
    geometry = eval_geometry(size) if size else None
    # filtered scanlines of the PNGs that are batched, None for the others
    # (a PNG already of the output size is left as it is by the geometry only when nothing is cropped)
    batchable = size and crop_pct_for(size) == 1.0
    rows = [_png_scanlines(data, in_chans, size) if batchable else None for data in datas]
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
            img = geometry(img)
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


# Image-size recipes. Small images (Fashion-MNIST, CIFAR) are used whole: the eval transform
# keeps all of the image (crop_pct 1) and training crops at random from a padded copy. Larger
# ones (photos) follow timm's ImageNet recipe: RandomResizedCrop for training; for eval, resize
# the short side to size / crop_pct and take the centre. Aspect ratio is always kept.
SMALL_IMAGE_MAX = 64
LARGE_CROP_PCT = 0.875
INTERPOLATION = "bicubic"


def crop_pct_for(image_size: int) -> float:
    return 1.0 if image_size <= SMALL_IMAGE_MAX else LARGE_CROP_PCT


def eval_transform(image_size: int, mean, std):
    """No noise: timm's eval transform (short side resized, centre crop, to tensor, normalise)."""
    from timm.data import create_transform

    return create_transform(int(image_size), is_training=False, interpolation=INTERPOLATION,
                            crop_pct=crop_pct_for(image_size), mean=tuple(mean), std=tuple(std))


def eval_geometry(image_size: int):
    """The PIL steps of ``eval_transform`` (resize and crop), without tensor conversion."""
    from torchvision import transforms as T

    tf = eval_transform(image_size, (0.0,), (1.0,))
    return T.Compose([t for t in tf.transforms if type(t).__name__ not in ("MaybeToTensor", "Normalize")])


# The noise of training, its one home. Defaults on small grey images (the paper's ImageNet
# values are in the README); teachers and students both train with them: the teacher is the
# best supervised model we can make, only labeling is unnoised. RandAugment's M uses timm's
# scale (10 = the op's full strength); above 10 needs magnitude_max.
NOISE_DEFAULTS = {"randaug_n": 2, "randaug_m": 9.0, "drop_rate": 0.2, "drop_path_rate": 0.1,
                  "random_erasing": 0.25}
# The range of each setting: (low, high, whether high itself is allowed).
NOISE_RANGES = {"randaug_n": (0, 16, True), "randaug_m": (0, 30, True), "drop_rate": (0, 1, False),
                "drop_path_rate": (0, 1, False), "random_erasing": (0, 1, True)}


def check_noise(noise: dict) -> dict:
    """NOISE (settings named as NOISE_DEFAULTS) with each value in its range, else UsageError
    naming the option; the one check of them (the CLI's option types use the same ranges)."""
    for key, value in noise.items():
        low, high, closed = NOISE_RANGES[key]
        if not (low <= value <= high if closed else low <= value < high):
            span = f"[{low:g}, {high:g}{']' if closed else ')'}"
            raise UsageError(f"--{key.replace('_', '-')} must be in {span}, got {value}")
    return noise


def train_transform(image_size: int, mean, std, randaug_n: int = 0, randaug_m: float = NOISE_DEFAULTS["randaug_m"],
                    in_chans: int = 1, *, hflip: float = 0.5, random_erasing: float = 0.0):
    """The training input: random crop (+ flip), RandAugment(N, M) as noise, random erasing.

    Built from timm's transform factory: its ImageNet training transform for large images
    (RandomResizedCrop); for small ones the eval geometry followed by a random crop from a
    copy padded by 1/8 of the side (reflected), as CIFAR-sized models are trained. ``hflip``
    is the flip probability (0 for digits or text). RandAugment is ours so M above 10 (the
    paper's 27) really applies: timm's factory caps it at 10.

    Per image the steps cost more than a small image's whole decode, so three are done here
    the cheap way with the same random draws and the same pixels as torchvision's (a test
    compares them bit for bit): the eval geometry of an image that already has the size, the
    reflect-padded crop, and ToTensor + Normalize.
    """
    from timm.data import create_transform
    from torchvision import transforms as T

    size = int(image_size)
    primary, _, final = create_transform(
        size, is_training=True, separate=True, hflip=hflip, interpolation=INTERPOLATION,
        mean=tuple(mean), std=tuple(std), color_jitter=None, re_prob=random_erasing, re_mode="pixel")
    if size <= SMALL_IMAGE_MAX:
        flip = [T.RandomHorizontalFlip(hflip)] if hflip > 0 else []
        primary = T.Compose([SkipIfSized(eval_geometry(size), size), ReflectPadRandomCrop(size, max(1, size // 8)),
                             *flip])
    noise = [randaugment(randaug_n, randaug_m, in_chans, size, mean)] if randaug_n and randaug_n > 0 else []
    erasing = [t for t in final.transforms if type(t).__name__ not in ("MaybeToTensor", "ToTensor", "Normalize")]
    return T.Compose([*primary.transforms, *noise, ToNormalizedTensor(mean, std), *erasing])


def decode_for_training(datas: list, in_chans: int, image_size: int | None = None) -> list:
    """Encoded images -> PIL images for ``train_transform(image_size, ...)``.

    Small images (up to SMALL_IMAGE_MAX) are decoded together by ``decode_batch`` straight to
    the eval geometry the small-image train transform starts with (which then skips it: same
    pixels, a third of the decode cost). Larger ones, or no size, are decoded one by one.
    """
    if not image_size or image_size > SMALL_IMAGE_MAX:
        return [decode(data, in_chans) for data in datas]
    pixels = decode_batch(datas, in_chans, image_size)
    if in_chans == 1:
        return [Image.fromarray(p[0], "L") for p in pixels]
    return [Image.fromarray(np.ascontiguousarray(p.transpose(1, 2, 0)), "RGB") for p in pixels]


class SkipIfSized:
    """Runs TRANSFORM (a resize + centre crop to SIZE) only on images not already SIZE x SIZE:
    on those it would return the same pixels."""

    def __init__(self, transform, size: int):
        self.transform, self.size = transform, int(size)

    def __call__(self, img):
        return img if img.size == (self.size, self.size) else self.transform(img)

    def __repr__(self):
        return f"SkipIfSized({self.transform!r}, size={self.size})"


class ReflectPadRandomCrop:
    """torchvision's ``RandomCrop(size, padding=pad, padding_mode="reflect")`` on PIL images:
    the same two torch.randint draws and the same pixels, at a fraction of its per-call cost."""

    def __init__(self, size: int, pad: int):
        self.size, self.pad = int(size), int(pad)

    def __call__(self, img):
        import torch

        a = np.asarray(img)
        widths = ((self.pad, self.pad), (self.pad, self.pad)) + (((0, 0),) if a.ndim == 3 else ())
        padded = np.pad(a, widths, mode="reflect")
        h, w = padded.shape[:2]
        if h < self.size or w < self.size:
            raise ValueError(f"image of {img.size} padded by {self.pad} is smaller than the crop {self.size}")
        if (h, w) == (self.size, self.size):
            return Image.fromarray(padded, img.mode)
        i = torch.randint(0, h - self.size + 1, size=(1,)).item()
        j = torch.randint(0, w - self.size + 1, size=(1,)).item()
        return Image.fromarray(np.ascontiguousarray(padded[i:i + self.size, j:j + self.size]), img.mode)

    def __repr__(self):
        return f"ReflectPadRandomCrop(size={self.size}, pad={self.pad})"


class ToNormalizedTensor:
    """ToTensor + Normalize in one step: a PIL image (or a uint8 array) to a float (C, H, W)
    tensor, the same float32 operations as torchvision's, so the same values bit for bit."""

    def __init__(self, mean, std):
        import torch

        self.mean = torch.tensor(list(mean), dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(list(std), dtype=torch.float32).view(-1, 1, 1)

    def __call__(self, img):
        import torch

        if not (isinstance(img, np.ndarray) or img.mode in ("L", "RGB")):  # not 8-bit: torchvision's own way
            from torchvision.transforms import functional as F

            return F.normalize(F.to_tensor(img), self.mean.flatten().tolist(), self.std.flatten().tolist())
        a = np.asarray(img)
        # a writable C-ordered copy: a PIL image's array is read-only
        a = np.array(a[None] if a.ndim == 2 else a.transpose(2, 0, 1), order="C")
        x = torch.from_numpy(a).to(torch.float32).div_(255)
        return x.sub_(self.mean).div_(self.std)

    def __repr__(self):
        return f"ToNormalizedTensor(mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()})"


def randaugment(n: int, m: float, in_chans: int = 1, image_size: int = 224, mean=(0.5,)):
    """timm's RandAugment with N ops of magnitude M; geometric ops fill with the mean. Training
    checks N and M once, with its other noise settings (``check_noise``)."""
    from timm.data.auto_augment import rand_augment_transform

    fill = tuple(min(255, round(255 * v)) for v in mean)
    fill = fill[0] if in_chans == 1 else (fill * 3)[:3]
    hparams = {"img_mean": fill, "magnitude_max": max(10, int(round(m))),
               "translate_const": int(image_size * 0.45)}
    return rand_augment_transform(f"rand-m{m:g}-n{int(n)}-mstd0.5", hparams)
