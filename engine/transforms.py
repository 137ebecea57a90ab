"""Image decoding and transforms: the deterministic eval transform (teacher labeling, eval)
and the noised train transform (student RandAugment) live side by side so both sides of the
loop normalise the same way.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def decode(data: bytes, in_chans: int) -> Image.Image:
    """Encoded image bytes -> PIL image with the model's channel count."""
    img = Image.open(io.BytesIO(data))
    return img.convert("L" if in_chans == 1 else "RGB")


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
