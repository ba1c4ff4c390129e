"""The gradient noise scale during the user's own training run, at almost no cost.

``bsselect noise`` measures ``B_simple`` with extra forward/backward passes at two batch sizes.
A real run already has two batch sizes whenever one optimizer step is built from several
gradients: the micro-batches of gradient accumulation, and the ranks of data parallelism.
McCandlish et al. (2018, App. A.1) estimate the noise scale exactly that way (per-device and
all-reduced gradients). This monitor reads

- ``|g_small|^2``: every backward's gradient of each parameter as autograd hands it over
  (a tensor hook: before it is added to ``.grad`` and before DDP reduces it) — one micro-batch
  of one rank;
- ``|g_big|^2``: ``.grad`` after the step's last backward (accumulated over the micro-batches,
  averaged over the ranks by DDP), before clipping and the optimizer step;

and turns each step's pair into unbiased ``|G|^2`` and ``tr(Sigma)`` (``noise_math``), kept as
two separate exponential moving averages (their ratio is ``B_simple``) and, over the last
``window`` measured steps, an estimate with a bootstrap interval like ``bsselect noise``'s.

The loss of each micro-batch is assumed divided by the number of micro-batches (Lightning,
Hugging Face ``Trainer`` and the usual hand-written loop do this), so that ``.grad`` after
the last one is the mean gradient of the whole step. One process without accumulation has a
single batch size per step and nothing to compare: the monitor says so instead of guessing.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import UsageError
from .noise_math import NoiseEstimate, estimate_from_norms, per_measurement

DEFAULT_WINDOW = 64   # measured steps behind ``estimate()``
DEFAULT_EMA = 0.95    # decay of the moving averages of |G|^2 and tr(Sigma)
GROW_FACTOR = 2.0     # "the batch could grow" when B_simple's lower bound is this x the batch


@dataclass(frozen=True)
class NoiseReading:
    """One measured optimizer step: the pair of squared norms, the batch sizes they belong to,
    the step's unbiased estimates, and the moving-average ``B_simple`` after it."""

    step: int
    small_sq: float
    big_sq: float
    b_small: int
    b_big: int
    grad_sq_norm: float
    trace_sigma: float
    b_simple_ema: float | None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model) if _is_ddp(model) else model


def _is_ddp(model: nn.Module) -> bool:
    return isinstance(model, torch.nn.parallel.DistributedDataParallel)


