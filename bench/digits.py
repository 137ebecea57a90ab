"""A second real data set that is available offline: scikit-learn's copy of the UCI optical
recognition of handwritten digits (1,797 grey 8x8 images, 10 classes, bundled in its wheel).

    .venv/bin/python bench/digits.py DIR     # writes DIR/train/<class>/*.png and DIR/test/<class>/*.png

The images are scaled from 0-16 to 0-255 and enlarged to 32x32 (bilinear), so the models and
transforms of a small-image data set apply; a fixed split (seed 0) keeps 1,500 for training
(labeled + pool) and 297 for test. Ingest: ``nsd ingest DIR/train --labeled-per-class 10`` and
``nsd ingest DIR/test --split test``. Digits are not mirror-symmetric: train with ``--hflip 0``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image

SIZE, TRAIN = 32, 1500


def write_digits(root: Path) -> Path:
    from sklearn.datasets import load_digits

    d = load_digits()
    order = np.random.default_rng(0).permutation(len(d.target))
    for rank, i in enumerate(order):
        split = "train" if rank < TRAIN else "test"
        folder = root / split / str(int(d.target[i]))
        folder.mkdir(parents=True, exist_ok=True)
        pixels = (d.images[i] * (255 / 16)).round().clip(0, 255).astype(np.uint8)
        Image.fromarray(pixels, "L").resize((SIZE, SIZE), Image.BILINEAR).save(folder / f"{i:04d}.png")
    return root


if __name__ == "__main__":
    print(write_digits(Path(sys.argv[1])))
