"""Test data: small synthetic, learnable images written straight into a store."""

from __future__ import annotations

import hashlib
import io
import signal
from contextlib import contextmanager

import numpy as np
from PIL import Image


def synthetic_image(label: int, rng: np.random.Generator, size: int = 16, num_classes: int = 4) -> np.ndarray:
    """A grey image whose bright square's position encodes the class, plus noise."""
    img = rng.integers(0, 60, size=(size, size), dtype=np.uint8)
    cells = int(np.ceil(np.sqrt(num_classes)))
    step = size // cells
    r, c = divmod(label, cells)
    img[r * step:(r + 1) * step, c * step:(c + 1) * step] += 150
    return img


def png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def add_images(store, per_class: dict[str, int], num_classes: int = 4, size: int = 16, seed: int = 0,
               hide_labels: bool = True) -> list[str]:
    """Insert per_class[split] images per class into `images` (+ `classes`) as one snapshot.

    Unlabeled images keep their class as gold_label when hide_labels. Returns the image ids.
    """
    rng = np.random.default_rng(seed)
    rows = []
    for split, n in per_class.items():
        for label in range(num_classes):
            for _ in range(n):
                data = png_bytes(synthetic_image(label, rng, size, num_classes))
                iid = hashlib.sha256(data).hexdigest()
                unl = split == "unlabeled"
                rows.append((iid, data, "png", size, size, 1, f"synthetic:{len(rows)}", split,
                             None if unl else label, label if (unl and hide_labels) else None, "test"))

    def fn(con):
        have = con.execute("SELECT count(*) FROM classes").fetchone()[0]
        if not have:
            con.executemany("INSERT INTO classes VALUES (?, ?)", [(c, f"class{c}") for c in range(num_classes)])
        con.executemany("INSERT INTO images VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
        return {"images": len(rows)}

    store.write("test-images", {"per_class": per_class, "seed": seed}, fn)
    return [r[0] for r in rows]


@contextmanager
def no_hang(seconds: int):
    """Fail the test (instead of hanging the suite) when the block runs longer than SECONDS."""
    def fail(*_):
        raise AssertionError(f"did not finish in {seconds} s")
    old = signal.signal(signal.SIGALRM, fail)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
