"""Checks that stop a training run going wrong before it registers anything."""

from __future__ import annotations

import math

from nsd.engine.errors import NsdError


class Diverged(NsdError):
    """The loss or the weights stopped being finite numbers: nothing is registered."""


def check_finite_loss(loss, step: int) -> None:
    """Stop at the first step whose loss is nan or inf (a too-high --lr, bad data)."""
    value = float(loss.detach())
    if not math.isfinite(value):
        raise Diverged(f"training diverged: loss is {value} at step {step + 1}; nothing was registered "
                       f"(try a lower --lr)")


def check_finite_weights(model) -> None:
    """The weights about to be registered are all finite (the last update can still break them)."""
    import torch

    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise Diverged(f"training diverged: {name} holds nan or inf after the last step; nothing was "
                           f"registered (try a lower --lr)")
