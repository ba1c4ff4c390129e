"""The Hugging Face ``Trainer`` callback that measures the gradient noise scale during
``trainer.train()`` (``NoiseScaleCallback``); the monitor itself is
``bsselect.selection.noise_monitor``."""

from __future__ import annotations

from typing import Any, Optional

import torch

from ..errors import UsageError
from . import batch_len, loader_sampling
from .hf import _loss_shifts_labels, label_tokens


def _trainer_callback_base() -> type:
    try:
        from transformers import TrainerCallback
    except ImportError as exc:  # pragma: no cover - the hf extra is missing
        raise UsageError("NoiseScaleCallback needs transformers (pip install "
                         "'bsselect[hf]')") from exc
    return TrainerCallback


def loss_takes_items(model: Any) -> bool:
    """Whether ``model``'s own loss divides by ``num_items_in_batch`` when the ``Trainer``
    passes it: its ``forward`` hands its kwargs to ``self.loss_function`` (GPT-2, Llama, BERT's
    masked LM) or names ``num_items_in_batch``. BERT's classification heads take ``**kwargs``
    (so the Trainer passes it and skips dividing by the accumulation steps) but compute a
    plain mean. Read from the source of the ``forward`` the model runs; True where there is
    none to read."""
    import inspect

    forward = getattr(type(model), "forward", None)
    try:
        source = inspect.getsource(forward)
    except (OSError, TypeError):
        return True
    return "loss_function(" in source or "num_items_in_batch" in source


