"""Which implementation an optimizer's step runs: for-loop, foreach or fused.

PyTorch optimizers that accept ``foreach``/``fused`` leave both unset by default and decide
at the first step from the parameters' device (``torch.optim.optimizer
._default_to_fused_or_foreach``): ``foreach`` on CUDA (and XPU, MTIA), the per-parameter
for-loop on the CPU. The two differ in memory: foreach ops take every parameter of a group at
once, so their temporaries (Adam's ``exp_avg_sq.sqrt()``, say) are parameter-sized, where the
for-loop's are one parameter's worth at a time; ``fused`` kernels update in place and add no
temporaries at all. A CPU simulation of a step that will run on CUDA must therefore run the
optimizer the way CUDA would.
"""

from __future__ import annotations

from enum import Enum

import torch

# PyTorch's list (torch.optim.optimizer._get_foreach_kernels_supported_devices), without the
# privateuse backend whose name varies.
FOREACH_DEFAULT_DEVICES = ("cuda", "xpu", "mtia")


class OptimizerImpl(str, Enum):
    for_loop = "for-loop"
    foreach = "foreach"
    fused = "fused"


def _group_impl(group: dict, device_type: str) -> OptimizerImpl:
    if group.get("fused"):
        return OptimizerImpl.fused
    if group.get("foreach"):
        return OptimizerImpl.foreach
    chosen_by_device = (group.get("foreach", False) is None and not group.get("differentiable")
                        and device_type in FOREACH_DEFAULT_DEVICES)
    return OptimizerImpl.foreach if chosen_by_device else OptimizerImpl.for_loop


def optimizer_impl(optimizer: torch.optim.Optimizer, device_type: str) -> OptimizerImpl:
    """What ``optimizer.step()`` runs on ``device_type`` (the first group's choice; groups
    rarely differ). Optimizers without a foreach variant (LBFGS, say) count as for-loop."""
    return _group_impl(optimizer.param_groups[0], device_type)


def run_as_on(optimizer: torch.optim.Optimizer, device_type: str) -> OptimizerImpl:
    """Make ``optimizer`` (built on whatever device) run the implementation it would pick on
    ``device_type``: groups the user left to the default get ``foreach=True`` where that
    device defaults to foreach. An explicit user choice is kept. Returns the implementation."""
    for group in optimizer.param_groups:
        if _group_impl(group, device_type) is OptimizerImpl.foreach and group.get("foreach") is None:
            group["foreach"] = True
    return optimizer_impl(optimizer, device_type)
