"""Peak training-step memory: simulated on fake tensors, or measured on the CPU allocator."""

from .cpu_truth import cpu_step_peak
from .simulated import Phase, StepPeak, simulate_step_peak

__all__ = ["Phase", "StepPeak", "cpu_step_peak", "simulate_step_peak"]
