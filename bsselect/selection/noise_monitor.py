"""The gradient noise scale during the user's own training run, at almost no cost.

``bsselect noise`` measures ``B_simple`` with extra forward/backward passes at two batch sizes.
A real run already has two batch sizes whenever one optimizer step is built from several
gradients: the micro-batches of gradient accumulation, and the ranks of data parallelism.
McCandlish et al. (2018, App. A.1) estimate the noise scale exactly that way (per-device and
all-reduced gradients). This monitor reads

- ``|g_small|^2``: every backward's gradient of each parameter as autograd hands it over
  (a tensor hook: before it is added to ``.grad`` and before DDP reduces it) — one micro-batch
  of one rank;
- ``|g_big|^2``: ``.grad`` at the end of the step's last backward (accumulated over the
  micro-batches, averaged over the ranks by DDP): read by a callback autograd runs when that
  backward is over, so clipping, unscaling or anything else done to ``.grad`` before
  :meth:`GradientNoiseMonitor.step` does not change it;

and turns each step's pair into unbiased ``|G|^2`` and ``tr(Sigma)`` (``noise_math``), kept as
two separate exponential moving averages (their ratio is ``B_simple``) and, over the last
``window`` measured steps, an estimate with a bootstrap interval like ``bsselect noise``'s.

The loss of each micro-batch is assumed divided by the number of micro-batches (Lightning and
the usual hand-written loop do this; so does the Hugging Face ``Trainer`` for a model that takes
no loss kwargs), so that ``.grad`` after the last one is the mean gradient of the whole step.
The ``Trainer`` divides the summed token losses of a model that takes ``num_items_in_batch``
(GPT-2, Llama...) by the whole step's token count instead; its callback gives each
micro-batch's token count before its backward (``weigh_next``), and the step's ``|G|^2`` and
``tr(Sigma)`` are the weighted U-statistic and residual spread over the micro-batches' hook
gradients (``step``, ``noise.weighted_pair``). One process without
accumulation has a single batch size per step and nothing to compare: the monitor says so
instead of guessing.

Epochs: the estimators assume each step's items are a fresh uniform draw from the dataset.
A loader that shuffles once per epoch (``DataLoader(shuffle=True)``, ``DistributedSampler``,
the HF ``Trainer``) draws each batch from the items not yet seen this epoch; after the first
epoch the model has just fitted the others, so that remainder's mean gradient is larger than
the dataset's and ``|G|^2`` reads high, ``B_simple`` low (2.5-4x low on a 2,000-item MLP over
tens of epochs; docs/noise.md, "During training"). The monitor counts the items of the steps
(``samples_seen``); past ``n_data`` it flags its readings ``past_first_epoch``, warns once and
notes it in ``estimate()``. ``sampling="uniform"`` says the batches are fresh draws.
"""

from __future__ import annotations

import functools
import math
import numbers
import sys
import warnings
from collections import Counter
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from ..errors import UsageError
from .noise_math import (CONFIDENCE, NoiseEstimate, estimate_from_norms, per_measurement,
                         t_quantile, weighted_pair)

DEFAULT_WINDOW = 64   # measured steps behind ``estimate()``
DEFAULT_EMA = 0.95    # decay of the moving averages of |G|^2 and tr(Sigma)
GROW_FACTOR = 2.0     # "the batch could grow" when B_simple's lower bound is this x the batch
MISMATCH_WARN_AFTER = 3   # measured steps in a row with another backward count: warn once
SAMPLINGS = ("epochs", "uniform")
EPOCH_NOTE = (
    "past the first epoch with batches drawn epoch by epoch (shuffled once per epoch): each "
    "batch comes from the items not yet seen this epoch, whose mean gradient is larger than "
    "the whole dataset's once the model has fitted the rest, so |G|^2 reads high and B_simple "
    "low (2.5-4x low measured on a 2,000-item MLP after tens of epochs; docs/noise.md, "
    "'During training'); with fresh uniform draws it is unbiased")


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
    # Items of the steps so far exceed n_data and batches come epoch by epoch: this reading's
    # |G|^2 is that of the items not yet seen this epoch (high), B_simple low (module doc).
    past_first_epoch: bool = False

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model) if _is_ddp(model) else model