def _world_size() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class GradientNoiseMonitor:
    """``B_simple`` from the gradients a training run computes anyway.

    ``model``: the module being trained (a DDP-wrapped one as is: its ranks are the big batch).
    ``accumulation_steps``: micro-batches per optimizer step. ``every``: measure every N-th step
    (the others cost nothing). ``n_data``: the training set's size, for the finite-population
    correction (None: an unlimited stream). Call :meth:`step` once per optimizer step, after
    the last backward and before clipping and ``optimizer.step()``, on every rank::

        monitor = GradientNoiseMonitor(model, accumulation_steps=4)
        for i, (x, y) in enumerate(loader):
            (loss_fn(model(x), y) / 4).backward()
            if (i + 1) % 4 == 0:
                monitor.step(micro_batch_size=len(x))
                optimizer.step(); optimizer.zero_grad()
        print(monitor.b_simple, monitor.estimate().b_simple_ci)
    """

    def __init__(self, model: nn.Module, *, accumulation_steps: int = 1, every: int = 1,
                 ema: float = DEFAULT_EMA, window: int = DEFAULT_WINDOW,
                 n_data: int | None = None, world_size: int | None = None) -> None:
        if accumulation_steps < 1 or every < 1 or window < 2 or not 0 <= ema < 1:
            raise UsageError("accumulation_steps and every must be >= 1, window >= 2 and "
                             "0 <= ema < 1")
        self.model = model
        self.accumulation_steps = accumulation_steps
        self.world_size = world_size or (_world_size() if _is_ddp(model) else 1)
        if self.accumulation_steps * self.world_size < 2:
            raise UsageError(
                "the noise scale needs two batch sizes in one step: gradient accumulation "
                "(accumulation_steps >= 2) or data parallelism (a DDP model on >= 2 ranks); "
                "with neither, measure it with `bsselect noise` (extra passes at two batch "
                "sizes)")
        self.every, self.ema, self.window, self.n_data = every, ema, window, n_data
        self.readings: list[NoiseReading] = []
        # Steps not measured: a clipped gradient, uneven micro-batches, a partial accumulation.
        self.skipped = 0
        self._steps = 0
        self._backwards = 0
        self._small: torch.Tensor | None = None   # this step's sum of micro |grad|^2
        self._ema_g = self._ema_t = 0.0
        self._ema_n = 0
        params = [p for p in _unwrap(model).parameters() if p.requires_grad]
        if not params:
            raise UsageError("the model has no trainable parameters")
        self._params = params
        self._handles = [p.register_hook(self._on_grad) for p in params]
        # Backward passes in this step, counted once per pass that reaches any trainable
        # parameter (a model's unused parameters, an HF pooler, get none): a step with another
        # number of micro-batches than ``accumulation_steps`` (an epoch's last, partial one)
        # has a different loss scaling and is not measured.
        from torch.autograd.graph import register_multi_grad_hook

        self._handles.append(register_multi_grad_hook(params, self._count_backward,
                                                      mode="any"))

    # ------------------------------------------------------------------ hooks

    def _measuring(self) -> bool:
        return self._steps % self.every == 0

    def _on_grad(self, grad: torch.Tensor) -> None:
        if not self._measuring():
            return
        sq = grad.detach().float().pow(2).sum()
        self._small = sq if self._small is None else self._small + sq

    def _count_backward(self, grad: torch.Tensor) -> None:
        self._backwards += 1

    # ------------------------------------------------------------------ per step

    def step(self, micro_batch_size: int) -> NoiseReading | None:
        """Read this step's pair (after its last backward, before clipping and the optimizer
        step). ``micro_batch_size``: items in each micro-batch on one rank. Returns the
        reading, or None on a step that is not measured (also when ``micro_batch_size`` is 0:
        a batch whose size is unknown, as the adapters pass it)."""
        if isinstance(micro_batch_size, bool) or not isinstance(
                micro_batch_size, numbers.Integral) or micro_batch_size < 0:
            raise UsageError(f"micro_batch_size must be an integer >= 1 (0: unknown, the step "
                             f"is not measured), got {micro_batch_size!r}")
        measuring = self._measuring()
        self._steps += 1
        small, self._small = self._small, None
        backwards, self._backwards = self._backwards, 0
        if not measuring:
            return None
        if small is None or micro_batch_size < 1 or backwards != self.accumulation_steps:
            self.skipped += 1
            return None
        big = sum(p.grad.detach().float().pow(2).sum() for p in self._params
                  if p.grad is not None)
        a, w = self.accumulation_steps, self.world_size
        # Hook gradients are of loss/a: |micro mean gradient|^2 = a^2 |hook|^2; the mean over
        # the a micro-batches of one rank is a * (sum of the hooks' |.|^2).
        local = small * a
        pair = torch.stack([local, torch.as_tensor(big, dtype=local.dtype,
                                                   device=local.device)])
        if w > 1:
            torch.distributed.all_reduce(pair)   # sums over ranks; big is the same on each
            pair = pair / w
        small_sq, big_sq = (float(v) for v in pair.cpu())
        return self.record(small_sq, big_sq, micro_batch_size, micro_batch_size * a * w)

    def record(self, small_sq: float, big_sq: float, b_small: int, b_big: int
               ) -> NoiseReading | None:
        """Add one pair measured elsewhere (``step`` calls this)."""
        if not (math.isfinite(small_sq) and math.isfinite(big_sq)):
            self.skipped += 1
            return None
        g, t = (float(x[0]) for x in per_measurement([small_sq], [big_sq], b_small, b_big,
                                                     self._n_data(b_big)))
        self._fold(g, t)
        reading = NoiseReading(self._steps, small_sq, big_sq, b_small, b_big, g, t,
                               self.b_simple)
        self.readings.append(reading)
        return reading

    def skip_last(self) -> None:
        """Drop the last reading (e.g. the caller learnt that its gradient was clipped)."""
        if self.readings:
            self.readings.pop()
            self.skipped += 1
            # The moving averages are rebuilt from the kept readings, in order.
            self._ema_g = self._ema_t = 0.0
            self._ema_n = 0
            for r in self.readings:
                self._fold(r.grad_sq_norm, r.trace_sigma)

    def _fold(self, grad_sq: float, trace: float) -> None:
        """One step's unbiased |G|^2 and tr(Sigma) into their moving averages."""
        self._ema_g = self.ema * self._ema_g + (1 - self.ema) * grad_sq
        self._ema_t = self.ema * self._ema_t + (1 - self.ema) * trace
        self._ema_n += 1

    def _n_data(self, b_big: int) -> int | None:
        return self.n_data if self.n_data is not None and self.n_data >= b_big else None

    # ------------------------------------------------------------------ results

    @property
    def grad_sq_norm(self) -> float | None:
        """Bias-corrected moving average of the unbiased ``|G|^2`` estimates."""
        return self._ema_g / (1 - self.ema ** self._ema_n) if self._ema_n else None

    @property
    def trace_sigma(self) -> float | None:
        return self._ema_t / (1 - self.ema ** self._ema_n) if self._ema_n else None

    @property
    def b_simple(self) -> float | None:
        """``tr(Sigma) / |G|^2`` of the two moving averages; None until ``|G|^2`` is positive."""
        g, t = self.grad_sq_norm, self.trace_sigma
        if g is None or t is None or g <= 0:
            return None
        return max(t, 0.0) / g

    def estimate(self, last: int | None = None, seed: int = 0) -> NoiseEstimate:
        """``B_simple`` with a 90% bootstrap interval over the last ``last`` readings (default:
        the window), all at the same pair of batch sizes. Raises UsageError with fewer than 2."""
        chosen = self.readings[-(last or self.window):]
        if chosen:
            key = (chosen[-1].b_small, chosen[-1].b_big)
            chosen = [r for r in chosen if (r.b_small, r.b_big) == key]
        if len(chosen) < 2:
            raise UsageError(f"{len(chosen)} measured step(s) so far; the interval needs at "
                             "least 2")
        return estimate_from_norms([r.small_sq for r in chosen], [r.big_sq for r in chosen],
                                   chosen[-1].b_small, chosen[-1].b_big,
                                   self._n_data(chosen[-1].b_big), seed=seed)

    def advice(self, batch_size: int) -> str | None:
        """One line when the last window says the (global) ``batch_size`` could grow: the
        interval's lower end of ``B_simple`` is at least twice it. None otherwise."""
        try:
            est = self.estimate()
        except UsageError:
            return None
        lower = est.b_simple_lower
        if lower is None or lower < GROW_FACTOR * batch_size:
            return None
        return (f"B_simple is at least {lower:,.0f} (90% interval, last {est.measurements} "
                f"steps), over {GROW_FACTOR:g}x the batch of {batch_size:,}: a larger batch "
                "would take fewer steps for nearly the same number of samples")

    def close(self) -> None:
        """Remove the gradient hooks."""
        for h in self._handles:
            h.remove()
        self._handles = []