def NoiseScaleCallback(every: int = 1, window: int = 64, ema: float = 0.95) -> Any:
    """A Hugging Face ``TrainerCallback`` that measures the gradient noise scale ``B_simple``
    during ``trainer.train()`` from the gradients the run computes anyway: the micro-batches
    of ``gradient_accumulation_steps`` and the ranks of DDP (``bsselect.selection.noise_monitor``).
    Each log line gains ``b_simple`` (in ``trainer.state.log_history`` and the callbacks after
    this one) once the moving average's ``|G|^2`` is told from zero (``monitor.resolved``);
    the monitor is ``callback.monitor`` (``.estimate()`` gives an interval). A model whose
    loss ignores ``num_items_in_batch`` though the Trainer passes it (BERT's heads) is read in
    the same units (``loss_takes_items``).

    Every step is measured, clipped or not: the Trainer clips (``max_grad_norm``) before
    callbacks run, but the monitor reads both norms during the backward passes, before the
    clipping. A step whose micro-batches differ in size (an epoch's last) is not measured. For
    a model that takes ``num_items_in_batch`` (GPT-2, Llama...), the Trainer divides each
    micro-batch's summed token loss by the whole step's token count rather than each mean by
    the number of micro-batches; the callback gives the monitor each micro-batch's label-token
    count (``labels != -100``) before its backward, so each micro-batch's gradient is still
    taken as its own mean (this holds one more gradient-sized buffer during a step). fp16
    loss scaling is not supported (bf16 and fp32 are). Past the first epoch of the Trainer's
    shuffled epochs ``B_simple`` reads low (the batches come from the items not yet seen this
    epoch; docs/noise.md): each line's ``b_simple_past_first_epoch`` is then 1 (else 0) and the
    monitor warns once.

        trainer = Trainer(model, args, train_dataset=data, callbacks=[NoiseScaleCallback()])
    """
    Base = _trainer_callback_base()
    from ..selection.noise_monitor import GradientNoiseMonitor

    class _NoiseScaleCallback(Base):  # type: ignore[misc, valid-type]
        def __init__(self) -> None:
            self.monitor: Optional[GradientNoiseMonitor] = None
            self.advice: Optional[str] = None
            self._sizes: list[int] = []      # items of each micro-batch of this step
            self._tokens: list[Any] = []     # their label tokens, when the loss is per token
            self._handle: Any = None
            self._shifts = False             # a causal LM's loss drops each first label
            self._across = False             # token shares over all ranks (DDP)
            self._takes_items = True         # the model's loss divides by num_items_in_batch
            self._undivided = 0              # this step's micro-batches left undivided

        def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None,
                           train_dataloader: Any = None, **kwargs: Any) -> None:
            import warnings

            if args.fp16:
                warnings.warn("NoiseScaleCallback: fp16 loss scaling is not supported; off",
                              stacklevel=2)
                return
            dataset = getattr(train_dataloader, "dataset", None)
            try:
                n_data = len(dataset) if dataset is not None else None
            except TypeError:
                n_data = None
            dist = torch.distributed
            world = (dist.get_world_size() if dist.is_available() and dist.is_initialized()
                     else 1)
            try:
                self.monitor = GradientNoiseMonitor(
                    model, accumulation_steps=args.gradient_accumulation_steps, every=every,
                    ema=ema, window=window, n_data=n_data, world_size=world,
                    sampling=loader_sampling(train_dataloader),
                    optimizer=kwargs.get("optimizer"))
            except UsageError as exc:
                warnings.warn(f"NoiseScaleCallback is off: {exc}", stacklevel=2)
                return
            self._shifts = _loss_shifts_labels(model)
            self._takes_items = loss_takes_items(model)
            # the Trainer divides by the token total over all ranks (its default) or each
            # rank's own
            self._across = bool(getattr(args, "average_tokens_across_devices", False))
            self._handle = model.register_forward_pre_hook(self._on_forward, with_kwargs=True)

        def _on_forward(self, module: Any, args: Any, kwargs: Any) -> None:
            if not (module.training and torch.is_grad_enabled()):
                return
            self._sizes.append(batch_len((*args, kwargs)))
            shifted = kwargs.get("shift_labels")  # already shifted by the collator
            labels = shifted if shifted is not None else kwargs.get("labels")
            # The Trainer passes num_items_in_batch exactly when the model's loss is the sum
            # over the micro-batch's label tokens divided by the step's total.
            if kwargs.get("num_items_in_batch") is None:
                return
            if not self._takes_items:
                # The Trainer passed it, so it did not divide by the accumulation steps, and
                # this model's loss (a mean) ignores it: the step's gradient is the sum of the
                # micro-batches' means (review: |G|^2 and tr(Sigma) read a^2 too high).
                self._undivided += 1
            elif torch.is_tensor(labels):
                tokens = label_tokens(labels, self._shifts and shifted is None)
                self._tokens.append(tokens)
                self.monitor.weigh_next(tokens)   # before its backward: the unbiased spread

        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self._sizes, self._tokens, self._undivided = [], [], 0

        def on_pre_optimizer_step(self, args: Any, state: Any, control: Any,
                                  **kwargs: Any) -> None:
            if self.monitor is None:
                return
            # One micro-batch size in the step, or the pair has no single b_small.
            micro = self._sizes[0] if len(set(self._sizes)) == 1 else 0
            tokens = self._tokens if len(self._tokens) == len(self._sizes) else None
            if 0 < self._undivided < len(self._sizes):
                micro = 0   # some micro-batches divided, some not: not one convention
            reading = self.monitor.step(micro, micro_weights=tokens,
                                        weights_across_ranks=self._across,
                                        loss_scale=max(1, self._undivided))
            if reading is not None and self.advice is None:
                self.advice = self.monitor.advice(reading.b_big)

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None,
                   **kwargs: Any) -> None:
            if self.monitor is None or not self.monitor.readings or logs is None:
                return
            extra: dict[str, Any] = {
                "b_simple_past_first_epoch": int(self.monitor.past_first_epoch)}
            # near a minimum |G|^2 is noise: no number rather than a ratio of it
            if self.monitor.b_simple is not None and self.monitor.resolved:
                extra["b_simple"] = self.monitor.b_simple
            logs.update(extra)
            if state.log_history and state.log_history[-1].get("step") == state.global_step:
                state.log_history[-1].update(extra)

        def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if self.monitor is not None:
                self.monitor.close()
            if self._handle is not None:
                self._handle.remove()

    return _NoiseScaleCallback()
