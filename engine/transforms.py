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
