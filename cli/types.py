"""Option types with bounds: every number a user can set has a sane range, and a bad one is
one line and exit 2 (click's own message), never a traceback or a run that goes wrong later."""

from __future__ import annotations

import math

import click

# Bounds of CLI-only options (the engine's caps are in nsd.engine.params).
MAX_ROWS = 10_000_000         # rows printed by head / sql


class FiniteFloat(click.FloatRange):
    """A FloatRange that also refuses nan and inf (click's own lets both through)."""

    name = "finite float"

    def convert(self, value, param, ctx):
        rv = click.FLOAT.convert(value, param, ctx)
        if not math.isfinite(rv):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return super().convert(rv, param, ctx)


def finite(min=None, max=None, min_open=False, max_open=False) -> FiniteFloat:
    return FiniteFloat(min, max, min_open=min_open, max_open=max_open)

