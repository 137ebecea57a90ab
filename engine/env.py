"""nsd's environment variables, read through one function so each is checked the same way.

A variable is read when it is used (not at import), so a bad value is a usage error of the
command that needs it: one line naming the variable and what it must be.
"""

from __future__ import annotations

import math
import os

from nsd.engine.errors import UsageError


def env_number(name: str, default: float, *, lo: float, hi: float = math.inf, lo_open: bool = False,
               integer: bool = False, must: str) -> float:
    """$NAME as a number in [LO, HI] ((LO, HI] with LO_OPEN; whole with INTEGER), DEFAULT when
    unset or blank; anything else raises "NAME must be MUST, got 'text'"."""
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    return check_number(text, name, lo=lo, hi=hi, lo_open=lo_open, integer=integer, must=must)


def check_number(text: str, name: str, *, lo: float, hi: float = math.inf, lo_open: bool = False,
                 integer: bool = False, must: str) -> float:
    """TEXT as the number NAME must be (see env_number); also for values given explicitly."""
    try:
        value = int(text) if integer else float(text)
    except ValueError:
        value = math.nan
    if not (value > lo if lo_open else value >= lo) or not value <= hi:  # also refuses nan
        raise UsageError(f"{name} must be {must}, got {text!r}")
    return value
