"""What trains best: short trials, step times that hold on a busy machine, the gradient noise
scale, the ranking and the pick, and the batch size over a run.

``plan`` (a sweep's or schedule's batch sizes and settings from its options), ``sweep`` (run
and rank trials; journaled) built on ``trials`` (one trial) and ``trial_types`` (its result),
``timing`` / ``steptime`` (interleaved timing rounds and the constrained step-time fit),
``formula`` (the step-time and noise fits, b_opt), ``rank`` / ``choice`` (predicted time to
target with an interval, the tied set with the run-to-run spread, and the pick), ``noise`` /
``noise_math`` (B_simple), ``noise_monitor`` (B_simple during a user's own run), ``schedule`` /
``schedule_plan`` (the noise scale over a run and a batch-size warm-up), ``lr_scaling``,
``pareto`` and ``journal``.
"""
