"""Parameter objects: a command's options as one dataclass, which holds their defaults and
declares each option once (:func:`option`: help, range, switch); the CLI builds its click
options from those declarations and the engine checks Python callers' values against them
(``TrainConfig``, ``LabelParams``, ``BalanceParams``, ``LoopConfig``). The engine functions
take one, or its fields as keyword arguments, as the CLI, the loop and Python callers do."""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import TypeVar

from nsd.engine.errors import UsageError

P = TypeVar("P")

# The splits of `images`: the images of every split but unlabeled carry their label. `val`
# holds labeled images no model trains on (the teacher's calibration, `nsd label --calibrate`).
SPLITS = ("labeled", "unlabeled", "test", "val")
LABELED_SPLITS = ("labeled", "test", "val")

# Caps on sizes a user sets, shared by several commands (the CLI's option types use the same).
MAX_BATCH = 65536        # images per batch
MAX_WORKERS = 64         # worker threads or processes
MAX_EPOCHS = 100_000     # a run's --epochs
MAX_STEPS = 10**9        # a run's --steps
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


# --------------------------------------------------------------------------- option declarations


@dataclasses.dataclass(frozen=True)
class Option:
    """How one field of a parameter object is a command-line option: declared once, beside
    the field's default (``field = option(default, "help", ...)``). The CLI builds its click
    option from it (nsd/cli/options.py) and :func:`check_options` checks a Python caller's
    value against the same range, so the two cannot drift.

    low, high: the allowed range (None: unbounded); ``open`` names the excluded ends
    ("low", "high", "both"). whole: a whole number. flag: a bool's switch, e.g. "--hard"
    (sets True), "--no-duplicate" (sets False) or "--noise/--no-noise" (default None).
    off, off_help: a switch that sets the field to None ("--no-leakage-gate"). name: the option's name
    when it is not the field's (``--model`` for ``arch``). shown: the effective default for the
    help when the field's is None. choices: the allowed strings. guarded: the range is the
    command line's sanity cap only; the engine guards the value itself (a learning rate: the
    divergence guard), so check_options leaves a Python caller's alone."""

    help: str = ""
    low: float | None = None
    high: float | None = None
    open: str = ""
    whole: bool = False
    flag: str | None = None
    off: str | None = None
    off_help: str = ""
    name: str | None = None
    metavar: str | None = None
    shown: object = None
    choices: tuple[str, ...] | None = None
    guarded: bool = False

    @property
    def low_open(self) -> bool:
        return self.open in ("low", "both")

    @property
    def high_open(self) -> bool:
        return self.open in ("high", "both")

    def describe(self) -> str:
        """The range in words, as the engine's messages say it."""
        kind = "a whole number" if self.whole else "a number"
        low, high = _plain(self.low), _plain(self.high)
        if self.low is not None and self.high is not None:
            return f"{kind} in {'(' if self.low_open else '['}{low}, {high}{')' if self.high_open else ']'}"
        if self.low is not None:
            return f"{kind} {'>' if self.low_open else '>='} {low}"
        return kind if self.high is None else f"{kind} <= {high}"

    def allows(self, value) -> bool:
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
            return False
        if self.whole and int(value) != value:
            return False
        return ((self.low is None or (value > self.low if self.low_open else value >= self.low))
                and (self.high is None or (value < self.high if self.high_open else value <= self.high)))


def _plain(bound) -> str:
    """A bound as people write it: 10000000, 0.01 (not 1e+07)."""
    return str(int(bound)) if bound is not None and float(bound).is_integer() else f"{bound}"


def option(default=dataclasses.MISSING, help: str = "", **spec) -> dataclasses.Field:
    """A dataclass field with its command-line declaration (see :class:`Option`)."""
    return dataclasses.field(default=default, metadata={"option": Option(help=help, **spec)})


def declared(cls) -> list[tuple[dataclasses.Field, Option]]:
    """The fields of the dataclass CLS that are options, in declaration order."""
    return [(f, f.metadata["option"]) for f in dataclasses.fields(cls) if "option" in f.metadata]


def option_name(field: dataclasses.Field, spec: Option) -> str:
    return spec.name or "--" + field.name.replace("_", "-")


def check_options(params) -> None:
    """A usage error naming the option for any numeric value outside its declared range; None
    passes where the declared default is None (not set) or the option has an off switch."""
    for field, spec in declared(type(params)):
        if spec.guarded or spec.low is None and spec.high is None and not spec.whole:
            continue
        value = getattr(params, field.name)
        if value is None and (field.default is None or spec.off):  # not set, or switched off
            continue
        if not spec.allows(value):
            raise UsageError(f"{option_name(field, spec)} must be {spec.describe()}, got {value!r}")