def _is_ddp(model: nn.Module) -> bool:
    return isinstance(model, torch.nn.parallel.DistributedDataParallel)


def _world_size() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _check_settings(accumulation_steps: Any, every: Any, window: Any, ema: Any,
                    n_data: Any, world_size: Any, sampling: Any = "epochs") -> None:
    def integer(value: Any) -> bool:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)

    if not (integer(accumulation_steps) and integer(every) and integer(window)
            and isinstance(ema, numbers.Real) and not isinstance(ema, bool)):
        raise UsageError(f"accumulation_steps, every and window must be integers and ema a "
                         f"number; got {accumulation_steps!r}, {every!r}, {window!r}, {ema!r}")
    if accumulation_steps < 1 or every < 1 or window < 2 or not 0 <= ema < 1:
        raise UsageError("accumulation_steps and every must be >= 1, window >= 2 and "
                         "0 <= ema < 1")
    for name, value in (("n_data", n_data), ("world_size", world_size)):
        if value is not None and (not integer(value) or value < 1):
            raise UsageError(f"{name} must be an integer >= 1 or None, got {value!r}")
    if sampling not in SAMPLINGS:
        raise UsageError(f"sampling must be one of {', '.join(SAMPLINGS)}, got {sampling!r}")


def _same_weight(x: Any, c: float) -> bool:
    try:
        x = float(x)
    except (TypeError, ValueError):
        return False
    return math.isclose(x, c, rel_tol=1e-9) or (math.isnan(x) and math.isnan(c))


def _inside_function_backward() -> bool:
    """Whether this hook runs inside an autograd Function's backward: the recomputing backward
    of reentrant activation checkpointing, nested in the micro-batch's own."""
    from torch.autograd.function import BackwardCFunction

    apply = BackwardCFunction.apply.__code__
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code is apply:
            return True
        frame = frame.f_back
    return False


def moved_by(optimizer: Any, params: list[nn.Parameter]) -> list[nn.Parameter]:
    """Those of ``params`` that ``optimizer`` moves: in one of its groups, at an lr above 0.
    A part frozen through the optimizer (a group of lr 0, or left out of it) has gradients
    that say nothing of how the loss moves (review: a frozen backbone's noise went into
    B_simple). The group's lr before any scheduler (``initial_lr``): a warm-up from 0 is
    not a frozen part. All of them when no optimizer is given, or it moves none of them."""
    if optimizer is None:
        return params
    moving = {id(p) for g in getattr(optimizer, "param_groups", ())
              if g.get("initial_lr", g.get("lr", 1)) != 0 for p in g.get("params", ())}
    moved = [p for p in params if id(p) in moving]
    return moved or params


# Readings before the monitor advises a larger batch. The callbacks ask at every measured
# step until it first says yes: on two readings (whose interval covers about half the time)
# it said so in 18 of 100 runs where the truth was below the bar (review).
ADVICE_MIN_READINGS = 16


