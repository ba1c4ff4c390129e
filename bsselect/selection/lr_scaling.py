"""How the learning rate follows the batch size in a sweep: linear for SGD (Goyal et al. 2017,
"Accurate, Large Minibatch SGD"), square root for Adam-family optimizers (Malladi et al. 2022,
"On the SDEs and Scaling Rules for Adaptive Gradient Algorithms"), or none; and the lr of each
step while a trial warms up to its scaled lr. Pure: no torch.
"""

from __future__ import annotations

import math
from enum import Enum


class LrScaling(str, Enum):
    """How the learning rate follows the batch size."""

    linear = "linear"  # lr * b/b0, SGD (Goyal et al. 2017)
    sqrt = "sqrt"  # lr * sqrt(b/b0), Adam-family (Malladi et al. 2022)
    none = "none"  # the base lr at every batch size


def scale_lr(base_lr: float, base_batch: int, batch: int, rule: LrScaling) -> float:
    """The learning rate for ``batch`` given ``base_lr`` valid at ``base_batch``."""
    if base_lr <= 0 or base_batch < 1 or batch < 1:
        raise ValueError(f"need base_lr > 0 and batch sizes >= 1, got {base_lr}, "
                         f"{base_batch}, {batch}")
    ratio = batch / base_batch
    match LrScaling(rule):
        case LrScaling.linear:
            return base_lr * ratio
        case LrScaling.sqrt:
            return base_lr * math.sqrt(ratio)
        case LrScaling.none:
            return base_lr


# Lower-case class names (and name fragments) of optimizers whose update is normalised by a
# running second moment, so that their noise scales like sqrt(b) (Malladi et al. 2022).
_ADAPTIVE = ("adam", "adafactor", "rmsprop", "lamb", "lion", "adagrad", "adadelta", "sophia")
_SGD_FAMILY = ("sgd", "lars", "nesterov", "momentum")


def default_lr_scaling(optimizer: object) -> LrScaling:
    """``sqrt`` for Adam-family/adaptive optimizers, ``linear`` for SGD-family, ``none`` when
    unknown (the user's learning rate is then left alone).

    ``optimizer`` is an instance, a class or a class name; the class and its bases are checked
    (so a subclass of ``torch.optim.AdamW`` counts), by name, without importing torch.
    """
    if isinstance(optimizer, str):
        names = [optimizer]
    else:
        cls = optimizer if isinstance(optimizer, type) else type(optimizer)
        names = [c.__name__ for c in cls.__mro__]
    for name in (n.lower() for n in names):
        if any(key in name for key in _ADAPTIVE):
            return LrScaling.sqrt
        if any(key in name for key in _SGD_FAMILY):
            return LrScaling.linear
    return LrScaling.none


def warmup_lr(step: int, lr: float, warmup_steps: int) -> float:
    """The lr of optimizer step ``step`` (0-based) warmed up linearly from 0 to ``lr`` over
    ``warmup_steps`` steps (none when 0)."""
    return lr * min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else lr


def trial_lr(step: int, lr: float, batch_size: int, base_lr: float, warmup_steps: int = 0,
             ramp_samples: int = 0) -> float:
    """The lr of optimizer step ``step`` (0-based) of a trial at ``batch_size`` whose target
    lr is ``lr``: with ``ramp_samples``, a linear ramp from ``base_lr`` (the task's) over the
    first ``ramp_samples`` samples when ``lr`` is above it (Goyal et al. 2017's gradual
    warm-up for linearly scaled lrs); else ``warmup_steps`` from 0; else ``lr``."""
    if ramp_samples > 0 and lr > base_lr:
        ramp = max(1, math.ceil(ramp_samples / batch_size))
        return base_lr + (lr - base_lr) * min(1.0, (step + 1) / ramp)
    return warmup_lr(step, lr, warmup_steps)
