"""Parameter objects: a command's options as one frozen dataclass, which also holds their
defaults (``LabelParams``, ``BalanceParams``). The engine functions take one, or its fields as
keyword arguments, as the CLI, the loop and Python callers do."""

from __future__ import annotations

import dataclasses
from typing import TypeVar

P = TypeVar("P")

# The splits of `images`: the images of every split but unlabeled carry their label. `val`
# holds labeled images no model trains on (the teacher's calibration, `nsd label --calibrate`).
SPLITS = ("labeled", "unlabeled", "test", "val")
LABELED_SPLITS = ("labeled", "test", "val")

# Caps on sizes a user sets, shared by several commands (the CLI's option types use the same).
MAX_BATCH = 65536        # images per batch
MAX_WORKERS = 64         # worker threads or processes
MAX_SHARD = 10_000_000   # images per label shard
MAX_TOP_K = 100_000      # probabilities kept per image
MAX_PER_CLASS = 1_000_000  # balance --per-class (K)
MAX_CLASSES_CAP = 1 << 20  # the highest --max-classes / $NSD_MAX_CLASSES a store may set
# Below these, softmax(logits / T) and p^(1/T) leave float range: soft labels would hold NaN.
MIN_TEMPERATURE = 0.01   # nsd label --temperature
MIN_SHARPEN = 0.01       # nsd balance --sharpen


def with_options(cls: type[P], params: P | None, options: dict) -> P:
    """PARAMS (an instance of the dataclass CLS; None: its defaults) with OPTIONS, keyword
    arguments named like its fields, over it. An unknown name is a TypeError, as for a function."""
    unknown = sorted(set(options) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
        raise TypeError(f"unknown {cls.__name__} option(s): {', '.join(unknown)}")
    return dataclasses.replace(params if params is not None else cls(), **options)
