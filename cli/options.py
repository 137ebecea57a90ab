"""Click options built from the engine's option declarations (nsd.engine.params.option), so an
option is declared once, beside its default, and every command that takes it gets the same
name, type, range and help.

    TRAIN = Options(TrainConfig)                # every declared field of TrainConfig

    @TRAIN
    def train(ctx, **kwargs):
        cfg = TrainConfig(**TRAIN.take(kwargs))  # the fields, back under their own names

A command that composes several (``nsd loop``) names what it leaves out and renames clashes.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator

import click

from nsd.cli.types import finite
from nsd.engine.params import Option, declared, option_name


class Options:
    """The click options of the declared fields of CLS but those in ``exclude``.

    rename: {field: option name} for fields whose name clashes in a composed command.
    defaults, helps: {field: value} where this command's default or help differs."""

    def __init__(self, cls, *, exclude=(), rename=None, defaults=None, helps=None):
        fields = [(f, spec) for f, spec in declared(cls) if f.name not in exclude]
        unknown = set(exclude) | set(rename or ()) | set(defaults or ()) | set(helps or ())
        unknown -= {f.name for f, _ in declared(cls)}
        if unknown:
            raise TypeError(f"{cls.__name__} declares no option(s) {', '.join(sorted(unknown))}")
        self.cls, self.rename = cls, dict(rename or {})
        self.defaults, self.helps = dict(defaults or {}), dict(helps or {})
        self.fields = fields
        self.excluded = {f.name for f, _ in declared(cls)} & set(exclude)

    def __call__(self, f):
        for field, spec in reversed(self.fields):  # decorators apply bottom-up: keep the order in --help
            for decorator in self._click(field, spec):
                f = decorator(f)
        return f

    def take(self, kwargs: dict) -> dict:
        """Pop this group's values from a command's KWARGS: {field name: value}."""
        out = {}
        for field, spec in self.fields:
            value = kwargs.pop(self._param(field), None)
            if spec.flag and "/" not in spec.flag:
                value = bool(value) != spec.flag.startswith("--no-")
            if spec.off and kwargs.pop(self._param(field) + "_off"):
                value = None
            out[field.name] = value
        return out

    def _param(self, field) -> str:
        return self.rename.get(field.name, field.name)

    def _click(self, field, spec: Option) -> Iterator:
        param = self._param(field)
        name = "--" + param.replace("_", "-") if param in self.rename.values() else option_name(field, spec)
        default = self.defaults.get(field.name, field.default)
        help = self.helps.get(field.name, spec.help)
        if spec.off:
            yield click.option(spec.off, param + "_off", is_flag=True, help=spec.off_help)
        if spec.flag:
            flag_default = None if "/" in spec.flag else False
            yield click.option(spec.flag, param, is_flag=True, default=flag_default, help=help)
            return
        required = default is dataclasses.MISSING
        shown = spec.shown if default is None and spec.shown is not None else None
        if shown is not None:
            help = f"{help} [default: {shown:g}]" if isinstance(shown, (int, float)) else f"{help} [default: {shown}]"
        yield click.option(name, param, default=None if required else default, required=required,
                           show_default=not required and default is not None and shown is None,
                           type=_type(spec, default), metavar=spec.metavar, help=help)


def _type(spec: Option, default):
    """The click type of a declared option: its kind and its range."""
    if spec.choices:
        return click.Choice(spec.choices)
    if spec.whole:
        return click.IntRange(None if spec.low is None else int(spec.low), None if spec.high is None else int(spec.high),
                              min_open=spec.low_open, max_open=spec.high_open)
    if spec.low is not None or spec.high is not None or isinstance(default, float):
        return finite(spec.low, spec.high, min_open=spec.low_open, max_open=spec.high_open)
    return None