class GradientNoiseMonitor:
    """``B_simple`` from the gradients a training run computes anyway.

    ``model``: the module being trained (a DDP-wrapped one as is: its ranks are the big batch).
    ``accumulation_steps``: micro-batches per optimizer step. ``every``: measure every N-th step
    (the others cost nothing). ``n_data``: the training set's size, for the finite-population
    correction and to know when the run is past its first epoch (None: an unlimited stream).
    ``sampling``: ``"epochs"`` (the default: each epoch a permutation, as a shuffling
    ``DataLoader``) or ``"uniform"`` (each batch a fresh draw, e.g. ``RandomSampler(
    replacement=True)``); past the first epoch of ``"epochs"`` the readings are flagged
    ``past_first_epoch`` and read B_simple low (module doc). ``scaler``: the
    ``torch.amp.GradScaler`` of an fp16
    run, whose scale the norms are divided by (without it ``B_simple`` is still right, the
    ratio of two norms of the same scaled gradients, but ``grad_sq_norm`` and ``trace_sigma``
    are in scaled units and mix scales when the scale changes). Call :meth:`step` once per
    optimizer step, after the last backward and before ``optimizer.step()`` (or
    ``scaler.step``), on every rank; before or after ``scaler.unscale_`` and clipping alike,
    since both norms are read during the backward passes. ``optimizer``: the run's; the
    parameters it does not move (a group of lr 0, or not in it) are left out, as
    ``bsselect noise`` leaves them (``moved_by``). Every micro-batch of a step must
    have ``micro_batch_size`` items (``drop_last=True``; an epoch's smaller last batch is
    passed as 0, not measured)::

        monitor = GradientNoiseMonitor(model, accumulation_steps=4, scaler=scaler)
        for i, (x, y) in enumerate(loader):               # drop_last=True
            scaler.scale(loss_fn(model(x), y) / 4).backward()
            if (i + 1) % 4 == 0:
                scaler.unscale_(optimizer)
                clip_grad_norm_(model.parameters(), 1.0)
                monitor.step(micro_batch_size=len(x))
                scaler.step(optimizer); scaler.update(); optimizer.zero_grad()
        print(monitor.b_simple, monitor.estimate().b_simple_ci)
    """

    def __init__(self, model: nn.Module, *, accumulation_steps: int = 1, every: int = 1,
                 ema: float = DEFAULT_EMA, window: int = DEFAULT_WINDOW,
                 n_data: int | None = None, world_size: int | None = None,
                 scaler: Any = None, sampling: str = "epochs", optimizer: Any = None) -> None:
        _check_settings(accumulation_steps, every, window, ema, n_data, world_size, sampling)
        if any(p.is_meta for p in model.parameters()):  # its step failed later, raw (review)
            raise UsageError("the model is on the meta device (shapes, no values): it cannot "
                             "train, so there are no gradients to measure; move it to a real "
                             "device first (model.to_empty(device=...) and initialise it)")
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
        self.scaler = scaler
        self.sampling = sampling
        self.samples_seen = 0      # items of the steps so far, all ranks: micro-batch x backwards
        self._epoch_warned = False
        self.readings: list[NoiseReading] = []
        # Steps not measured: uneven micro-batches, a partial accumulation, a non-finite norm.
        self.skipped = 0
        self._steps = 0
        self._backwards = 0
        self._mismatched = 0       # measured steps in a row skipped for their backward count
        self._warned = False
        self._small: list[torch.Tensor] = []   # this step's sum of |hook grad|^2, per backward
        self._pending: torch.Tensor | None = None   # hooks before their backward was counted
        self._open = False                     # a counted backward is running
        self._big: torch.Tensor | None = None  # |.grad|^2 at the end of the a-th backward
        self._ema_g = self._ema_t = 0.0
        self._ema_n = 0
        # Micro-batch weights given before their backward (weigh_next): the queue, the running
        # backward's weight, this step's weights in backward order, sum_j c_j h_j per
        # parameter (the weighted residual spread's cross term needs it) and its dot with .grad.
        self._queued: list[Any] = []                 # floats or 0-d tensors
        self._weight: Any = None
        self._step_weights: list[Any] = []
        self._weighted: list[torch.Tensor | None] = []
        self._cross: torch.Tensor | None = None
        self._unweighed_warned = False
        params = [p for p in _unwrap(model).parameters() if p.requires_grad]
        if not params:
            raise UsageError("the model has no trainable parameters")
        params = moved_by(optimizer, params)
        self._params = params
        self._weighted = [None] * len(params)
        # Backward passes in this step, counted once per pass that reaches any trainable
        # parameter (a model's unused parameters, an HF pooler, get none): a step with another
        # number of micro-batches than ``accumulation_steps`` (an epoch's last, partial one)
        # has a different loss scaling and is not measured. Registered before the tensor
        # hooks, so that a backward is counted before its first gradient is added up.
        from torch.autograd.graph import register_multi_grad_hook

        self._handles = [register_multi_grad_hook(params, self._count_backward, mode="any")]
        self._handles += [p.register_hook(functools.partial(self._on_grad, i))
                          for i, p in enumerate(params)]

    # ------------------------------------------------------------------ hooks

    def _measuring(self) -> bool:
        return self._steps % self.every == 0

    def weigh_next(self, weight: float | torch.Tensor) -> None:
        """The weight of the next micro-batch (its share of the step's loss normaliser: the
        HF ``Trainer`` dividing by the step's token count gives its token count), called before
        its backward, once per micro-batch. With every micro-batch of a step weighed, ``step``
        reads the weighted ``tr(Sigma)`` without bias; weights handed to ``step`` alone give
        its first version, a few percent off where the weights vary (review: -4% to +7%).
        Costs one gradient-sized buffer during the step. A 0-d tensor is taken as it is (no
        host sync until ``step``)."""
        if torch.is_tensor(weight) and weight.dim() == 0 and not weight.is_complex():
            self._queued.append(weight.detach())
            return
        if isinstance(weight, bool) or not isinstance(weight, numbers.Real):
            raise UsageError(f"weigh_next takes a number (a micro-batch's weight), got "
                             f"{weight!r}")
        self._queued.append(float(weight))

    def _on_grad(self, index: int, grad: torch.Tensor) -> None:
        if not self._measuring():
            return
        sq = grad.detach().float().pow(2).sum()
        if self._open:
            self._small[-1] = self._small[-1] + sq
            weight = self._weight
        else:  # a reentrant recompute's backward that ran before its micro-batch's own began
            self._pending = sq if self._pending is None else self._pending + sq
            weight = self._queued[0] if self._queued else None
        if weight is not None:   # a non-finite one makes the step unmeasured, in step()
            acc = self._weighted[index]
            if acc is None:
                self._weighted[index] = grad.detach() * weight
            else:
                acc.add_(grad.detach() * weight)

    def _count_backward(self, grad: torch.Tensor) -> None:
        # The recomputing backward of reentrant checkpointing (use_reentrant=True) runs inside
        # the micro-batch's own: part of that micro-batch, not another one.
        if _inside_function_backward():
            return
        self._backwards += 1
        self._weight = self._queued.pop(0) if self._queued else None
        if not self._measuring():
            return
        self._step_weights.append(self._weight)
        pending, self._pending = self._pending, None
        self._small.append(pending if pending is not None else torch.zeros((), device=grad.device))
        self._open = True
        engine = torch.autograd.Variable._execution_engine
        engine.queue_callback(self._close)
        if self._backwards == self.accumulation_steps:
            # .grad is complete only when autograd is done with this backward, and under DDP
            # only after DDP's own end-of-backward callback (queued later, during the pass)
            # has written the all-reduced gradient: read it from a callback queued by one.
            engine.queue_callback(lambda: engine.queue_callback(self._read_big))

    def _close(self) -> None:
        self._open = False

    def _read_big(self) -> None:
        self._big = sum(p.grad.detach().float().pow(2).sum() for p in self._params
                        if p.grad is not None)
        if any(acc is not None for acc in self._weighted):
            self._cross = sum((p.grad.detach().float() * acc.float()).sum()
                              for p, acc in zip(self._params, self._weighted)
                              if p.grad is not None and acc is not None)

    # ------------------------------------------------------------------ per step

    def step(self, micro_batch_size: int, micro_weights: Sequence[float] | None = None,
             weights_across_ranks: bool = False, loss_scale: float = 1.0
             ) -> NoiseReading | None:
        """Take this step's pair; call it after the step's last backward and before
        ``optimizer.step()`` (before or after clipping and ``scaler.unscale_``: both norms were
        read during the backward passes). ``micro_batch_size``: items in each micro-batch on one
        rank; every micro-batch of the step must have that many (0: unknown or uneven, the step
        is not measured). ``micro_weights``: each micro-batch's share of the step's loss
        normaliser, in backward order, when the losses are not divided equally (the HF
        ``Trainer`` dividing by the step's token count passes the token counts).
        ``weights_across_ranks``: under DDP, the losses were divided by the weights' total over
        all ranks (the ``Trainer``'s ``average_tokens_across_devices``), not each rank's own.
        ``loss_scale``: how many times larger the step's losses were than that convention says
        (the HF ``Trainer`` leaves a micro-batch's mean loss undivided by the accumulation
        steps for a model whose ``forward`` takes ``**kwargs`` but whose loss ignores
        ``num_items_in_batch``, BERT's heads: the number of micro-batches); it is divided out
        of the norms, as the ``scaler``'s scale is. Returns the reading, or None on a step that
        is not measured."""
        if isinstance(loss_scale, bool) or not isinstance(loss_scale, numbers.Real) or not (
                math.isfinite(loss_scale) and loss_scale > 0):
            raise UsageError(f"loss_scale must be a positive number, got {loss_scale!r}")
        if isinstance(micro_batch_size, bool) or not isinstance(
                micro_batch_size, numbers.Integral) or micro_batch_size < 0:
            raise UsageError(f"micro_batch_size must be an integer >= 1 (0: unknown, the step "
                             f"is not measured), got {micro_batch_size!r}")
        measuring = self._measuring()
        self._steps += 1
        smalls, self._small, self._pending = self._small, [], None
        big, self._big = self._big, None
        cross, self._cross = self._cross, None
        weighed, self._step_weights, self._queued = self._step_weights, [], []
        self._weighted = [None] * len(self._params)
        backwards, self._backwards = self._backwards, 0
        # uneven micro-batches (0) are not counted: at most an epoch's last step, late
        self.samples_seen += micro_batch_size * backwards * self.world_size
        if not measuring:
            return None
        self._note_backwards(backwards)
        a, w = self.accumulation_steps, self.world_size
        # Hook gradient h_j is micro-batch j's share of the step's gradient: share_j times its
        # own mean gradient (share 1/a for a loss divided by the accumulation steps; token
        # counts for the HF Trainer's token-weighted loss). Over the step's a * w pieces
        # (DDP averages the ranks: each piece is h_j / w of .grad), the weighted U-statistic
        # |G|^2 = (|sum h|^2 - sum |h_j|^2) / (1 - sum share^2) is unbiased whatever the
        # shares; dividing each piece by its share instead (a per-micro-batch token mean)
        # overstates the small batches' noise when lengths vary, and B_simple read 1.2-2.6x
        # high (review). It is handed on as the equal-piece mean |g_small|^2 that gives the
        # same |G|^2 and tr(Sigma) (with equal shares, exactly a * sum |h_j|^2 as before).
        # Shares over all ranks (the Trainer's average_tokens_across_devices): each piece's
        # weight over the step's global total, which a rank learns from the all-reduce; else
        # each rank's shares sum to 1 and DDP's mean gives every rank 1/w (a rank with 40% of
        # the tokens counted as half read |G|^2 ~4% low: review).
        given = [float(c) for c in weighed if c is not None]
        if given and micro_weights is not None and (
                len(micro_weights) != len(given) or not all(
                    _same_weight(x, c) for x, c in zip(micro_weights, given))):
            raise UsageError("micro_weights differ from the weights given with weigh_next: "
                             "give each micro-batch's weight one way")
        if given and len(given) != len(weighed):   # some micro-batches weighed, some not
            micro_weights = [math.nan] * len(weighed)
        elif given:
            micro_weights = given
        across = weights_across_ranks and micro_weights is not None and w > 1
        shares = self._shares(smalls, big, micro_batch_size, micro_weights, across)
        # The cross term of the weighted spread, from every micro-batch weighed before its
        # backward: this rank's dot of .grad with sum_j share_j h_j (its shares' raw weights
        # over their total, or raw over all ranks: divided by the global total below).
        local_cross = (None if shares is None or not given or cross is None
                       else float(cross) / (1.0 if across else sum(given)))
        if shares is None and w == 1:
            self.skipped += 1
            return None
        # Under DDP every rank joins the all-reduce, a rank whose step is not measurable with
        # zeros and a flag, and then every rank skips alike: a rank that returned before it
        # would leave the others waiting in the collective for ever.
        device = self._params[0].device
        f64 = dict(device=device, dtype=torch.float64)
        if shares is None:
            parts = torch.tensor([0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 1.0], **f64)
        else:
            parts = torch.stack([torch.stack(smalls).sum().to(**f64),
                                 shares.pow(2).sum().to(**f64), big.to(**f64),
                                 shares.sum().to(**f64), torch.zeros((), **f64),
                                 torch.tensor(local_cross or 0.0, **f64),
                                 torch.tensor(float(local_cross is None), **f64)])
        if w > 1:
            torch.distributed.all_reduce(parts)   # sums over ranks; big is the same on each
            if float(parts[4]) > 0:   # some rank could not measure this step
                self.skipped += 1
                return None
            parts = parts / torch.tensor([w * w, 1.0 if across else w * w, w, 1.0, 1.0,
                                          w if across else w * w, 1.0], **f64)
        pieces_sq, share_sq, big_sq, total, _, cross_sq, unweighed = (
            float(v) for v in parts.cpu())
        if across:
            if not total > 0:
                self.skipped += 1
                return None
            share_sq /= total * total
            cross_sq /= total
        if self.scaler is not None:   # the gradients were of the loss times the scale
            scale_sq = float(self.scaler.get_scale()) ** 2
            pieces_sq, big_sq, cross_sq = (pieces_sq / scale_sq, big_sq / scale_sq,
                                           cross_sq / scale_sq)
        if loss_scale != 1.0:
            unit = float(loss_scale) ** 2
            pieces_sq, big_sq, cross_sq = pieces_sq / unit, big_sq / unit, cross_sq / unit
        if share_sq >= 1.0:   # one piece holds the whole step: nothing to compare
            self.skipped += 1
            return None
        pieces = a * w
        if unweighed == 0:   # every micro-batch of every rank weighed before its backward
            small_sq, big_sq = weighted_pair(big_sq, pieces_sq, cross_sq, share_sq, pieces)
        else:
            # Equal shares, or weights handed to step() alone: tr(Sigma) / b_big read as
            # |g_big|^2 - |G|^2, exact with equal shares and a few percent off otherwise.
            if micro_weights is not None and not self._unweighed_warned and (
                    share_sq * pieces > 1.0 + 1e-9):
                self._unweighed_warned = True
                warnings.warn("GradientNoiseMonitor: micro_weights given to step() alone: "
                              "tr(Sigma) reads a few percent off where the weights vary; give "
                              "each micro-batch's weight with weigh_next() before its backward",
                              stacklevel=2)
            g2 = (big_sq - pieces_sq) / (1.0 - share_sq)
            small_sq = pieces * big_sq - (pieces - 1) * g2
        return self.record(small_sq, big_sq, micro_batch_size, micro_batch_size * a * w)

    def _shares(self, smalls: list[torch.Tensor], big: torch.Tensor | None,
                micro_batch_size: int, micro_weights: Sequence[float] | None,
                across: bool) -> torch.Tensor | None:
        """This rank's micro-batch shares of the step (float64), or None where the step cannot
        be measured here: a missing or extra backward, uneven micro-batches, bad weights."""
        a = self.accumulation_steps
        if big is None or len(smalls) != a or micro_batch_size < 1 or (
                micro_weights is not None and len(micro_weights) != a):
            return None
        if micro_weights is None:
            return torch.full((a,), 1.0 / a, dtype=torch.float64)
        try:
            shares = torch.tensor([float(x) for x in micro_weights], dtype=torch.float64)
        except (TypeError, ValueError):
            return None
        if not (bool(torch.isfinite(shares).all()) and float(shares.min()) >= 0
                and (across or float(shares.sum()) > 0)):
            return None
        return shares if across else shares / shares.sum()

    def _note_backwards(self, backwards: int) -> None:
        """Warn once when measured steps keep having another number of backward passes than
        ``accumulation_steps`` (nothing would ever be measured, silently)."""
        if backwards == self.accumulation_steps:
            self._mismatched = 0
            return
        self._mismatched += 1
        if self._mismatched == MISMATCH_WARN_AFTER and not self._warned:
            self._warned = True
            warnings.warn(
                f"GradientNoiseMonitor: {self._mismatched} steps in a row had {backwards} "
                f"backward passes, not accumulation_steps={self.accumulation_steps}; none of "
                "them is measured. Pass the number of micro-batches per optimizer step, and "
                "call step() once per optimizer step", stacklevel=3)

    def record(self, small_sq: float, big_sq: float, b_small: int, b_big: int
               ) -> NoiseReading | None:
        """Add one pair measured elsewhere (``step`` calls this)."""
        if not (math.isfinite(small_sq) and math.isfinite(big_sq)):
            self.skipped += 1
            return None
        g, t = (float(x[0]) for x in per_measurement([small_sq], [big_sq], b_small, b_big,
                                                     self._n_data(b_big)))
        self._fold(g, t)
        late = self.past_first_epoch
        reading = NoiseReading(self._steps, small_sq, big_sq, b_small, b_big, g, t,
                               self.b_simple, late)
        self.readings.append(reading)
        if late and not self._epoch_warned:
            self._epoch_warned = True
            warnings.warn(f"GradientNoiseMonitor: {self.samples_seen:,} items seen of "
                          f"{self.n_data:,}: {EPOCH_NOTE}. Readings from here on are flagged "
                          "past_first_epoch; pass sampling='uniform' if batches are fresh "
                          "draws", stacklevel=3)
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

    @property
    def past_first_epoch(self) -> bool:
        """Whether the steps so far hold more items than the dataset (``n_data``) with batches
        drawn epoch by epoch: from then on B_simple reads low (module doc)."""
        return (self.sampling == "epochs" and self.n_data is not None
                and self.samples_seen > self.n_data)

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

    def _window(self, last: int | None = None) -> list[NoiseReading]:
        """The last ``last`` readings (default: the window) at the pair of batch sizes most of
        them have (the latest such pair on a tie)."""
        chosen = self.readings[-(last or self.window):]
        if chosen:
            counts = Counter((r.b_small, r.b_big) for r in chosen)
            key = max(reversed([(r.b_small, r.b_big) for r in chosen]), key=counts.__getitem__)
            chosen = [r for r in chosen if (r.b_small, r.b_big) == key]
        return chosen

    @property
    def resolved(self) -> bool:
        """Whether the moving-average ``|G|^2`` is told from zero: its lower 95% t bound (the
        lower end of a 90% interval) is above zero, with the readings weighted as the moving
        average weights them (effective count ``(sum w)^2 / sum w^2``, at least 2). Near a
        minimum it is not, and the moving-average ``B_simple`` is a ratio over noise (finite
        in half the runs of a review); the callbacks log it only when this holds."""
        # readings whose weight is under 1e-9 of the last's add nothing (ema 0: the last alone,
        # one reading, never resolved)
        reach = math.ceil(math.log(1e-9) / math.log(self.ema)) if self.ema > 0 else 1
        depth = min(len(self.readings), reach)
        if depth < 2:
            return False
        g = np.array([r.grad_sq_norm for r in self.readings[-depth:]], dtype=np.float64)
        w = self.ema ** np.arange(len(g) - 1, -1, -1, dtype=np.float64)
        total, total_sq = float(w.sum()), float((w * w).sum())
        n_eff = total * total / total_sq
        if n_eff < 2:
            return False
        mean = float((w * g).sum()) / total
        var = float((w * (g - mean) ** 2).sum()) / (total - total_sq / total)
        se = math.sqrt(var * total_sq) / total
        return mean - t_quantile(1 - (1 - CONFIDENCE) / 2, int(n_eff - 1)) * se > 0

    def estimate(self, last: int | None = None, seed: int = 0) -> NoiseEstimate:
        """``B_simple`` with a 90% bootstrap interval over the last ``last`` readings (default:
        the window) at the pair of batch sizes most of them have (the latest such pair on a
        tie; an epoch's odd last step does not decide it). Raises UsageError with fewer
        than 2."""
        chosen = self._window(last)
        if len(chosen) < 2:
            raise UsageError(f"{len(chosen)} measured step(s) so far; the interval needs at "
                             "least 2")
        late = sum(r.past_first_epoch for r in chosen)
        notes = ([f"{late} of the {len(chosen)} steps are {EPOCH_NOTE}"] if late else [])
        return estimate_from_norms([r.small_sq for r in chosen], [r.big_sq for r in chosen],
                                   chosen[-1].b_small, chosen[-1].b_big,
                                   self._n_data(chosen[-1].b_big), seed=seed, notes=notes)

    def advice(self, batch_size: int) -> str | None:
        """One line when the last window says the (global) ``batch_size`` could grow: the
        interval's lower end of ``B_simple`` is at least twice it, over at least
        ``ADVICE_MIN_READINGS`` readings. None otherwise."""
        try:
            est = self.estimate()
        except UsageError:
            return None
        if est.measurements < ADVICE_MIN_READINGS:
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

